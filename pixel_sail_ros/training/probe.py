"""What a checkpoint's image tokens know about each object: linear probes on object-pooled patch states.

Why: the description metric says whether the *answer* names the shape; this says whether the shape is in the
*image representation* at all, which tells a training problem on the language side from one on the vision
side. For held-out ShapesRef scenes it pools each object's cells (:func:`.losses.object_cell_weights`) of the
last-layer ``<vpatch>`` states, and of the raw patches for comparison, fits one linear classifier per
attribute (and for which third of the image, across and down, the object lies in) on the first 70 % of the objects
and reports its accuracy on the rest, overall and per size class.
The same probe reads the ``[SEG]`` query of referring questions about those scenes: does the query say
which third of the image its target lies in, for plain phrases ("the red circle") and positional ones
("the leftmost star")? A query that does not know where its object is can only pick it by look. For a model
with ``pixel_positions`` it also reads the place term of each query's mask directly (the query against the
pixel positions alone): the third of the image where it peaks, and whether it is higher on the target than on
every other object.
It also reports how much the image states change when the row or the column positions of the patches are
mirrored (pixels unchanged): a model that cannot tell its columns apart cannot see shape or left/right
(``mrope_layout`` in the model's config).

    python -m pixel_sail_ros.training.probe [--model DIR] [--num-scenes 300]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import PixelSailEngine
from ..model.processing_pixel_sail import refer_seg_question
from . import shapesref as sr
from .data import AUX_ATTRIBUTES
from .losses import object_cell_weights, pool_objects

PROBE_SEED = 99  # scenes no training run draws (training seeds index their own generators from 0)


@torch.no_grad()
def prefill_image(model: Any, processor: Any, image: np.ndarray, mirror_axis: int | None = None):
    """(image inputs, prefix) of one image; ``mirror_axis`` 1 / 2 mirrors the patches' row / column position ids
    (the pixels stay where they are), to see how much the model's image states depend on them."""
    weight = model.lm_head.weight
    inputs = processor.preprocess_image(image, device=weight.device)
    batch = processor.prefix_inputs(inputs, device=weight.device)
    positions = batch["position_ids"]
    if mirror_axis is not None:  # only the patches' positions, between the <vision> markers
        positions = positions.clone()
        inner = positions[mirror_axis, :, 1:-1]
        positions[mirror_axis, :, 1:-1] = inner.min() + inner.max() - inner
    prefix = model.prefill(
        pixel_values=inputs.pixel_values.to(weight.dtype).unsqueeze(0), position_ids=positions,
        **{k: batch[k] for k in ("input_ids", "image_grid_hw", "attention_mask")},
    )
    return inputs, prefix


@torch.no_grad()
def position_sensitivity(engine: PixelSailEngine, num_scenes: int = 8, seed: int = PROBE_SEED) -> dict[str, float]:
    """Mean relative change of the last-layer image states when the row / column positions are mirrored."""
    gen = sr.ShapesRefGenerator(seed=seed)
    change: dict[str, list[float]] = {"rows": [], "cols": []}
    for i in range(num_scenes):
        image = gen.scene(i).image
        base = prefill_image(engine.model, engine.processor, image)[1].vision_tokens.float()
        for name, axis in (("rows", 1), ("cols", 2)):
            moved = prefill_image(engine.model, engine.processor, image, axis)[1].vision_tokens.float()
            change[name].append(float((moved - base).norm() / base.norm()))
    return {k: round(float(np.mean(v)), 4) for k, v in change.items()}


@torch.no_grad()
def object_features(engine: PixelSailEngine, num_scenes: int, seed: int = PROBE_SEED) -> dict[str, Any]:
    """Pooled last-layer states and raw patches of every visible object in ``num_scenes`` scenes, with labels."""
    gen = sr.ShapesRefGenerator(seed=seed)
    feats: dict[str, list[np.ndarray]] = {"tokens": [], "patches": []}
    labels: list[tuple[int, ...]] = []
    for i in range(num_scenes):
        scene = gen.scene(i)
        inputs, prefix = prefill_image(engine.model, engine.processor, scene.image)
        h, w, _ = prefix.vision_tokens.shape
        masks = torch.from_numpy(np.stack([o.mask for o in scene.objects]))
        weights = object_cell_weights(masks, (h, w)).to(engine.device)
        keep = (weights.flatten(1).sum(1) > 0).cpu().numpy()
        for name, grid in (("tokens", prefix.vision_tokens), ("patches", inputs.pixel_values.view(h, w, -1))):
            pooled = pool_objects(grid.permute(2, 0, 1), weights).float().cpu().numpy()
            feats[name].extend(pooled[keep])
        for o, k in zip(scene.objects, keep):
            if k:
                values = {"colour": o.color, "shape": o.shape, "size": o.size}
                place = (_third(o.center[0], scene.width), _third(o.center[1], scene.height))
                labels.append(tuple(AUX_ATTRIBUTES[a].index(values[a]) for a in AUX_ATTRIBUTES) + place)
    return {"features": {k: np.stack(v) for k, v in feats.items()}, "labels": np.array(labels)}


