"""Masks <-> messages, the SegmentationResult builder, and validation of what requests ask for.

The validators are the node's and the service's first line of defence (DESIGN.md §3, issue 7): a click
outside the image, a NaN box or a prompt full of control characters becomes a :class:`RequestError` whose
message names the problem, so the node answers ``success=false`` / logs one line and keeps running.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, Sequence

import numpy as np
from geometry_msgs.msg import Point
from sensor_msgs.msg import Image, RegionOfInterest
from std_msgs.msg import Header

from pixel_sail_ros.ros.image_conversion import DEFAULT_MAX_PIXELS, ImageConversionError, image_to_numpy, numpy_to_image

__all__ = [
    "RequestError",
    "mask_to_image",
    "image_to_mask",
    "mask_bbox",
    "bbox_to_roi",
    "build_segmentation_result",
    "validate_points",
    "validate_boxes",
    "validate_prompt",
    "DEFAULT_MAX_PROMPT_CHARS",
]

DEFAULT_MAX_PROMPT_CHARS = 512


class RequestError(ValueError):
    """A request (prompt, points, boxes) that cannot be served; the message says what is wrong."""


# ----------------------------------------------------------------------------------------------- masks

def _bool_mask(mask: Any) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {m.shape}")
    if m.dtype == bool:
        return m
    if m.dtype.kind not in "uif":
        raise ValueError(f"a mask must be boolean or numeric, got dtype {m.dtype}")
    return m != 0


def mask_to_image(mask: np.ndarray, header: Header | None = None) -> Image:
    """A mono8 Image of a (H, W) mask: 255 object, 0 background (non-zero counts as object)."""
    u8 = _bool_mask(mask).astype(np.uint8)
    u8 *= 255
    return numpy_to_image(u8, "mono8", header)


def image_to_mask(msg: Image, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A (H, W) bool mask from a mono8/8UC1 Image; any non-zero pixel is object (so 0/1 masks work too)."""
    if msg.encoding not in ("mono8", "8UC1"):
        raise ImageConversionError(f"a mask image must be mono8 or 8UC1, got {msg.encoding!r}")
    return image_to_numpy(msg, max_pixels=max_pixels) != 0


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x_offset, y_offset, width, height) of the tightest box around the mask; all zeros when it is empty."""
    m = _bool_mask(mask)
    cols, rows = m.any(axis=0), m.any(axis=1)
    if not cols.any():
        return 0, 0, 0, 0
    x0, y0 = int(cols.argmax()), int(rows.argmax())
    x1 = cols.size - int(cols[::-1].argmax())  # exclusive
    y1 = rows.size - int(rows[::-1].argmax())
    return x0, y0, x1 - x0, y1 - y0


def bbox_to_roi(bbox: tuple[int, int, int, int]) -> RegionOfInterest:
    """A sensor_msgs/RegionOfInterest from (x_offset, y_offset, width, height)."""
    x, y, w, h = (int(v) for v in bbox)
    return RegionOfInterest(x_offset=x, y_offset=y, width=w, height=h, do_rectify=False)


# ------------------------------------------------------------------------------------ result building

def _copy_header(header: Header | None) -> Header:
    """A detached copy, so a later change to the caller's header cannot alter a published result."""
    if header is None:
        return Header()
    out = Header(frame_id=header.frame_id)
    out.stamp.sec, out.stamp.nanosec = header.stamp.sec, header.stamp.nanosec
    return out


def _to_point(p: Any) -> Point:
    if hasattr(p, "x") and hasattr(p, "y"):
        return Point(x=float(p.x), y=float(p.y), z=float(getattr(p, "z", 0.0)))
    vals = [float(v) for v in p]
    if len(vals) not in (2, 3):
        raise ValueError(f"a point needs 2 or 3 coordinates, got {len(vals)}")
    return Point(x=vals[0], y=vals[1], z=vals[2] if len(vals) == 3 else 0.0)


def _score(s: Any) -> float:
    v = float(s)
    return 0.0 if math.isnan(v) else min(1.0, max(0.0, v))  # the contract says [0, 1]


