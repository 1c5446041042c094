"""What a person looks at in RViz: the debug overlay, the label image and the 3D markers.

Object i has the same colour everywhere (overlay, markers): ``palette(n)[i]``, a fixed sequence, so a user can
match a mask in the overlay with its sphere in the 3D view.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from builtin_interfaces.msg import Duration
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

__all__ = ["palette", "label_image", "overlay", "make_markers"]

_GOLDEN = 0.618033988749895


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB colours, deterministic and well separated (hues stepped by the golden ratio)."""
    h = (0.07 + _GOLDEN * np.arange(n)) % 1.0
    s, v = 0.85, 0.95
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    vv = np.full(n, v)
    pp = np.full(n, p)
    table = np.stack([
        np.stack([vv, t, pp], 1), np.stack([q, vv, pp], 1), np.stack([pp, vv, t], 1),
        np.stack([pp, q, vv], 1), np.stack([t, pp, vv], 1), np.stack([vv, pp, q], 1)], 0)  # (6, n, 3)
    rgb = table[i, np.arange(n)] if n else np.zeros((0, 3))
    return np.round(rgb * 255).astype(np.uint8)


def _as_masks(masks: np.ndarray | Sequence[np.ndarray], shape: tuple[int, int] | None) -> np.ndarray:
    if isinstance(masks, np.ndarray):
        arr = masks
    elif len(masks):
        arr = np.stack([np.asarray(m) for m in masks])
    else:
        if shape is None:
            raise ValueError("no masks and no shape: pass shape=(H, W) for an empty list")
        return np.zeros((0, *shape), bool)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {arr.shape}")
    if shape is not None and arr.shape[1:] != tuple(shape):
        raise ValueError(f"masks are {arr.shape[2]}x{arr.shape[1]}, the image is {shape[1]}x{shape[0]}")
    return arr.astype(bool, copy=False)


def label_image(masks: np.ndarray | Sequence[np.ndarray], shape: tuple[int, int] | None = None,
                scores: Sequence[float] | None = None) -> np.ndarray:
    """(H, W) uint8: 0 background, i+1 where object i is.

    Overlaps: without scores the later object wins; with scores the higher score wins (ties: the later one),
    i.e. each pixel shows the object the model is surest of. At most 255 objects fit in uint8.
    ``shape`` (H, W) is needed only for an empty list of masks (and is checked when given).
    """
    m = _as_masks(masks, shape)
    n = m.shape[0]
    if n > 255:
        raise ValueError(f"{n} objects do not fit a uint8 label image (at most 255)")
    out = np.zeros(m.shape[1:], np.uint8)
    if scores is None:
        order = np.arange(n)
    else:
        sc = np.asarray(scores, dtype=np.float64).reshape(-1)
        if sc.size != n:
            raise ValueError(f"{sc.size} scores for {n} masks")
        order = np.argsort(np.nan_to_num(sc, nan=-np.inf), kind="stable")
    for i in order:  # one vectorised pass per object, painted from least to most trusted
        out[m[i]] = i + 1
    return out


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), exclusive ends, of a (H, W) bool mask; None when empty."""
    cols, rows = mask.any(axis=0), mask.any(axis=1)
    if not cols.any():
        return None
    return (int(cols.argmax()), int(rows.argmax()),
            cols.size - int(cols[::-1].argmax()), rows.size - int(rows[::-1].argmax()))


def _ascii(text: str) -> str:
    """Hershey fonts draw ASCII only: anything else becomes '?' instead of garbage."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)


