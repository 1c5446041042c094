"""A trivial rclpy echo (``echo_in`` → ``echo_out``, sensor_msgs/Image): the cost of ROS transport itself.

The node suite streams frames of the node's input size through it, so the node's overhead can be read
against what two hops of plain rclpy cost on the same machine. Input QoS matches the node's image
subscription (best effort, depth 1); output QoS matches its result publisher (reliable, depth 10).
"""

from __future__ import annotations

import sys
from typing import Optional


def main(args: Optional[list[str]] = None) -> int:
    import rclpy
    from rclpy.node import Node
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from ..spin import spin_until_shutdown

    rclpy.init(args=args)
    node = Node("pixel_sail_bench_echo")
    pub = node.create_publisher(Image, "echo_out", 10)
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
    node.create_subscription(Image, "echo_in", pub.publish, qos)
    node.get_logger().info("echo ready")
    spin_until_shutdown(node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
