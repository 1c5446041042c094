"""Training data glue: ShapesRef and manifest datasets, flip augmentation, resumable sampling, batching.

A dataset item is one image with several turns about it. The turns are grouped into *sequences*: turns
without a visual prompt share one image prefix; prompted turns go into sequences whose prefixes carry their
prompts (``<Prompt0>``, ``<Prompt1>``, … on non-overlapping objects), since a prompt is injected into the
image patches themselves. Every sequence goes through the processor's ``build_sequence``; all of a batch's
sequences through its ``collate`` (docs/DEVELOPING.md: turns are independent, so K turns on one prefix
cost one image and train like K single-turn samples).

Items are pure functions of ``(seed, index, epoch, step)``: the sampler hands those keys out, so a run
resumed from a checkpoint sees exactly the data it would have seen (no iterator state to save), and the
step lets a curriculum change the templates over training.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..model.processing_pixel_sail import PixelSailProcessor, Turn
from . import appearance as shifts
from . import shapesref as sr
from .manifest import Record, decode_turn, load_image, load_manifest

# Per-pixel attribute classes of the auxiliary loss (0 = background), in shapesref's order.
AUX_ATTRIBUTES: dict[str, tuple[str, ...]] = {"colour": tuple(sr.COLORS), "shape": sr.SHAPES, "size": sr.SIZES}
AUX_NUM_CLASSES: tuple[int, ...] = tuple(1 + len(v) for v in AUX_ATTRIBUTES.values())

# Curriculum: single-attribute phrases first, relational ones afterwards (issue 4 hint).
SIMPLE_TEMPLATES: tuple[str, ...] = (sr.T_COLOR_SHAPE, sr.T_SIZE_SHAPE, sr.T_SIZE_COLOR_SHAPE)

_PROMPT_RE = re.compile(r"<Prompt(\d+)>")


@dataclass
class SequenceSpec:
    """One sequence to build: turns sharing one image prefix, with the prefix's visual prompts."""

    turns: list[Turn]
    prompts: list[Any] = field(default_factory=list)  # point (2,), box (4,) or mask (H, W), <Prompt i> = prompts[i]
    aux_targets: np.ndarray | None = None  # (A, H, W) uint8 attribute classes, for the auxiliary loss


@dataclass
class ImageItem:
    """One image and its sequences (what a dataset returns)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    sequences: list[SequenceSpec]
    key: tuple[int, int, int] = (0, 0, 0)  # (index, epoch, step) that produced it
    flipped: bool = False  # mirrored by augmentation (teacher feature files must be mirrored too)


def item_rng(seed: int, key: tuple[int, int, int], stream: int) -> np.random.Generator:
    """Independent generator per (seed, index, epoch, stream): augmentation never touches global RNG."""
    index, epoch, _ = key
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), int(epoch), int(stream)])


def photometric_augment(image: np.ndarray, seed: int, key: tuple[int, int, int], prob: float) -> np.ndarray:
    """With probability ``prob``, the image through one random camera-like shift (JPEG, blur or noise).

    Pixels only: masks and prompts stay valid. Seeded by the item key, so an item is the same on resume.
    """
    if prob <= 0:
        return image
    rng = item_rng(seed, key, 3)
    return shifts.random_photometric(image, rng) if rng.random() < prob else image


def _as_key(key: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(key, (int, np.integer)):
        return int(key), 0, 0
    index, epoch, step = (list(key) + [0, 0])[:3]
    return int(index), int(epoch), int(step)


# ---------------------------------------------------------------------------------------- prompts


def renumber_prompt(text: str, k: int) -> str:
    """``<Prompt0>`` → ``<Prompt{k}>`` (the generator and manifest write single-prompt questions)."""
    return _PROMPT_RE.sub(lambda m: f"<Prompt{k}>", text)


def _coverage(processor: PixelSailProcessor, prompt: Any, hw: tuple[int, int]) -> np.ndarray:
    grid = processor.grid_size(*hw)
    return processor.prompt_coverage(prompt, hw, grid)


def _prompt_rank(prompt: Any) -> int:
    """Masks first, boxes next, points last: later prompts overwrite, and a point has only one patch."""
    a = np.asarray(prompt)
    return 0 if a.ndim == 2 else (1 if a.shape == (4,) else 2)


def pack_prompted(
    processor: PixelSailProcessor,
    hw: tuple[int, int],
    turns: Sequence[tuple[Turn | Sequence[Turn], Any]],
    max_prompts: int,
    min_kept: float = 0.5,
) -> list[SequenceSpec]:
    """Group (turn(s), prompt) pairs into sequences of at most ``max_prompts`` prompts each.

    Several turns may share one prompt (questions about the same marked object). In a prefix a later prompt
    overwrites an earlier one's patches, so a prompt joins a group only if every prompt there keeps at least
    ``min_kept`` of its patches (and one at least); otherwise it starts a new sequence. Prompts of one
    sequence are numbered ``<Prompt0>``, ``<Prompt1>``, … in their questions.
    """
    groups: list[dict[str, Any]] = []
    ordered = sorted(turns, key=lambda tp: _prompt_rank(tp[1]))  # stable: same order for the same item
    for item_turns, prompt in ordered:
        item_turns = [item_turns] if isinstance(item_turns, Turn) else list(item_turns)
        cover = _coverage(processor, prompt, hw)
        target = None
        for g in groups:
            k = len(g["prompts"])
            if k >= max_prompts:
                continue
            labels = g["labels"].copy()
            labels[cover] = k
            if all((labels == j).sum() >= max(1, math.ceil(min_kept * n)) for j, n in enumerate(g["sizes"])):
                g["labels"] = labels
                target = g
                break
        if target is None:
            target = {"labels": np.where(cover, 0, -1), "sizes": [], "prompts": [], "turns": []}
            groups.append(target)
        k = len(target["prompts"])
        target["sizes"].append(int(cover.sum()))
        target["prompts"].append(prompt)
        target["turns"] += [Turn(renumber_prompt(t.question, k), t.answer, t.masks) for t in item_turns]
    return [SequenceSpec(g["turns"], g["prompts"]) for g in groups]


def shapesref_prompt(p: sr.VisualPrompt) -> Any:
    """A generator prompt in the processor's form: point (x, y), box (x0, y0, x1, y1) or an (H, W) mask."""
    if p.kind == "point":
        return np.asarray(p.point, np.float64)
    if p.kind == "box":
        return np.asarray(p.box, np.float64)
    return p.mask