def build_segmentation_result(header: Header | None, prompt: str, points: Sequence[Any] | np.ndarray | None,
                              description: str, masks: np.ndarray | Sequence[np.ndarray],
                              scores: Sequence[float], labels: Sequence[str],
                              positions: Sequence[Sequence[float] | None] | None = None,
                              inference_seconds: float = 0.0, *, answer: str = "",
                              num_points: Sequence[int] | None = None) -> Any:
    """A pixel_sail_ros/SegmentationResult with one SegmentedObject per mask (imports the message lazily).

    Each object gets its label, score (clipped to [0, 1]), tight bbox, a full-size mono8 mask carrying the
    source header, ``has_position``/``position`` when ``positions[i]`` is a finite xyz, and ``num_points``
    (valid depth points behind the mask) when given. ``answer`` is the model's raw text answer.
    """
    from pixel_sail_ros.msg import SegmentationResult, SegmentedObject

    return _build_result(SegmentationResult, SegmentedObject, header, prompt, points, description, masks,
                         scores, labels, positions, inference_seconds, answer, num_points)


def _build_result(result_cls: Any, object_cls: Any, header: Header | None, prompt: str, points: Any,
                  description: str, masks: Any, scores: Sequence[float], labels: Sequence[str],
                  positions: Sequence[Sequence[float] | None] | None, inference_seconds: float,
                  answer: str = "", num_points: Sequence[int] | None = None) -> Any:
    """build_segmentation_result with the message classes passed in (the optional fields set only if present)."""
    mask_list = list(masks) if not isinstance(masks, np.ndarray) else [masks[i] for i in range(masks.shape[0])]
    n = len(mask_list)
    if len(scores) != n or len(labels) != n:
        raise ValueError(f"{n} masks, {len(scores)} scores and {len(labels)} labels: they must match")
    if positions is not None and len(positions) != n:
        raise ValueError(f"{n} masks but {len(positions)} positions")
    if num_points is not None and len(num_points) != n:
        raise ValueError(f"{n} masks but {len(num_points)} num_points")
    hdr = _copy_header(header)
    result = result_cls()
    result.header = hdr
    result.prompt = str(prompt or "")
    result.description = str(description or "")
    result.points = [_to_point(p) for p in (points if points is not None else [])]
    result.inference_seconds = float(inference_seconds)
    if hasattr(result, "answer"):
        result.answer = str(answer or "")
    objects = []
    for i, mask in enumerate(mask_list):
        m = _bool_mask(mask)
        obj = object_cls()
        obj.label = str(labels[i])
        obj.score = _score(scores[i])
        obj.bbox = bbox_to_roi(mask_bbox(m))
        obj.mask = mask_to_image(m, _copy_header(hdr))
        pos = positions[i] if positions is not None else None
        if pos is not None:
            xyz = [float(v) for v in (pos.x, pos.y, pos.z)] if hasattr(pos, "x") else [float(v) for v in pos]
            if len(xyz) == 3 and all(math.isfinite(v) for v in xyz):
                obj.has_position = True
                obj.position = Point(x=xyz[0], y=xyz[1], z=xyz[2])
        if num_points is not None and hasattr(obj, "num_points"):
            obj.num_points = max(0, int(num_points[i]))
        objects.append(obj)
    result.objects = objects
    return result


# ------------------------------------------------------------------------------------------ validation

def validate_points(points: Any, width: int, height: int,
                    max_points: int | None = None) -> list[tuple[float, float]]:
    """Click prompts as a list of (x = column, y = row) float pairs, each finite and inside the image.

    Accepts geometry_msgs/Point(-like) objects (z ignored), (x, y[, z]) sequences or an (N, 2|3) array.
    """
    if points is None:
        return []
    items = list(points) if not isinstance(points, np.ndarray) else list(np.atleast_2d(points)) if points.size else []
    if max_points is not None and len(items) > max_points:
        raise RequestError(f"{len(items)} points given, at most {max_points} are allowed")
    out: list[tuple[float, float]] = []
    for i, p in enumerate(items):
        try:
            if hasattr(p, "x") and hasattr(p, "y"):
                x, y = float(p.x), float(p.y)
            else:
                vals = [float(v) for v in p]
                if len(vals) not in (2, 3):
                    raise RequestError(f"point {i} has {len(vals)} coordinates; expected (x, y) or (x, y, z)")
                x, y = vals[0], vals[1]
        except (TypeError, ValueError) as exc:
            if isinstance(exc, RequestError):
                raise
            raise RequestError(f"point {i} is not numeric: {p!r}") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise RequestError(f"point {i} is not finite: x={x}, y={y}")
        if not (0 <= x < width and 0 <= y < height):
            raise RequestError(f"point {i} (x={x:g}, y={y:g}) is outside the {width}x{height} image "
                               f"(x must be in [0, {width}), y in [0, {height}))")
        out.append((x, y))
    return out


