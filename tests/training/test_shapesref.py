"""ShapesRef follows DESIGN.md §5: checked from the pixels and masks, with an independent phrase checker."""

from __future__ import annotations

import re
from collections import Counter

import cv2
import numpy as np
import pytest

from pixel_sail_ros.training import shapesref as sr

N_SCENES = 60

# DESIGN.md §5, restated here so a drifting constant in the generator cannot move the test with it.
SPEC_COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (230, 210, 40), "purple": (150, 60, 190), "orange": (240, 140, 30),
}
SPEC_SIZES = {"small": (0.08, 0.14), "large": (0.22, 0.35)}
SPEC_JITTER = 20
SPEC_MAX_HIDDEN = 0.15
SLOT_WORDS = {  # the words each template's slots take
    sr.T_COLOR_SHAPE: set(SPEC_COLORS) | {"circle", "square", "triangle", "star"},
    sr.T_SIZE_COLOR_SHAPE: set(SPEC_COLORS) | {"circle", "square", "triangle", "star", "small", "large"},
    sr.T_SIZE_SHAPE: {"circle", "square", "triangle", "star", "small", "large"},
    sr.T_SIDE: set(SPEC_COLORS) | {"circle", "square", "triangle", "star", "left", "right"},
    sr.T_VERTICAL: set(SPEC_COLORS) | {"circle", "square", "triangle", "star", "top", "bottom"},
    sr.T_EXTREME: {"circle", "square", "triangle", "star", "leftmost", "rightmost", "topmost", "bottommost"},
}
SIZE_WORDS = "|".join(sr.SIZES)
COLOR_WORDS = "|".join(sr.COLORS)
SHAPE_WORDS = "|".join(sr.SHAPES)


@pytest.fixture(scope="module")
def scenes() -> list[sr.Scene]:
    """Scenes from several seeds (indices within a seed are independent draws too)."""
    gens = [sr.ShapesRefGenerator(seed=seed) for seed in (0, 1, 123)]
    return [gens[i % 3].scene(i) for i in range(N_SCENES)]


@pytest.fixture(scope="module")
def scene_exprs(scenes) -> list[tuple[sr.Scene, list[sr.Expression]]]:
    return [(s, sr.expressions(s, np.random.default_rng(s.index), n_absent=6)) for s in scenes]


# --- an independent reading of a scene: attributes from pixels, masks and regexes ---------------------------


def measured_size(scene: sr.Scene, obj: sr.ShapeObject) -> str | None:
    ys, xs = np.nonzero(obj.full_mask)
    rel = max(np.ptp(xs) + 1, np.ptp(ys) + 1) / min(scene.height, scene.width)
    for name, (lo, hi) in SPEC_SIZES.items():
        if lo - 1e-9 <= rel <= hi + 1e-9:
            return name
    return None


