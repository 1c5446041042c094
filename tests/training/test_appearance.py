"""Appearance shifts: camera-like pixel changes and another renderer's outlines, for robustness eval and training."""

from __future__ import annotations

import numpy as np
import pytest

from pixel_sail_ros.training import appearance as shifts
from pixel_sail_ros.training import shapesref as sr
from pixel_sail_ros.training.data import ManifestDataset, ShapesRefDataset
from pixel_sail_ros.training.train import main as train_main

from .test_train import tiny_parts, write_shapes_manifest


@pytest.fixture(scope="module")
def scene() -> sr.Scene:
    return sr.ShapesRefGenerator(seed=21).scene(0)


@pytest.mark.parametrize("name", list(shifts.PHOTOMETRIC_SHIFTS))
def test_photometric_shifts_change_pixels_a_little_and_nothing_else(scene, name):
    out = shifts.apply(name, scene.image, np.random.default_rng(0))
    assert out.shape == scene.image.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(np.int16) - scene.image.astype(np.int16))
    assert diff.max() >= 20, "the shift must be visible (at least at the edges)"
    assert diff.mean() < 12, "and stay a camera's difference, not another scene"
    again = shifts.apply(name, scene.image, np.random.default_rng(0))
    assert np.array_equal(out, again)


def test_none_and_renderer_shifts_leave_pixels_alone(scene):
    for name in ("none", *shifts.RENDERER_SHIFTS):
        assert shifts.apply(name, scene.image, np.random.default_rng(0)) is scene.image


def test_unknown_appearance_is_a_clear_error(scene):
    with pytest.raises(ValueError, match="unknown appearance 'fisheye'"):
        shifts.apply("fisheye", scene.image, np.random.default_rng(0))
    with pytest.raises(ValueError, match="star_inner"):
        sr.ShapesRefGenerator(star_inner=1.2)


def test_pointed_stars_are_thinner_and_everything_else_is_the_spec():
    plain, pointed = sr.ShapesRefGenerator(seed=4), sr.ShapesRefGenerator(seed=4, **shifts.generator_kwargs("pointed-stars"))
    fill = {"plain": [], "pointed": []}
    for i in range(40):
        for key, gen in (("plain", plain), ("pointed", pointed)):
            for o in gen.scene(i).objects:
                lo = sr.SIZE_RANGES[o.size][0]
                assert o.bbox_size >= np.ceil(lo * 160) - 1  # sized from its mask like every other object
                if o.shape == "star":
                    fill[key].append(o.full_mask.sum() / o.bbox_size**2)
    assert len(fill["plain"]) > 10 and len(fill["pointed"]) > 10
    # a star's area over its bounding square falls as its inner radius does (0.45 -> 0.382)
    assert np.mean(fill["pointed"]) < np.mean(fill["plain"]) - 0.03


def test_aliased_rendering_keeps_the_masks():
    plain, aliased = sr.ShapesRefGenerator(seed=9), sr.ShapesRefGenerator(seed=9, **shifts.generator_kwargs("aliased"))
    a, b = plain.scene(3), aliased.scene(3)
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert not np.array_equal(a.image, b.image)


def test_training_augmentation_changes_pixels_not_targets():
    _, processor = tiny_parts()
    base = ShapesRefDataset(processor, seed=2, flip_prob=0.0)
    aug = ShapesRefDataset(processor, seed=2, flip_prob=0.0, appearance_prob=1.0)
    changed = 0
    for key in range(6):
        x, y = base[key], aug[key]
        assert y.image.shape == x.image.shape
        changed += not np.array_equal(x.image, y.image)
        assert np.array_equal(aug[key].image, y.image), "an item is the same on every read (exact resume)"
        tx = [m for s in x.sequences for t in s.turns for m in (t.masks or [])]
        ty = [m for s in y.sequences for t in s.turns for m in (t.masks or [])]
        assert len(tx) == len(ty) and all(np.array_equal(m, n) for m, n in zip(tx, ty))
    assert changed == 6
    half = ShapesRefDataset(processor, seed=2, flip_prob=0.0, appearance_prob=0.5)
    kept = sum(np.array_equal(half[k].image, base[k].image) for k in range(40))
    assert 8 <= kept <= 32


def test_manifest_images_are_augmented_too(tmp_path):
    _, processor = tiny_parts()
    manifest = write_shapes_manifest(tmp_path, n=3)
    base, aug = ManifestDataset(processor, manifest), ManifestDataset(processor, manifest, appearance_prob=1.0)
    for key in range(3):
        assert not np.array_equal(base[key].image, aug[key].image)
        assert np.array_equal(aug[key].image, aug[key].image)


def test_train_rejects_a_probability_outside_0_1(tmp_path):
    with pytest.raises(SystemExit, match="--appearance-aug is a probability"):
        train_main(["--data", "shapesref", "--max-steps", "1", "--appearance-aug", "1.5", "--output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir()), "nothing starts before the arguments are checked"