# ---------------------------------------------------------------------------------------- datasets


def curriculum_templates(step: int, curriculum_steps: int) -> tuple[str, ...] | None:
    """Templates allowed at ``step``: the simple ones for the first ``curriculum_steps`` steps, then all."""
    if curriculum_steps > 0 and step < curriculum_steps:
        return SIMPLE_TEMPLATES
    return None


class ShapesRefDataset(Dataset):
    """Random-access ShapesRef items: scene ``index`` of a seeded generator, ``turns_per_image`` turns on it.

    Keys are ``index`` or ``(index, epoch, step)``; the same key always gives the same item. Augmentation:
    horizontal flip with probability ``flip_prob`` (left/right words swapped by the generator's helpers) and a
    photometric shift with probability ``appearance_prob``.
    """

    def __init__(
        self,
        processor: PixelSailProcessor,
        seed: int = 0,
        length: int = 1_000_000,
        turns_per_image: int = 16,
        flip_prob: float = 0.5,
        mix: Mapping[str, float] | None = None,
        p_absent: float = 0.25,
        curriculum_steps: int = 0,
        max_prompts_per_sequence: int = 6,
        prompt_probs: Mapping[str, float] | None = None,
        aux_targets: bool = False,
        generator_kwargs: Mapping[str, Any] | None = None,
        appearance_prob: float = 0.0,
    ) -> None:
        self.processor = processor
        self.generator = sr.ShapesRefGenerator(seed=seed, **dict(generator_kwargs or {}))
        self.seed = int(seed)
        self.length = int(length)
        self.turns_per_image = int(turns_per_image)
        self.flip_prob = float(flip_prob)
        self.mix = dict(mix) if mix is not None else None
        self.p_absent = float(p_absent)
        self.curriculum_steps = int(curriculum_steps)
        self.max_prompts = int(max_prompts_per_sequence)
        self.prompt_probs = dict(prompt_probs or sr.PROMPT_TYPE_PROBS)
        self.aux_targets = bool(aux_targets)
        self.appearance_prob = float(appearance_prob)

    def __len__(self) -> int:
        return self.length

    def scene_and_samples(self, key: int | Sequence[int]) -> tuple[sr.Scene, list[sr.Sample]]:
        """The (possibly flipped) scene and its turns for a key."""
        key = _as_key(key)
        index, _, step = key
        scene = self.generator.scene(index)
        rng = item_rng(self.seed, key, 1)
        turns = sr.samples(
            scene, rng, self.turns_per_image, mix=self.mix, p_absent=self.p_absent,
            templates=curriculum_templates(step, self.curriculum_steps), prompt_probs=self.prompt_probs,
        )
        if self.is_flipped(key):
            scene = sr.hflip_scene(scene)
            turns = [sr.hflip_sample(t, scene.width) for t in turns]
        return scene, turns

    def is_flipped(self, key: int | Sequence[int]) -> bool:
        return self.flip_prob > 0 and bool(item_rng(self.seed, _as_key(key), 2).random() < self.flip_prob)

    def __getitem__(self, key: int | Sequence[int]) -> ImageItem:
        key = _as_key(key)
        scene, turns = self.scene_and_samples(key)
        hw = (scene.height, scene.width)
        plain = [Turn(s.question, s.answer, None if s.target is None else [s.target]) for s in turns if s.prompt is None]
        # Turns about the same object share its first prompt (one <Prompt k> for all of them).
        by_object: dict[int, tuple[list[Turn], Any]] = {}
        for s in turns:
            if s.prompt is not None:
                entry = by_object.setdefault(s.object_index, ([], shapesref_prompt(s.prompt)))
                entry[0].append(Turn(s.question, s.answer, None if s.target is None else [s.target]))
        prompted = list(by_object.values())
        seqs = ([SequenceSpec(plain)] if plain else []) + pack_prompted(self.processor, hw, prompted, self.max_prompts)
        if self.aux_targets:
            aux = attribute_maps(scene, instances=True)
            for s in seqs:
                s.aux_targets = aux
        image = photometric_augment(scene.image, self.seed, key, self.appearance_prob)
        return ImageItem(image, seqs, key, self.is_flipped(key))


