"""PixelSailConfig: presets, validation, round trip, and the paper presets' parameter counts (meta device)."""

from __future__ import annotations

import pytest
import torch

from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig
from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
from pixel_sail_ros.model.tokenization import build_tiny_tokenizer, special_token_ids

# transformers_notes.md: Qwen2.5 decoders (vocab 151936) counted on the meta device.
QWEN25_05B_TIED = 494_032_768
QWEN25_3B_TIED = 3_085_938_688
ADDED_TOKENS = 22


def head_params(hidden: int, in_dim: int, d_seg: int, blocks: int) -> int:
    """Mask-decoder parameters from the layer shapes of brief §1.4."""
    pre = (hidden * hidden + hidden + hidden * in_dim + in_dim) if hidden > in_dim else 0
    block = (in_dim * in_dim * 4 + in_dim) + (in_dim * 9 + in_dim) + (in_dim * in_dim + in_dim) + 2 * in_dim
    image_projector = in_dim * in_dim + in_dim + in_dim * d_seg + d_seg
    seg_projector = hidden * in_dim + in_dim + in_dim * d_seg + d_seg
    return pre + blocks * block + image_projector + seg_projector


def meta_param_counts(config: PixelSailConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = PixelSailForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("model.", "lm_head.")))
    return total, decoder


@pytest.mark.parametrize(
    ("preset", "hidden", "qwen_tied", "low", "high"),
    [("0.5b", 896, QWEN25_05B_TIED, 0.45e9, 0.55e9), ("3b", 2048, QWEN25_3B_TIED, 3.1e9, 3.4e9)],
)
def test_paper_presets_build_on_meta_with_expected_counts(preset, hidden, qwen_tied, low, high):
    config = PixelSailConfig.from_preset(preset)
    assert config.text_config.hidden_size == hidden
    assert config.patch_size == 16 and config.max_image_size == 1024 and config.seg_hidden_size == 512
    assert config.mask_output_stride == 2 and config.num_upsample_blocks == 3
    total, decoder = meta_param_counts(config)
    # The decoder is exactly a tied Qwen2.5 of that shape, with the 22 Pixel-SAIL tokens' embedding rows.
    assert decoder == qwen_tied + ADDED_TOKENS * hidden
    in_dim = min(hidden, 1024)
    extras = 3 * 16 * 16 * hidden + hidden * hidden + head_params(hidden, in_dim, 512, 3)
    assert total == decoder + extras
    assert low < total < high


def test_3b_has_pre_projector_and_05b_does_not():
    for preset, expected in (("0.5b", False), ("3b", True)):
        config = PixelSailConfig.from_preset(preset)
        with torch.device("meta"):
            model = PixelSailForConditionalGeneration(config)
        assert (model.image_feature_pre_projector is not None) is expected
        assert model.upsample_blocks[0][0].in_channels == min(config.text_config.hidden_size, 1024)


def test_tiny_preset_fields_and_special_ids():
    config = PixelSailConfig.from_preset("tiny")
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (256, 6, 4, 2)
    assert text.intermediate_size == 768 and text.rope_parameters["rope_theta"] == 10000.0
    assert text.rope_parameters["mrope_section"] == [0, 16, 16]
    assert (config.patch_size, config.max_image_size, config.seg_hidden_size, config.mask_output_stride) == (16, 224, 128, 4)
    assert config.num_upsample_blocks == 2
    tokenizer = build_tiny_tokenizer()
    assert text.vocab_size == len(tokenizer)
    assert config.special_ids() == special_token_ids(tokenizer)
    assert text.pad_token_id == config.pad_token_id and text.eos_token_id == config.eos_token_id


def test_mrope_section_follows_head_dim():
    assert PixelSailConfig.from_preset("3b").text_config.rope_parameters["mrope_section"] == [0, 32, 32]
    assert PixelSailConfig.from_preset("0.5b").text_config.rope_parameters["mrope_section"] == [0, 16, 16]


def test_overrides_reach_top_level_and_decoder():
    config = PixelSailConfig.from_preset("tiny", num_hidden_layers=2, mask_output_stride=2, rope_theta=1e6)
    assert config.text_config.num_hidden_layers == 2
    assert config.mask_output_stride == 2 and config.num_upsample_blocks == 3
    assert config.text_config.rope_parameters["rope_theta"] == 1e6
    with pytest.raises(ValueError, match="no_such_field"):
        PixelSailConfig.from_preset("tiny", no_such_field=1)
    with pytest.raises(ValueError, match="unknown preset"):
        PixelSailConfig.from_preset("7b")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask_output_stride": 3}, "power of two"),
        ({"max_image_size": 200}, "multiple of patch_size"),
        ({"image_std": [0.2, 0.0, 0.2]}, "image_std"),
        ({"num_attention_heads": 8, "hidden_size": 48}, "head_dim"),
    ],
)
def test_invalid_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        PixelSailConfig.from_preset("tiny", **overrides)


def test_config_round_trip(tmp_path):
    config = PixelSailConfig.from_preset("tiny", distill_pixel_dim=8)
    config.save_pretrained(tmp_path)
    loaded = PixelSailConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.text_config.rope_parameters["mrope_section"] == [0, 16, 16]
