"""The train suite: how fast the tiny model fine-tunes, in float32 and under bf16 autocast.

What a user teaching the model their own objects waits for: images per second through whole optimizer steps
(forward, the bundled model's own losses and probes, backward, clipping, AdamW) at the bundled recipe's batch
shape (4 images × 16 turns of ShapesRef). Both precisions start from the same weights and take the same
batches, drawn before the clock starts, so the ratio is the precision's alone, and the first step's losses
show whether bf16 changed what is computed. The trainer is ``pixel-sail-train``'s own.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any, Optional

import torch

from .stats import percentile, rounded

log = logging.getLogger("pixel_sail_bench.train")

BATCH_SIZE = 4
TURNS_PER_IMAGE = 16
#: The losses of the bundled model's last stages (its model card has the whole command).
RECIPE = [
    "--data", "shapesref", "--batch-size", str(BATCH_SIZE), "--turns-per-image", str(TURNS_PER_IMAGE),
    "--lr", "2e-4", "--warmup-steps", "0", "--num-points", "2048", "--p-absent", "0.4",
    "--aux-weight", "0.5", "--aux-object-weight", "1.5", "--aux-place-weight", "5", "--aux-query-place-weight", "5",
    "--aux-query-place-on", "embedding", "--aux-mask-place-weight", "1",
    "--mix", "referring=0.5,vp_segment=0.15,vp_describe=0.2,text_describe=0.05,vp_qa=0.1",
    "--prompt-probs", "point=0.5,box=0.2,mask=0.3", "--eval-every", "0", "--save-every", "0", "--no-progress",
]
PRECISIONS = ("float32", "bf16-autocast")


def _trainer(model_dir: str, device: str, precision: str, out_dir: str) -> Any:
    from pixel_sail_ros.training import train

    # no --threads: the trainer then keeps the torch thread count the bench's --threads set
    argv = RECIPE + ["--init", model_dir, "--device", device, "--seed", "0", "--max-steps", "1000000",
                     "--bf16", "yes" if precision == "bf16-autocast" else "no", "--output-dir", out_dir]
    return train.Trainer(train.build_parser().parse_args(argv))


def time_precision(model_dir: str, device: str, precision: str, warmup: int, steps: int) -> dict[str, Any]:
    """Time ``steps`` optimizer steps after ``warmup`` untimed ones, on batches drawn before the clock starts."""
    with tempfile.TemporaryDirectory(prefix="pixel_sail_train_bench_") as tmp:
        trainer = _trainer(model_dir, device, precision, tmp)
        loader = trainer.loader()
        batches = [next(loader) for _ in range(warmup + steps)]
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        seconds, losses = [], []
        for i, batch in enumerate(batches):
            sync()
            t0 = time.perf_counter()
            parts = trainer.train_step([batch])
            sync()
            if i >= warmup:
                seconds.append(time.perf_counter() - t0)
            losses.append(parts["loss"])
        device_name = str(trainer.device)
    ms = [1000.0 * s for s in seconds]
    return {
        "precision": precision,
        "device": device_name,
        "images_per_s": rounded(BATCH_SIZE * len(seconds) / sum(seconds), 2),
        "step_ms_p50": rounded(percentile(ms, 50), 1),
        "step_ms_p95": rounded(percentile(ms, 95), 1),
        "first_loss": rounded(losses[0], 4),
        "losses": [rounded(v, 4) for v in losses],
    }


def run(model_path: Optional[str] = None, device: str = "auto", quick: bool = False,
        steps: Optional[int] = None) -> dict[str, Any]:
    """Both precisions on one model; ``bf16_speedup`` is float32's step time over bf16's (p50)."""
    from pixel_sail_ros.engine import BUNDLED_CHECKPOINT

    model_dir = str(model_path or BUNDLED_CHECKPOINT)
    warmup, timed = (1, 3) if quick else (2, 12)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--repeats must be at least 1 for the train suite, got {steps}")
        timed = steps
    entries = []
    for precision in PRECISIONS:
        log.info("train suite: %s, %d + %d steps", precision, warmup, timed)
        entries.append(time_precision(model_dir, device, precision, warmup, timed))
    full, half = entries
    return {
        "preset": "tiny",
        "model": model_dir,
        "batch_size": BATCH_SIZE,
        "turns_per_image": TURNS_PER_IMAGE,
        "warmup_steps": warmup,
        "timed_steps": timed,
        "entries": entries,
        "bf16_speedup": rounded(full["step_ms_p50"] / half["step_ms_p50"], 2),
        "first_loss_rel_diff": rounded(abs(half["first_loss"] - full["first_loss"]) / abs(full["first_loss"]), 4),
    }


__all__ = ["PRECISIONS", "RECIPE", "run", "time_precision"]