def overlay(rgb: np.ndarray, masks: np.ndarray | Sequence[np.ndarray], labels: Sequence[str] | None = None,
            scores: Sequence[float] | None = None, alpha: float = 0.45) -> np.ndarray:
    """A new (H, W, 3) uint8 image: ``rgb`` with each mask tinted in its palette colour, outlined, and labelled.

    Text is "label score" at the top-left of the mask's box. The input image is not modified.
    """
    import cv2

    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got shape {img.shape} dtype {img.dtype}")
    m = _as_masks(masks, img.shape[:2])
    n = m.shape[0]
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} masks")
    if scores is not None and len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} masks")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = np.array(img, copy=True, order="C")
    if n == 0:
        return out
    colours = palette(n)
    lbl = label_image(m, scores=scores)
    boxes = [_box(m[i]) for i in range(n)]
    for i, box in enumerate(boxes):  # tint: per object, only inside its box (cheap for small objects)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        region = out[y0:y1, x0:x1]
        solid = np.empty_like(region)
        solid[:] = colours[i]
        blended = cv2.addWeighted(region, 1.0 - alpha, solid, alpha, 0.0)
        np.copyto(region, blended, where=(lbl[y0:y1, x0:x1] == i + 1)[:, :, None])

    h, w = img.shape[:2]
    font, fscale = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, min(h, w) / 900)
    thick = max(1, int(round(min(h, w) / 400)))
    for i, box in enumerate(boxes):  # outlines and labels on top of every tint
        if box is None:
            continue
        colour = tuple(int(c) for c in colours[i])
        x0, y0, x1, y1 = box
        contours, _ = cv2.findContours(m[i, y0:y1, x0:x1].astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))
        cv2.drawContours(out, contours, -1, colour, thick)
        parts = [labels[i] if labels is not None else f"object {i}"]
        if scores is not None:
            parts.append(f"{float(scores[i]):.2f}")
        text = _ascii(" ".join(p for p in parts if p))
        if not text:
            continue
        (tw, th), base = cv2.getTextSize(text, font, fscale, 1)
        tx = min(x0, max(0, w - tw - 2))
        ty = y0 - th - base - 2 if y0 - th - base - 2 >= 0 else y0  # above the box if it fits, else inside
        cv2.rectangle(out, (tx, ty), (tx + tw + 2, ty + th + base + 2), colour, -1)
        ink = (0, 0, 0) if int(colours[i].astype(int).sum()) > 380 else (255, 255, 255)
        cv2.putText(out, text, (tx + 1, ty + th + 1), font, fscale, ink, 1, cv2.LINE_AA)
    return out


def make_markers(header: Header, positions: Sequence[Sequence[float] | None], labels: Sequence[str],
                 ns: str = "pixel_sail", *, sphere_diameter: float = 0.05,
                 text_height: float = 0.04, up: Sequence[float] = (0.0, -1.0, 0.0)) -> MarkerArray:
    """A MarkerArray: DELETEALL first, then per object with a position a sphere (id 2i) and a label (id 2i+1).

    DELETEALL + lifetime 0 ("until replaced") makes each result replace the previous one exactly: no stale
    markers from earlier frames and no blinking between results (yolo_ros #54, ros_anchors.md §8).
    Objects whose position is None get no markers. Labels float above the sphere, along ``up`` (a unit vector;
    the default, -y, is up in an optical frame).
    """
    if len(labels) != len(positions):
        raise ValueError(f"{len(labels)} labels for {len(positions)} positions")
    clear = Marker(header=header, ns=ns, id=0, action=Marker.DELETEALL)
    out = MarkerArray(markers=[clear])
    colours = palette(len(positions)).astype(np.float64) / 255.0
    forever = Duration(sec=0, nanosec=0)
    for i, (pos, label) in enumerate(zip(positions, labels)):
        if pos is None:
            continue
        x, y, z = (float(v) for v in pos)
        if not np.isfinite([x, y, z]).all():
            continue
        colour = ColorRGBA(r=float(colours[i, 0]), g=float(colours[i, 1]), b=float(colours[i, 2]), a=0.9)
        sphere = Marker(header=header, ns=ns, id=2 * i, type=Marker.SPHERE, action=Marker.ADD,
                        lifetime=forever, color=colour)
        sphere.pose.position.x, sphere.pose.position.y, sphere.pose.position.z = x, y, z
        sphere.pose.orientation.w = 1.0
        sphere.scale.x = sphere.scale.y = sphere.scale.z = float(sphere_diameter)
        text = Marker(header=header, ns=ns, id=2 * i + 1, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                      lifetime=forever, text=str(label),
                      color=ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0))
        lift = (sphere_diameter + text_height) * np.asarray(up, dtype=np.float64)
        text.pose.position.x, text.pose.position.y, text.pose.position.z = (float(v) for v in (x, y, z) + lift)
        text.pose.orientation.w = 1.0
        text.scale.z = float(text_height)
        out.markers.append(sphere)
        out.markers.append(text)
    return out
