"""pixel-sail-eval: the JSON it prints, the held-out set it builds, and metric plumbing with an oracle engine."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pixel_sail_ros.engine import SegmentationOutput
from pixel_sail_ros.training import appearance as shifts
from pixel_sail_ros.training import evaluate
from pixel_sail_ros.training import shapesref as sr

from .test_train import make_tiny_checkpoint, write_shapes_manifest

KEYS = ("ciou", "giou", "no_target_accuracy", "description_accuracy", "num_samples")


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _in_unit_range(result: dict) -> None:
    for k in ("ciou", "giou", "no_target_accuracy", "description_accuracy", "click_ciou", "target_found_accuracy"):
        v = result.get(k)
        assert v is None or 0.0 <= v <= 1.0, (k, v)


def test_eval_cli_prints_json_in_range(tmp_path: Path, capsys):
    model = make_tiny_checkpoint(tmp_path / "m")
    code = evaluate.main(["--model", str(model), "--num-samples", "8", "--seed", "5", "--threads", "1",
                          "--examples", str(tmp_path / "ex.png"), "--output", str(tmp_path / "r.json")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert all(k in result for k in KEYS)
    assert result["num_samples"] == 8 and result["n_description"] == 2 and result["n_segmentation"] == 6
    assert result["seed"] == 5 and result["data"] == "shapesref"
    _in_unit_range(result)
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert (tmp_path / "ex.png").stat().st_size > 0


def test_eval_cli_on_a_manifest(tmp_path: Path, capsys):
    model = make_tiny_checkpoint(tmp_path / "m")
    data = tmp_path / "data"
    data.mkdir()
    manifest = write_shapes_manifest(data, n=2)
    assert evaluate.main(["--model", str(model), "--manifest", str(manifest), "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 10 and result["n_segmentation"] == 8 and result["n_no_target"] == 2
    assert 0.0 <= result["answer_accuracy"] <= 1.0
    _in_unit_range(result)


def test_held_out_items_are_deterministic_and_mixed():
    a, b = sr.ShapesRefGenerator(seed=11), sr.ShapesRefGenerator(seed=11)
    items = [evaluate.shapesref_eval_item(a, i) for i in range(8)]
    again = [evaluate.shapesref_eval_item(b, i) for i in range(8)]
    assert [s.question for _, s in items] == [s.question for _, s in again]
    assert [s.task for _, s in items] == ["referring"] * 3 + ["vp_describe"] + ["referring"] * 3 + ["vp_describe"]
    assert all(s.prompt.kind == "point" for _, s in items if s.task == "vp_describe")
    other = [evaluate.shapesref_eval_item(sr.ShapesRefGenerator(seed=12), i)[0].image.shape for i in range(8)]
    assert other != [scene.image.shape for scene, _ in items]


class OracleEngine:
    """Answers every held-out request perfectly (it looks the scene up by its pixels)."""

    def __init__(self, seed: int, n: int, appearance: str = "none") -> None:
        gen = sr.ShapesRefGenerator(seed=seed, **shifts.generator_kwargs(appearance))
        self.truth = {}
        for i in range(n):
            scene, s = evaluate.shapesref_eval_item(gen, i)
            image = shifts.apply(appearance, scene.image, gen.rng(i, evaluate.APPEARANCE_STREAM))
            self.truth[hashlib.sha1(image.tobytes()).hexdigest()] = (scene, s)

    def segment(self, rgb, text="", points=None, boxes=None, describe=False) -> SegmentationOutput:
        scene, s = self.truth[hashlib.sha1(rgb.tobytes()).hexdigest()]
        if text:
            assert text == s.expression.text
            masks = s.target[None] if s.target is not None else np.zeros((0, *rgb.shape[:2]), bool)
            return SegmentationOutput(masks, np.ones(len(masks), np.float32), [text] * len(masks))
        obj = scene.objects[s.object_index]
        assert tuple(points[0]) == s.prompt.point and obj.mask[s.prompt.point[1], s.prompt.point[0]]
        return SegmentationOutput(obj.mask[None], np.ones(1, np.float32), ["x"], description=sr.describe(obj))


def test_metrics_are_perfect_for_an_oracle_and_shard_cleanly():
    oracle = OracleEngine(seed=3, n=16)
    totals, _ = evaluate.evaluate_shapesref(oracle, seed=3, num_samples=16)
    r = totals.compute()
    assert r["ciou"] == 1.0 and r["giou"] == 1.0 and r["description_accuracy"] == 1.0 and r["click_ciou"] == 1.0
    assert r["num_samples"] == 16 and r["n_description"] == 4
    assert r["wrong_object_rate"] == 0.0
    assert sum(v["n"] for v in r["per_template"].values()) == r["n_segmentation"]
    assert all(v["ciou"] == 1.0 for v in r["per_template"].values())
    assert all(v["wrong_object_rate"] in (None, 0.0) for v in r["per_template"].values())
    assert sum(v["n"] for v in r["description_per_object"].values()) == r["n_description"]
    assert all(v["description_accuracy"] == 1.0 for v in r["description_per_object"].values())
    # two "ranks" summed give the same counters as one pass (what all_reduce does under DDP)
    parts = [evaluate.evaluate_shapesref(oracle, seed=3, num_samples=16, rank=k, world_size=2)[0] for k in (0, 1)]
    merged = evaluate.EvalTotals()
    merged.set_vector([x + y for x, y in zip(parts[0].vector(), parts[1].vector())])
    assert merged.compute() == r


@pytest.mark.parametrize("appearance", ["aliased", "pointed-stars", "jpeg", "noise"])
def test_appearance_shifts_what_the_engine_sees_and_scores_against_its_own_masks(appearance):
    # The oracle knows only the shifted renderings: a plain image would miss its lookup (KeyError), and masks
    # scored against the unshifted scene would not be perfect for the renderer shifts.
    oracle = OracleEngine(seed=3, n=8, appearance=appearance)
    r = evaluate.evaluate_shapesref(oracle, seed=3, num_samples=8, appearance=appearance)[0].compute()
    assert r["ciou"] == 1.0 and r["description_accuracy"] == 1.0 and r["click_ciou"] == 1.0
    with pytest.raises(KeyError):
        evaluate.evaluate_shapesref(oracle, seed=3, num_samples=8)


class NeighbourEngine(OracleEngine):
    """Answers every present referring target with the mask of another object: the wrong choice of object."""

    def segment(self, rgb, text="", points=None, boxes=None, describe=False) -> SegmentationOutput:
        out = super().segment(rgb, text, points, boxes, describe)
        scene, s = self.truth[hashlib.sha1(rgb.tobytes()).hexdigest()]
        if text and s.expression.target is not None:
            other = scene.objects[(s.expression.target + 1) % len(scene.objects)].mask
            return SegmentationOutput(other[None], np.ones(1, np.float32), [text])
        return out


def test_wrong_object_rate_and_per_template_scores_find_a_wrong_choice_of_object():
    r = evaluate.evaluate_shapesref(NeighbourEngine(seed=5, n=24), seed=5, num_samples=24)[0].compute()
    assert r["wrong_object_rate"] == 1.0
    # the neighbour is the next object in drawing order: larger about as often as not, and exactly as often as
    # the scenes say
    larger = []
    gen = sr.ShapesRefGenerator(seed=5)
    for i in range(24):
        scene, s = evaluate.shapesref_eval_item(gen, i)
        if s.task == "referring" and s.expression.target is not None:
            t = s.expression.target
            larger.append(scene.objects[(t + 1) % len(scene.objects)].mask.sum() > scene.objects[t].mask.sum())
    assert r["wrong_object_larger_share"] == pytest.approx(np.mean(larger)) and 0 < np.mean(larger) < 1
    assert r["target_found_accuracy"] == 1.0  # every mask is non-empty: only the new figure tells the failure
    per = r["per_template"]
    assert set(per) <= set(sr.TEMPLATES) and len(per) >= 3
    for v in per.values():  # absent targets stay right, present ones score no better than the objects' overlap
        assert v["no_target_accuracy"] in (None, 1.0)
        assert v["target_found_accuracy"] is None or v["ciou"] < 0.5
        assert v["wrong_object_rate"] in (None, 1.0)  # every present target of every phrasing: the wrong object
    assert any(v["wrong_object_rate"] == 1.0 for v in per.values())
    # the per-phrasing counts survive the sum over ranks
    parts = [evaluate.evaluate_shapesref(NeighbourEngine(seed=5, n=24), seed=5, num_samples=24, rank=k, world_size=2)[0]
             for k in (0, 1)]
    merged = evaluate.EvalTotals()
    merged.set_vector([x + y for x, y in zip(parts[0].vector(), parts[1].vector())])
    assert merged.compute() == r


def test_wrong_object_compares_overlaps():
    scene = sr.ShapesRefGenerator(seed=1).scene(0)
    a, b = scene.objects[0].mask, scene.objects[1].mask
    assert evaluate.wrong_object(a, scene, 0) is None
    assert evaluate.wrong_object(b, scene, 0) == 1
    assert evaluate.wrong_object(a | b, scene, 1 if a.sum() > b.sum() else 0) is not None  # both: the bigger wins
    assert evaluate.wrong_object(np.zeros_like(a), scene, 0) is None  # an empty mask is a miss, not a wrong pick


class StarBlindEngine(OracleEngine):
    """Names every star a triangle; every other answer is right."""

    def segment(self, rgb, text="", points=None, boxes=None, describe=False) -> SegmentationOutput:
        out = super().segment(rgb, text, points, boxes, describe)
        if out.description:
            out = replace(out, description=out.description.replace("star", "triangle"))
        return out


def test_description_per_object_shows_which_objects_are_misnamed():
    r = evaluate.evaluate_shapesref(StarBlindEngine(seed=4, n=80), seed=4, num_samples=80)[0].compute()
    per = r["description_per_object"]
    assert set(per) <= set(evaluate.OBJECT_KINDS) and sum(v["n"] for v in per.values()) == r["n_description"] == 20
    stars = [k for k in per if k.endswith(" star")]
    assert stars and len(stars) < len(per)
    for k, v in per.items():
        want = 0.0 if k in stars else 1.0
        assert v["description_accuracy"] == v["description_shape_accuracy"] == want, (k, v)
    assert r["description_accuracy"] == pytest.approx(1 - sum(per[k]["n"] for k in stars) / 20)
