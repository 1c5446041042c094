"""Overlay, label image and markers on tiny, hand-checkable inputs."""

from __future__ import annotations

import numpy as np
import pytest
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from pixel_sail_ros.ros.visualization import label_image, make_markers, overlay, palette


def test_palette_is_deterministic_and_distinct():
    p = palette(12)
    assert p.shape == (12, 3) and p.dtype == np.uint8
    assert np.array_equal(p, palette(12)) and np.array_equal(palette(5), p[:5])
    assert len({tuple(c) for c in p}) == 12
    d = np.abs(p[:, None, :].astype(int) - p[None, :, :].astype(int)).sum(-1)
    assert d[~np.eye(12, dtype=bool)].min() > 30  # visibly different colours
    assert palette(0).shape == (0, 3)


def two_overlapping() -> np.ndarray:
    m = np.zeros((2, 4, 4), bool)
    m[0, 0:3, 0:3] = True
    m[1, 1:4, 1:4] = True
    return m


def test_label_image_later_wins_without_scores():
    lbl = label_image(two_overlapping())
    assert lbl.dtype == np.uint8
    assert lbl.tolist() == [[1, 1, 1, 0], [1, 2, 2, 2], [1, 2, 2, 2], [0, 2, 2, 2]]


def test_label_image_higher_score_wins():
    lbl = label_image(two_overlapping(), scores=[0.9, 0.4])
    assert lbl.tolist() == [[1, 1, 1, 0], [1, 1, 1, 2], [1, 1, 1, 2], [0, 2, 2, 2]]
    tie = label_image(two_overlapping(), scores=[0.5, 0.5])
    assert tie[1, 1] == 2  # ties: the later object
    nan = label_image(two_overlapping(), scores=[np.nan, 0.1])
    assert nan[1, 1] == 2  # a NaN score never wins


def test_label_image_edge_cases():
    assert label_image([], shape=(3, 5)).shape == (3, 5)
    assert label_image([], (3, 5)).shape == (3, 5)  # shape is the second positional argument (the node's call)
    assert label_image(two_overlapping(), (4, 4)).tolist() == label_image(two_overlapping()).tolist()
    with pytest.raises(ValueError, match="image is 5x3"):
        label_image(two_overlapping(), (3, 5))
    assert not label_image(np.zeros((0, 3, 5), bool)).any()
    with pytest.raises(ValueError, match="shape"):
        label_image([])
    with pytest.raises(ValueError, match="scores"):
        label_image(two_overlapping(), scores=[1.0])
    with pytest.raises(ValueError, match="255"):
        label_image(np.zeros((256, 2, 2), bool))
    many = np.zeros((255, 1, 255), bool)
    many[np.arange(255), 0, np.arange(255)] = True
    assert label_image(many)[0].tolist() == list(range(1, 256))


def test_overlay_tints_only_masked_pixels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (80, 80, 3)).astype(np.uint8)
    before = rgb.copy()
    mask = np.zeros((1, 80, 80), bool)
    mask[0, 30:70, 30:70] = True
    out = overlay(rgb, mask, labels=["mug"], scores=[0.87], alpha=0.5)
    assert np.array_equal(rgb, before)  # input untouched
    assert out.shape == rgb.shape and out.dtype == np.uint8
    colour = palette(1)[0].astype(float)
    inner = (slice(40, 60), slice(40, 60))  # away from the outline and the label
    expected = rgb[inner].astype(float) * 0.5 + colour * 0.5
    assert np.abs(out[inner] - expected).max() <= 0.5  # exact blend, up to OpenCV's round-half-to-even
    far = (slice(0, 10), slice(0, 10))  # away from the mask and the label
    np.testing.assert_array_equal(out[far], rgb[far])
    assert not np.array_equal(out[15:30, 30:70], rgb[15:30, 30:70])  # the label box above the mask


