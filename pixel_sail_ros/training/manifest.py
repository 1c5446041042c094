"""JSONL manifests: how users bring their own images, masks and questions to ``pixel-sail-train``.

One line per image (blank lines and lines starting with ``#`` are skipped)::

    {"image": "images/kitchen_001.jpg",
     "turns": [
       {"expression": "the red mug", "masks": [{"size": [480, 640], "counts": "b0Z3..."}]},
       {"expression": "the green kettle", "masks": []},
       {"question": "Please segment every cup in this image.", "answer": "They are [SEG] and [SEG].",
        "masks": ["masks/kitchen_001_cup0.png", [[10, 10, 60, 10, 60, 70, 10, 70]]]},
       {"prompt": {"points": [[320, 240]]}, "answer": "a small red mug"},
       {"prompt": {"boxes": [[300, 200, 360, 290]]}, "masks": ["masks/kitchen_001_mug.png"]},
       {"question": "What colour is <Prompt0>?", "answer": "red", "prompt": {"mask": "masks/mug.png"}}
     ]}

``image``
    Path to the image, relative to the manifest's folder (absolute paths also work). Any format PIL reads.
``turns``
    A list of independent question/answer turns about that image (they share one image prefix in training,
    so several turns per image are much cheaper than one line per turn). Each turn is an object with:

    ``expression`` (str)
        A referring expression. The question becomes ``Please segment {expression} in this image.`` and the
        answer ``It is [SEG].`` — or ``No target.`` when ``masks`` is ``[]`` (the object is absent).
    ``question`` (str)
        A free-form question instead of ``expression``. It may name visual prompts as ``<Prompt0>``,
        ``<Prompt1>``, … With ``masks`` and no ``answer``, the answer is ``It is [SEG].`` (one mask) or
        ``No target.`` (no mask).
    ``answer`` (str, optional)
        The target text. It must contain exactly one ``[SEG]`` per mask, in the masks' order.
    ``masks`` (list, optional)
        The objects the answer's ``[SEG]`` tokens segment, each one of:

        - COCO RLE: ``{"size": [h, w], "counts": "..."}`` (compressed string) or with a list of run lengths;
        - polygons: a list of ``[x1, y1, x2, y2, ...]`` lists in image pixels (one object, possibly several
          parts), or ``{"polygons": [[...], ...]}``; a single flat ``[x1, y1, ...]`` list is one polygon;
        - a PNG/any image path (relative to the manifest): non-zero pixels are the object.

        Leave ``masks`` out for text-only turns (descriptions, visual-prompt QA).
    ``prompt`` (object, optional)
        A visual prompt marking one object; it becomes ``<Prompt0>``. One of ``{"points": [[x, y], ...]}``
        (pixels, x = column), ``{"boxes": [[x0, y0, x1, y1]]}`` or ``{"mask": <mask as above>}``.
        Without ``question``, a prompt turn asks ``Please segment the object marked by <Prompt0>.`` when it
        has ``masks``, and ``Please describe the object marked by <Prompt0> briefly.`` otherwise.

Mask sizes must equal the image size. Errors name the manifest line and the field
(``manifest.jsonl:12: turns[1].masks[0]: polygon needs at least 3 points``).

RefCOCO-style annotations (COCO ``instances.json`` + a refs list) convert with
:func:`refcoco_to_manifest`. The refs must be JSON (a list of ``{"image_id", "ann_id", "split",
"sentences": [{"sent": ...}]}``, as in the ``refs(unc).json`` exports): the original ``refs(unc).p`` is a
Python pickle, and this package never unpickles anything, because loading a pickle can run arbitrary code.
Convert it once yourself, in an environment you trust, if you only have the pickle.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

SEG = "[SEG]"
NO_TARGET = "No target."
REFER_QUESTION = "Please segment {expr} in this image."
REFER_ANSWER = "It is [SEG]."
PROMPT_SEG_QUESTION = "Please segment the object marked by <Prompt0>."
PROMPT_DESCRIBE_QUESTION = "Please describe the object marked by <Prompt0> briefly."


class ManifestError(ValueError):
    """A manifest line is malformed; the message starts with ``file:line: field:``."""


@dataclass
class Turn:
    """One question/answer turn; masks are still in their manifest form (decoded by :meth:`decode_masks`)."""

    question: str
    answer: str
    masks: list[Any] | None = None  # None = text-only turn; [] = absent target
    prompt: dict[str, Any] | None = None  # {"points": …} | {"boxes": …} | {"mask": raw mask}
    where: str = ""  # "file:line: turns[i]" for errors


@dataclass
class Record:
    """One manifest line: an image and its turns."""

    image: Path
    turns: list[Turn] = field(default_factory=list)
    where: str = ""
    base: Path = Path(".")  # the manifest's folder: mask paths are relative to it


# ---------------------------------------------------------------------------------------------- parse


def _err(where: str, msg: str) -> ManifestError:
    return ManifestError(f"{where}: {msg}")


def _check_mask_form(m: Any, where: str) -> None:
    """Validate the structure of one mask entry without decoding it."""
    if isinstance(m, str):
        if not m:
            raise _err(where, "empty mask path")
        return
    if isinstance(m, dict):
        if "counts" in m:
            size = m.get("size")
            if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
                raise _err(where, "RLE needs 'size': [height, width]")
            if not isinstance(m["counts"], (str, list)):
                raise _err(where, "RLE 'counts' must be a string or a list of run lengths")
            return
        if "polygons" in m:
            _check_polygons(m["polygons"], where)
            return
        raise _err(where, "a mask object needs 'counts'+'size' (RLE) or 'polygons'")
    if isinstance(m, list):
        _check_polygons(m, where)
        return
    raise _err(where, f"a mask must be an RLE object, polygons or an image path, not {type(m).__name__}")


def _polygon_parts(p: Any) -> list[list[float]]:
    if isinstance(p, list) and p and all(isinstance(v, (int, float)) for v in p):
        return [p]
    return p


def _check_polygons(p: Any, where: str) -> None:
    parts = _polygon_parts(p)
    if not isinstance(parts, list) or not parts:
        raise _err(where, "polygons must be a non-empty list of [x1, y1, x2, y2, ...] lists")
    for i, part in enumerate(parts):
        if not isinstance(part, list) or not all(isinstance(v, (int, float)) for v in part):
            raise _err(where, f"polygon {i} must be a flat list of numbers")
        if len(part) % 2:
            raise _err(where, f"polygon {i} has an odd number of coordinates")
        if len(part) < 6:
            raise _err(where, f"polygon {i}: a polygon needs at least 3 points")


def _check_prompt(p: Any, where: str) -> dict[str, Any]:
    if not isinstance(p, dict) or len(p) != 1:
        raise _err(where, "prompt must be an object with exactly one of 'points', 'boxes', 'mask'")
    (kind, val), = p.items()
    if kind == "points":
        if not (isinstance(val, list) and val and all(isinstance(q, list) and len(q) == 2 for q in val)):
            raise _err(where + ".points", "expected [[x, y], ...]")
    elif kind == "boxes":
        if not (isinstance(val, list) and val and all(isinstance(q, list) and len(q) == 4 for q in val)):
            raise _err(where + ".boxes", "expected [[x0, y0, x1, y1], ...]")
        for b in val:
            if b[2] < b[0] or b[3] < b[1]:
                raise _err(where + ".boxes", f"box {b} has x1 < x0 or y1 < y0")
    elif kind == "mask":
        _check_mask_form(val, where + ".mask")
    else:
        raise _err(where, f"unknown prompt kind {kind!r} (use 'points', 'boxes' or 'mask')")
    return {kind: val}


def parse_turn(obj: Any, where: str) -> Turn:
    """Validate one turn object and fill in the default question/answer templates."""
    if not isinstance(obj, dict):
        raise _err(where, "a turn must be an object")
    unknown = set(obj) - {"expression", "question", "answer", "masks", "prompt"}
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}")
    masks = obj.get("masks")
    if masks is not None:
        if not isinstance(masks, list):
            raise _err(where + ".masks", "must be a list (use [] for an absent object)")
        for j, m in enumerate(masks):
            _check_mask_form(m, f"{where}.masks[{j}]")
    prompt = _check_prompt(obj["prompt"], where + ".prompt") if "prompt" in obj else None
    for key in ("expression", "question", "answer"):
        if key in obj and (not isinstance(obj[key], str) or not obj[key].strip()):
            raise _err(f"{where}.{key}", "must be a non-empty string")
    if "expression" in obj and "question" in obj:
        raise _err(where, "give either 'expression' or 'question', not both")
    if "expression" in obj:
        if masks is None:
            raise _err(where + ".masks", "an 'expression' turn needs masks ([] if the object is absent)")
        question = REFER_QUESTION.format(expr=obj["expression"].strip())
    elif "question" in obj:
        question = obj["question"].strip()
    elif prompt is not None:
        question = PROMPT_SEG_QUESTION if masks is not None else PROMPT_DESCRIBE_QUESTION
    else:
        raise _err(where, "needs 'expression', 'question' or 'prompt'")
    if "<Prompt" in question and prompt is None:
        raise _err(where + ".prompt", "the question names <PromptK> but the turn has no prompt")
    if "answer" in obj:
        answer = obj["answer"].strip()
    elif masks is not None:
        if len(masks) > 1:
            raise _err(where + ".answer", f"{len(masks)} masks need an answer with that many [SEG]")
        answer = REFER_ANSWER if masks else NO_TARGET
    else:
        raise _err(where + ".answer", "a turn without masks needs an answer")
    n_seg = answer.count(SEG)
    if n_seg != len(masks or []):
        raise _err(where + ".answer", f"has {n_seg} [SEG] but the turn has {len(masks or [])} masks")
    return Turn(question, answer, masks, prompt, where)


def parse_line(obj: Any, base: Path, where: str) -> Record:
    """Validate one decoded JSON line."""
    if not isinstance(obj, dict):
        raise _err(where, "each line must be a JSON object")
    unknown = set(obj) - {"image", "turns", "id", "meta"}
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}")
    img = obj.get("image")
    if not isinstance(img, str) or not img:
        raise _err(where + ": image", "missing or not a string")
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns:
        raise _err(where + ": turns", "must be a non-empty list")
    turns_ = [parse_turn(t, f"{where}: turns[{i}]") for i, t in enumerate(turns)]
    return Record(base / img, turns_, where, base)


def load_manifest(path: str | os.PathLike, check_files: bool = True) -> list[Record]:
    """Parse and validate a manifest (structure, templates, and that image files exist)."""
    path = Path(path)
    base = path.parent
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            where = f"{path.name}:{lineno}"
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise _err(where, f"invalid JSON ({e.msg} at column {e.colno})") from None
            rec = parse_line(obj, base, where)
            if check_files and not rec.image.is_file():
                raise _err(where + ": image", f"file not found: {rec.image}")
            records.append(rec)
    if not records:
        raise ManifestError(f"{path}: no records")
    return records


# --------------------------------------------------------------------------------------------- decode


def decode_mask(m: Any, height: int, width: int, base: Path, where: str) -> np.ndarray:
    """One mask entry → bool (height, width)."""
    from pycocotools import mask as mask_utils

    if isinstance(m, str):
        p = Path(m) if os.path.isabs(m) else base / m
        if not p.is_file():
            raise _err(where, f"mask file not found: {p}")
        from PIL import Image

        with Image.open(p) as im:
            arr = np.asarray(im)
        if arr.ndim == 3:
            arr = arr[..., :3].max(-1) if arr.shape[-1] != 4 else arr[..., :3].max(-1) * (arr[..., 3] > 0)
        out = arr > 0
    elif isinstance(m, dict) and "counts" in m:
        h, w = m["size"]
        rle = dict(m)
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, h, w)
        elif isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        try:
            with warnings.catch_warnings():  # pycocotools vs numpy 2 "copy keyword" deprecation noise
                warnings.simplefilter("ignore", DeprecationWarning)
                out = mask_utils.decode(rle).astype(bool)
        except Exception as e:  # pycocotools raises bare exceptions on corrupt counts
            raise _err(where, f"cannot decode RLE ({e})") from None
    else:
        parts = _polygon_parts(m["polygons"] if isinstance(m, dict) else m)
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in parts], height, width)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            out = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    if out.shape != (height, width):
        raise _err(where, f"mask is {out.shape[1]}x{out.shape[0]} but the image is {width}x{height}")
    return out


def load_image(rec: Record) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a record's image."""
    from PIL import Image

    try:
        with Image.open(rec.image) as im:
            return np.array(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise _err(rec.where + ": image", f"cannot read {rec.image} ({e})") from None


def decode_turn(turn: Turn, height: int, width: int, base: Path) -> tuple[np.ndarray | None, dict | None]:
    """Decode a turn's masks → (n, H, W) bool (None for text-only) and its prompt with a decoded mask.

    ``base`` is the folder relative mask paths start from (``Record.base``, the manifest's folder).
    """
    masks = None
    if turn.masks is not None:
        masks = np.zeros((len(turn.masks), height, width), bool)
        for j, m in enumerate(turn.masks):
            masks[j] = decode_mask(m, height, width, base, f"{turn.where}.masks[{j}]")
    prompt = turn.prompt
    if prompt is not None and "mask" in prompt:
        prompt = {"mask": decode_mask(prompt["mask"], height, width, base, f"{turn.where}.prompt.mask")}
    return masks, prompt


# ---------------------------------------------------------------------------------------------- write


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """bool (H, W) → JSON-ready compressed COCO RLE."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_manifest(lines: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write manifest lines (dicts in the format above) as JSONL; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for obj in lines:
            f.write(json.dumps(obj, separators=(",", ":")) + "\n")
    return path


def refcoco_to_manifest(
    instances_json: str | os.PathLike,
    refs_json: str | os.PathLike,
    image_dir: str | os.PathLike,
    out: str | os.PathLike,
    splits: Sequence[str] | None = None,
) -> int:
    """Convert RefCOCO/+/g-style annotations to a manifest; returns the number of images written.

    ``instances_json``: COCO instances (images, annotations with polygon/RLE segmentations).
    ``refs_json``: the refs as JSON — a list (or ``{"refs": [...]}``) of objects with ``image_id``,
    ``ann_id``, ``split`` and ``sentences`` (each ``{"sent": str}`` or a plain string). Pickled ``.p``
    refs are refused: they are never unpickled. ``splits`` keeps only those splits (e.g. ``["train"]``).
    Every sentence becomes one ``expression`` turn on its image; images are referenced relative to ``out``.
    """
    refs_path = Path(refs_json)
    if refs_path.suffix in (".p", ".pkl", ".pickle"):
        raise ManifestError(
            f"{refs_path}: pickled refs are not loaded (unpickling can run code); convert them to JSON first"
        )
    with open(instances_json, encoding="utf-8") as f:
        inst = json.load(f)
    with open(refs_path, encoding="utf-8") as f:
        refs = json.load(f)
    if isinstance(refs, dict):
        refs = refs.get("refs", refs.get("annotations"))
    if not isinstance(refs, list):
        raise ManifestError(f"{refs_path}: expected a JSON list of refs")
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    out = Path(out)
    out_dir = out.parent.resolve()
    per_image: dict[int, list[dict[str, Any]]] = {}
    for i, ref in enumerate(refs):
        if splits is not None and ref.get("split") not in splits:
            continue
        try:
            ann = anns[ref["ann_id"]]
            img_id = ref.get("image_id", ann["image_id"])
            sents = ref["sentences"]
        except KeyError as e:
            raise ManifestError(f"{refs_path}: ref {i}: missing or unknown {e}") from None
        seg = ann["segmentation"]
        if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
            seg = {"size": list(seg["size"]), "counts": seg["counts"]}
        for s in sents:
            text = s["sent"] if isinstance(s, dict) else str(s)
            text = text.strip()
            if text:
                per_image.setdefault(img_id, []).append({"expression": text, "masks": [seg]})
    lines = []
    for img_id, turns in per_image.items():
        if img_id not in images:
            raise ManifestError(f"{instances_json}: image id {img_id} (used by the refs) is not in 'images'")
        p = (Path(image_dir) / images[img_id]["file_name"]).resolve()
        lines.append({"image": os.path.relpath(p, out_dir), "turns": turns})
    write_manifest(lines, out)
    return len(lines)