def attribute_maps(scene: sr.Scene, instances: bool = False) -> np.ndarray:
    """(3, H, W) uint8 colour / shape / size class per pixel (0 = background), later objects on top.

    ``instances`` adds a fourth map: which object each pixel shows (1 + its index, 0 = background), for the
    per-object loss (:func:`.losses.object_attribute_loss`); two objects may share all three attributes.
    """
    out = np.zeros((len(AUX_ATTRIBUTES) + int(instances), scene.height, scene.width), np.uint8)
    for i, obj in enumerate(scene.objects):
        for a, (name, values) in enumerate(AUX_ATTRIBUTES.items()):
            value = {"colour": obj.color, "shape": obj.shape, "size": obj.size}[name]
            out[a][obj.mask] = 1 + values.index(value)
        if instances:
            out[-1][obj.mask] = 1 + i
    return out


class ManifestDataset(Dataset):
    """Items from a JSONL manifest (see :mod:`.manifest`): one line = one image; at most ``turns_per_image``
    of its turns per item (a seeded choice per epoch when there are more), horizontal flip with
    ``flip_prob`` (masks, prompts, and left/right words in questions and answers)."""

    def __init__(
        self,
        processor: PixelSailProcessor,
        manifest: str | Path | Sequence[Record],
        seed: int = 0,
        turns_per_image: int = 16,
        flip_prob: float = 0.0,
        max_prompts_per_sequence: int = 6,
        appearance_prob: float = 0.0,
    ) -> None:
        self.processor = processor
        self.records = load_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
        self.seed = int(seed)
        self.turns_per_image = int(turns_per_image)
        self.flip_prob = float(flip_prob)
        self.max_prompts = int(max_prompts_per_sequence)
        self.appearance_prob = float(appearance_prob)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | Sequence[int]) -> ImageItem:
        key = _as_key(key)
        rec = self.records[key[0] % len(self.records)]
        image = photometric_augment(load_image(rec), self.seed, key, self.appearance_prob)
        h, w = image.shape[:2]
        chosen = list(rec.turns)
        if len(chosen) > self.turns_per_image:
            pick = item_rng(self.seed, key, 1).choice(len(chosen), self.turns_per_image, replace=False)
            chosen = [chosen[i] for i in sorted(pick)]
        flip = self.flip_prob > 0 and item_rng(self.seed, key, 2).random() < self.flip_prob
        if flip:
            image = image[:, ::-1].copy()
        plain: list[Turn] = []
        prompted: list[tuple[Turn, Any]] = []
        for t in chosen:
            masks, prompt = decode_turn(t, h, w, rec.base)
            mask_list = [] if masks is None else list(masks)
            q, a = t.question, t.answer
            if flip:
                mask_list = [m[:, ::-1].copy() for m in mask_list]
                q, a = sr.flip_text(q), sr.flip_text(a)
            turn = Turn(q, a, mask_list)
            if prompt is None:
                plain.append(turn)
            else:
                p = manifest_prompt(prompt, h, w)
                prompted.append((turn, flip_prompt(p, w) if flip else p))
        seqs = ([SequenceSpec(plain)] if plain else []) + pack_prompted(self.processor, (h, w), prompted, self.max_prompts)
        return ImageItem(image, seqs, key, flip)


