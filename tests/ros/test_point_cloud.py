"""Deprojection against analytic geometry, robust centroids, PointCloud2 layout and read-back."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sensor_msgs.msg import CameraInfo, PointCloud2, PointField
from std_msgs.msg import Header

from pixel_sail_ros.ros.point_cloud import (
    CameraInfoError,
    camera_matrix,
    deproject,
    deproject_colored,
    make_point_cloud2,
    mask_centroid_3d,
    read_points,
    read_rgb,
    validate_camera_info,
)

FX, FY, CX, CY = 500.0, 400.0, 31.5, 23.5
K = np.array([[FX, 0, CX], [0, FY, CY], [0, 0, 1]])
H, W = 48, 64


def info(width: int = W, height: int = H, k=K) -> CameraInfo:
    return CameraInfo(width=width, height=height, k=np.asarray(k, float).reshape(-1).tolist())


# -------------------------------------------------------------------------------------------- intrinsics

def test_camera_matrix_accepts_3x3_flat_and_camerainfo():
    for source in (K, K.reshape(-1).tolist(), info().k, info()):
        assert np.array_equal(camera_matrix(source), K)


@pytest.mark.parametrize("k,word", [
    (np.zeros(9), "fx=0"),
    ([[FX, 0, CX], [0, -1, CY], [0, 0, 1]], "fy=-1"),
    ([[np.nan, 0, CX], [0, FY, CY], [0, 0, 1]], "non-finite"),
    (np.ones(6), "9 values"),
    ([[FX, 0, CX], [0, FY, CY], [0, 0, 2]], "not of the form"),
    ("abc", "not numeric"),
])
def test_camera_matrix_rejects(k, word):
    with pytest.raises(CameraInfoError, match=word):
        camera_matrix(k)


def test_validate_camera_info_checks_size():
    assert np.array_equal(validate_camera_info(info(), W, H), K)
    with pytest.raises(CameraInfoError, match=r"camera_info is 640x480 but the image is 64x48.*registered"):
        validate_camera_info(info(640, 480), W, H)
    binned = info()
    binned.binning_x = 2
    with pytest.raises(CameraInfoError, match="binning"):
        validate_camera_info(binned, W, H)
    with pytest.raises(CameraInfoError, match="calibrated"):
        validate_camera_info(info(k=np.zeros(9)), W, H)


# ---------------------------------------------------------------------------------------- deprojection

def test_deproject_plane_matches_pinhole_model():
    z = 2.0
    depth = np.full((H, W), z, np.float32)
    mask = np.zeros((H, W), bool)
    mask[10:20, 30:40] = True
    pts = deproject(depth, K, mask)
    assert pts.dtype == np.float32 and pts.shape == (100, 3)
    v, u = np.mgrid[10:20, 30:40]
    expected = np.stack([(u - CX) * z / FX, (v - CY) * z / FY, np.full(u.shape, z)], -1).reshape(-1, 3)
    np.testing.assert_allclose(pts, expected, atol=1e-6)
    # optical frame: right of the principal point is +x, below it is +y
    right = deproject(depth, K, np.pad(np.ones((1, 1), bool), ((0, H - 1), (W - 1, 0))))
    below = deproject(depth, K, np.pad(np.ones((1, 1), bool), ((H - 1, 0), (0, W - 1))))
    assert right[0, 0] > 0 and below[0, 1] > 0


def test_deproject_with_skew():
    s = 7.0
    k = np.array([[FX, s, CX], [0, FY, CY], [0, 0, 1]])
    depth = np.full((H, W), 3.0, np.float32)
    pts = deproject(depth, k).astype(np.float64)
    v, u = np.mgrid[0:H, 0:W]
    y = (v - CY) / FY
    x = (u - CX - s * y) / FX
    np.testing.assert_allclose(pts, np.stack([x * 3, y * 3, np.full(u.shape, 3.0)], -1).reshape(-1, 3), atol=1e-5)
    # projecting back with K gives the pixel again
    proj = (k @ (pts / pts[:, 2:]).T).T
    np.testing.assert_allclose(proj[:, :2], np.stack([u, v], -1).reshape(-1, 2), atol=1e-3)


def test_centroid_of_masked_square_is_the_analytic_point():
    z = 1.25
    depth = np.full((H, W), z, np.float32)
    mask = np.zeros((H, W), bool)
    mask[5:15, 40:50] = True  # centre pixel (44.5, 9.5)
    c = mask_centroid_3d(depth, K, mask)
    np.testing.assert_allclose(c, [(44.5 - CX) * z / FX, (9.5 - CY) * z / FY, z], atol=1e-6)


def test_tilted_plane_points_lie_on_it():
    z0, s = 1.5, 0.3  # plane z = z0 + s*x in the optical frame
    u = np.arange(W)[None, :].repeat(H, 0)
    depth = (z0 / (1 - s * (u - CX) / FX)).astype(np.float64)
    pts = deproject(depth, K).astype(np.float64)
    assert pts.shape == (H * W, 3)
    np.testing.assert_allclose(pts[:, 2] - s * pts[:, 0], z0, atol=1e-5)


def test_invalid_depths_are_skipped():
    depth = np.full((4, 4), 1.0, np.float32)
    depth[0, 0], depth[1, 1], depth[2, 2], depth[3, 3] = 0.0, np.nan, np.inf, -2.0
    assert deproject(depth, K).shape == (12, 3)
    mask = np.eye(4, dtype=bool)
    assert deproject(depth, K, mask).shape == (0, 3)
    assert mask_centroid_3d(depth, K, mask, min_points=1) is None


def test_centroid_needs_min_points_and_ignores_outliers():
    depth = np.full((H, W), 2.0, np.float32)
    mask = np.zeros((H, W), bool)
    mask[20:30, 20:30] = True
    depth[20:22, 20:30] = 9.0  # 20% of the mask sees the far background (edge spill)
    depth[29, 29] = np.nan
    c = mask_centroid_3d(depth, K, mask)
    assert c is not None and c[2] == pytest.approx(2.0)
    few = np.zeros((H, W), bool)
    few[0, :5] = True
    assert mask_centroid_3d(depth, K, few, min_points=6) is None
    assert mask_centroid_3d(depth, K, few, min_points=5) is not None


def test_shape_mismatches_are_clear():
    with pytest.raises(ValueError, match="mask shape"):
        deproject(np.ones((4, 4)), K, np.ones((4, 5), bool))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        deproject(np.ones((4, 4, 1)), K)
    with pytest.raises(ValueError, match="rgb shape"):
        deproject_colored(np.ones((4, 4)), K, None, np.zeros((4, 5, 3), np.uint8))


def test_deproject_colored_pairs_points_with_pixels():
    depth = np.full((3, 3), 1.0, np.float32)
    depth[0, 0] = np.nan
    rgb = np.arange(27, dtype=np.uint8).reshape(3, 3, 3)
    mask = np.ones((3, 3), bool)
    mask[2, 2] = False
    pts, cols = deproject_colored(depth, K, mask, rgb)
    assert pts.shape == (7, 3) and cols.dtype == np.uint8
    valid = mask & np.isfinite(depth)
    np.testing.assert_array_equal(cols, rgb[valid])


# ----------------------------------------------------------------------------------------- PointCloud2

def test_point_cloud2_layout():
    pts = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    msg = make_point_cloud2(pts, Header(frame_id="camera_color_optical_frame"))
    assert isinstance(msg, PointCloud2) and msg.header.frame_id == "camera_color_optical_frame"
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ("x", 0, PointField.FLOAT32, 1), ("y", 4, PointField.FLOAT32, 1), ("z", 8, PointField.FLOAT32, 1)]
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 2, 16, 32)
    assert len(msg.data) == 32 and msg.is_dense and not msg.is_bigendian
    raw = np.frombuffer(msg.data, "<f4").reshape(2, 4)
    np.testing.assert_array_equal(raw[:, :3], pts)


def test_point_cloud2_colours():
    pts = np.zeros((3, 3), np.float32)
    cols = np.array([[255, 0, 0], [0, 128, 0], [1, 2, 3]], np.uint8)
    msg = make_point_cloud2(pts, colors=cols)
    rgb = msg.fields[3]
    assert (rgb.name, rgb.offset, rgb.datatype) == ("rgb", 12, PointField.FLOAT32)
    packed = np.frombuffer(msg.data, "<u4").reshape(3, 4)[:, 3]
    assert packed.tolist() == [0xFF0000, 0x008000, 0x010203]
    np.testing.assert_array_equal(read_rgb(msg), cols)


def test_point_cloud2_dense_flag_and_empty():
    assert not make_point_cloud2(np.array([[0, 0, np.nan]], np.float32)).is_dense
    empty = make_point_cloud2(np.zeros((0, 3)))
    assert empty.width == 0 and len(empty.data) == 0 and read_points(empty).shape == (0, 3)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        make_point_cloud2(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="colors"):
        make_point_cloud2(np.zeros((4, 3)), colors=np.zeros((3, 3), np.uint8))


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 40), seed=st.integers(0, 2**32 - 1), colour=st.booleans())
def test_point_cloud2_read_back(n, seed, colour):
    rng = np.random.default_rng(seed)
    pts = rng.normal(0, 5, (n, 3)).astype(np.float32)
    cols = rng.integers(0, 256, (n, 3)).astype(np.uint8) if colour else None
    msg = make_point_cloud2(pts, colors=cols)
    np.testing.assert_array_equal(read_points(msg), pts)
    if colour:
        np.testing.assert_array_equal(read_rgb(msg), cols)


def test_read_points_handles_foreign_layouts():
    """An organised, big-endian float64 cloud with padded rows, fields in another order (e.g. from a driver)."""
    h, w, ps, rs = 2, 3, 32, 100
    pts = np.arange(h * w * 3, dtype=np.float64).reshape(h, w, 3)
    buf = np.zeros(rs * h, np.uint8)
    for r in range(h):
        for c in range(w):
            base = r * rs + c * ps
            for off, axis in ((16, 0), (0, 1), (8, 2)):
                buf[base + off: base + off + 8] = np.frombuffer(np.array(pts[r, c, axis], ">f8").tobytes(), np.uint8)
    msg = PointCloud2(height=h, width=w, point_step=ps, row_step=rs, is_bigendian=True)
    msg.fields = [PointField(name="y", offset=0, datatype=PointField.FLOAT64, count=1),
                  PointField(name="z", offset=8, datatype=PointField.FLOAT64, count=1),
                  PointField(name="x", offset=16, datatype=PointField.FLOAT64, count=1)]
    msg.data = buf.tobytes()
    np.testing.assert_array_equal(read_points(msg), pts.reshape(-1, 3).astype(np.float32))
    msg.data = buf.tobytes()[:-40]
    with pytest.raises(ValueError, match="fewer"):
        read_points(msg)
    msg.fields = msg.fields[:2]
    with pytest.raises(ValueError, match="no field 'x'"):
        read_points(msg)