def test_overlay_outline_and_label_drawn():
    rgb = np.zeros((60, 60, 3), np.uint8)
    mask = np.zeros((1, 60, 60), bool)
    mask[0, 20:40, 20:40] = True
    out = overlay(rgb, mask, alpha=0.0)  # no tint: only the outline and the label remain
    colour = palette(1)[0]
    assert (out[20, 20:40] == colour).all(axis=-1).all()
    assert (out[30, 30] == 0).all()


def test_overlay_edge_cases():
    rgb = np.full((8, 8, 3), 9, np.uint8)
    assert np.array_equal(overlay(rgb, np.zeros((0, 8, 8), bool)), rgb)
    empty_mask = np.zeros((1, 8, 8), bool)
    assert np.array_equal(overlay(rgb, empty_mask, ["x"], [0.5]), rgb)
    m = np.ones((1, 8, 8), bool)
    overlay(rgb, m, ["tasse rouge ☕"], [1.0])  # non-ASCII label: drawn with '?', no crash
    with pytest.raises(ValueError, match="labels"):
        overlay(rgb, m, ["a", "b"])
    with pytest.raises(ValueError, match="image is 8x8"):
        overlay(rgb, np.ones((1, 4, 4), bool))
    with pytest.raises(ValueError, match="uint8"):
        overlay(rgb.astype(np.float32), m)


def test_markers_delete_all_first_then_sphere_and_text():
    header = Header(frame_id="camera_color_optical_frame")
    header.stamp.sec = 42
    arr = make_markers(header, [(0.1, 0.2, 1.0), None, (0.0, 0.0, np.nan), (-0.3, 0.1, 2.0)],
                       ["mug", "ghost", "nan", "box"], ns="objs")
    assert isinstance(arr, MarkerArray)
    first = arr.markers[0]
    assert first.action == Marker.DELETEALL and first.ns == "objs"
    rest = arr.markers[1:]
    assert [(m.type, m.id) for m in rest] == [
        (Marker.SPHERE, 0), (Marker.TEXT_VIEW_FACING, 1), (Marker.SPHERE, 6), (Marker.TEXT_VIEW_FACING, 7)]
    for m in arr.markers:
        assert m.header.frame_id == "camera_color_optical_frame" and m.header.stamp.sec == 42
    for m in rest:
        assert m.action == Marker.ADD and m.ns == "objs"
        assert (m.lifetime.sec, m.lifetime.nanosec) == (0, 0)  # until replaced: no blinking
        assert m.pose.orientation.w == 1.0 and m.color.a > 0
    sphere, text = rest[0], rest[1]
    assert (sphere.pose.position.x, sphere.pose.position.y, sphere.pose.position.z) == (0.1, 0.2, 1.0)
    assert sphere.scale.x > 0 and text.scale.z > 0
    assert text.text == "mug" and text.pose.position.y < sphere.pose.position.y  # above: -y is up
    assert rest[3].text == "box"


def test_marker_labels_float_along_the_given_up_direction():
    """In a target frame such as base_link (z up), the node passes the camera's up rotated into that frame."""
    arr = make_markers(Header(frame_id="base_link"), [(1.0, 2.0, 0.5)], ["mug"], sphere_diameter=0.05,
                       text_height=0.04, up=(0.0, 0.0, 1.0))
    sphere, text = arr.markers[1], arr.markers[2]
    assert (text.pose.position.x, text.pose.position.y) == (1.0, 2.0)
    assert text.pose.position.z == pytest.approx(0.5 + 0.09)
    assert (sphere.pose.position.x, sphere.pose.position.y, sphere.pose.position.z) == (1.0, 2.0, 0.5)


def test_markers_with_nothing_still_clear():
    arr = make_markers(Header(), [], [])
    assert len(arr.markers) == 1 and arr.markers[0].action == Marker.DELETEALL
    with pytest.raises(ValueError, match="labels"):
        make_markers(Header(), [(0, 0, 1)], [])