def manifest_prompt(prompt: dict[str, Any], h: int, w: int) -> Any:
    """A manifest prompt → one processor prompt (several points/boxes become the union mask)."""
    if "mask" in prompt:
        return np.asarray(prompt["mask"], bool)
    kind = "points" if "points" in prompt else "boxes"
    vals = np.asarray(prompt[kind], np.float64)
    if len(vals) == 1:
        return vals[0]
    m = np.zeros((h, w), bool)
    for v in vals:
        if kind == "points":
            x, y = int(min(max(v[0], 0), w - 1)), int(min(max(v[1], 0), h - 1))
            m[y, x] = True
        else:
            m[int(max(v[1], 0)) : int(math.ceil(v[3])), int(max(v[0], 0)) : int(math.ceil(v[2]))] = True
    return m


def flip_prompt(p: Any, width: int) -> Any:
    """Mirror a processor prompt horizontally (points are pixel indices, boxes have exclusive x1)."""
    a = np.asarray(p)
    if a.ndim == 2:
        return a[:, ::-1].copy()
    if a.shape == (2,):
        return np.array([width - 1 - a[0], a[1]], np.float64)
    return np.array([width - a[2], a[1], width - a[0], a[3]], np.float64)


# ---------------------------------------------------------------------------------------- sampling


class ResumableBatchSampler:
    """Endless, seeded batches of keys ``(index, epoch, step)`` for one rank, starting at any micro-batch.

    Epoch e visits a permutation of ``range(n)`` seeded by (seed, e); micro-batch g of the run takes slot
    ``g`` of that order for all ranks together (rank r gets the r-th share), so a resumed run restarts at
    ``start`` without replaying anything and DDP ranks never see the same index in one step.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
        grad_accum: int = 1, start: int = 0, shuffle: bool = True,
    ) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError("need at least one item and batch_size >= 1")
        self.n, self.bs, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world, self.accum = int(rank), int(world_size), max(1, int(grad_accum))
        self.start, self.shuffle = int(start), bool(shuffle)
        self.per_epoch = max(1, self.n // (self.bs * self.world))

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), 7]).permutation(self.n)

    def batch(self, g: int) -> list[tuple[int, int, int]]:
        """Keys of micro-batch ``g`` on this rank."""
        epoch, slot = divmod(g, self.per_epoch)
        order = self.order(epoch)
        start = (slot * self.world + self.rank) * self.bs
        idx = [int(order[(start + i) % self.n]) for i in range(self.bs)]
        return [(i, epoch, g // self.accum) for i in idx]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        g = self.start
        while True:
            yield self.batch(g)
            g += 1


# ---------------------------------------------------------------------------------------- batching


class ItemCollator:
    """DataLoader ``collate_fn``: items → one processor batch (plus per-sequence aux targets).

    Each image is resized/patched once and shared by its sequences.
    """

    def __init__(self, processor: PixelSailProcessor) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[ImageItem]) -> dict[str, Any]:
        samples, aux, seq_keys, images = [], [], [], []
        for item in items:
            image = self.processor.preprocess_image(item.image)
            hw = image.original_hw
            for seq in item.sequences:
                prompt_map = (
                    self.processor.visual_prompt_map(hw, image.grid_hw, seq.prompts) if seq.prompts else None
                )
                samples.append(self.processor.build_sequence(image, seq.turns, prompt_map))
                aux.append(None if seq.aux_targets is None else torch.from_numpy(seq.aux_targets))
                seq_keys.append((item.key, item.flipped))
                images.append(item.image)
        batch = self.processor.collate(samples)
        batch["aux_targets"] = aux
        batch["seq_keys"] = seq_keys  # per sequence: (item key, flipped)
        batch["images"] = images  # per sequence: the (augmented) RGB image, e.g. for a teacher model
        return batch


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move tensors (and lists of tensors) to ``device``."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and all(isinstance(x, torch.Tensor) or x is None for x in v):
            out[k] = [None if x is None else x.to(device, non_blocking=True) for x in v]
        else:
            out[k] = v
    return out
