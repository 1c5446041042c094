"""Where the node's non-model time goes: its per-frame steps, timed in-process at the stream's frame size.

The node suite measures overhead = end-to-end − engine from outside; this breaks the same path into the
functions the node calls (rclpy (de)serialisation, image conversion, result building, the label image), so a
change to one of them shows up as a number, not as a guess.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from pixel_sail_ros.bench.stats import percentile, rounded


def _p50_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm caches and lazy imports
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return rounded(1000 * percentile(times, 50))


def _masks(n: int, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.zeros((n, height, width), bool)
    for i in range(n):
        cy, cx, r = height * (i + 1) / (n + 1), width * (i + 1) / (n + 1), min(height, width) / 6
        out[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    return out


def profile(width: int = 640, height: int = 480, repeats: int = 20) -> dict[str, Any]:
    """p50 milliseconds of each per-frame step of the node (no model), for 1 and 3 masks."""
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image

    from pixel_sail_ros.msg import SegmentationResult
    from pixel_sail_ros.ros import conversions, image_conversion, visualization
    from pixel_sail_ros.training.camera_frames import render_frame

    rgb = render_frame(7, 0, width, height).rgb
    msg = image_conversion.numpy_to_image(rgb, "rgb8")
    wire = serialize_message(msg)
    received = deserialize_message(wire, Image)  # what a subscription callback gets
    bgr = image_conversion.numpy_to_image(np.ascontiguousarray(rgb[:, :, ::-1]), "bgr8")
    out: dict[str, Any] = {
        "frame": [width, height],
        "image_serialize_ms": _p50_ms(lambda: serialize_message(msg), repeats),
        "image_deserialize_ms": _p50_ms(lambda: deserialize_message(wire, Image), repeats),
        "to_rgb8_rgb8_ms": _p50_ms(lambda: image_conversion.to_rgb8(received), repeats),
        "to_rgb8_bgr8_ms": _p50_ms(lambda: image_conversion.to_rgb8(bgr), repeats),
        "numpy_to_image_rgb8_ms": _p50_ms(lambda: image_conversion.numpy_to_image(rgb, "rgb8"), repeats),
        "to_rgb8_is_view": bool(np.shares_memory(image_conversion.to_rgb8(received),
                                                 np.frombuffer(received.data, np.uint8))),
    }
    for n in (1, 3):
        masks = _masks(n, height, width)
        scores, labels = [0.9] * n, ["red circle"] * n

        def build() -> Any:
            return conversions.build_segmentation_result(
                header=received.header, prompt="red circle", points=[], description="", masks=masks,
                scores=scores, labels=labels, inference_seconds=0.1)

        result = build()
        out[f"build_result_{n}mask_ms"] = _p50_ms(build, repeats)
        out[f"label_image_{n}mask_ms"] = _p50_ms(lambda: visualization.label_image(masks, (height, width), scores),
                                                 repeats)
        out[f"result_serialize_{n}mask_ms"] = _p50_ms(lambda: serialize_message(result), repeats)
        out[f"result_bytes_{n}mask"] = len(serialize_message(result))
        out[f"result_deserialize_{n}mask_ms"] = _p50_ms(
            lambda: deserialize_message(serialize_message(result), SegmentationResult), repeats)
    label = visualization.label_image(_masks(1, height, width), (height, width))
    out["label_to_image_ms"] = _p50_ms(lambda: image_conversion.numpy_to_image(label, "mono8"), repeats)
    return out


__all__ = ["profile"]
