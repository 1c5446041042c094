"""``torch.compile`` for the two passes of a request whose size is the image's: the prefix through the decoder
and the pixel decoder.

Why: on a small CPU most of a request is these two passes (docs/PERFORMANCE.md: ~15 and ~13 ms of the tiny
model's ~35 ms at 640×480), and eagerly a good share of each is per-operator work around the matrix products
(norms, rotary, GELU, adds, layout copies) that the compiler fuses. The pixel decoder has the same shapes frame
after frame (one camera = one patch grid), so it compiles once per grid (``dynamic=False``). The prefix pass also
reads the request's first question (``prefill(first_turn_ids=...)``), whose length changes with the question and
its draft: it compiles for the first length it sees and, at the first other length, once more with the length
symbolic (torch.compile's automatic dynamic shapes), then serves every length. The text passes after the prefix
stay eager (or use ``decoding="compiled"``). The first frames pay the compilation: tens of seconds on a small
CPU, less once the compiler's on-disk cache holds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .modeling_pixel_sail import PixelSailForConditionalGeneration


@dataclass(frozen=True)
class CompiledImagePasses:
    """Compiled forms of one model's image-sized passes (what ``prefill(compiled=...)`` runs)."""

    text_model: Callable  # the decoder (Qwen2_5_VLTextModel.forward), used for the prefix pass only
    pixel_decoder: Callable[..., torch.Tensor]  # decode_pixel_features

    @classmethod
    def of(cls, model: PixelSailForConditionalGeneration) -> CompiledImagePasses:
        """Wrap ``model``'s passes; nothing compiles until the first prefix runs through them."""
        return cls(
            text_model=torch.compile(model.model.forward),  # static first, then symbolic lengths (see above)
            pixel_decoder=torch.compile(model.decode_pixel_features, dynamic=False),
        )
