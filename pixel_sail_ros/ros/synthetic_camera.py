"""`synthetic_camera_node`: a camera that publishes ShapesRef scenes (colour, aligned depth, camera_info).

For the demo, the benchmarks, soak runs and tests, where no real camera exists. The rendering is a pure
function of (seed, index, size), so a test can recompute exactly what was published and score masks
against ground truth.
"""

from __future__ import annotations

import sys
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


def main(args: Optional[list[str]] = None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node
    from sensor_msgs.msg import CameraInfo, Image

    from .image_conversion import numpy_to_image

    rclpy.init(args=args)
    node = Node("synthetic_camera")
    rate = node.declare_parameter("rate_hz", 5.0).value
    seed = node.declare_parameter("seed", 0).value
    fixed = node.declare_parameter("scene_index", -1).value  # -1 = a new scene every `frames_per_scene` frames
    per_scene = node.declare_parameter("frames_per_scene", 10).value
    width = node.declare_parameter("width", 640).value
    height = node.declare_parameter("height", 480).value
    frame_id = node.declare_parameter("frame_id", "camera_optical").value
    with_depth = node.declare_parameter("publish_depth", False).value
    pub_img = node.create_publisher(Image, "image", 2)
    pub_depth = node.create_publisher(Image, "depth", 2) if with_depth else None
    pub_info = node.create_publisher(CameraInfo, "camera_info", 2) if with_depth else None
    cache: dict[int, SyntheticFrame] = {}
    count = [0]

    def tick() -> None:
        index = fixed if fixed >= 0 else count[0] // max(1, per_scene)
        if index not in cache:
            cache.clear()
            cache[index] = render_frame(seed, index, width, height)
        frame = cache[index]
        stamp = node.get_clock().now().to_msg()
        img = numpy_to_image(frame.rgb, "rgb8")
        img.header.stamp, img.header.frame_id = stamp, frame_id
        pub_img.publish(img)
        if pub_depth is not None:
            d = numpy_to_image(frame.depth_m, "32FC1")
            d.header = img.header
            pub_depth.publish(d)
            info = CameraInfo(width=width, height=height, distortion_model="plumb_bob")
            info.header = img.header
            info.k = frame.K.reshape(-1).tolist()
            info.p = [frame.K[0, 0], 0.0, frame.K[0, 2], 0.0, 0.0, frame.K[1, 1], frame.K[1, 2], 0.0, 0.0, 0.0, 1.0, 0.0]
            info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
            info.d = [0.0] * 5
            pub_info.publish(info)
        count[0] += 1

    node.create_timer(1.0 / rate, tick)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
