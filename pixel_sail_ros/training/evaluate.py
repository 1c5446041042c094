"""``pixel-sail-eval``: cIoU, gIoU, no-target and description accuracy of a checkpoint; prints JSON.

ShapesRef (DESIGN.md §5): sample i is scene i of a generator seeded with ``--seed`` (training uses other
seeds, so the set is held out), with one turn on it: a referring expression (a quarter of them name an
absent object) or, for every ``1/describe_every``-th sample, a click inside an object to describe. Requests
go through :class:`~pixel_sail_ros.engine.PixelSailEngine` exactly as the ROS node sends them. cIoU/gIoU and
no-target accuracy are over the referring samples, description accuracy over the clicks (colour and shape
words right); ``click_ciou`` is the cIoU of the masks those clicks produced.

Manifest: every turn of every line; segmentation turns feed cIoU/gIoU/no-target accuracy, text-only turns
``answer_accuracy`` (exact match, case- and punctuation-insensitive).

    pixel-sail-eval --model runs/tiny --data shapesref --num-samples 500 --seed 1234
    pixel-sail-eval --model runs/tiny --data shapesref --appearance jpeg   # robustness to the renderer/camera
    pixel-sail-eval --model runs/mine --manifest my_data/val.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import PixelSailEngine
from ..model.processing_pixel_sail import PixelSailProcessor
from . import appearance as shifts
from . import shapesref as sr
from .data import manifest_prompt
from .manifest import decode_turn, load_image, load_manifest
from .metrics import MetricAccumulator

DEFAULT_SEED = 424242
DESCRIBE_EVERY = 4  # every 4th ShapesRef sample is a click description
APPEARANCE_STREAM = 7  # generator stream for a photometric shift's randomness (0 draws scenes, 1 their turns)
OBJECT_KINDS = tuple(f"{size} {shape}" for size in sr.SIZES for shape in sr.SHAPES)  # description breakdown keys


@dataclass
class EvalTotals:
    """Streaming counters for one evaluation; summable across workers (DDP ranks).

    Besides the headline metrics: the referring samples again per ShapesRef template (which phrasings fail),
    and how often a mask for a present target covers another object more than its own (a wrong choice of
    object, as opposed to a poor outline of the right one); the click descriptions again per kind of object
    clicked ("small star": which objects are misnamed).
    """

    acc: MetricAccumulator = field(default_factory=MetricAccumulator)
    templates: dict[str, MetricAccumulator] = field(default_factory=lambda: {t: MetricAccumulator() for t in sr.TEMPLATES})
    objects: dict[str, MetricAccumulator] = field(default_factory=lambda: {k: MetricAccumulator() for k in OBJECT_KINDS})
    click_intersection: int = 0
    click_union: int = 0
    n_click: int = 0
    n_answers: int = 0
    n_answers_correct: int = 0
    wrong_by_template: dict[str, int] = field(default_factory=lambda: {t: 0 for t in sr.TEMPLATES})
    n_wrong_larger: int = 0  # wrong choices where the object chosen instead is the larger (shows more pixels)
    num_samples: int = 0

    _SCALARS = ("click_intersection", "click_union", "n_click", "n_answers", "n_answers_correct", "n_wrong_larger",
                "num_samples")

    @property
    def n_wrong_object(self) -> int:
        """Present targets whose mask went mostly to another object, over all phrasings."""
        return sum(self.wrong_by_template.values())

    def _accumulators(self) -> list[MetricAccumulator]:
        return [self.acc, *(self.templates[t] for t in sr.TEMPLATES), *(self.objects[k] for k in OBJECT_KINDS)]

    def vector(self) -> list[float]:
        counts = [float(v) for a in self._accumulators() for v in vars(a).values()]
        wrong = [float(self.wrong_by_template[t]) for t in sr.TEMPLATES]
        return counts + wrong + [float(getattr(self, k)) for k in self._SCALARS]

    def set_vector(self, values: list[float]) -> None:
        it = iter(values)
        for a in self._accumulators():
            for name, v in zip(list(vars(a)), it):
                setattr(a, name, type(getattr(a, name))(v))
        for t, v in zip(sr.TEMPLATES, it):
            self.wrong_by_template[t] = int(round(v))
        for name, v in zip(self._SCALARS, it):
            setattr(self, name, int(round(v)))

    def compute(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.acc.compute())
        out["click_ciou"] = None if self.n_click == 0 else (
            1.0 if self.click_union == 0 else self.click_intersection / self.click_union
        )
        out["answer_accuracy"] = None if self.n_answers == 0 else self.n_answers_correct / self.n_answers
        n_present = self.acc.n_present
        out["wrong_object_rate"] = None if n_present == 0 else self.n_wrong_object / n_present
        # a bias, if any: does a wrong choice go to the bigger of the look-alikes?
        out["wrong_object_larger_share"] = None if self.n_wrong_object == 0 else self.n_wrong_larger / self.n_wrong_object
        per = {}
        for t, a in self.templates.items():
            if a.n_seg:
                r = a.compute()
                per[t] = {"n": a.n_seg, **{k: r[k] for k in ("ciou", "giou", "no_target_accuracy", "target_found_accuracy")},
                          "wrong_object_rate": self.wrong_by_template[t] / a.n_present if a.n_present else None}
        if per:
            out["per_template"] = per
        kinds = {
            k: {"n": a.n_desc, **{m: r[m] for m in ("description_accuracy", "description_shape_accuracy")}}
            for k, a in self.objects.items() if a.n_desc for r in (a.compute(),)
        }
        if kinds:
            out["description_per_object"] = kinds
        out["num_samples"] = self.num_samples
        return out


def wrong_object(pred: np.ndarray, scene: sr.Scene, target: int) -> int | None:
    """The other object a mask overlaps most, when that is more than the object it should cover; else None."""
    own = int((pred & scene.objects[target].mask).sum())
    overlaps = [(int((pred & o.mask).sum()), k) for k, o in enumerate(scene.objects) if k != target]
    best, k = max(overlaps, default=(0, None))
    return k if best > own else None


def all_reduce_accumulator(totals: EvalTotals, device: torch.device) -> EvalTotals:
    """Sum the counters over all ranks (float64 keeps integer counts exact far beyond any eval set)."""
    import torch.distributed as dist

    t = torch.tensor(totals.vector(), dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    totals.set_vector(t.tolist())
    return totals


# ------------------------------------------------------------------------------------------ ShapesRef


def shapesref_eval_item(gen: sr.ShapesRefGenerator, index: int, describe_every: int = DESCRIBE_EVERY) -> tuple[sr.Scene, sr.Sample]:
    """Held-out sample ``index``: a referring turn, or (every ``describe_every``-th) a click description."""
    if describe_every > 0 and index % describe_every == describe_every - 1:
        scene, turns = gen.item(index, 1, mix={"vp_describe": 1.0}, prompt_probs={"point": 1.0})
    else:
        scene, turns = gen.item(index, 1, mix={"referring": 1.0}, p_absent=0.25)
    return scene, turns[0]


def _union(masks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return masks.any(0) if len(masks) else np.zeros(hw, bool)


def evaluate_shapesref(
    engine: PixelSailEngine, seed: int = DEFAULT_SEED, num_samples: int = 500, rank: int = 0, world_size: int = 1,
    num_examples: int = 0, describe_every: int = DESCRIBE_EVERY, appearance: str = "none",
) -> tuple[EvalTotals, list[dict[str, Any]]]:
    """Run this rank's share of the held-out ShapesRef set through ``engine``.

    ``appearance``: score the same samples rendered or photographed differently (see :mod:`.appearance`).
    """
    gen = sr.ShapesRefGenerator(seed=seed, **shifts.generator_kwargs(appearance))
    totals = EvalTotals()
    examples: list[dict[str, Any]] = []
    for i in range(rank, num_samples, world_size):
        scene, s = shapesref_eval_item(gen, i, describe_every)
        image = shifts.apply(appearance, scene.image, gen.rng(i, APPEARANCE_STREAM))
        hw = (scene.height, scene.width)
        totals.num_samples += 1
        if s.task == "referring":
            out = engine.segment(image, text=s.expression.text)
            pred = _union(out.masks, hw)
            score = totals.acc.add_segmentation(pred, s.target)
            totals.templates[s.expression.template].add_segmentation(pred, s.target)
            if s.expression.target is not None:
                other = wrong_object(pred, scene, s.expression.target)
                if other is not None:
                    totals.wrong_by_template[s.expression.template] += 1
                    totals.n_wrong_larger += int(scene.objects[other].mask.sum() > scene.objects[s.expression.target].mask.sum())
            if len(examples) < num_examples:
                answer = out.answers[0] if out.answers else ""
                examples.append({"image": image, "gt": s.target, "pred": pred, "title": s.expression.text,
                                 "pred_text": f"{answer} IoU {score:.2f}"})
        else:
            out = engine.segment(image, points=[s.prompt.point], describe=True)
            obj = scene.objects[s.object_index]
            totals.acc.add_description(out.description, obj)
            totals.objects[f"{obj.size} {obj.shape}"].add_description(out.description, obj)
            pred = _union(out.masks, hw)
            gt = scene.objects[s.object_index].mask
            totals.click_intersection += int((pred & gt).sum())
            totals.click_union += int((pred | gt).sum())
            totals.n_click += 1
    return totals, examples


def evaluate_shapesref_model(model, processor: PixelSailProcessor, **kwargs) -> tuple[EvalTotals, list[dict[str, Any]]]:
    """:func:`evaluate_shapesref` for an in-memory model (e.g. during training); leaves it in eval mode."""
    return evaluate_shapesref(PixelSailEngine(model, processor), **kwargs)


# ------------------------------------------------------------------------------------------- manifest


def _norm_text(t: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", t.lower()))


def evaluate_manifest(
    engine: PixelSailEngine, manifest: str | Path, rank: int = 0, world_size: int = 1, num_examples: int = 0,
    limit: int | None = None,
) -> tuple[EvalTotals, list[dict[str, Any]]]:
    """Every turn of a manifest: each question is asked as written, after its own prompted prefix."""
    records = load_manifest(manifest)
    if limit is not None:
        records = records[:limit]
    model, proc = engine.model, engine.processor
    totals = EvalTotals()
    examples: list[dict[str, Any]] = []
    with torch.inference_mode():
        for r in range(rank, len(records), world_size):
            rec = records[r]
            image = load_image(rec)
            hw = image.shape[:2]
            inputs = proc.preprocess_image(image, device=engine.device)
            prefixes: dict[int, Any] = {}
            for turn in rec.turns:
                masks, prompt = decode_turn(turn, hw[0], hw[1], rec.base)
                key = -1 if prompt is None else id(turn)
                if key not in prefixes:
                    pmap = None
                    if prompt is not None:
                        pmap = proc.visual_prompt_map(hw, inputs.grid_hw, [manifest_prompt(prompt, *hw)])
                    batch = proc.prefix_inputs(inputs, pmap, device=engine.device)
                    batch["pixel_values"] = batch["pixel_values"].to(engine.dtype)
                    prefixes[key] = model.prefill(**batch)
                ans = model.generate_answer(
                    prefixes[key], proc.encode_question(turn.question), max_new_tokens=engine.max_new_tokens,
                    stop_token_ids=engine.stop_token_ids,
                )
                text = proc.decode(ans.token_ids)
                totals.num_samples += 1
                if masks is not None:
                    pm = proc.postprocess_masks(ans.mask_logits, hw, engine.mask_threshold).cpu().numpy()
                    pred, gt = _union(pm, hw), _union(masks, hw)
                    totals.acc.add_segmentation(pred, gt)
                    if len(examples) < num_examples:
                        examples.append({"image": image, "gt": gt, "pred": pred, "title": turn.question, "pred_text": text})
                else:
                    totals.n_answers += 1
                    totals.n_answers_correct += int(_norm_text(text) == _norm_text(turn.answer))
    return totals, examples


def evaluate_manifest_model(model, processor: PixelSailProcessor, manifest, **kwargs) -> tuple[EvalTotals, list[dict[str, Any]]]:
    return evaluate_manifest(PixelSailEngine(model, processor), manifest, **kwargs)


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pixel-sail-eval", description="Evaluate a Pixel-SAIL checkpoint; prints JSON.")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--data", choices=["shapesref"], default=None, help="held-out ShapesRef (default)")
    d.add_argument("--manifest", metavar="FILE", help="a JSONL manifest (see pixel_sail_ros/training/manifest.py)")
    p.add_argument("--num-samples", type=int, default=500, help="ShapesRef samples (manifest: max lines)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="ShapesRef generator seed of the held-out set")
    p.add_argument("--describe-every", type=int, default=DESCRIBE_EVERY, help="every k-th ShapesRef sample is a click description (0 = none)")
    p.add_argument("--appearance", choices=shifts.APPEARANCES, default="none",
                   help="ShapesRef: the same samples drawn by another renderer (aliased, pointed-stars) or through "
                        "another camera (jpeg, blur, noise), to measure how much the model depends on this generator")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--examples", metavar="PNG", help="also draw a few predictions into this PNG")
    p.add_argument("--output", metavar="FILE", help="also write the JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = PixelSailEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    n_ex = 8 if args.examples else 0
    if args.manifest:
        totals, examples = evaluate_manifest(engine, args.manifest, num_examples=n_ex, limit=args.num_samples)
        data = {"data": "manifest", "manifest": str(args.manifest)}
    else:
        totals, examples = evaluate_shapesref(
            engine, seed=args.seed, num_samples=args.num_samples, num_examples=n_ex, describe_every=args.describe_every,
            appearance=args.appearance,
        )
        data = {"data": "shapesref", "seed": args.seed, "appearance": args.appearance}
    seconds = time.perf_counter() - t0
    result = {**totals.compute(), **data, "model": str(args.model) if args.model else "bundled",
              "device": str(engine.device), "seconds": round(seconds, 2),
              "samples_per_s": round(totals.num_samples / max(seconds, 1e-9), 2)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    if args.examples and examples:
        from .plots import plot_examples

        plot_examples(examples, args.examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
