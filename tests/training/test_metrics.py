"""Metrics of DESIGN.md §5 on hand-computed cases, and their invariants under hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pixel_sail_ros.training import metrics as m
from pixel_sail_ros.training.shapesref import ShapesRefGenerator, describe


def box_mask(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[y0:y1, x0:x1] = True
    return out


def test_iou_hand_cases():
    gt = box_mask((4, 4), 0, 2, 0, 2)  # 4 px
    pred = box_mask((4, 4), 0, 2, 0, 4)  # 8 px, 4 shared
    assert m.iou(pred, gt) == pytest.approx(0.5)
    assert m.iou(gt, gt) == 1.0
    assert m.iou(~gt, gt) == 0.0
    empty = np.zeros((4, 4), bool)
    assert m.iou(empty, empty) == 1.0  # absent target, answered with nothing
    assert m.iou(empty, None) == 1.0
    assert m.iou(pred, None) == 0.0  # absent target, hallucinated mask
    assert m.iou(empty, gt) == 0.0
    with pytest.raises(ValueError):
        m.iou(np.zeros((3, 3), bool), gt)


def test_ciou_weights_by_area_and_giou_by_sample():
    big = box_mask((20, 20), 0, 10, 0, 10)  # 100 px, predicted perfectly
    small = box_mask((20, 20), 15, 17, 15, 17)  # 4 px, missed entirely
    miss = box_mask((20, 20), 0, 2, 18, 20)  # 4 px elsewhere
    preds, gts = [big, miss], [big, small]
    assert m.ciou(preds, gts) == pytest.approx(100 / 108)
    assert m.giou(preds, gts) == pytest.approx(0.5)
    # an absent target answered with nothing: no effect on cIoU, a 1 for gIoU
    empty = np.zeros((20, 20), bool)
    assert m.ciou(preds + [empty], gts + [None]) == pytest.approx(100 / 108)
    assert m.giou(preds + [empty], gts + [None]) == pytest.approx(2 / 3)
    # a hallucinated mask on an absent target: its area joins the union, and gIoU gets a 0
    assert m.ciou(preds + [small], gts + [None]) == pytest.approx(100 / 112)
    assert m.giou(preds + [small], gts + [None]) == pytest.approx(1 / 3)
    assert m.ciou([empty], [None]) == 1.0
    assert m.ciou([], []) is None and m.giou([], []) is None
    with pytest.raises(ValueError):
        m.ciou([big], [])


def test_no_target_accuracy():
    assert m.no_target_accuracy([True, False, True, False], [True, True, False, False]) == 0.5
    assert m.no_target_accuracy([True, True], [True, True]) == 1.0
    assert m.no_target_accuracy([False], [False]) is None  # no absent targets: undefined, not 0 or 1


def test_description_accuracy():
    obj = ShapesRefGenerator(seed=0).scene(0).objects[0]
    assert m.description_correct(describe(obj), obj)
    assert m.description_correct("A LARGE red Circle.", ("red", "circle"))  # size word is not scored
    assert m.description_correct("two red circles", {"color": "red", "shape": "circle"})
    assert not m.description_correct("a small red square", ("red", "circle"))
    assert not m.description_correct("a small blue circle", ("red", "circle"))
    assert not m.description_correct("a red or blue circle", ("red", "circle"))  # hedging is wrong
    assert not m.description_correct("a red circle or star", ("red", "circle"))
    assert not m.description_correct("No target.", ("red", "circle"))
    assert not m.description_correct("a reddish circles", ("red", "circle"))  # whole words only
    texts = ["a small red circle", "a large green star", "a small red star"]
    targets = [("red", "circle"), ("green", "star"), ("red", "circle")]
    assert m.description_accuracy(texts, targets) == pytest.approx(2 / 3)
    assert m.description_accuracy([], []) is None


def test_accumulator_matches_functions_and_merges():
    rng = np.random.default_rng(0)
    preds, gts = [], []
    for _ in range(12):
        p = rng.random((6, 7)) < 0.4
        g = None if rng.random() < 0.3 else rng.random((6, 7)) < 0.5
        if rng.random() < 0.3:
            p = np.zeros_like(p)
        preds.append(p)
        gts.append(g)
    a, b, whole = m.MetricAccumulator(), m.MetricAccumulator(), m.MetricAccumulator()
    for i, (p, g) in enumerate(zip(preds, gts)):
        (a if i % 2 else b).add_segmentation(p, g)
        whole.add_segmentation(p, g)
    a.add_description("a small red circle", ("red", "circle"))
    b.add_description("a small red star", ("red", "circle"))
    whole.add_description("a small red circle", ("red", "circle"))
    whole.add_description("a small red star", ("red", "circle"))
    merged = a.merge(b).compute()
    result = whole.compute()
    assert merged == pytest.approx(result)
    gt_empty = [g is None or not g.any() for g in gts]
    assert result["ciou"] == pytest.approx(m.ciou(preds, gts))
    assert result["giou"] == pytest.approx(m.giou(preds, gts))
    assert result["no_target_accuracy"] == pytest.approx(m.no_target_accuracy([not p.any() for p in preds], gt_empty))
    assert result["description_accuracy"] == 0.5
    assert result["description_color_accuracy"] == 1.0 and result["description_shape_accuracy"] == 0.5
    assert result["n_segmentation"] == 12 and result["n_description"] == 2
    assert result["n_no_target"] == sum(gt_empty)


def test_empty_accumulator_is_json_safe():
    import json

    out = m.MetricAccumulator().compute()
    assert out["ciou"] is None and out["no_target_accuracy"] is None
    json.dumps(out, allow_nan=False)


mask_pairs = st.integers(1, 6).flatmap(
    lambda h: st.integers(1, 6).flatmap(
        lambda w: st.tuples(arrays(bool, (h, w)), arrays(bool, (h, w)))
    )
)


@settings(max_examples=60, deadline=None)
@given(mask_pairs)
def test_iou_properties(pair):
    p, g = pair
    v = m.iou(p, g)
    assert 0.0 <= v <= 1.0
    assert v == m.iou(g, p)
    assert m.iou(g, g) == 1.0
    assert (v == 1.0) == np.array_equal(p, g)


@settings(max_examples=40, deadline=None)
@given(st.lists(mask_pairs, min_size=1, max_size=5))
def test_set_metric_properties(pairs):
    preds, gts = [p for p, _ in pairs], [g for _, g in pairs]
    c, g_ = m.ciou(preds, gts), m.giou(preds, gts)
    assert 0.0 <= c <= 1.0 and 0.0 <= g_ <= 1.0
    assert m.ciou(gts, gts) == 1.0 and m.giou(gts, gts) == 1.0
    inter = sum(int((p & g).sum()) for p, g in pairs)
    union = sum(int((p | g).sum()) for p, g in pairs)
    assert c == (1.0 if union == 0 else pytest.approx(inter / union))
    ious = [m.iou(p, g) for p, g in pairs]
    assert min(ious) - 1e-12 <= g_ <= max(ious) + 1e-12
