"""`make demo`: the node on the bundled model, fed by a synthetic ShapesRef camera, driven by prompts and clicks.

This process is the camera (colour + aligned depth + camera_info at a few Hz) and the user (a prompt sequence,
then a click); the node runs in its own process exactly as a user starts it. Each result is printed with its
IoU against the scene's ground truth, and the node's overlay (debug_image) is written as a PNG.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import rclpy
from geometry_msgs.msg import PointStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import String

from pixel_sail_ros.msg import SegmentationResult
from pixel_sail_ros.training import shapesref

from .image_conversion import image_to_numpy, numpy_to_image
from pixel_sail_ros.training.camera_frames import SyntheticFrame, render_frame

ROOT = Path(__file__).resolve().parents[2]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


class DemoDriver(Node):
    """Publishes the camera streams and the user's prompts; collects the node's answers."""

    def __init__(self, namespace: str) -> None:
        super().__init__("pixel_sail_demo", namespace=namespace)
        self.pub_image = self.create_publisher(Image, "image", 2)
        self.pub_depth = self.create_publisher(Image, "depth", 2)
        self.pub_info = self.create_publisher(CameraInfo, "camera_info", 2)
        self.pub_prompt = self.create_publisher(String, "prompt", 10)
        self.pub_click = self.create_publisher(PointStamped, "click", 10)
        self.results: list[SegmentationResult] = []
        self.overlays: list[tuple[float, np.ndarray]] = []
        self.create_subscription(SegmentationResult, "segmentation", self.results.append, 10)
        self.create_subscription(Image, "debug_image", self._on_overlay, 2)
        self.frame: Optional[SyntheticFrame] = None
        self.scene_start_ns = 0
        self.create_timer(0.2, self._publish_frame)

    def show(self, frame: SyntheticFrame) -> None:
        """Switch the camera to a new scene; results about frames stamped before now are the old scene's."""
        self.scene_start_ns = self.get_clock().now().nanoseconds
        self.frame = frame

    def current(self, res: SegmentationResult) -> bool:
        """Whether a result is about a frame of the scene on show (the node may still answer an older frame)."""
        return res.header.stamp.sec * 1_000_000_000 + res.header.stamp.nanosec >= self.scene_start_ns

    def _on_overlay(self, msg: Image) -> None:
        self.overlays.append((msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9, image_to_numpy(msg, copy=True)))

    def _publish_frame(self) -> None:
        if self.frame is None:
            return
        header_stamp = self.get_clock().now().to_msg()
        img = numpy_to_image(self.frame.rgb, "rgb8")
        img.header.stamp, img.header.frame_id = header_stamp, "camera_optical"
        depth = numpy_to_image(self.frame.depth_m, "32FC1")
        depth.header = img.header
        h, w = self.frame.rgb.shape[:2]
        info = CameraInfo(width=w, height=h, distortion_model="plumb_bob", k=self.frame.K.reshape(-1).tolist())
        info.header = img.header
        self.pub_info.publish(info)
        self.pub_depth.publish(depth)
        self.pub_image.publish(img)


