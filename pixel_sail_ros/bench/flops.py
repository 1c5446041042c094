"""Analytic FLOP counts of Pixel-SAIL's image prefix, from the config and the token count.

Why analytic: the efficiency figure (achieved FLOP/s ÷ the device's own matmul FLOP/s) needs the work the
prefix *must* do, independent of how an implementation happens to do it. Only matmul-class work is counted
(2 FLOPs per multiply-add); norms, rotary, softmax, activations and biases are left out (they are O(N·h),
a fraction of a percent here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class DecoderShape:
    """The decoder sizes a FLOP count needs (read from a ``PixelSailConfig``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        text = config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
                   head_dim, text.intermediate_size, text.vocab_size)


def layer_flops(shape: DecoderShape, tokens: int, context: int | None = None) -> dict[str, int]:
    """One decoder layer on ``tokens`` new tokens attending to ``context`` keys (default: the same tokens).

    Returns the parts: q/k/v/o projections, attention scores + weighted values, and the gated MLP.
    """
    n, h, d = tokens, shape.hidden, shape.head_dim
    keys = tokens if context is None else context
    q_out, kv_out = shape.heads * d, shape.kv_heads * d
    return {
        "attn_proj": 2 * n * h * q_out + 2 * 2 * n * h * kv_out + 2 * n * q_out * h,
        "attn_core": 2 * 2 * shape.heads * n * keys * d,  # Q·Kᵀ and P·V; the prefix is bidirectional: all N²
        "mlp": 3 * 2 * n * h * shape.intermediate,  # gate, up, down
    }


def decoder_flops(config: Any, tokens: int) -> int:
    """FLOPs of the decoder layers alone over a bidirectional block of ``tokens`` tokens."""
    shape = DecoderShape.from_config(config)
    return shape.layers * sum(layer_flops(shape, tokens).values())


def prefix_flops(config: Any, tokens: int, patches: int | None = None) -> int:
    """FLOPs of the image prefix forward: every decoder layer over ``tokens`` tokens, plus vis_embed.

    ``tokens`` counts the whole prefix (``<vision>`` + patches + ``</vision>``); ``patches`` defaults to
    ``tokens - 2``. This is the number the efficiency figure is built on.
    """
    patches = tokens - 2 if patches is None else patches
    vis_embed = 2 * patches * (3 * config.patch_size**2) * config.text_config.hidden_size
    return decoder_flops(config, tokens) + vis_embed + patches * patch_stem_flops(config)


def patch_stem_flops(config: Any) -> int:
    """FLOPs of ``config.patch_stem`` for one patch (0 without it): its two convolutions and its projection."""
    if not getattr(config, "patch_stem", False):
        return 0
    from pixel_sail_ros.model.modeling_pixel_sail import PATCH_STEM_CHANNELS, patch_stem_side, stride2_side

    c1, c2 = PATCH_STEM_CHANNELS
    first, second = stride2_side(config.patch_size), patch_stem_side(config.patch_size)
    return 2 * (first**2 * c1 * 3 * 9 + second**2 * c2 * c1 * 9 + second**2 * c2 * config.text_config.hidden_size)


def pixel_decoder_flops(config: Any, grid_hw: Sequence[int]) -> int:
    """FLOPs of the mask decoder's per-pixel features (pre-projector, upsample blocks, pixel skip, feature projector).

    Each upsample block: 2×2 stride-2 transposed conv (C→C), depthwise 3×3 and pointwise 1×1 at the doubled
    resolution. Computed once per frame, lazily on the first [SEG] of an answer (``PixelSailPrefix.pixel_features``),
    so it belongs to the answer time, not to the prefix.
    """
    h = config.text_config.hidden_size
    c = config.vision_feature_dim
    pixels = int(grid_hw[0]) * int(grid_hw[1])
    total = 2 * pixels * (h * h + h * c) if h > c else 0
    if not config.use_upsampler:  # the ablation baseline: projected per patch, then interpolated (no matmul)
        return total + 2 * pixels * (c * c + c * config.seg_hidden_size)
    for _ in range(config.num_upsample_blocks):
        total += 2 * pixels * c * c * 4  # transposed conv: every input pixel feeds a 2×2 output block
        pixels *= 4
        total += 2 * pixels * c * 9 + 2 * pixels * c * c  # depthwise + pointwise
    if config.pixel_skip:
        total += 2 * pixels * 3 * config.mask_output_stride**2 * c  # each cell's raw pixels → C
    total += 2 * pixels * (c * c + c * config.seg_hidden_size)  # image_feature_projector (Linear, ReLU, Linear)
    return total


def prefill_flops(config: Any, grid_hw: Sequence[int], turn_tokens: int = 0, turn_logits: int = 1) -> dict[str, int]:
    """All the matmul work of ``model.prefill`` for one image: the prefix and one LM-head row (the pixel decoder
    runs later, only for answers with a [SEG]: see ``pixel_decoder_flops``). With ``turn_tokens``, the first turn
    read in the same pass (``first_turn_ids``): those tokens over the prefix and themselves, and ``turn_logits``
    LM-head rows."""
    patches = int(grid_hw[0]) * int(grid_hw[1])
    shape = DecoderShape.from_config(config)
    parts = {
        "prefix": prefix_flops(config, patches + 2, patches),
        "lm_head": 2 * shape.hidden * shape.vocab * (turn_logits if turn_tokens else 1),
    }
    if turn_tokens:
        # each turn token attends to the prefix and (causally, counted in full here) the turn
        parts["turn"] = shape.layers * sum(layer_flops(shape, turn_tokens, patches + 2 + turn_tokens).values())
    parts["total"] = sum(parts.values())
    return parts


def decode_step_flops(config: Any, context: int) -> int:
    """FLOPs of one greedy decode step (one new token over ``context`` cached + new keys), LM head included."""
    shape = DecoderShape.from_config(config)
    per_layer = sum(layer_flops(shape, 1, context).values())
    return shape.layers * per_layer + 2 * shape.hidden * shape.vocab


__all__ = ["DecoderShape", "decode_step_flops", "decoder_flops", "layer_flops", "pixel_decoder_flops", "prefill_flops", "prefix_flops"]
