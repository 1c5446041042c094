"""The optimiser's side of training: the learning-rate schedule and AdamW's parameter groups."""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float, time_progress: float = 0.0) -> float:
    """Linear warmup from ~0 to 1, then cosine down to ``min_ratio`` at ``total``, or earlier where
    ``time_progress`` (the spent fraction of a time budget) is further along than the steps. The cosine of
    the spent time also caps the warmup, so a slow run still ends at the floor."""

    def cosine(progress: float) -> float:
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    if warmup > 0 and step < warmup:
        return max(1e-5, min((step + 1) / warmup, cosine(time_progress)))
    return cosine(max((step - warmup) / max(1, total - warmup), time_progress))


def param_groups(
    module: nn.Module, weight_decay: float, lr: float | None = None, lr_scale: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Decay matrices; no decay for biases, norms and other 1-D parameters (as transformers' Trainer).

    ``lr_scale`` maps a module name (one or more dotted components of a parameter's name, e.g. ``patch_stem``)
    to a multiplier of ``lr`` for its parameters: a zero-initialised switch fine-tuned into a trained model
    otherwise grows at the pace of weights that are already in place. A name that matches no trainable
    parameter is an error (a typo would silently train at the base rate). The scheduler scales every group's
    rate alike, so the ratios hold all run long.
    """
    scales = dict(lr_scale or {})
    if scales and lr is None:
        raise ValueError("lr_scale needs the base lr")
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    used: set[str] = set()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in scales if f".{k}." in f".{name}."), None)
        factor = 1.0 if key is None else scales[key]
        if key is not None:
            used.add(key)
        groups.setdefault((factor, p.dim() >= 2), []).append(p)
    unused = sorted(set(scales) - used)
    if unused:
        raise ValueError(f"no trainable parameter is named {unused}")
    out = []
    for (factor, decays), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != 1.0, kv[0][0], not kv[0][1])):
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if factor != 1.0:
            group["lr"] = lr * factor
        out.append(group)
    return out