def wait_for(executor: SingleThreadedExecutor, predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        executor.spin_once(timeout_sec=0.05)
    return predicate()


def describe_result(res: SegmentationResult, frame: SyntheticFrame, target: Optional[int]) -> str:
    lat = f"{res.inference_seconds * 1000:.0f} ms"
    if not res.objects:
        verdict = "correct (absent)" if target is None else "MISSED"
        return f"no object  [{verdict}]  model {lat}"
    obj = res.objects[0]
    mask = np.frombuffer(bytes(obj.mask.data), np.uint8).reshape(obj.mask.height, obj.mask.width) > 0
    iou = mask_iou(mask, frame.masks[target]) if target is not None else 0.0
    pos = (f"  xyz=({obj.position.x:+.2f}, {obj.position.y:+.2f}, {obj.position.z:.2f}) m" if obj.has_position
           else "  no 3D position (fewer mask pixels with depth than min_depth_points)")
    truth = "should be absent" if target is None else f"IoU vs truth {iou:.2f}"
    return (f"{len(res.objects)} object(s), score {obj.score:.2f}, box {obj.bbox.width}x{obj.bbox.height}"
            f"@({obj.bbox.x_offset},{obj.bbox.y_offset}), {int(mask.sum())} px{pos}  [{truth}]  model {lat}")


def run_demo(model_path: str, out_dir: Path, scenes: int, seed: int, timeout: float,
             namespace: str = "/pixel_sail") -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    node_cmd = [sys.executable, "-m", "pixel_sail_ros.ros.node", "--ros-args", "-r", f"__ns:={namespace}",
                "--params-file", str(ROOT / "config" / "pixel_sail.yaml"), "-p", "use_depth:=true",
                "-p", "image_qos:=reliable"] + (["-p", f"model_path:={model_path}"] if model_path else [])
    print("starting:", " ".join(node_cmd[1:]), flush=True)
    proc = subprocess.Popen(node_cmd, env=env)
    rclpy.init()
    driver = DemoDriver(namespace)
    ex = SingleThreadedExecutor()
    ex.add_node(driver)
    answered = 0
    asked = 0
    try:
        ready = wait_for(ex, lambda: proc.poll() is not None or (driver.pub_prompt.get_subscription_count() > 0
                                                                and driver.pub_click.get_subscription_count() > 0), 120.0)
        if not ready or proc.poll() is not None:
            print("the node did not come up (see its log above)", flush=True)
            return 1
        for k in range(scenes):
            frame = render_frame(seed, k, 640, 480)
            driver.show(frame)
            rng = np.random.default_rng([seed, k])
            exprs = shapesref.expressions(frame.scene, rng)
            present = [e for e in exprs if e.target is not None]
            absent = [e for e in exprs if e.target is None]
            chosen = present[:2] + absent[:1]
            print(f"\n== scene {k}: {len(frame.masks)} objects: "
                  + ", ".join(shapesref.describe(o) for o in frame.scene.objects), flush=True)
            for expr in chosen:
                asked += 1
                driver.results.clear()
                driver.overlays.clear()
                t0 = time.monotonic()
                driver.pub_prompt.publish(String(data=expr.text))
                def answer() -> Optional[SegmentationResult]:
                    return next((r for r in driver.results if r.prompt == expr.text and driver.current(r)), None)

                ok = wait_for(ex, lambda: answer() is not None, timeout)
                if not ok:
                    print(f"  prompt {expr.text!r}: no answer within {timeout:.0f} s", flush=True)
                    continue
                answered += 1
                res = answer()
                print(f"  prompt {expr.text!r}: {describe_result(res, frame, expr.target)}  "
                      f"(end-to-end {1000 * (time.monotonic() - t0):.0f} ms)", flush=True)
                stamp = res.header.stamp.sec + res.header.stamp.nanosec * 1e-9
                wait_for(ex, lambda: any(abs(s - stamp) < 1e-6 for s, _ in driver.overlays), 2.0)
                for s, img in driver.overlays:
                    if abs(s - stamp) < 1e-6:
                        path = out_dir / f"scene{k}_{expr.text.replace(' ', '_')}.png"
                        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                        print(f"    overlay → {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
                        break
            driver.pub_prompt.publish(String(data=""))
            target = int(np.argmax([m.sum() for m in frame.masks]))
            x, y = shapesref.click_point(frame.masks[target], rng)
            click = PointStamped()
            click.header.frame_id = "camera_optical"
            click.point.x, click.point.y = float(x), float(y)
            asked += 1
            driver.results.clear()
            wait_for(ex, lambda: False, 0.3)
            driver.pub_click.publish(click)
            ok = wait_for(ex, lambda: any(len(r.points) == 1 and driver.current(r) for r in driver.results), timeout)
            if ok:
                answered += 1
                res = next(r for r in driver.results if len(r.points) == 1 and driver.current(r))
                print(f"  click ({x}, {y}) on {shapesref.describe(frame.scene.objects[target])}: "
                      f"description {res.description!r}; {describe_result(res, frame, target)}", flush=True)
            else:
                print(f"  click ({x}, {y}): no answer within {timeout:.0f} s", flush=True)
    finally:
        ex.remove_node(driver)
        driver.destroy_node()
        rclpy.try_shutdown()
        proc.send_signal(2)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"\n{answered}/{asked} requests answered; overlays in {out_dir}")
    return 0 if answered == asked else 1


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default="", help="checkpoint directory; empty = the bundled model")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="where overlay PNGs go")
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=2026, help="ShapesRef seed of the demo scenes (not a training seed)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer")
    ap.add_argument("--namespace", default="/pixel_sail", help="namespace of the node and the synthetic camera")
    a = ap.parse_args(argv)
    return run_demo(a.model_path, Path(a.out), a.scenes, a.seed, a.timeout, a.namespace)


if __name__ == "__main__":
    sys.exit(main())
