"""ShapesRef frames as a camera sees them: colour, aligned depth and intrinsics, at a chosen resolution.

A pure function of (seed, index, size), so the synthetic camera node, the demo, the benchmarks and tests
all see exactly the same frame and can score masks and 3D positions against ground truth. No ROS here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from pixel_sail_ros.training.shapesref import Scene, ShapesRefGenerator

BACKGROUND_DEPTH_M = 2.0
NEAREST_OBJECT_M = 0.8
OBJECT_STEP_M = 0.1
FOCAL_FRACTION = 0.8  # fx = fy = FOCAL_FRACTION * width: a ~64 degree horizontal field of view


@dataclass
class SyntheticFrame:
    rgb: np.ndarray  # (H, W, 3) uint8
    depth_m: np.ndarray  # (H, W) float32, metres, aligned to rgb
    masks: np.ndarray  # (N, H, W) bool, visible part of each object, in scene order
    scene: Scene
    K: np.ndarray  # 3x3 intrinsics


def intrinsics(width: int, height: int) -> np.ndarray:
    f = FOCAL_FRACTION * width
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def render_frame(seed: int, index: int, width: Optional[int] = None, height: Optional[int] = None) -> SyntheticFrame:
    """Scene ``index`` of ShapesRef(seed), resized to width×height if given, with a depth image.

    Depth: a fronto-parallel background plane at 2 m; object i (drawing order, later on top) is a flat
    plate at 0.8 m + 0.1 m·(N-1-i), so the object drawn on top is also the nearest one.
    """
    scene = ShapesRefGenerator(seed=seed).scene(index)
    rgb = scene.image
    masks = np.stack([o.mask for o in scene.objects]) if scene.objects else np.zeros((0, *rgb.shape[:2]), bool)
    if width is not None and height is not None and (width, height) != (scene.width, scene.height):
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        masks = np.stack([cv2.resize(m.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
                          for m in masks]) if len(masks) else np.zeros((0, height, width), bool)
    h, w = rgb.shape[:2]
    depth = np.full((h, w), BACKGROUND_DEPTH_M, np.float32)
    n = len(masks)
    for i, m in enumerate(masks):
        depth[m] = NEAREST_OBJECT_M + OBJECT_STEP_M * (n - 1 - i)
    return SyntheticFrame(rgb=np.ascontiguousarray(rgb), depth_m=depth, masks=masks, scene=scene, K=intrinsics(w, h))