def validate_boxes(boxes: Any, width: int, height: int,
                   max_boxes: int | None = None) -> list[tuple[float, float, float, float]]:
    """Box prompts as a list of (x0, y0, x1, y1) float tuples, x1/y1 exclusive, non-empty, inside the image.

    Accepts sensor_msgs/RegionOfInterest(-like) objects (x_offset, y_offset, width, height) or 4-sequences
    already in (x0, y0, x1, y1) form. An all-zero RegionOfInterest (ROS's "whole image") is rejected as empty.
    """
    if boxes is None:
        return []
    items = list(boxes) if not isinstance(boxes, np.ndarray) else list(np.atleast_2d(boxes)) if boxes.size else []
    if max_boxes is not None and len(items) > max_boxes:
        raise RequestError(f"{len(items)} boxes given, at most {max_boxes} are allowed")
    out: list[tuple[float, float, float, float]] = []
    for i, b in enumerate(items):
        try:
            if hasattr(b, "x_offset"):
                x0, y0 = float(b.x_offset), float(b.y_offset)
                x1, y1 = x0 + float(b.width), y0 + float(b.height)
            else:
                vals = [float(v) for v in b]
                if len(vals) != 4:
                    raise RequestError(f"box {i} has {len(vals)} values; expected (x0, y0, x1, y1)")
                x0, y0, x1, y1 = vals
        except (TypeError, ValueError) as exc:
            if isinstance(exc, RequestError):
                raise
            raise RequestError(f"box {i} is not numeric: {b!r}") from None
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise RequestError(f"box {i} is not finite: ({x0}, {y0}, {x1}, {y1})")
        if x1 <= x0 or y1 <= y0:
            raise RequestError(f"box {i} is empty: ({x0:g}, {y0:g}, {x1:g}, {y1:g}) has no area")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise RequestError(f"box {i} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the {width}x{height} image")
        out.append((x0, y0, x1, y1))
    return out


_WHITESPACE_RUN = re.compile(r"\s+")
# Unicode category Cc (U+0000-001F, U+007F-009F) minus the whitespace ones normalised below (\t \n \v \f \r).
_BAD_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def validate_prompt(text: Any, max_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> str:
    """The prompt, normalised: NFC, runs of whitespace collapsed to one space, stripped.

    Decision: the whitespace controls (tab, newline, vertical tab, form feed, carriage return) are
    *normalised*, since a trailing newline from a speech pipeline or ``ros2 topic pub`` is harmless; every
    other control character (C0/C1, DEL) is *rejected*: it means corrupt or hostile input, and removing it
    silently could change what is segmented. Other Unicode (accents, CJK, emoji, zero-width joiners) is kept.
    Over-long prompts (> ``max_chars`` characters after normalisation) are rejected. "" is valid (= stop).
    """
    if not isinstance(text, str):
        raise RequestError(f"prompt must be a string, got {type(text).__name__}")
    if len(text) > 8 * max_chars + 1024:  # refuse megabytes before doing any per-character work
        raise RequestError(f"prompt is {len(text)} characters long; the limit is {max_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"prompt is not valid Unicode text (unpaired surrogate at index {exc.start})") from None
    bad = _BAD_CONTROL.search(text)
    if bad:
        raise RequestError(f"prompt contains control character U+{ord(bad.group()):04X} at index {bad.start()}")
    norm = _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text)).strip()
    if len(norm) > max_chars:
        raise RequestError(f"prompt is {len(norm)} characters long; the limit is {max_chars}")
    return norm
