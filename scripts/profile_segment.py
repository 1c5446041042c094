"""Where one segmentation request's time goes, on any device: torch.profiler over a few engine.segment calls.

Prints the top operators by self CPU time and by device time, for a checkpoint (default: the bundled model)
at an image size (default 640x480). Used on a lent GPU machine by scripts/device_check.sh (PROFILE=1).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from pixel_sail_ros.engine import BUNDLED_CHECKPOINT, PixelSailEngine
from pixel_sail_ros.training.shapesref import ShapesRefGenerator, describe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(BUNDLED_CHECKPOINT))
    ap.add_argument("--size", type=int, default=640, help="the scene's long side")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--calls", type=int, default=5)
    a = ap.parse_args(argv)
    engine = PixelSailEngine.from_pretrained(a.model, device=a.device)
    scene = ShapesRefGenerator(seed=0, min_side=a.size, max_side=a.size).scene(0)
    image, text = scene.image, describe(scene.objects[-1])  # a real scene, so the answer has a [SEG] to decode
    for _ in range(3):
        engine.segment(image, text=text)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(a.calls):
            out = engine.segment(image, text=text)
    print(f"{a.model} {image.shape[1]}x{image.shape[0]} on {engine.device}/{engine.dtype}: answers {out.answers}, "
          f"{out.seconds * 1000:.1f} ms last call", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    if engine.device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