POSITIONAL_TEMPLATES = (sr.T_SIDE, sr.T_VERTICAL, sr.T_EXTREME)


@torch.no_grad()
def query_features(engine: PixelSailEngine, num_scenes: int, seed: int = PROBE_SEED, per_group: int = 2
                   ) -> dict[str, Any]:
    """The ``[SEG]`` embedding the model makes for up to ``per_group`` plain and as many positional phrases per
    scene (a 128-wide embedding needs many samples for a linear probe that does not just memorise), with the target's column and row third and whether the phrase was positional.

    The model answers freely (greedy, as the engine does); a phrase it answers without ``[SEG]`` is counted,
    not probed. With ``pixel_positions``, ``place_term`` holds per query (peak column third, peak row third,
    target first): where the place term of its mask peaks, and whether it is higher on the target than on every
    other object.
    """
    gen = sr.ShapesRefGenerator(seed=seed)
    rng = np.random.default_rng(seed)
    feats: dict[str, list[np.ndarray]] = {"state": [], "embedding": []}
    labels: list[tuple[int, int, int]] = []
    place_term: list[tuple[int, int, int]] = []
    has_places = bool(engine.model.config.pixel_positions)
    asked = 0
    states: list[torch.Tensor] = []  # the projector's input: the [SEG] token's last hidden state
    hook = engine.model.seg_token_projector.register_forward_hook(lambda _m, args, _out: states.append(args[0]))
    for i in range(num_scenes):
        scene = gen.scene(i)
        _, prefix = prefill_image(engine.model, engine.processor, scene.image)
        present = [e for e in sr.expressions(scene, rng, n_absent=0) if e.target is not None]
        for positional in (False, True):
            group = [e for e in present if (e.template in POSITIONAL_TEMPLATES) == positional]
            if not group:
                continue
            for j in rng.permutation(len(group))[:per_group]:
                e = group[int(j)]
                asked += 1
                states.clear()
                answer = engine.model.generate_answer(
                    prefix, engine.processor.encode_question(refer_seg_question(e.text)), max_new_tokens=8,
                    stop_token_ids=engine.stop_token_ids,
                )
                if answer.seg_embeddings.shape[0] == 0:
                    continue
                o = scene.objects[e.target]
                feats["embedding"].append(answer.seg_embeddings[0].float().cpu().numpy())
                feats["state"].append(states[-1].reshape(-1, states[-1].shape[-1])[0].float().cpu().numpy())
                labels.append((_third(o.center[0], scene.width), _third(o.center[1], scene.height), int(positional)))
                if has_places:
                    pixel = prefix.pixel_features
                    places = engine.model.pixel_place_features(*pixel.shape[-2:], pixel.device, pixel.dtype)
                    place_term.append(_place_term_readout(places, answer.seg_embeddings[0], scene, e.target))
    hook.remove()
    return {"features": {k: np.stack(v) for k, v in feats.items()}, "labels": np.array(labels), "asked": asked,
            "place_term": np.array(place_term) if place_term else None}


