"""The paper's ablation at this project's scale (issue 4 item 5): four tiny models, one budget each.

    plain baseline (no upsampler, pooled visual prompts) → + learnable upsampling → + visual-prompt injection
    → + distillation from a small ShapesRef expert (:mod:`.teacher`)

Every variant trains with the same recipe, seed, data order and number of steps (``--steps``), then
``pixel-sail-eval`` scores it on the same held-out ShapesRef samples. Each run is its own process (as a user
runs them). Writes ``ablation.json`` and ``ablation.md`` (a README-ready table) to ``--output-dir``.

    python -m pixel_sail_ros.training.ablation --steps 2000 --teacher-steps 1500 --output-dir runs/ablation
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .evaluate import DEFAULT_SEED as EVAL_SEED

VARIANTS: tuple[tuple[str, str, dict[str, Any], bool], ...] = (
    ("baseline", "plain baseline (no upsampler, pooled visual prompts)",
     {"use_upsampler": False, "visual_prompt_injection": False}, False),
    ("upsampler", "+ learnable upsampling", {"visual_prompt_injection": False}, False),
    ("vp_injection", "+ visual-prompt injection", {}, False),
    ("distillation", "+ distillation (SegFormer expert on ShapesRef)", {}, True),
)
#: The from-scratch recipe of the bundled model's stage 1 (its model card), shared by every variant. Arguments
#: after the ablation's own (``-- --lr 5e-4`` …) are passed to ``pixel-sail-train`` after these and win.
RECIPE: tuple[str, ...] = ("--lr", "1e-3", "--warmup-steps", "60", "--min-lr-ratio", "0.05", "--aux-weight", "0.5",
                           "--curriculum-steps", "150", "--num-points", "2048")
COLUMNS = (("ciou", "cIoU"), ("giou", "gIoU"), ("description_accuracy", "description acc."),
           ("no_target_accuracy", "no-target acc."), ("click_ciou", "click cIoU"))


def _run(cmd: list[str], log_path: Path) -> None:
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[2:5])} … failed (exit {proc.returncode}); log {log_path}:\n{tail}")


def run_ablation(output_dir: str | Path, steps: int, teacher_steps: int, eval_samples: int, batch_size: int = 4,
                 turns_per_image: int = 16, seed: int = 1, threads: int = 0, train_args: list[str] | None = None,
                 only: list[str] | None = None) -> list[dict[str, Any]]:
    """Train and score each variant; a variant whose eval is already on disk with the same budget is reused,
    so an interrupted ablation resumes at the next variant. The JSON and table are rewritten after each one."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    thread_args = ["--threads", str(threads)] if threads else []
    teacher_dir = out / "teacher"
    rows: list[dict[str, Any]] = []
    for key, label, overrides, distil in VARIANTS:
        if only and key not in only:
            continue
        run_dir = out / key
        eval_path = run_dir / "eval_shapesref.json"
        done = out / f"{key}.row.json"
        if done.is_file() and eval_path.is_file():
            row = json.loads(done.read_text(encoding="utf-8"))
            if row.get("steps") == steps and row.get("num_samples") == eval_samples:
                rows.append(row)
                continue
        cmd = py + ["pixel_sail_ros.training.train", "--preset", "tiny", "--data", "shapesref", "--seed", str(seed),
                    "--max-steps", str(steps), "--batch-size", str(batch_size), "--turns-per-image", str(turns_per_image),
                    "--model-overrides", json.dumps(overrides), "--eval-every", "0", "--save-every", "0",
                    "--no-progress", "--output-dir", str(run_dir), *thread_args, *RECIPE, *(train_args or [])]
        if distil:
            if not (teacher_dir / "model.safetensors").is_file():
                _run(py + ["pixel_sail_ros.training.teacher", "--steps", str(teacher_steps), "--seed", str(seed),
                           "--output-dir", str(teacher_dir), *thread_args], out / "teacher.log")
            cmd += ["--teacher-model", str(teacher_dir), "--teacher-target", "pixel"]
        t0 = time.time()
        _run(cmd, out / f"{key}.train.log")
        train_s = time.time() - t0
        _run(py + ["pixel_sail_ros.training.evaluate", "--model", str(run_dir), "--data", "shapesref",
                   "--num-samples", str(eval_samples), "--seed", str(EVAL_SEED), "--device", "cpu",
                   "--output", str(eval_path), *thread_args], out / f"{key}.eval.log")
        metrics = json.loads(eval_path.read_text(encoding="utf-8"))
        rows.append({"variant": key, "label": label, "model_overrides": overrides, "distillation": distil,
                     "steps": steps, "train_seconds": round(train_s, 1),
                     **{k: metrics.get(k) for k, _ in COLUMNS}, "num_samples": metrics.get("num_samples")})
        done.write_text(json.dumps(rows[-1], indent=2) + "\n", encoding="utf-8")
        _write_record(out, rows, steps, batch_size, turns_per_image, seed, eval_samples, teacher_steps, train_args)
    _write_record(out, rows, steps, batch_size, turns_per_image, seed, eval_samples, teacher_steps, train_args)
    return rows


def _write_record(out: Path, rows: list[dict[str, Any]], steps: int, batch_size: int, turns_per_image: int,
                  seed: int, eval_samples: int, teacher_steps: int, train_args: list[str] | None) -> None:
    record = {"steps": steps, "batch_size": batch_size, "turns_per_image": turns_per_image, "seed": seed,
              "eval_samples": eval_samples, "eval_seed": EVAL_SEED, "teacher_steps": teacher_steps,
              "train_args": [*RECIPE, *(train_args or [])], "rows": rows}
    (out / "ablation.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (out / "ablation.md").write_text(markdown_table(rows), encoding="utf-8")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| variant | " + " | ".join(name for _, name in COLUMNS) + " | train time |\n"
    head += "|---|" + "---|" * len(COLUMNS) + "---|\n"
    body = ""
    for r in rows:
        cells = ["–" if r.get(k) is None else f"{r[k]:.3f}" for k, _ in COLUMNS]
        body += f"| {r['label']} | " + " | ".join(cells) + f" | {r['train_seconds'] / 60:.0f} min |\n"
    return head + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps per variant (the shared budget)")
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--turns-per-image", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", nargs="*", choices=[v[0] for v in VARIANTS], help="run only these variants")
    a, rest = ap.parse_known_args(argv)
    rows = run_ablation(a.output_dir, a.steps, a.teacher_steps, a.eval_samples, a.batch_size, a.turns_per_image,
                        a.seed, a.threads, rest, a.only)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
