"""Where one segmentation request's time goes, on any device: torch.profiler over a few engine.segment calls.

Prints the top operators by self CPU time and by device time, for a checkpoint (default: the bundled model) on
the node suite's frame and standing prompt (its one yellow circle: the answer carries a mask, so the pixel decoder
is profiled too) at an image size (default 640x480). Used on a lent GPU machine by scripts/device_check.sh
(PROFILE=1).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from pixel_sail_ros.engine import BUNDLED_CHECKPOINT, PixelSailEngine
from pixel_sail_ros.ros.bench.node_bench import FRAME_INDEX, FRAME_SEED, HEIGHT, PROMPT, WIDTH  # no rclpy
from pixel_sail_ros.training.camera_frames import render_frame


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(BUNDLED_CHECKPOINT))
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--height", type=int, default=HEIGHT)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--calls", type=int, default=5)
    a = ap.parse_args(argv)
    engine = PixelSailEngine.from_pretrained(a.model, device=a.device)
    image, text = render_frame(FRAME_SEED, FRAME_INDEX, a.width, a.height).rgb, a.prompt
    for _ in range(3):
        engine.segment(image, text=text)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(a.calls):
            out = engine.segment(image, text=text)
    print(f"{a.model} {image.shape[1]}x{image.shape[0]} on {engine.device}/{engine.dtype}: answers {out.answers} "
          f"with {len(out.masks)} mask(s), {out.seconds * 1000:.1f} ms last call", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    if engine.device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