@torch.no_grad()
def _place_term_readout(places: torch.Tensor, query: torch.Tensor, scene: sr.Scene, target: int) -> tuple[int, int, int]:
    """(peak column third, peak row third, target first) of ``query`` · ``places``, the (h, w, D_seg) pixel
    positions of the mask grid (``pixel_place_features``)."""
    h, w = places.shape[:2]
    field = places @ query  # (h, w)
    row, col = divmod(int(field.argmax()), w)
    masks = torch.from_numpy(np.stack([o.mask for o in scene.objects])).float()[:, None]
    cover = F.interpolate(masks, size=(h, w), mode="area")[:, 0].to(field.device)  # each object's share of a cell
    area = cover.flatten(1).sum(1)
    mean = (cover * field).flatten(1).sum(1) / area.clamp_min(1e-6)
    others = [k for k in range(len(scene.objects)) if k != target and float(area[k]) > 0]
    first = all(float(mean[target]) > float(mean[k]) for k in others)
    return min(2, 3 * col // w), min(2, 3 * row // h), int(first)


# What the probe reads besides the attributes: which third of the image (left/middle/right, top/middle/bottom)
# an object's centre lies in. Positional phrases ("the leftmost star") need it in the states, not only in the
# attention scores that rotary positions reach (``patch_positions`` in the model's config).
PLACES = {"column third": 3, "row third": 3}


def _third(coordinate: float, extent: int) -> int:
    return min(2, int(3 * coordinate / extent))


def linear_probe_accuracy(x: np.ndarray, y: np.ndarray, classes: int, train_frac: float = 0.7,
                          steps: int = 500, seed: int = 0) -> np.ndarray:
    """Per-sample correctness (bool) on the held-out tail of a softmax regression fit on the head."""
    g = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x).float()
    xt = (xt - xt.mean(0)) / (xt.std(0) + 1e-6)
    yt = torch.from_numpy(y).long()
    n = int(train_frac * len(yt))
    lin = torch.nn.Linear(xt.shape[1], classes)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(xt[:n]), yt[:n]).backward()
        opt.step()
    with torch.no_grad():
        return (lin(xt[n:]).argmax(1) == yt[n:]).numpy()


def probe_report(engine: PixelSailEngine, num_scenes: int = 300, seed: int = PROBE_SEED) -> dict[str, Any]:
    """{features: {attribute: {all, large, small}}} held-out probe accuracies, object counts, the image states'
    sensitivity to row / column positions, and {query: {state|embedding: {place: {all, plain, positional}}}} for
    the [SEG] queries (their hidden state, and its projection that makes the mask), with ``place_term`` beside
    them for a model with ``pixel_positions``."""
    data = object_features(engine, num_scenes, seed)
    y = data["labels"]
    n_train = int(0.7 * len(y))
    size_idx = list(AUX_ATTRIBUTES).index("size")
    large = y[n_train:, size_idx] == AUX_ATTRIBUTES["size"].index("large")
    report: dict[str, Any] = {"num_scenes": num_scenes, "objects": int(len(y)), "held_out": int(len(y) - n_train),
                              "position_sensitivity": position_sensitivity(engine, seed=seed)}
    targets = {attr: len(values) for attr, values in AUX_ATTRIBUTES.items()} | PLACES
    for name, x in data["features"].items():
        report[name] = {}
        for a, (attr, classes) in enumerate(targets.items()):
            right = linear_probe_accuracy(x, y[:, a], classes)
            report[name][attr] = {"all": round(float(right.mean()), 3), "large": round(float(right[large].mean()), 3),
                                  "small": round(float(right[~large].mean()), 3)}
    q = query_features(engine, num_scenes, seed)
    qy = q["labels"]
    positional = qy[int(0.7 * len(qy)):, 2] == 1
    report["query"] = {"asked": q["asked"], "with_seg": int(len(qy)), "held_out": int(len(qy) - int(0.7 * len(qy)))}
    for name, x in q["features"].items():  # the hidden state, and the embedding the mask is made with
        report["query"][name] = {}
        for a, (place, classes) in enumerate(PLACES.items()):
            right = linear_probe_accuracy(x, qy[:, a], classes)
            report["query"][name][place] = _by_phrasing(right, positional)
    if q["place_term"] is not None:  # read directly, on every query: no fit, nothing held out
        term = q["place_term"]
        readouts = {"column third": term[:, 0] == qy[:, 0], "row third": term[:, 1] == qy[:, 1],
                    "target first": term[:, 2] == 1}
        report["query"]["place_term"] = {name: _by_phrasing(right, qy[:, 2] == 1) for name, right in readouts.items()}
    return report


def _by_phrasing(right: np.ndarray, positional: np.ndarray) -> dict[str, float]:
    """{all, plain, positional}: the share of ``right`` overall and for plain / positional phrases."""
    return {"all": round(float(right.mean()), 3), "plain": round(float(right[~positional].mean()), 3),
            "positional": round(float(right[positional].mean()), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--num-scenes", type=int, default=300)
    ap.add_argument("--seed", type=int, default=PROBE_SEED)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    engine = PixelSailEngine.from_pretrained(a.model, device=a.device)
    report = probe_report(engine, a.num_scenes, a.seed)
    report["model"] = a.model or "bundled"
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
