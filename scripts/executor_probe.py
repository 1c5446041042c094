"""Does spinning rclpy beside the model slow the model? The engine on the node's frames, timed per request, while
this process spins an rclpy executor subscribed to a 30 Hz 640x480 rgb8 stream published by a child process.

    python scripts/executor_probe.py --executor multi|single|events|none [--seconds 30]

`none` runs the engine alone (no ROS at all). Prints one JSON line: engine p50/p95/max and how many requests
took over 100 ms. This is how the node's 0.1-2 s stalls were traced to rclpy's MultiThreadedExecutor
(docs/PERFORMANCE.md, one executor thread). Run it with ROS_DOMAIN_ID set apart from other ROS processes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from pixel_sail_ros.bench.stats import percentile, rounded

TOPIC = "executor_probe_image"


def engine_times(seconds: float, threads: int) -> dict[str, Any]:
    """Segment the node suite's standing prompt on its 640x480 frame for ``seconds``; the engine's time per request."""
    import torch

    from pixel_sail_ros.engine import PixelSailEngine
    from pixel_sail_ros.ros.bench.node_bench import FRAME_INDEX, FRAME_SEED, HEIGHT, PROMPT, WIDTH
    from pixel_sail_ros.training.camera_frames import render_frame

    torch.set_num_threads(threads)
    engine = PixelSailEngine.from_pretrained(None, device="cpu")
    frame = render_frame(FRAME_SEED, FRAME_INDEX, WIDTH, HEIGHT).rgb  # the node suite's frame
    for _ in range(3):
        engine.segment(frame, text=PROMPT)
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        times.append(1000 * engine.segment(frame, text=PROMPT).seconds)
    return {"requests": len(times), "engine_ms_p50": rounded(percentile(times, 50), 1),
            "engine_ms_p95": rounded(percentile(times, 95), 1), "engine_ms_max": rounded(max(times), 1),
            "over_100_ms": sum(t > 100 for t in times)}


def publish_stream() -> None:
    """The child process: 640x480 rgb8 at 30 Hz, best effort, until killed."""
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from pixel_sail_ros.ros.bench.node_bench import frame_message, sensor_qos

    rclpy.init()
    node = Node("executor_probe_camera")
    pub = node.create_publisher(Image, TOPIC, sensor_qos())
    msg = frame_message(640, 480)
    tick = time.monotonic()
    while True:
        tick += 1 / 30
        time.sleep(max(0.0, tick - time.monotonic()))
        msg.header.stamp = node.get_clock().now().to_msg()
        pub.publish(msg)


def make_executor(kind: str) -> Any:
    if kind == "multi":
        from rclpy.executors import MultiThreadedExecutor

        return MultiThreadedExecutor(num_threads=3)  # as the node spun before 2026-12-02
    if kind == "single":
        from rclpy.executors import SingleThreadedExecutor

        return SingleThreadedExecutor()
    from rclpy.experimental import EventsExecutor

    return EventsExecutor()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--executor", choices=("multi", "single", "events", "none"), default="single")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the engine")
    ap.add_argument("--publish", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.publish:
        publish_stream()
        return 0
    if args.executor == "none":
        print(json.dumps({"executor": "none", **engine_times(args.seconds, args.threads)}), flush=True)
        return 0

    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from pixel_sail_ros.ros.bench.node_bench import sensor_qos

    camera = subprocess.Popen([sys.executable, __file__, "--publish"])
    rclpy.init()
    node = Node("executor_probe")
    received = [0]

    def on_image(msg: Image) -> None:
        np.frombuffer(msg.data, np.uint8)  # as the node's zero-copy conversion
        received[0] += 1

    node.create_subscription(Image, TOPIC, on_image, sensor_qos())
    executor = make_executor(args.executor)
    executor.add_node(node)
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(engine_times(args.seconds, args.threads)), daemon=True)
    try:
        time.sleep(2.0)  # discovery
        worker.start()
        while worker.is_alive():
            executor.spin_once(timeout_sec=0.1)
    finally:
        camera.kill()
        camera.wait()
    print(json.dumps({"executor": args.executor, "frames_received": received[0], **result}), flush=True)
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
