"""ShapesRef / referring-segmentation metrics, as DESIGN.md §5 defines them. Pure numpy.

- cIoU: Σ intersection / Σ union over the whole set, so large objects weigh more (the RefCOCO convention).
- gIoU: mean per-sample IoU; an absent target answered with an empty mask scores 1, with any mask 0
  (the gRefCOCO convention, so saying "No target." correctly is rewarded and hallucinating is punished).
- no-target accuracy: over absent-target samples, the fraction answered with an empty mask.
- description accuracy: the text names the right colour and the right shape (and no other colour or shape).

A ground truth of ``None`` means an absent target (an all-False mask of the prediction's shape). A metric over
an empty set is ``None`` rather than NaN, so results stay valid JSON.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .shapesref import COLORS, SHAPES

COLOR_WORDS: tuple[str, ...] = tuple(COLORS)
SHAPE_WORDS: tuple[str, ...] = SHAPES


def _pair(pred: Any, gt: Any | None) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=bool)
    g = np.zeros_like(p) if gt is None else np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} != ground truth shape {g.shape}")
    return p, g


def intersection_union(pred: Any, gt: Any | None) -> tuple[int, int]:
    p, g = _pair(pred, gt)
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


def iou(pred: Any, gt: Any | None) -> float:
    """IoU of one sample; 1.0 when both are empty (a correctly answered absent target)."""
    i, u = intersection_union(pred, gt)
    return 1.0 if u == 0 else i / u


def ciou(preds: Sequence[Any], gts: Sequence[Any | None]) -> float | None:
    """Cumulative IoU: Σ intersection / Σ union over the set (1.0 when every mask is empty)."""
    if len(preds) != len(gts):
        raise ValueError("preds and gts differ in length")
    if not preds:
        return None
    total_i = total_u = 0
    for p, g in zip(preds, gts):
        i, u = intersection_union(p, g)
        total_i += i
        total_u += u
    return 1.0 if total_u == 0 else total_i / total_u


def giou(preds: Sequence[Any], gts: Sequence[Any | None]) -> float | None:
    """Mean per-sample IoU (empty on empty = 1, anything on empty = 0)."""
    if len(preds) != len(gts):
        raise ValueError("preds and gts differ in length")
    if not preds:
        return None
    return float(np.mean([iou(p, g) for p, g in zip(preds, gts)]))


def no_target_accuracy(pred_empty: Sequence[bool], gt_empty: Sequence[bool]) -> float | None:
    """Fraction of absent-target samples (``gt_empty``) that the model answered with nothing."""
    pe = np.asarray(pred_empty, dtype=bool).reshape(-1)
    ge = np.asarray(gt_empty, dtype=bool).reshape(-1)
    if pe.shape != ge.shape:
        raise ValueError("pred_empty and gt_empty differ in length")
    if not ge.any():
        return None
    return float(pe[ge].mean())


def _words(text: str, vocabulary: Iterable[str]) -> set[str]:
    """Vocabulary words present in ``text`` (whole words; a trailing plural 's' is tolerated)."""
    tokens = set(re.findall(r"[a-z]+", text.lower()))
    tokens |= {t[:-1] for t in tokens if t.endswith("s")}
    return {w for w in vocabulary if w in tokens}


def _color_shape(target: Any) -> tuple[str, str]:
    if isinstance(target, tuple | list) and len(target) == 2:
        return str(target[0]), str(target[1])
    if isinstance(target, dict):
        return str(target["color"]), str(target["shape"])
    return str(target.color), str(target.shape)


def description_correct(text: str, target: Any) -> bool:
    """True when ``text`` names exactly the target's colour and shape among the ShapesRef words.

    ``target`` is anything with ``.color``/``.shape`` (a ShapeObject), a dict with those keys, or a
    ``(color, shape)`` pair. Naming a second colour or shape counts as wrong, so a hedge cannot score.
    """
    color, shape = _color_shape(target)
    return _words(text, COLOR_WORDS) == {color} and _words(text, SHAPE_WORDS) == {shape}


def description_accuracy(texts: Sequence[str], objects: Sequence[Any]) -> float | None:
    """Fraction of descriptions with both the colour word and the shape word right."""
    if len(texts) != len(objects):
        raise ValueError("texts and objects differ in length")
    if not texts:
        return None
    return float(np.mean([description_correct(t, o) for t, o in zip(texts, objects)]))


class MetricAccumulator:
    """Streams samples in one by one and reports every metric; ``merge`` combines workers' accumulators."""

    def __init__(self) -> None:
        self.intersection = 0  # Σ over segmentation samples
        self.union = 0
        self.iou_sum = 0.0
        self.n_seg = 0
        self.n_absent = 0  # absent-target samples
        self.n_absent_correct = 0  # ... answered with an empty mask
        self.n_present = 0  # present-target samples
        self.n_present_found = 0  # ... answered with a non-empty mask
        self.n_desc = 0
        self.n_desc_correct = 0
        self.n_desc_color = 0  # ... whose colour word alone is right (what fails more often: colour or shape?)
        self.n_desc_shape = 0  # ... whose shape word alone is right

    def add_segmentation(self, pred: Any, gt: Any | None) -> float:
        """Add one referring/click segmentation sample (gt None or empty = absent target); returns its IoU."""
        p, g = _pair(pred, gt)
        i, u = intersection_union(p, g)
        score = 1.0 if u == 0 else i / u
        self.intersection += i
        self.union += u
        self.iou_sum += score
        self.n_seg += 1
        if g.any():
            self.n_present += 1
            self.n_present_found += int(p.any())
        else:
            self.n_absent += 1
            self.n_absent_correct += int(not p.any())
        return score

    def add_description(self, text: str, target: Any) -> bool:
        """Add one description sample; returns whether it was right."""
        ok = description_correct(text, target)
        color, shape = _color_shape(target)
        self.n_desc += 1
        self.n_desc_correct += int(ok)
        self.n_desc_color += int(_words(text, COLOR_WORDS) == {color})
        self.n_desc_shape += int(_words(text, SHAPE_WORDS) == {shape})
        return ok

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self

    def compute(self) -> dict[str, float | int | None]:
        def ratio(a: float, b: int) -> float | None:
            return None if b == 0 else a / b

        return {
            "ciou": None if self.n_seg == 0 else (1.0 if self.union == 0 else self.intersection / self.union),
            "giou": ratio(self.iou_sum, self.n_seg),
            "no_target_accuracy": ratio(self.n_absent_correct, self.n_absent),
            "target_found_accuracy": ratio(self.n_present_found, self.n_present),
            "description_accuracy": ratio(self.n_desc_correct, self.n_desc),
            "description_color_accuracy": ratio(self.n_desc_color, self.n_desc),
            "description_shape_accuracy": ratio(self.n_desc_shape, self.n_desc),
            "n_segmentation": self.n_seg,
            "n_no_target": self.n_absent,
            "n_description": self.n_desc,
        }
