"""A second process for the plumbing tests: publishes a SegmentationResult, or serves `segment`.

Run as `python plumbing_peer.py publish|serve NAMESPACE`. It builds messages from numpy here and the test
checks them there, so what is verified is the real serialisation over Fast DDS between processes.
"""

from __future__ import annotations

import sys

import numpy as np
import rclpy
from geometry_msgs.msg import Point
from rclpy.node import Node
from sensor_msgs.msg import Image, RegionOfInterest

from pixel_sail_ros.msg import SegmentationResult, SegmentedObject
from pixel_sail_ros.srv import Segment


def pattern_mask(height: int, width: int) -> np.ndarray:
    """A mask both processes can recompute: a filled ellipse off-centre."""
    yy, xx = np.mgrid[0:height, 0:width]
    return (((xx - width * 0.6) / (width * 0.25)) ** 2 + ((yy - height * 0.4) / (height * 0.3)) ** 2) <= 1.0


def mono8(mask: np.ndarray) -> Image:
    img = Image(height=mask.shape[0], width=mask.shape[1], encoding="mono8", is_bigendian=0, step=mask.shape[1])
    img.data = (mask.astype(np.uint8) * 255).tobytes()
    return img


def make_result(height: int, width: int, frame: str, sec: int) -> SegmentationResult:
    mask = pattern_mask(height, width)
    ys, xs = np.nonzero(mask)
    res = SegmentationResult()
    res.header.frame_id = frame
    res.header.stamp.sec = sec
    res.header.stamp.nanosec = 123
    res.prompt = "the red mug"
    res.points = [Point(x=10.0, y=20.0, z=0.0)]
    res.description = "a small red mug"
    obj = SegmentedObject(label="red mug", score=0.75, has_position=True)
    obj.bbox = RegionOfInterest(
        x_offset=int(xs.min()), y_offset=int(ys.min()),
        width=int(xs.max() - xs.min() + 1), height=int(ys.max() - ys.min() + 1),
    )
    obj.mask = mono8(mask)
    obj.mask.header = res.header
    obj.position = Point(x=0.1, y=-0.2, z=0.9)
    res.objects = [obj]
    res.inference_seconds = 0.042
    return res


def main() -> None:
    mode, namespace = sys.argv[1], sys.argv[2]
    rclpy.init()
    node = Node("plumbing_peer", namespace=namespace)
    if mode == "publish":
        pub = node.create_publisher(SegmentationResult, "segmentation", 10)
        node.create_timer(0.1, lambda: pub.publish(make_result(48, 64, "camera_optical", 7)))
    else:

        def serve(req: Segment.Request, resp: Segment.Response) -> Segment.Response:
            if req.image.height == 0 or not req.text:
                resp.success = False
                resp.message = "need an image and a text"
                return resp
            resp.success = True
            resp.result = make_result(req.image.height, req.image.width, req.image.header.frame_id, req.image.header.stamp.sec)
            resp.result.prompt = req.text
            resp.result.points = req.points
            return resp

        node.create_service(Segment, "segment", serve)
    print("peer ready", flush=True)
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
