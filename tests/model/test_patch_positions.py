"""``patch_positions`` / ``pixel_positions``: each patch's (each mask cell's) normalised place in the image, as
Fourier features through a zero-initialised linear, added to its embedding (to its mask features). Checked: the
features mark the same relative place at any grid size, a model fine-tuned into either starts unchanged, the
cached prefix sees the positions as the training forward does, the mask features of a uniform image then vary
with place, and the new weights learn (their gradient is not zero)."""

from __future__ import annotations

from operator import attrgetter

import numpy as np
import pytest
import torch

from pixel_sail_ros.model.modeling_pixel_sail import (
    PixelSailForConditionalGeneration,
    grid_position_features,
    patch_position_features_dim,
)
from pixel_sail_ros.model.processing_pixel_sail import SEG_ANSWER, Turn

from .test_modeling import run, sample_for


def test_features_mark_the_same_relative_place_at_any_grid_size():
    small, large = grid_position_features(2, 4, torch.device("cpu")), grid_position_features(6, 12, torch.device("cpu"))
    assert small.shape[-1] == patch_position_features_dim()
    # patch (r, c) of an h×w grid has its centre where patch (3r+1, 3c+1) of a 3h×3w grid has its own
    for r in range(2):
        for c in range(4):
            torch.testing.assert_close(small[r, c], large[3 * r + 1, 3 * c + 1])
    x, y = large[..., 0], large[..., 1]
    assert (x.diff(dim=1) > 0).all() and (y.diff(dim=0) > 0).all()  # left to right, top to bottom
    torch.testing.assert_close(x, -x.flip(1))  # centred: the mirror image of a column has the opposite x
    assert (large[0, 0] - large[0, 1]).abs().max() > 0.1  # neighbours differ clearly, not just in the slow terms


@pytest.mark.parametrize(
    "switch,module",
    [("pixel_skip", "pixel_skip"), ("patch_positions", "patch_position_embed"), ("pixel_positions", "pixel_position_embed"),
     ("patch_stem", "patch_stem.proj")],
)
def test_a_checkpoint_without_a_zero_initialised_switch_loads_into_it_unchanged(tmp_path, model_factory, processor,
                                                                              image_factory, switch, module):
    plain = model_factory(2)
    plain.save_pretrained(tmp_path)
    grown = PixelSailForConditionalGeneration.from_pretrained(tmp_path, **{switch: True}).eval()
    assert getattr(grown.config, switch) and attrgetter(module)(grown).weight.abs().max() == 0
    sample = sample_for(processor, image_factory(64, 80, seed=2), [Turn("blue star", SEG_ANSWER)])
    torch.testing.assert_close(run(grown, processor, [sample]).mask_logits[0], run(plain, processor, [sample]).mask_logits[0])


def test_the_cached_prefix_sees_the_positions_as_the_training_forward_does(model_factory, processor, image_factory):
    model = model_factory(0, patch_positions=True)
    with torch.no_grad():
        model.patch_position_embed.weight.normal_(0.0, 0.5)  # a trained-looking embedding, so that it shows
    image = image_factory(80, 112, seed=3)
    inputs = processor.preprocess_image(image)
    prefix = model.prefill(**processor.prefix_inputs(inputs))
    full = run(model, processor, [sample_for(processor, image, [Turn("x", SEG_ANSWER)])])
    torch.testing.assert_close(prefix.pixel_features, full.pixel_features[0], atol=1e-4, rtol=1e-4)
    without = model_factory(0).prefill(**processor.prefix_inputs(inputs))
    assert (without.vision_tokens - prefix.vision_tokens).abs().max() > 1e-2  # the positions reach the states


def test_the_embedding_gets_a_gradient_and_needs_the_grid(model_factory, processor, image_factory):
    model = model_factory(1, patch_positions=True).train()
    sample = sample_for(processor, image_factory(64, 64, seed=1), [Turn("red circle", SEG_ANSWER)])
    inputs = processor.model_inputs(processor.collate([sample]))
    out = model(**inputs)
    out.mask_logits[0].sigmoid().mean().backward()
    assert model.patch_position_embed.weight.grad is not None and model.patch_position_embed.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="image_grid_hw"):
        model.embed_inputs(inputs["input_ids"], inputs["pixel_values"])


def test_pixel_positions_let_the_mask_features_of_a_uniform_image_say_where(model_factory, processor):
    model = model_factory(0, pixel_positions=True).eval()
    uniform = np.full((64, 96, 3), 128, np.uint8)
    inputs = processor.prefix_inputs(processor.preprocess_image(uniform))
    plain = model.prefill(**inputs).pixel_features
    with torch.no_grad():
        model.pixel_position_embed.weight.zero_()
        model.pixel_position_embed.weight[0, 0] = 1.0  # channel 0 += x − ½, the cell's column
    placed = model.prefill(**inputs).pixel_features
    h, w = placed.shape[-2:]
    assert (h, w) == tuple(plain.shape[-2:])
    shift = (placed - plain)[0]
    torch.testing.assert_close(shift, (torch.arange(w) + 0.5).div(w).sub(0.5).expand(h, w))  # the column, every row
    torch.testing.assert_close((placed - plain)[1:], torch.zeros_like(placed[1:]))  # no other channel moved
    torch.testing.assert_close(shift, model.pixel_place_features(h, w, shift.device, shift.dtype)[..., 0])
    with pytest.raises(ValueError, match="pixel_positions"):
        model_factory(0).pixel_place_features(h, w, shift.device, shift.dtype)


def test_the_cached_prefix_sees_the_pixel_positions_and_they_get_a_gradient(model_factory, processor, image_factory):
    model = model_factory(1, pixel_positions=True)
    with torch.no_grad():
        model.pixel_position_embed.weight.normal_(0.0, 0.5)
    image = image_factory(80, 112, seed=3)
    prefix = model.eval().prefill(**processor.prefix_inputs(processor.preprocess_image(image)))
    sample = sample_for(processor, image, [Turn("red circle", SEG_ANSWER)])
    out = model.train()(**processor.model_inputs(processor.collate([sample])))
    torch.testing.assert_close(prefix.pixel_features, out.pixel_features[0], atol=1e-4, rtol=1e-4)
    out.mask_logits[0].sigmoid().mean().backward()
    assert model.pixel_position_embed.weight.grad.abs().max() > 0
