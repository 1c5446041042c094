"""The analytic FLOP counter against hand counts and against PyTorch's own FLOP counter on the real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixel_sail_ros.bench import flops
from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig


def test_tiny_prefix_matches_a_hand_count() -> None:
    # tiny: hidden 256, 6 layers, 4 heads × 64, 2 KV heads, MLP 768, patches 16×16×3 = 768 values.
    # A 320×240 frame → 224×176 → 11×14 = 154 patches, 156 prefix tokens.
    cfg = PixelSailConfig.from_preset("tiny")
    n = 156
    q = 2 * n * 256 * 256  # q_proj: 256 → 4·64
    kv = 2 * (2 * n * 256 * 128)  # k_proj, v_proj: 256 → 2·64
    o = 2 * n * 256 * 256  # o_proj
    attention = 2 * (2 * 4 * n * n * 64)  # Q·Kᵀ and P·V, 4 heads, all N² pairs (bidirectional prefix)
    mlp = 3 * (2 * n * 256 * 768)  # gate, up, down
    vis_embed = 2 * 154 * 768 * 256
    hand = 6 * (q + kv + o + attention + mlp) + vis_embed
    assert hand == 1_682_276_352  # the arithmetic above, written out once
    assert flops.prefix_flops(cfg, n) == hand
    assert flops.prefix_flops(cfg, n, patches=154) == hand


def test_half_b_prefix_matches_a_hand_count() -> None:
    # 0.5b (Qwen2.5-0.5B): hidden 896, 24 layers, 14 heads × 64, 2 KV heads, MLP 4864; 320×240 → 15×20 patches.
    cfg = PixelSailConfig.from_preset("0.5b")
    n, p = 302, 300
    per_layer = (2 * n * 896 * 896 * 2  # q and o projections (14·64 = 896)
                 + 2 * 2 * n * 896 * 128  # k and v (2·64)
                 + 4 * 14 * n * n * 64  # scores and values
                 + 6 * n * 896 * 4864)  # gated MLP
    hand = 24 * per_layer + 2 * p * 768 * 896
    assert flops.prefix_flops(cfg, n) == hand
    assert 200e9 < hand < 250e9  # ~2 · tokens · 358M decoder weights, plus attention


def test_pixel_decoder_hand_count() -> None:
    cfg = PixelSailConfig.from_preset("tiny")  # stride 4 → 2 upsample blocks at 256 channels, D_seg 128
    g = 11 * 14
    block1 = 2 * g * 256 * 256 * 4 + 2 * (4 * g) * 256 * 9 + 2 * (4 * g) * 256 * 256
    block2 = 2 * (4 * g) * 256 * 256 * 4 + 2 * (16 * g) * 256 * 9 + 2 * (16 * g) * 256 * 256
    projector = 2 * (16 * g) * (256 * 256 + 256 * 128)
    assert flops.pixel_decoder_flops(cfg, (11, 14)) == block1 + block2 + projector
    skip = 2 * (16 * g) * (3 * 4 * 4) * 256
    assert flops.pixel_decoder_flops(PixelSailConfig.from_preset("tiny", pixel_skip=True), (11, 14)) == (
        block1 + block2 + skip + projector)


@pytest.mark.parametrize("switches", [{}, {"pixel_skip": True}, {"patch_stem": True}], ids=["plain", "pixel_skip", "patch_stem"])
def test_prefill_count_equals_torch_flop_counter_on_the_model(switches: dict) -> None:
    """Every matmul/conv the real prefill runs is counted, and nothing else (eager attention: counted matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
    from pixel_sail_ros.model.processing_pixel_sail import PixelSailProcessor
    from pixel_sail_ros.model.tokenization import build_tiny_tokenizer

    cfg = PixelSailConfig.from_preset("tiny", num_hidden_layers=2, **switches)
    torch.manual_seed(0)
    model = PixelSailForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    processor = PixelSailProcessor.from_config(cfg, build_tiny_tokenizer())
    image = processor.preprocess_image(np.zeros((240, 320, 3), np.uint8))
    with FlopCounterMode(display=False) as counter:
        prefix = model.prefill(**processor.prefix_inputs(image))
    expected = flops.prefill_flops(cfg, image.grid_hw)
    assert counter.get_total_flops() == expected["total"]
    per_module = counter.get_flop_counts()
    decoder = sum(per_module["PixelSailForConditionalGeneration.model"].values())
    assert decoder == flops.decoder_flops(cfg, image.grid_hw[0] * image.grid_hw[1] + 2)
    stem = sum(per_module.get("PixelSailForConditionalGeneration.patch_stem", {}).values())
    assert stem == image.grid_hw[0] * image.grid_hw[1] * flops.patch_stem_flops(cfg) and (stem > 0) == bool(switches.get("patch_stem"))
    # the pixel decoder is not part of the prefill: it runs once, when the features are first needed
    assert not prefix.pixel_features_decoded
    with FlopCounterMode(display=False) as counter:
        first = prefix.pixel_features
    assert counter.get_total_flops() == flops.pixel_decoder_flops(cfg, image.grid_hw)
    with FlopCounterMode(display=False) as counter:
        assert prefix.pixel_features is first
    assert counter.get_total_flops() == 0


def test_a_first_turn_read_with_the_prefix_is_counted() -> None:
    """prefill(first_turn_ids=...): the turn's rows over the prefix and the turn, and its LM-head rows. The dense
    attention kernel also scores the prefix's rows against the turn (masked out, not needed): the counter sees
    that block too, and only that differs."""
    from torch.utils.flop_counter import FlopCounterMode

    from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
    from pixel_sail_ros.model.processing_pixel_sail import PixelSailProcessor
    from pixel_sail_ros.model.tokenization import build_tiny_tokenizer

    cfg = PixelSailConfig.from_preset("tiny", num_hidden_layers=2)
    torch.manual_seed(0)
    model = PixelSailForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    processor = PixelSailProcessor.from_config(cfg, build_tiny_tokenizer())
    image = processor.preprocess_image(np.zeros((240, 320, 3), np.uint8))
    turn, logits = list(range(30, 47)), 5
    with FlopCounterMode(display=False) as counter:
        model.prefill(**processor.prefix_inputs(image), first_turn_ids=turn, first_turn_logits=logits)
    expected = flops.prefill_flops(cfg, image.grid_hw, len(turn), logits)
    shape = flops.DecoderShape.from_config(cfg)
    prefix_tokens = image.grid_hw[0] * image.grid_hw[1] + 2
    masked = shape.layers * 2 * 2 * shape.heads * prefix_tokens * len(turn) * shape.head_dim
    assert counter.get_total_flops() == expected["total"] + masked
    assert expected["total"] - flops.prefill_flops(cfg, image.grid_hw)["total"] == (
        expected["turn"] + 2 * shape.hidden * shape.vocab * (logits - 1))


def test_decode_step_grows_with_context_and_includes_the_lm_head() -> None:
    cfg = PixelSailConfig.from_preset("tiny")
    short, long = flops.decode_step_flops(cfg, 160), flops.decode_step_flops(cfg, 320)
    shape = flops.DecoderShape.from_config(cfg)
    assert long - short == 6 * 4 * 4 * 160 * 64  # only attention over the 160 extra keys
    assert short > 2 * shape.hidden * shape.vocab


@pytest.mark.parametrize("tokens", [2, 50, 1000])
def test_prefix_is_superlinear_in_tokens(tokens: int) -> None:
    cfg = PixelSailConfig.from_preset("tiny")
    assert flops.prefix_flops(cfg, 2 * tokens) > 2 * flops.prefix_flops(cfg, tokens)
