"""Spin a plain rclpy node until Ctrl-C or an external shutdown, then release it.

The helper nodes (synthetic camera, bench echo) end the same way; the lifecycle node has its own
teardown (worker, engine, executor) in :mod:`pixel_sail_ros.ros.node`.
"""

from __future__ import annotations

from typing import Any


def spin_until_shutdown(node: Any) -> None:
    """`rclpy.spin(node)`; a SIGINT or a context shut down from outside ends it quietly, and the node and
    the context are released either way."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
