"""What a warm-up at start-up saves the first frame: one cold process, one JSON line.

Loads a checkpoint (default: the bundled model), optionally warms it up at the frame's size
(``PixelSailEngine.warm_up``, what the node does at configure), then times the first ``engine.segment`` on the node
suite's frame and standing prompt, the frames after it, and a first click with a description. Run it once with
``--warm-up`` and once without, each in a fresh process: the first request of a process is what the warm-up is for.
``--fresh-compiler-cache`` gives torch.compile an empty cache directory, as on a robot's first start.
Used on a lent GPU machine by scripts/device_check.sh; the CPU figures are in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--decoding", default="auto")
    ap.add_argument("--compile-image", action="store_true")
    ap.add_argument("--warm-up", action="store_true", help="warm up at the frame's size before the first frame")
    ap.add_argument("--fresh-compiler-cache", action="store_true")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=6, help="frames timed, the first included")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = ap.parse_args(argv)
    if a.frames < 2:
        ap.error("--frames must be at least 2")
    cache = tempfile.TemporaryDirectory(prefix="inductor_") if a.fresh_compiler_cache else None
    if cache is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name  # read when torch.compile first runs

    import torch

    from pixel_sail_ros.allocator import keep_freed_memory
    from pixel_sail_ros.engine import PixelSailEngine
    from pixel_sail_ros.ros.bench.node_bench import FRAME_INDEX, FRAME_SEED, PROMPT  # no rclpy
    from pixel_sail_ros.training.camera_frames import render_frame

    if a.threads:
        torch.set_num_threads(a.threads)
    keep_freed_memory()  # as the node does by default
    engine = PixelSailEngine.from_pretrained(a.model, device=a.device, dtype=a.dtype, decoding=a.decoding,
                                             compile_image=a.compile_image)
    image = render_frame(FRAME_SEED, FRAME_INDEX, a.width, a.height).rgb
    warm_up_s = engine.warm_up(a.width, a.height) if a.warm_up else 0.0

    def timed(**request) -> tuple[float, int]:
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        masks = len(engine.segment(image, **request).masks)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - start), masks

    frames = [timed(text=PROMPT) for _ in range(a.frames)]
    click_ms, _ = timed(points=[(a.width / 2, a.height / 2)], describe=True)
    print(json.dumps({
        "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""), "decoding": engine.decoding,
        "compile_image": engine.compile_image, "resolution": [a.width, a.height], "warm_up": a.warm_up,
        "fresh_compiler_cache": a.fresh_compiler_cache, "torch_threads": torch.get_num_threads(),
        "warm_up_s": round(warm_up_s, 3), "first_frame_ms": round(frames[0][0], 1),
        "later_frames_ms_p50": round(statistics.median(ms for ms, _ in frames[1:]), 1),
        "first_click_described_ms": round(click_ms, 1), "masks_per_frame": [m for _, m in frames],
    }))
    if cache is not None:
        cache.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
