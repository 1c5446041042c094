"""The decoder's 3-axis rotary with the row and column frequencies interleaved (config ``mrope_layout``).

Why: the authors' split ``[0, d/4, d/4]``, laid out in chunks as Qwen2-VL does, gives the row axis the
fastest half of the frequencies and the column axis the slowest half. With rope_theta 1e4 and head_dim 64
the column rotation is 0.01 to 0.00013 rad per patch, so across a 14-patch image the columns hardly differ: a
trained `tiny` model's image states change by 30 % when the row positions are mirrored and by 0.5 % when the
column positions are (README, "The model"). Its image tokens are rows of nearly unordered patches, which hides
shape and left/right. Interleaving (as Qwen3-VL does) gives slot 2i to the rows and 2i+1 to the columns, so
both axes span the whole range of frequencies. Text-only positions (t = h = w) give exactly the plain 1-D
RoPE of the chunked layout (slot i turns by position × inv_freq[i] in both), so a pretrained Qwen2 LLM keeps
its text behaviour. Only image positions change: a checkpoint trained with the chunked layout has to be
fine-tuned into this one (the bundled model's stage 5 was).
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding


class InterleavedMRotaryEmbedding(Qwen2_5_VLRotaryEmbedding):
    """Qwen2.5-VL's rotary for sections ``[0, k, k]``, with frequency slot 2i on rows and 2i+1 on columns.

    (The class name keeps "RotaryEmbedding": transformers re-initialises such modules' frequency buffers when
    it loads a model.)
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        t, h, w = self.mrope_section
        if t != 0 or h != w:
            raise ValueError(f"the interleaved layout needs mrope_section [0, k, k], got {self.mrope_section}")

    def recomposition_frequencies(self, freq: torch.Tensor) -> torch.Tensor:
        """(3, B, L, d/2) per-axis angles → (B, L, d): rows at the even slots, columns at the odd ones."""
        rows, cols = freq[1][..., 0::2], freq[2][..., 1::2]
        mixed = torch.stack((rows, cols), dim=-1).flatten(-2)
        return torch.cat((mixed, mixed), dim=-1)
