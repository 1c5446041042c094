"""Masks <-> messages, SegmentationResult building, and the request validators."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from geometry_msgs.msg import Point
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sensor_msgs.msg import Image, RegionOfInterest
from std_msgs.msg import Header

from pixel_sail_ros.ros.conversions import (
    RequestError,
    _build_result,
    build_segmentation_result,
    image_to_mask,
    mask_bbox,
    mask_to_image,
    validate_boxes,
    validate_points,
    validate_prompt,
)
from pixel_sail_ros.ros.image_conversion import ImageConversionError, image_to_numpy, numpy_to_image

SETTINGS = settings(max_examples=60, deadline=None)
masks_st = hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12))


# ----------------------------------------------------------------------------------------------- masks

@SETTINGS
@given(mask=masks_st)
def test_mask_image_round_trip(mask):
    header = Header(frame_id="cam")
    msg = mask_to_image(mask, header)
    assert (msg.encoding, msg.height, msg.width, msg.step) == ("mono8", mask.shape[0], mask.shape[1], mask.shape[1])
    assert msg.header.frame_id == "cam"
    assert set(np.unique(image_to_numpy(msg)).tolist()) <= {0, 255}
    assert np.array_equal(image_to_numpy(msg) == 255, mask)
    assert np.array_equal(image_to_mask(msg), mask)


def test_mask_from_numeric_and_zero_one_images():
    assert image_to_numpy(mask_to_image(np.array([[0, 3], [0.5, 0]]))).tolist() == [[0, 255], [255, 0]]
    assert image_to_mask(numpy_to_image(np.array([[0, 1]], np.uint8), "mono8")).tolist() == [[False, True]]
    with pytest.raises(ImageConversionError, match="mono8"):
        image_to_mask(numpy_to_image(np.zeros((2, 2, 3), np.uint8), "rgb8"))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        mask_to_image(np.zeros((1, 2, 2), bool))


@SETTINGS
@given(mask=masks_st)
def test_mask_bbox_matches_brute_force(mask):
    ys, xs = np.nonzero(mask)
    expected = (0, 0, 0, 0) if xs.size == 0 else (
        int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    assert mask_bbox(mask) == expected


def test_mask_bbox_examples():
    m = np.zeros((5, 7), bool)
    assert mask_bbox(m) == (0, 0, 0, 0)
    m[3, 6] = True
    assert mask_bbox(m) == (6, 3, 1, 1)
    m[1, 2] = True
    assert mask_bbox(m) == (2, 1, 5, 3)
    assert all(isinstance(v, int) for v in mask_bbox(m))


# -------------------------------------------------------------------------------------- result building

def result_inputs():
    header = Header(frame_id="camera_color_optical_frame")
    header.stamp.sec, header.stamp.nanosec = 17, 500
    masks = np.zeros((3, 6, 8), bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4, 7] = True
    return header, masks


def check_result(res, header, masks):
    assert res.header.frame_id == "camera_color_optical_frame" and res.header.stamp.sec == 17
    assert res.header.stamp.nanosec == 500 and res.header is not header
    assert res.prompt == "the red mug" and res.description == "a red mug"
    assert [(p.x, p.y, p.z) for p in res.points] == [(3.0, 2.0, 0.0), (1.5, 4.0, 0.0)]
    assert res.inference_seconds == pytest.approx(0.25)
    assert [o.label for o in res.objects] == ["mug", "dot", "nothing"]
    assert [o.score for o in res.objects] == [1.0, pytest.approx(0.3), 0.0]  # clipped to [0, 1], NaN -> 0
    o0, o1, o2 = res.objects
    assert (o0.bbox.x_offset, o0.bbox.y_offset, o0.bbox.width, o0.bbox.height) == (2, 1, 3, 2)
    assert (o1.bbox.x_offset, o1.bbox.y_offset, o1.bbox.width, o1.bbox.height) == (7, 4, 1, 1)
    assert (o2.bbox.width, o2.bbox.height) == (0, 0)
    for obj, m in zip(res.objects, masks):
        assert (obj.mask.encoding, obj.mask.width, obj.mask.height) == ("mono8", 8, 6)
        assert obj.mask.header.stamp.sec == 17 and obj.mask.header.frame_id == header.frame_id
        assert np.array_equal(image_to_mask(obj.mask), m)
    assert o0.has_position and (o0.position.x, o0.position.y, o0.position.z) == (0.1, -0.2, 0.9)
    assert not o1.has_position and not o2.has_position  # None, and a NaN position


def test_build_segmentation_result_real_messages():
    msg = pytest.importorskip("pixel_sail_ros.msg", reason="interfaces not built (make build)")
    header, masks = result_inputs()
    res = build_segmentation_result(
        header, "the red mug", [Point(x=3.0, y=2.0), (1.5, 4.0)], "a red mug", masks, [1.7, 0.3, float("nan")],
        ["mug", "dot", "nothing"], positions=[(0.1, -0.2, 0.9), None, (np.nan, 0, 1)], inference_seconds=0.25,
        answer="It is [SEG].", num_points=[6, 1, 0])
    assert isinstance(res, msg.SegmentationResult) and all(isinstance(o, msg.SegmentedObject) for o in res.objects)
    check_result(res, header, masks)
    assert res.answer == "It is [SEG]." and [o.num_points for o in res.objects] == [6, 1, 0]
    header.frame_id = "changed"
    assert res.header.frame_id == "camera_color_optical_frame"  # detached from the caller's header


def test_build_result_with_stand_in_classes():
    """The same checks without the generated interfaces (plain attribute holders)."""
    class Obj:
        has_position = False
        position = None

    class Res:
        pass

    header, masks = result_inputs()
    res = _build_result(Res, Obj, header, "the red mug", np.array([[3, 2], [1.5, 4]]), "a red mug",
                        list(masks), [1.7, 0.3, float("nan")], ["mug", "dot", "nothing"],
                        [Point(x=0.1, y=-0.2, z=0.9), None, (np.nan, 0, 1)], 0.25)
    check_result(res, header, masks)


def test_build_result_empty_and_mismatched():
    pytest.importorskip("pixel_sail_ros.msg", reason="interfaces not built (make build)")
    res = build_segmentation_result(Header(), "", None, "", np.zeros((0, 4, 4), bool), [], [])
    assert res.objects == [] and res.points == []
    with pytest.raises(ValueError, match="must match"):
        build_segmentation_result(Header(), "", None, "", np.zeros((2, 4, 4), bool), [1.0], ["a", "b"])
    with pytest.raises(ValueError, match="positions"):
        build_segmentation_result(Header(), "", None, "", np.zeros((1, 4, 4), bool), [1.0], ["a"], positions=[])


# ------------------------------------------------------------------------------------------ validators

def test_validate_points_accepts_good_points():
    out = validate_points([Point(x=0.0, y=0.0), (639.9, 479.5), [10, 20, 99]], 640, 480)
    assert out == [(0.0, 0.0), (639.9, 479.5), (10.0, 20.0)]
    assert all(type(v) is float for p in out for v in p)
    assert validate_points(np.array([[1, 2], [3, 4]]), 5, 5) == [(1.0, 2.0), (3.0, 4.0)]
    assert validate_points([], 5, 5) == [] and validate_points(None, 5, 5) == []


@pytest.mark.parametrize("point,words", [
    ((640, 10), ["(x=640, y=10)", "outside", "640x480"]),
    ((10, 480), ["outside"]),
    ((-0.1, 10), ["outside"]),
    ((float("nan"), 1), ["not finite"]),
    ((1, float("inf")), ["not finite"]),
    ((1,), ["1 coordinates"]),
    (("a", "b"), ["not numeric"]),
    (None, ["not numeric"]),
])
def test_validate_points_rejects(point, words):
    with pytest.raises(RequestError) as exc:
        validate_points([(5, 5), point], 640, 480)
    for word in ["point 1", *words]:  # names the offending point (index 1) and the problem
        assert word in str(exc.value), str(exc.value)


def test_validate_points_limit():
    with pytest.raises(RequestError, match="3 points given, at most 2"):
        validate_points([(0, 0)] * 3, 5, 5, max_points=2)


def test_validate_boxes_accepts_roi_and_xyxy():
    roi = RegionOfInterest(x_offset=10, y_offset=20, width=30, height=40)
    out = validate_boxes([roi, (0, 0, 640, 480)], 640, 480)
    assert out == [(10.0, 20.0, 40.0, 60.0), (0.0, 0.0, 640.0, 480.0)]
    assert all(type(v) is float for b in out for v in b)
    assert validate_boxes([], 4, 4) == [] and validate_boxes(None, 4, 4) == []


@pytest.mark.parametrize("box,words", [
    (RegionOfInterest(), ["box 1", "empty"]),
    (RegionOfInterest(x_offset=600, y_offset=0, width=50, height=10), ["box 1", "outside", "640x480"]),
    ((5, 5, 5, 9), ["empty"]),
    ((9, 5, 5, 9), ["empty"]),
    ((-1, 0, 5, 5), ["outside"]),
    ((0, 0, 5, float("nan")), ["not finite"]),
    ((0, 0, 5), ["3 values"]),
    (object(), ["not numeric"]),
])
def test_validate_boxes_rejects(box, words):
    with pytest.raises(RequestError) as exc:
        validate_boxes([(0, 0, 1, 1), box], 640, 480)
    for word in words:
        assert word in str(exc.value), str(exc.value)


def test_validate_prompt_normalises_whitespace():
    assert validate_prompt("  the red\n mug\t\r\n", 100) == "the red mug"
    assert validate_prompt("", 100) == "" and validate_prompt(" \n ", 100) == ""
    assert validate_prompt("tasse rouge ☕ 赤いマグ", 100) == "tasse rouge ☕ 赤いマグ"
    assert validate_prompt("cafe\u0301", 100) == "café"  # NFC: one code point


@pytest.mark.parametrize("text,words", [
    ("red\x00mug", ["control character", "U+0000", "index 3"]),
    ("\x1b[31mred", ["U+001B"]),
    ("mug\x7f", ["U+007F"]),
    ("mug\x85", ["U+0085"]),
    ("a" * 101, ["101 characters", "limit is 100"]),
    ("a" * 10_000_000, ["limit is 100"]),
    ("bad \ud800 surrogate", ["surrogate"]),
    (b"bytes", ["must be a string"]),
    (None, ["must be a string"]),
])
def test_validate_prompt_rejects(text, words):
    t0 = time.perf_counter()
    with pytest.raises(RequestError) as exc:
        validate_prompt(text, 100)
    assert time.perf_counter() - t0 < 0.5
    for word in words:
        assert word in str(exc.value), str(exc.value)


@SETTINGS
@given(text=st.text(max_size=150), limit=st.integers(1, 120))
def test_validate_prompt_invariants(text, limit):
    try:
        out = validate_prompt(text, limit)
    except RequestError as exc:
        assert str(exc)
        return
    assert len(out) <= limit and out == out.strip() and "  " not in out
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in out)


@SETTINGS
@given(x=st.floats(allow_nan=True, allow_infinity=True), y=st.floats(allow_nan=True, allow_infinity=True),
       w=st.integers(1, 4000), h=st.integers(1, 4000))
def test_validate_points_property(x, y, w, h):
    ok = math.isfinite(x) and math.isfinite(y) and 0 <= x < w and 0 <= y < h
    try:
        validate_points([(x, y)], w, h)
        assert ok
    except RequestError:
        assert not ok


def test_mask_image_is_a_sensor_msgs_image():
    assert isinstance(mask_to_image(np.ones((2, 2), bool)), Image)