def measured_color(scene: sr.Scene, obj: sr.ShapeObject) -> str:
    core = cv2.erode(obj.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    px = scene.image[core if core.any() else obj.mask].astype(float).mean(0)
    return min(SPEC_COLORS, key=lambda c: np.sum((np.asarray(SPEC_COLORS[c]) - px) ** 2))


def measured_shape(obj: sr.ShapeObject) -> str:
    """Star: low solidity; otherwise the area over the enclosing circle's separates circle/square/triangle."""
    m = obj.full_mask.astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate(contours)
    area = float(m.sum())
    hull = cv2.convexHull(pts)
    hull_area = float(cv2.contourArea(hull)) + 0.5 * cv2.arcLength(hull, True) + 1  # pixel-area hull
    if area / hull_area < 0.75:
        return "star"
    (_, _), r = cv2.minEnclosingCircle(pts)
    fill = area / (np.pi * (r + 0.5) ** 2)
    return "circle" if fill > 0.8 else ("square" if fill > 0.52 else "triangle")


def visible_centroid(obj: sr.ShapeObject) -> np.ndarray:
    ys, xs = np.nonzero(obj.mask)
    return np.array([xs.mean(), ys.mean()])


PATTERNS = [
    rf"(?P<direction>leftmost|rightmost|topmost|bottommost) (?P<shape>{SHAPE_WORDS})",
    rf"(?P<color>{COLOR_WORDS}) (?P<shape>{SHAPE_WORDS}) on the (?P<direction>left|right)",
    rf"(?P<color>{COLOR_WORDS}) (?P<shape>{SHAPE_WORDS}) at the (?P<direction>top|bottom)",
    rf"(?P<size>{SIZE_WORDS}) (?P<color>{COLOR_WORDS}) (?P<shape>{SHAPE_WORDS})",
    rf"(?P<size>{SIZE_WORDS}) (?P<shape>{SHAPE_WORDS})",
    rf"(?P<color>{COLOR_WORDS}) (?P<shape>{SHAPE_WORDS})",
]


_READINGS: dict[int, tuple[sr.Scene, list[tuple[str, str, str | None, np.ndarray]]]] = {}


def read_scene(scene: sr.Scene) -> list[tuple[str, str, str | None, np.ndarray]]:
    """(shape, colour, size, visible centroid) of every object, measured once per scene."""
    cached = _READINGS.get(id(scene))
    if cached is None or cached[0] is not scene:
        reading = [
            (measured_shape(o), measured_color(scene, o), measured_size(scene, o), visible_centroid(o))
            for o in scene.objects
        ]
        cached = _READINGS[id(scene)] = (scene, reading)
    return cached[1]


def check(scene: sr.Scene, text: str) -> tuple[list[int], list[int]]:
    """(objects matching the phrase's attribute words, objects the phrase selects), read from pixels."""
    for pattern in PATTERNS:
        m = re.fullmatch(r"(?:the )?" + pattern, text)
        if m:
            break
    else:
        raise AssertionError(f"phrase fits no template: {text!r}")
    words = m.groupdict()
    reading = read_scene(scene)
    base = [
        i for i, (shape, color, size, _) in enumerate(reading)
        if shape == words["shape"] and words.get("color") in (None, color) and words.get("size") in (None, size)
    ]
    direction = words.get("direction")
    if direction is None or not base:
        return base, base
    axis = 0 if direction.startswith(("left", "right")) else 1
    sign = -1 if direction.startswith(("left", "top")) else 1
    keys = {i: sign * reading[i][3][axis] for i in base}
    best = max(keys, key=keys.get)
    others = [v for i, v in keys.items() if i != best]
    if others:  # a clear winner, not a coin toss between near-equal positions
        assert keys[best] - max(others) >= sr.POSITION_MARGIN * min(scene.height, scene.width) - 1e-6, text
    return base, [best]


# --- the image and objects ---------------------------------------------------------------------------------


def test_image_bounds_and_object_counts(scenes):
    counts = Counter()
    for s in scenes:
        assert s.image.dtype == np.uint8 and s.image.shape == (s.height, s.width, 3)
        assert 160 <= s.width <= 640 and 160 <= s.height <= 640
        assert 3 / 4 <= s.height / s.width <= 4 / 3
        assert 2 <= len(s.objects) <= 6
        assert s.background in sr.BACKGROUNDS
        counts[len(s.objects)] += 1
    assert set(counts) == {2, 3, 4, 5, 6}
    assert {s.background for s in scenes} == set(sr.BACKGROUNDS)


def test_colours_within_jitter_and_painted(scenes):
    for s in scenes:
        for o in s.objects:
            nominal = np.asarray(SPEC_COLORS[o.color])
            assert np.all(np.abs(np.asarray(o.rgb) - nominal) <= SPEC_JITTER)
            core = cv2.erode(o.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            if core.any():  # away from anti-aliased edges the object is exactly its colour
                assert np.all(s.image[core] == np.asarray(o.rgb, np.uint8))
            assert measured_color(s, o) == o.color


def test_sizes_measured_from_masks(scenes):
    for s in scenes:
        for o in s.objects:
            x0, y0, x1, y1 = sr.mask_box(o.full_mask)
            assert o.bbox_size == max(x1 - x0, y1 - y0)
            assert measured_size(s, o) == o.size


def test_shapes_drawn_and_rotated(scenes):
    angles = {shape: [] for shape in sr.SHAPES}
    for s in scenes:
        for o in s.objects:
            assert measured_shape(o) == o.shape
            angles[o.shape].append(o.angle)
    for shape in ("square", "triangle", "star"):
        assert np.std(angles[shape]) > 5  # rotated at random, not all upright
    all_objects = [o for s in scenes for o in s.objects]
    assert {o.color for o in all_objects} == set(SPEC_COLORS)
    assert {o.size for o in all_objects} == set(sr.SIZES)


def test_masks_are_visible_pixels_and_occlusion_bounded(scenes):
    overlapped = 0
    for s in scenes:
        above = np.zeros((s.height, s.width), bool)
        for o in reversed(s.objects):  # later objects are drawn on top
            assert np.array_equal(o.mask, o.full_mask & ~above)
            assert o.hidden_fraction <= SPEC_MAX_HIDDEN + 1e-9
            overlapped += o.hidden_fraction > 0
            above |= o.full_mask
            assert o.mask.any()
    assert overlapped > 0  # overlaps do happen


def test_background_is_grey_outside_objects(scenes):
    for s in scenes:
        union = np.zeros((s.height, s.width), np.uint8)
        for o in s.objects:
            union |= o.full_mask.astype(np.uint8)
        outside = ~cv2.dilate(union, np.ones((3, 3), np.uint8)).astype(bool)  # anti-aliased rims excluded
        px = s.image[outside]
        assert np.array_equal(px[:, 0], px[:, 1]) and np.array_equal(px[:, 1], px[:, 2])


def test_background_grey_everywhere_without_antialiasing():
    gen = sr.ShapesRefGenerator(seed=5, antialias=False)
    for i in range(8):
        s = gen.scene(i)
        union = np.logical_or.reduce([o.mask for o in s.objects])
        px = s.image[~union]
        assert np.array_equal(px[:, 0], px[:, 1]) and np.array_equal(px[:, 1], px[:, 2])
        for o in s.objects:
            assert np.all(s.image[o.mask] == np.asarray(o.rgb, np.uint8))


def test_reproducible_and_random_access():
    a, b = sr.ShapesRefGenerator(seed=7), sr.ShapesRefGenerator(seed=7)
    first = [a.scene() for _ in range(3)]  # sequential calls take indices 0, 1, 2
    s2 = b.scene(2)
    assert np.array_equal(first[2].image, s2.image)
    assert [(o.shape, o.color, o.size, o.rgb, o.center) for o in first[2].objects] == [
        (o.shape, o.color, o.size, o.rgb, o.center) for o in s2.objects
    ]
    assert not np.array_equal(sr.ShapesRefGenerator(seed=8).scene(2).image, s2.image)
    (_, x), (_, y) = a.item(4, 6), b.item(4, 6)
    assert [(t.question, t.answer) for t in x] == [(t.question, t.answer) for t in y]


def test_small_sides_option():
    gen = sr.ShapesRefGenerator(seed=1, min_side=160, max_side=224)
    for i in range(5):
        s = gen.scene(i)
        assert 160 <= min(s.height, s.width) and max(s.height, s.width) <= 224


# --- referring expressions -----------------------------------------------------------------------------------


def test_constants_are_the_spec():
    assert sr.COLORS == SPEC_COLORS and sr.SIZE_RANGES == SPEC_SIZES
    assert sr.COLOR_JITTER == SPEC_JITTER and sr.MAX_HIDDEN == SPEC_MAX_HIDDEN
    assert set(sr.SHAPES) == {"circle", "square", "triangle", "star"}
    assert sr.TEMPLATES == (
        "{color} {shape}", "{size} {color} {shape}", "{size} {shape}", "{color} {shape} on the {left|right}",
        "{color} {shape} at the {top|bottom}", "{leftmost|rightmost|topmost|bottommost} {shape}",
    )


def test_every_slot_word_appears_in_every_template(scene_exprs):
    seen: dict[str, set[str]] = {t: set() for t in sr.TEMPLATES}
    for _, es in scene_exprs:
        for e in es:
            seen[e.template] |= set(e.text.split()) - {"the", "on", "at"}
    for template, words in SLOT_WORDS.items():
        assert seen[template] == words, template


def test_every_template_appears_present_and_absent(scene_exprs):
    present = {e.template for _, es in scene_exprs for e in es if e.target is not None}
    absent = {e.template for _, es in scene_exprs for e in es if e.target is None}
    assert present == set(sr.TEMPLATES)
    assert absent == set(sr.TEMPLATES)
    texts = [e.text for _, es in scene_exprs for e in es]
    assert any(t.startswith("the ") for t in texts) and any(not t.startswith("the ") for t in texts)
    for side in ("on the left", "on the right", "at the top", "at the bottom"):
        assert any(t.endswith(side) for t in texts), side
    for word in ("leftmost", "rightmost", "topmost", "bottommost"):
        assert any(f"{word} " in t for t in texts), word


def test_expressions_name_exactly_their_object(scene_exprs):
    for scene, exprs in scene_exprs:
        assert exprs == sorted(set(exprs), key=exprs.index)  # no duplicates
        for e in exprs:
            assert e.text == e.text.lower()
            base, chosen = check(scene, e.text)
            if e.target is None:
                assert base == [] and chosen == [], e
            else:
                assert chosen == [e.target], e
                if e.template in (sr.T_SIDE, sr.T_VERTICAL, sr.T_EXTREME):
                    assert len(base) >= 2, e  # otherwise the plain phrase would be the natural one


def test_horizontal_flip_keeps_the_referent(scene_exprs):
    for scene, exprs in scene_exprs[:20]:
        flipped = sr.hflip_scene(scene)
        assert np.array_equal(flipped.image, scene.image[:, ::-1])
        for e in exprs:
            fe = sr.hflip_expression(e)
            assert fe.target == e.target
            _, chosen = check(flipped, fe.text)
            assert chosen == ([] if e.target is None else [e.target]), (e, fe)
    assert sr.flip_text("the red star on the left") == "the red star on the right"
    assert sr.flip_text("leftmost circle") == "rightmost circle"
    assert sr.flip_text("the rightmost square at the top") == "the leftmost square at the top"


def test_flip_of_shapes_is_consistent(scenes):
    for s in scenes[:10]:
        f = sr.hflip_scene(s)
        for o, fo in zip(s.objects, f.objects):
            assert np.allclose(visible_centroid(fo)[0], s.width - 1 - visible_centroid(o)[0])
            assert np.allclose(fo.center, (s.width - 1 - o.center[0], o.center[1]))
            assert np.array_equal(fo.mask, o.mask[:, ::-1]) and np.array_equal(fo.full_mask, o.full_mask[:, ::-1])
            assert fo.shape == o.shape and fo.color == o.color and fo.size == o.size


# --- descriptions, clicks, samples ---------------------------------------------------------------------------


def test_describe_and_click_points(scenes):
    rng = np.random.default_rng(0)
    for s in scenes[:20]:
        for o in s.objects:
            assert sr.describe(o) == f"a {o.size} {o.color} {o.shape}"
            for _ in range(3):
                x, y = sr.click_point(o.mask, rng)
                assert o.mask[y, x]
                if o.mask.sum() > 50:  # interior: not on the rim
                    assert o.mask[y - 1 : y + 2, x - 1 : x + 2].all()


def test_samples_use_the_templates(scenes):
    kinds, tasks = Counter(), Counter()
    gen = sr.ShapesRefGenerator(seed=123)
    for s in scenes[:30]:
        for t in sr.samples(s, gen.rng(s.index, 1), 12):
            tasks[t.task] += 1
            obj = None if t.object_index is None else s.objects[t.object_index]
            if t.task == "referring":
                assert t.question == sr.REFER_QUESTION.format(expr=t.expression.text)
                if obj is None:
                    assert t.answer == sr.NO_TARGET_ANSWER and t.target is None
                else:
                    assert t.answer == sr.SEG_ANSWER and np.array_equal(t.target, obj.mask)
            elif t.task == "text_describe":
                assert t.question == sr.TEXT_DESCRIBE_QUESTION.format(expr=t.expression.text)
                assert t.answer == (sr.NO_TARGET_ANSWER if obj is None else sr.describe(obj))
            else:
                assert t.prompt is not None and obj is not None
                kinds[t.prompt.kind] += 1
                region = t.prompt.to_mask(s.height, s.width)
                arr = t.prompt.as_array()
                assert arr.shape == {"point": (2,), "box": (4,), "mask": (s.height, s.width)}[t.prompt.kind]
                if t.prompt.kind == "point":
                    assert region.sum() == 1 and obj.mask[region].all()
                elif t.prompt.kind == "box":
                    assert t.prompt.box == sr.mask_box(obj.mask) and region[obj.mask].all()
                else:
                    assert np.array_equal(region, obj.mask)
                expected = {
                    "vp_segment": [(sr.VP_SEGMENT_QUESTION, sr.SEG_ANSWER)],
                    "vp_describe": [(sr.VP_DESCRIBE_QUESTION, sr.describe(obj))],
                    "vp_qa": sr.vp_qa(obj),
                }[t.task]
                assert (t.question, t.answer) in expected
                assert (t.target is not None) == (t.task == "vp_segment")
    assert set(tasks) == set(sr.TASKS)
    total = sum(kinds.values())
    for kind, p in sr.PROMPT_TYPE_PROBS.items():
        assert abs(kinds[kind] / total - p) < 0.12, kinds


def test_vp_qa_and_absent_rate(scenes):
    s = scenes[0]
    assert [q for q, _ in sr.vp_qa(s.objects[0])] == [sr.VP_COLOR_QUESTION, sr.VP_SHAPE_QUESTION, sr.VP_SIZE_QUESTION]
    gen = sr.ShapesRefGenerator(seed=123)
    turns = [t for s in scenes for t in sr.samples(s, gen.rng(s.index, 2), 10, mix={"referring": 1.0}, p_absent=0.3)]
    absent = sum(t.object_index is None for t in turns) / len(turns)
    assert 0.2 < absent < 0.4


def test_template_restriction_for_curricula(scenes):
    rng = np.random.default_rng(0)
    for s in scenes[:10]:
        exprs = sr.expressions(s, rng, templates=[sr.T_COLOR_SHAPE])
        assert {e.template for e in exprs} <= {sr.T_COLOR_SHAPE}


def test_hflip_sample(scenes):
    s = scenes[3]
    gen = sr.ShapesRefGenerator(seed=123)
    for t in sr.samples(s, gen.rng(s.index, 3), 20):
        f = sr.hflip_sample(t, s.width)
        assert f.question == sr.flip_text(t.question) and f.answer == t.answer
        if t.target is not None:
            assert np.array_equal(f.target, t.target[:, ::-1])
        if t.prompt is not None:
            assert np.array_equal(f.prompt.to_mask(s.height, s.width), t.prompt.to_mask(s.height, s.width)[:, ::-1])


def test_preview_renders(scenes):
    out = sr.render_preview(scenes[0])
    assert out.shape == scenes[0].image.shape and out.dtype == np.uint8


def test_templates_identical_to_processor():
    """The processor (model layer, needs torch) formats the same questions and answers as the generator."""
    proc = pytest.importorskip("pixel_sail_ros.model.processing_pixel_sail")
    assert proc.refer_seg_question("the red star") == sr.REFER_QUESTION.format(expr="the red star")
    assert proc.refer_describe_question("red star") == sr.TEXT_DESCRIBE_QUESTION.format(expr="red star")
    assert proc.vp_seg_question(0) == sr.VP_SEGMENT_QUESTION
    assert proc.vp_describe_question(0) == sr.VP_DESCRIBE_QUESTION
    assert proc.vp_attribute_question("colour", 0) == sr.VP_COLOR_QUESTION
    assert proc.vp_attribute_question("shape", 0) == sr.VP_SHAPE_QUESTION
    assert proc.vp_attribute_question("size", 0) == sr.VP_SIZE_QUESTION
    assert proc.SEG_ANSWER == sr.SEG_ANSWER and proc.NO_TARGET_ANSWER == sr.NO_TARGET_ANSWER
