"""The interleaved row/column rotary (config ``mrope_layout``): what each image axis gets, and the model with it."""

from __future__ import annotations

import pytest
import torch

from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig
from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
from pixel_sail_ros.model.rotary import InterleavedMRotaryEmbedding
from pixel_sail_ros.training.probe import prefill_image


def _angles(model, t, h, w):
    """Rotary angles (radians, one per frequency slot) the decoder applies at one (t, h, w) position."""
    rotary = model.model.rotary_emb
    pos = torch.tensor([t, h, w]).view(3, 1, 1)
    cos, sin = rotary(torch.zeros(1, 1, 1), pos)
    half = cos.shape[-1] // 2
    return torch.atan2(sin[0, 0, :half], cos[0, 0, :half])


@pytest.mark.parametrize("layout", ["chunked", "interleaved"])
def test_text_positions_give_plain_rope_in_both_layouts(model_factory, layout) -> None:
    model = model_factory(mrope_layout=layout)
    inv_freq = model.model.rotary_emb.inv_freq
    for p in (1, 3, 17):
        want = torch.atan2(torch.sin(p * inv_freq), torch.cos(p * inv_freq))
        torch.testing.assert_close(_angles(model, p, p, p), want, rtol=0, atol=1e-5)


def test_interleaving_gives_columns_the_fast_frequencies_that_chunks_give_rows_only(model_factory) -> None:
    chunked, interleaved = model_factory(mrope_layout="chunked"), model_factory(mrope_layout="interleaved")
    assert isinstance(interleaved.model.rotary_emb, InterleavedMRotaryEmbedding)
    fastest = {}
    for name, m in (("chunked", chunked), ("interleaved", interleaved)):
        base = _angles(m, 0, 0, 0)
        fastest[name] = {  # the largest rotation one step along each image axis causes
            "row": float((_angles(m, 0, 1, 0) - base).abs().max()),
            "col": float((_angles(m, 0, 0, 1) - base).abs().max()),
        }
    assert fastest["chunked"]["row"] == pytest.approx(1.0, abs=1e-5)
    assert fastest["chunked"]["col"] < 0.011  # rope_theta 1e4, head_dim 64: 1e4^(-1/2) rad per column
    assert fastest["interleaved"]["row"] == pytest.approx(1.0, abs=1e-5)
    assert fastest["interleaved"]["col"] > 0.5  # 1e4^(-1/32) ≈ 0.75 rad per column


def _image_states(model, processor, image, mirror_axis=None):
    return prefill_image(model, processor, image, mirror_axis)[1].vision_tokens


def test_the_image_tokens_see_column_order_only_when_interleaved(model_factory, processor, image_factory) -> None:
    image = image_factory(160, 224, seed=3)
    change = {}
    for layout in ("chunked", "interleaved"):
        m = model_factory(seed=1, mrope_layout=layout)
        a = _image_states(m, processor, image)
        change[layout] = {axis: float((a - _image_states(m, processor, image, i)).norm() / a.norm())
                          for axis, i in (("row", 1), ("col", 2))}
    assert change["chunked"]["col"] < 0.2 * change["chunked"]["row"]
    assert change["interleaved"]["col"] > 0.5 * change["interleaved"]["row"]


def test_interleaved_layout_survives_save_and_load(model_factory, processor, image_factory, tmp_path) -> None:
    model = model_factory(seed=2, mrope_layout="interleaved")
    model.save_pretrained(tmp_path)
    loaded = PixelSailForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.mrope_layout == "interleaved"
    assert isinstance(loaded.model.rotary_emb, InterleavedMRotaryEmbedding)
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    image = image_factory(96, 128, seed=4)
    torch.testing.assert_close(_image_states(loaded, processor, image), _image_states(model, processor, image))


def test_layout_is_validated() -> None:
    with pytest.raises(ValueError, match="mrope_layout"):
        PixelSailConfig.from_preset("tiny", mrope_layout="spiral")
    cfg = PixelSailConfig.from_preset("tiny")
    assert cfg.mrope_layout == "chunked"  # the paper's, and every existing checkpoint's
    d = cfg.to_dict()
    d["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 12]  # Qwen2.5-VL's own kind of split
    assert PixelSailConfig(**d).mrope_layout == "chunked"
    with pytest.raises(ValueError, match=r"\[0, k, k\]"):
        PixelSailConfig(**{**d, "mrope_layout": "interleaved"})
