"""``patch_stem``: a small convolutional stem inside each patch, added to the linear patch embedding through a
zero-initialised projection. Checked: it reads each patch's own pixels in the processor's channel-first layout and
nothing of its neighbours, its features start at order one (so the zero projection learns at once), the cached
prefix sees it as the training forward does, and the whole stem learns. Loading a checkpoint without it
unchanged is checked with the other zero-initialised switches in test_patch_positions.py."""

from __future__ import annotations

import torch

from pixel_sail_ros.model.modeling_pixel_sail import PixelSailPatchStem, patch_stem_side
from pixel_sail_ros.model.processing_pixel_sail import SEG_ANSWER, Turn

from .test_modeling import run, sample_for


def test_the_stem_reads_each_patch_alone_in_the_processors_layout(processor, image_factory):
    torch.manual_seed(0)
    stem = PixelSailPatchStem(16, 32)
    torch.nn.init.normal_(stem.proj.weight)
    rows = processor.preprocess_image(image_factory(32, 48, seed=4)).pixel_values.float()  # 2×3 patches
    assert rows.shape == (6, 3 * 16 * 16) and patch_stem_side(16) == 4 and patch_stem_side(14) == 4
    out = stem(rows)
    assert out.shape == (6, 32)
    changed = rows.clone()
    changed[2] += 1.0  # one patch changes: only its own embedding may move
    moved = (stem(changed) - out).abs().amax(dim=1)
    assert moved[2] > 1e-3 and (moved[[0, 1, 3, 4, 5]] == 0).all()
    # channel-first rows: a red-only change differs from the same change spread over the other channels
    red, blue = rows.clone(), rows.clone()
    red[0, : 16 * 16] += 1.0
    blue[0, 2 * 16 * 16:] += 1.0
    assert not torch.allclose(stem(red)[0], stem(blue)[0])


def test_a_fresh_stem_has_unit_scale_features_and_a_zero_projection(model_factory, processor, image_factory):
    model = model_factory(0, patch_stem=True)
    assert model.patch_stem.proj.weight.abs().max() == 0
    rows = processor.preprocess_image(image_factory(64, 64, seed=1)).pixel_values.float()
    features = model.patch_stem.convs(rows.view(-1, 3, 16, 16))
    assert 0.2 < features.std() < 5.0  # He-initialised convolutions; a 0.02-std init would give ~1e-2 here


def test_the_cached_prefix_sees_the_stem_and_the_stem_learns(model_factory, processor, image_factory):
    model = model_factory(0, patch_stem=True)
    with torch.no_grad():
        model.patch_stem.proj.weight.normal_(0.0, 0.05)  # a trained-looking projection, so that it shows
    image = image_factory(80, 112, seed=3)
    prefix = model.prefill(**processor.prefix_inputs(processor.preprocess_image(image)))
    full = run(model, processor, [sample_for(processor, image, [Turn("x", SEG_ANSWER)])])
    torch.testing.assert_close(prefix.pixel_features, full.pixel_features[0], atol=1e-4, rtol=1e-4)
    without = model_factory(0).prefill(**processor.prefix_inputs(processor.preprocess_image(image)))
    assert (without.vision_tokens - prefix.vision_tokens).abs().max() > 1e-2  # the stem reaches the states

    model.train()
    sample = sample_for(processor, image_factory(64, 64, seed=1), [Turn("red circle", SEG_ANSWER)])
    out = model(**processor.model_inputs(processor.collate([sample])))
    out.mask_logits[0].sigmoid().mean().backward()
    for name, param in model.patch_stem.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name
