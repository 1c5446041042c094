"""Training plots (matplotlib, Agg backend, no display needed): loss/metric curves and mask examples."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics log; a torn last line (crash while writing) is skipped."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(y) < k:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    s = (c[k:] - c[:-k]) / k
    return np.concatenate([y[: k - 1], s])


def plot_curves(records: Iterable[dict], out_png: str | os.PathLike) -> Path:
    """Training loss (raw + moving average) and eval metrics (cIoU, gIoU, accuracies) against the step."""
    plt = _plt()
    recs = list(records)
    train = [r for r in recs if r.get("type") == "train" and "loss" in r]
    evals = [r for r in recs if r.get("type") == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        x = np.array([r["step"] for r in train])
        for key, colour in (("loss", "C0"), ("loss_mask", "C1"), ("loss_dice", "C2"), ("loss_text", "C3")):
            y = np.array([r.get(key, np.nan) for r in train], dtype=float)
            if np.all(np.isnan(y)):
                continue
            ax1.plot(x, y, color=colour, alpha=0.2, lw=0.8)
            ax1.plot(x, _smooth(np.nan_to_num(y), max(1, len(y) // 50)), color=colour, label=key)
        ax1.set_yscale("log")
        ax1.legend(fontsize=8)
    ax1.set_xlabel("step")
    ax1.set_title("training loss")
    if evals:
        x = [r["step"] for r in evals]
        for key in ("ciou", "giou", "no_target_accuracy", "description_accuracy"):
            y = [r.get(key) for r in evals]
            if any(v is not None for v in y):
                ax2.plot(x, [np.nan if v is None else v for v in y], marker="o", ms=3, label=key)
        ax2.set_ylim(0, 1)
        ax2.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_title("held-out eval")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def overlay(image: np.ndarray, mask: np.ndarray | None, colour: Sequence[int] = (255, 0, 255), alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 with a translucent mask on top."""
    img = image.astype(np.float32).copy()
    if mask is not None and mask.any():
        m = mask.astype(bool)
        img[m] = (1 - alpha) * img[m] + alpha * np.asarray(colour, np.float32)
    return img.clip(0, 255).astype(np.uint8)


def plot_examples(examples: Sequence[dict], out_png: str | os.PathLike, cols: int = 4) -> Path:
    """Grid of examples: each ``{"image", "gt" (H,W bool|None), "pred" (H,W bool|None), "title"}``.

    Each example is drawn twice side by side: ground truth (green) and prediction (magenta).
    """
    plt = _plt()
    n = max(1, len(examples))
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(3.2 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ex in enumerate(examples):
        r, c = divmod(i, cols)
        a_gt, a_pr = axes[r, 2 * c], axes[r, 2 * c + 1]
        a_gt.imshow(overlay(ex["image"], ex.get("gt"), (0, 220, 0)))
        a_pr.imshow(overlay(ex["image"], ex.get("pred"), (255, 0, 255)))
        a_gt.set_title(("GT: " + ex.get("title", ""))[:40], fontsize=7)
        a_pr.set_title(("pred: " + ex.get("pred_text", ""))[:40], fontsize=7)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
