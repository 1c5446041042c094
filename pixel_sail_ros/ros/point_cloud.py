"""Depth + mask -> 3D points and sensor_msgs/PointCloud2, without sensor_msgs_py.

``sensor_msgs_py`` is in no wheel (docs/ros_wheels_recipe.md §8), so clouds are built here with numpy
structured arrays. Every 3D quantity is in the camera *optical* frame (x right, y down, z forward, metres),
the frame of the image header, so a grasp planner transforms it with TF at the image's stamp.

Pixel convention (as OpenCV / image_geometry): integer (u, v) is the centre of pixel column u, row v.
"""

from __future__ import annotations

import array
from typing import Any

import numpy as np
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

__all__ = [
    "CameraInfoError",
    "camera_matrix",
    "validate_camera_info",
    "valid_depth_mask",
    "deproject",
    "deproject_colored",
    "mask_centroid_3d",
    "make_point_cloud2",
    "read_points",
    "read_rgb",
]


class CameraInfoError(ValueError):
    """Intrinsics or sizes that cannot be used for 3D; the message names the problem."""


def camera_matrix(K: Any) -> np.ndarray:
    """K as a validated float64 3x3 matrix, from a 3x3 array, the 9-element ``CameraInfo.k`` or a CameraInfo.

    An all-zero K is what an uncalibrated driver publishes: it is rejected rather than dividing by zero.
    """
    if hasattr(K, "k"):
        K = K.k
    try:
        k = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError):
        raise CameraInfoError(f"camera matrix K is not numeric: {K!r}") from None
    if k.size != 9:
        raise CameraInfoError(f"camera matrix K needs 9 values (3x3), got shape {k.shape}")
    k = k.reshape(3, 3)
    if not np.isfinite(k).all():
        raise CameraInfoError("camera matrix K has non-finite values")
    fx, fy = k[0, 0], k[1, 1]
    if fx <= 0 or fy <= 0:
        raise CameraInfoError(f"camera matrix K has fx={fx:g}, fy={fy:g}; both must be > 0 (is the camera calibrated?)")
    if k[1, 0] != 0 or k[2, 0] != 0 or k[2, 1] != 0 or k[2, 2] != 1:
        raise CameraInfoError(f"camera matrix K is not of the form [[fx s cx] [0 fy cy] [0 0 1]]: {k.tolist()}")
    return k


def validate_camera_info(info: Any, width: int, height: int) -> np.ndarray:
    """Check a CameraInfo against the (depth) image it describes and return its K (3x3).

    Unaligned depth/camera_info (yolo_ros #61 in ros_anchors.md) is the common 3D failure: say so plainly.
    """
    bx, by = int(getattr(info, "binning_x", 0) or 1), int(getattr(info, "binning_y", 0) or 1)
    if bx != 1 or by != 1:
        raise CameraInfoError(f"camera_info binning {bx}x{by} is not supported; publish unbinned intrinsics")
    if (int(info.width), int(info.height)) != (int(width), int(height)):
        raise CameraInfoError(
            f"camera_info is {info.width}x{info.height} but the image is {width}x{height}: "
            "depth must be registered (aligned) to the colour image and described by its camera_info")
    return camera_matrix(info.k)


