"""`synthetic_camera_node`: a camera that publishes ShapesRef scenes (colour, aligned depth, camera_info).

For the demo, the benchmarks, soak runs and tests, where no real camera exists. The frames come from
:func:`pixel_sail_ros.training.camera_frames.render_frame`, so a test can recompute exactly what was published.
"""

from __future__ import annotations

import sys
from typing import Optional

from pixel_sail_ros.training.camera_frames import SyntheticFrame, render_frame


def main(args: Optional[list[str]] = None) -> int:
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import CameraInfo, Image

    from .image_conversion import numpy_to_image
    from .spin import spin_until_shutdown

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
    spin_until_shutdown(node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
