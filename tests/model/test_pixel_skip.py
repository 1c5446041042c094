"""``pixel_skip``: each mask cell's own raw pixels, through a zero-initialised linear, added to the upsampled
features. Checked: the cells are the right pixels, a model fine-tuned into it starts unchanged, the lazy
decoder of a cached prefix equals the training forward, and the skip learns (its gradient is not zero). That a
checkpoint without it loads unchanged is checked with the other zero-initialised switch in test_patch_positions.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig
from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
from pixel_sail_ros.model.processing_pixel_sail import SEG_ANSWER, Turn

from .test_modeling import run, sample_for


@pytest.fixture(scope="module")
def skip_model(model_factory) -> PixelSailForConditionalGeneration:
    m = model_factory(0, pixel_skip=True)
    with torch.no_grad():
        m.pixel_skip.weight.normal_(0.0, 0.5)  # a trained-looking skip, so that it shows in the outputs
    return m


def test_a_fresh_skip_is_zero_and_changes_nothing(model_factory, processor, image_factory):
    plain, skip = model_factory(0), model_factory(0, pixel_skip=True)
    assert skip.pixel_skip.weight.shape == (plain.config.vision_feature_dim, 3 * 4 * 4)
    assert skip.pixel_skip.weight.abs().max() == 0
    skip.load_state_dict(plain.state_dict(), strict=False)
    sample = sample_for(processor, image_factory(96, 128), [Turn("red circle", SEG_ANSWER)])
    torch.testing.assert_close(run(skip, processor, [sample]).mask_logits[0], run(plain, processor, [sample]).mask_logits[0])


def test_stride_cells_are_the_pixels_of_each_mask_cell(skip_model, processor, image_factory):
    inputs = processor.preprocess_image(image_factory(64, 96, seed=5))  # no resize: 64x96 fits the tiny size
    (gh, gw), p, s = inputs.grid_hw, processor.patch_size, skip_model.config.mask_output_stride
    # the normalised image, reassembled from the processor's patches (channel, row, column within a patch)
    image = inputs.pixel_values.view(gh, gw, 3, p, p).permute(2, 0, 3, 1, 4).reshape(3, gh * p, gw * p)
    cells = skip_model.stride_cells(inputs.pixel_values.view(1, gh, gw, -1))[0]
    assert cells.shape == (gh * p // s, gw * p // s, 3 * s * s)
    rng = np.random.default_rng(0)
    for y, x in zip(rng.integers(0, cells.shape[0], 20), rng.integers(0, cells.shape[1], 20)):
        expected = image[:, y * s:(y + 1) * s, x * s:(x + 1) * s].reshape(-1)
        torch.testing.assert_close(cells[y, x], expected)


def test_cached_prefix_decodes_the_same_pixel_features_as_the_full_forward(skip_model, processor, image_factory):
    inputs = processor.preprocess_image(image_factory(80, 112, seed=3))
    prefix = skip_model.prefill(**processor.prefix_inputs(inputs))
    full = run(skip_model, processor, [sample_for(processor, image_factory(80, 112, seed=3), [Turn("x", SEG_ANSWER)])])
    torch.testing.assert_close(prefix.pixel_features, full.pixel_features[0], atol=1e-4, rtol=1e-4)
    without = skip_model.decode_pixel_features(prefix.vision_tokens.unsqueeze(0), torch.zeros(1, *inputs.grid_hw,
                                                                                            inputs.pixel_values.shape[-1]))
    assert (without[0] - prefix.pixel_features).abs().max() > 1e-3  # the pixels themselves reach the features


def test_the_skip_gets_a_gradient_from_the_mask_loss(model_factory, processor, image_factory):
    model = model_factory(1, pixel_skip=True).train()
    sample = sample_for(processor, image_factory(64, 64, seed=1), [Turn("red circle", SEG_ANSWER)])
    out = model(**processor.model_inputs(processor.collate([sample])))
    out.mask_logits[0].sigmoid().mean().backward()
    assert model.pixel_skip.weight.grad is not None and model.pixel_skip.weight.grad.abs().max() > 0


def test_the_skip_needs_the_upsampler():
    with pytest.raises(ValueError, match="pixel_skip"):
        PixelSailConfig.from_preset("tiny", pixel_skip=True, use_upsampler=False)