def valid_depth_mask(depth_m: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Pixels with a usable depth (finite, > 0) inside ``mask``; checks the shapes agree."""
    depth = np.asarray(depth_m)
    if depth.ndim != 2:
        raise ValueError(f"depth must be an (H, W) array, got shape {depth.shape}")
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(depth) & (depth > 0)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != depth.shape:
            raise ValueError(f"mask shape {m.shape} does not match depth shape {depth.shape}")
        valid &= m.astype(bool, copy=False)
    return valid


def _deproject_valid(depth: np.ndarray, k: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pinhole back-projection of the ``valid`` pixels (float32 math on per-row/column rays: fast at 1080p)."""
    h, w = valid.shape
    fx, s, cx, fy, cy = k[0, 0], k[0, 1], k[0, 2], k[1, 1], k[1, 2]
    ray_y = ((np.arange(h) - cy) / fy).astype(np.float32)  # y/z of each row
    ray_x = ((np.arange(w) - cx) / fx).astype(np.float32)  # x/z of each column (without skew)
    z = depth[valid].astype(np.float32, copy=False)
    yn = np.broadcast_to(ray_y[:, None], (h, w))[valid]
    xn = np.broadcast_to(ray_x[None, :], (h, w))[valid]
    if s:
        xn -= np.float32(s / fx) * yn
    out = np.empty((z.size, 3), np.float32)
    np.multiply(xn, z, out=out[:, 0])
    np.multiply(yn, z, out=out[:, 1])
    out[:, 2] = z
    return out


def deproject(depth_m: np.ndarray, K: Any, mask: np.ndarray | None = None) -> np.ndarray:
    """(N, 3) float32 points of the masked pixels with valid depth, row-major order, optical frame."""
    valid = valid_depth_mask(depth_m, mask)
    return _deproject_valid(np.asarray(depth_m), camera_matrix(K), valid)


def deproject_colored(depth_m: np.ndarray, K: Any, mask: np.ndarray | None,
                      rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`deproject`, plus the (N, 3) uint8 RGB of each point from the aligned colour image."""
    valid = valid_depth_mask(depth_m, mask)
    colours = np.asarray(rgb)
    if colours.shape[:2] != valid.shape or colours.ndim != 3 or colours.shape[2] < 3:
        raise ValueError(f"rgb shape {colours.shape} does not match depth shape {valid.shape} (+ 3 channels)")
    return _deproject_valid(np.asarray(depth_m), camera_matrix(K), valid), colours[valid][:, :3].astype(np.uint8)


def mask_centroid_3d(depth_m: np.ndarray, K: Any, mask: np.ndarray, min_points: int = 10) -> np.ndarray | None:
    """A robust 3D position of the masked object: the per-axis median of its valid points, or None.

    The median ignores the background pixels a mask edge picks up and depth speckle, where a mean would be
    dragged away. None when fewer than ``min_points`` pixels have valid depth (no reliable position).
    """
    pts = deproject(depth_m, K, mask)
    if pts.shape[0] < max(1, int(min_points)):
        return None
    return np.median(pts, axis=0).astype(np.float64)


# ----------------------------------------------------------------------------------------- PointCloud2

_POINT_STEP = 16  # x, y, z float32 at 0/4/8, rgb (packed, as float32) at 12: PCL's PointXYZRGB layout
_NP_OF_FIELD = {PointField.INT8: "i1", PointField.UINT8: "u1", PointField.INT16: "i2", PointField.UINT16: "u2",
                PointField.INT32: "i4", PointField.UINT32: "u4", PointField.FLOAT32: "f4", PointField.FLOAT64: "f8"}


def make_point_cloud2(points: np.ndarray, header: Header | None = None,
                      colors: np.ndarray | None = None) -> PointCloud2:
    """An unorganised (height 1) PointCloud2 of (N, 3) points, with optional (N, 3) uint8 RGB colours.

    Layout: x, y, z float32 at offsets 0/4/8; ``rgb`` at 12 as float32 holding 0x00RRGGBB (the PCL/RViz
    convention) when colours are given; point_step 16 either way; is_dense when every point is finite.
    """
    pts = np.asarray(points, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got shape {pts.shape}")
    n = pts.shape[0]
    rec = np.zeros(n, dtype=np.dtype({"names": ["x", "y", "z", "rgb"], "formats": ["<f4"] * 3 + ["<u4"],
                                       "offsets": [0, 4, 8, 12], "itemsize": _POINT_STEP}))
    rec["x"], rec["y"], rec["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, name in enumerate("xyz")]
    if colors is not None:
        c = np.asarray(colors)
        if c.shape != (n, 3):
            raise ValueError(f"colors must be (N, 3) matching {n} points, got shape {c.shape}")
        c = c.astype(np.uint32)
        rec["rgb"] = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
        fields.append(PointField(name="rgb", offset=12, datatype=PointField.FLOAT32, count=1))
    msg = PointCloud2()
    if header is not None:
        msg.header = header
    msg.height, msg.width = 1, n
    msg.fields = fields
    msg.is_bigendian = False  # the structured dtype above is little-endian explicitly
    msg.point_step = _POINT_STEP
    msg.row_step = _POINT_STEP * n
    msg.is_dense = bool(np.isfinite(pts).all())
    data = array.array("B")
    if n:
        data.frombytes(rec.view(np.uint8))
    msg.data = data
    return msg


def _field_array(msg: PointCloud2, name: str) -> np.ndarray:
    """One scalar field of every point, honouring offsets, point_step, row_step and endianness."""
    field = next((f for f in msg.fields if f.name == name), None)
    if field is None:
        raise ValueError(f"PointCloud2 has no field {name!r} (fields: {[f.name for f in msg.fields]})")
    code = _NP_OF_FIELD.get(field.datatype)
    if code is None:
        raise ValueError(f"PointCloud2 field {name!r} has unknown datatype {field.datatype}")
    dtype = np.dtype((">" if msg.is_bigendian else "<") + code)
    h, w, ps, rs = int(msg.height), int(msg.width), int(msg.point_step), int(msg.row_step)
    if h * w == 0:
        return np.empty(0, dtype.newbyteorder("="))
    if field.offset + dtype.itemsize > ps or ps * w > rs:
        raise ValueError(f"PointCloud2 layout is inconsistent: field {name!r} at offset {field.offset}, "
                         f"point_step {ps}, row_step {rs}, width {w}")
    buf = np.frombuffer(msg.data, np.uint8)
    if buf.size < rs * (h - 1) + ps * w:
        raise ValueError(f"PointCloud2 data has {buf.size} bytes, fewer than its {h}x{w} points need")
    view = np.ndarray((h, w), dtype=dtype, buffer=buf, offset=field.offset, strides=(rs, ps))
    return view.reshape(-1).astype(dtype.newbyteorder("="))


def read_points(msg: PointCloud2) -> np.ndarray:
    """(N, 3) float32 x, y, z of every point (NaN points included), for tests and consumers."""
    return np.stack([_field_array(msg, n).astype(np.float32) for n in "xyz"], axis=1).reshape(-1, 3)


def read_rgb(msg: PointCloud2) -> np.ndarray:
    """(N, 3) uint8 colours unpacked from the ``rgb`` field (float32 or uint32 holding 0x00RRGGBB)."""
    raw = _field_array(msg, "rgb")
    packed = raw.view(np.uint32) if raw.dtype.itemsize == 4 else raw.astype(np.uint32)
    return np.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF], axis=1).astype(np.uint8)
