#!/usr/bin/env python3
"""Voice-command grasp client: a line of text in → `segment` call → the target's mask, 3D position and cloud out.

A speech-recognition node publishes what it heard as std_msgs/String; this client also reads lines from
stdin, so it can be tried by typing. For each command it calls the node's `segment` service on the latest
camera frame, then picks the object_cloud published for that frame (same header stamp), and prints what a
grasp planner consumes: frame, stamp, 3D centroid, point count, bounding box and the cloud's extent.

    source env.sh
    python examples/grasp_client.py --namespace /pixel_sail            # then type: the red mug
    python examples/grasp_client.py --namespace /pixel_sail --listen speech/text
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Optional

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import String

from pixel_sail_ros.ros.point_cloud import read_points
from pixel_sail_ros.srv import Segment


def command_to_phrase(text: str) -> str:
    """Strip the imperative a voice command usually starts with: 'pick up the red mug' → 'the red mug'."""
    words = text.strip().rstrip(".!?").split()
    lowered = [w.lower() for w in words]
    for lead in (("pick", "up"), ("grab",), ("grasp",), ("get",), ("take",), ("find",), ("segment",), ("show", "me")):
        if tuple(lowered[: len(lead)]) == lead:
            words = words[len(lead):]
            break
    return " ".join(words)


class GraspClient(Node):
    def __init__(self, namespace: str, listen: Optional[str]) -> None:
        super().__init__("grasp_client", namespace=namespace)
        self.segment = self.create_client(Segment, "segment")
        self.clouds: dict[tuple[int, int], PointCloud2] = {}
        self.create_subscription(PointCloud2, "object_cloud", self._on_cloud, 5)
        if listen:
            self.create_subscription(String, listen, lambda m: self.on_command(m.data), 10)

    def _on_cloud(self, msg: PointCloud2) -> None:
        self.clouds[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = msg
        while len(self.clouds) > 20:
            self.clouds.pop(next(iter(self.clouds)))

    def on_command(self, text: str) -> None:
        phrase = command_to_phrase(text)
        if not phrase:
            return
        if not self.segment.wait_for_service(timeout_sec=5.0):
            print("segment service not available: is pixel_sail_node running in this namespace?", flush=True)
            return
        fut = self.segment.call_async(Segment.Request(text=phrase, describe=True))
        end = time.monotonic() + 60
        while not fut.done() and time.monotonic() < end:
            time.sleep(0.01)
        if not fut.done():
            print(f"{phrase!r}: no answer within 60 s", flush=True)
            return
        resp = fut.result()
        if not resp.success:
            print(f"{phrase!r}: rejected: {resp.message}", flush=True)
            return
        res = resp.result
        stamp = (res.header.stamp.sec, res.header.stamp.nanosec)
        if not res.objects:
            print(f"{phrase!r}: not in view (model answered {res.answer!r})", flush=True)
            return
        obj = max(res.objects, key=lambda o: o.score)
        print(f"target {phrase!r}: {res.description or obj.label!r}  score {obj.score:.2f}", flush=True)
        print(f"  frame {res.header.frame_id!r} stamp {stamp[0]}.{stamp[1]:09d}", flush=True)
        print(f"  bbox x={obj.bbox.x_offset} y={obj.bbox.y_offset} w={obj.bbox.width} h={obj.bbox.height}", flush=True)
        if obj.has_position:
            p = obj.position
            print(f"  position (camera optical frame) x={p.x:+.3f} y={p.y:+.3f} z={p.z:.3f} m", flush=True)
        else:
            print("  no 3D position (start the node with use_depth:=true and a registered depth stream)", flush=True)
        end = time.monotonic() + 2.0
        while stamp not in self.clouds and time.monotonic() < end:
            time.sleep(0.02)
        cloud = self.clouds.get(stamp)
        if cloud is not None:
            pts = read_points(cloud)
            if len(pts) == 0:
                print("  cloud empty (no valid depth under the mask)", flush=True)
                return
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            print(f"  cloud {len(pts)} points, extent x[{lo[0]:+.3f},{hi[0]:+.3f}] y[{lo[1]:+.3f},{hi[1]:+.3f}] "
                  f"z[{lo[2]:.3f},{hi[2]:.3f}] m", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--namespace", default="/pixel_sail")
    ap.add_argument("--listen", default=None, help="also take commands from this std_msgs/String topic")
    args = ap.parse_args(rclpy.utilities.remove_ros_args(sys.argv if argv is None else argv)[1:])
    rclpy.init()
    client = GraspClient(args.namespace, args.listen)
    executor = SingleThreadedExecutor()
    executor.add_node(client)

    def spin() -> None:
        try:
            executor.spin()
        except ExternalShutdownException:
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        for line in sys.stdin:
            client.on_command(line)
        if args.listen:
            spinner.join()
    except KeyboardInterrupt:
        pass
    finally:
        executor.shutdown()  # stops the spinning thread before the node goes away
        spinner.join(timeout=2.0)
        client.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
