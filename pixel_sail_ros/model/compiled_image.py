"""``torch.compile`` for the two passes of a request whose size is the image's: the prefix through the decoder
and the pixel decoder.

Why: on a small CPU most of a request is these two passes (README "Performance": ~15 and ~13 ms of the tiny
model's ~35 ms at 640×480), and eagerly a good share of each is per-operator work around the matrix products
(norms, rotary, GELU, adds, layout copies) that the compiler fuses. Both passes have the same shapes frame after
frame (one camera = one patch grid), so each compiles once per grid (``dynamic=False``) and is reused; the text
passes after the prefix, whose lengths change with every question, stay eager (or use ``decoding="compiled"``).
The first frame of each new grid pays the compilation: tens of seconds on a small CPU, less once the compiler's
on-disk cache holds it.
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

    text_model: Callable  # the decoder (Qwen2_5_VLTextModel.forward), used for image prefixes only
    pixel_decoder: Callable[..., torch.Tensor]  # decode_pixel_features

    @classmethod
    def of(cls, model: PixelSailForConditionalGeneration) -> CompiledImagePasses:
        """Wrap ``model``'s passes; nothing compiles until the first prefix runs through them."""
        return cls(
            text_model=torch.compile(model.model.forward, dynamic=False),
            pixel_decoder=torch.compile(model.decode_pixel_features, dynamic=False),
        )
