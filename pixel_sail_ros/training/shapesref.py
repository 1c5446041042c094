"""ShapesRef: the synthetic referring-segmentation benchmark of DESIGN.md §5.

That section is a contract between this generator, the bundled default model and anyone who evaluates it, so
the numbers here (image sides, aspect, colours, jitter, size classes, occlusion, templates) are the spec's, not
tuning knobs. Everything is numpy + OpenCV. ``ShapesRefGenerator.scene(index)`` is a pure function of
``(seed, index)``, so a dataset is random-access and train/eval splits are just index ranges or seeds.

Conventions: pixel centres sit at integer coordinates (OpenCV's), points are ``(x, y)`` = (column, row),
boxes are ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive (``x1 - x0`` is the width).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

# --- the spec (DESIGN.md §5) -----------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
SIZES: tuple[str, ...] = ("small", "large")
#: Bounding size (max side of the object's axis-aligned bounding box) as a fraction of the short image side.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.08, 0.14), "large": (0.22, 0.35)}
COLOR_JITTER = 20
MAX_HIDDEN = 0.15
MIN_ASPECT, MAX_ASPECT = 3 / 4, 4 / 3
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "noise")

# Expression templates, spelled as in §5; Expression.template is one of these strings.
T_COLOR_SHAPE = "{color} {shape}"
T_SIZE_COLOR_SHAPE = "{size} {color} {shape}"
T_SIZE_SHAPE = "{size} {shape}"
T_SIDE = "{color} {shape} on the {left|right}"
T_VERTICAL = "{color} {shape} at the {top|bottom}"
T_EXTREME = "{leftmost|rightmost|topmost|bottommost} {shape}"
TEMPLATES: tuple[str, ...] = (T_COLOR_SHAPE, T_SIZE_COLOR_SHAPE, T_SIZE_SHAPE, T_SIDE, T_VERTICAL, T_EXTREME)

# Question/answer templates: identical to those of model/processing_pixel_sail.py (docs/DEVELOPING.md).
REFER_QUESTION = "Please segment {expr} in this image."
SEG_ANSWER = "It is [SEG]."
NO_TARGET_ANSWER = "No target."
VP_SEGMENT_QUESTION = "Please segment the object marked by <Prompt0>."
VP_DESCRIBE_QUESTION = "Please describe the object marked by <Prompt0> briefly."
TEXT_DESCRIBE_QUESTION = "Please describe {expr} briefly."
VP_COLOR_QUESTION = "What colour is <Prompt0>?"
VP_SHAPE_QUESTION = "What shape is <Prompt0>?"
VP_SIZE_QUESTION = "What size is <Prompt0>?"

#: Visual-prompt kinds drawn for click/VP samples, with the paper's probabilities.
PROMPT_TYPE_PROBS: dict[str, float] = {"point": 0.3, "box": 0.3, "mask": 0.4}
#: Default mix of training turns drawn by ``samples``.
TASK_MIX: dict[str, float] = {
    "referring": 0.45,
    "vp_segment": 0.15,
    "vp_describe": 0.15,
    "text_describe": 0.1,
    "vp_qa": 0.15,
}
TASKS: tuple[str, ...] = tuple(TASK_MIX)
#: Positional phrases are only used when the chosen object leads the runner-up by this fraction of the short side.
POSITION_MARGIN = 0.06

_DIRECTIONS: dict[str, tuple[int, int]] = {  # word -> (axis 0=x 1=y, sign: -1 smallest coordinate wins)
    "left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1),
    "leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1),
}
_ROTATION_PERIOD = {"circle": 360.0, "square": 90.0, "triangle": 120.0, "star": 72.0}
_STAR_INNER = 0.45  # inner/outer radius: blunter than a geometric pentagram, so small stars keep their tips
_SUPERSAMPLE = 4  # coverage >= 0.5 at 4x4 subpixels defines every mask, with or without anti-aliasing


# --- data ------------------------------------------------------------------------------------------------------


@dataclass
class ShapeObject:
    """One drawn object. ``mask`` is its visible part; ``full_mask`` what it would cover unoccluded."""

    shape: str
    color: str
    size: str
    center: tuple[float, float]  # (x, y) px, geometric centre of the shape
    bbox_size: int  # max side (px) of the full mask's bounding box; the quantity the size classes bound
    angle: float  # rotation, degrees, in [0, symmetry period)
    rgb: tuple[int, int, int]
    mask: np.ndarray  # (H, W) bool, the pixels of this object that are visible
    full_mask: np.ndarray  # (H, W) bool

    @property
    def hidden_fraction(self) -> float:
        return 1.0 - float(self.mask.sum()) / max(1, int(self.full_mask.sum()))

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Tight box of the visible mask, (x0, y0, x1, y1), x1/y1 exclusive."""
        return mask_box(self.mask)

    @property
    def centroid(self) -> tuple[float, float]:
        """Centroid (x, y) of the visible pixels."""
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: list[ShapeObject]  # in drawing order (later ones on top)
    background: str  # one of BACKGROUNDS
    index: int = 0

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass(frozen=True)
class Expression:
    text: str
    target: int | None  # index into Scene.objects; None = the described object is absent
    template: str  # one of TEMPLATES


@dataclass
class VisualPrompt:
    """A click/box/mask prompt in image pixels; ``to_mask`` is what the processor turns into covered patches."""

    kind: str  # "point" | "box" | "mask"
    point: tuple[int, int] | None = None  # (x, y)
    box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1), x1/y1 exclusive
    mask: np.ndarray | None = None  # (H, W) bool

    def as_array(self) -> np.ndarray:
        """The processor's prompt format: a point (2,) [x, y], a box (4,) [x0, y0, x1, y1] or an (H, W) mask."""
        if self.kind == "point":
            return np.asarray(self.point, np.int64)
        if self.kind == "box":
            return np.asarray(self.box, np.int64)
        return self.mask

    def to_mask(self, height: int, width: int) -> np.ndarray:
        out = np.zeros((height, width), bool)
        if self.kind == "point":
            x, y = self.point
            out[y, x] = True
        elif self.kind == "box":
            x0, y0, x1, y1 = self.box
            out[y0:y1, x0:x1] = True
        elif self.kind == "mask":
            out |= self.mask
        else:
            raise ValueError(f"unknown visual prompt kind {self.kind!r}")
        return out


@dataclass
class Sample:
    """One training/eval turn on a scene's image, in the exact DEVELOPING.md question/answer templates."""

    task: str  # one of TASKS
    question: str
    answer: str
    target: np.ndarray | None  # (H, W) bool mask the [SEG] answers; None when the answer has no [SEG]
    prompt: VisualPrompt | None = None
    object_index: int | None = None  # the object the turn is about; None for absent targets
    expression: Expression | None = None  # for referring / text_describe turns


# --- rendering -------------------------------------------------------------------------------------------------


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (x0, y0, x1, y1) box of a non-empty mask, x1/y1 exclusive."""
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    if ys.size == 0:
        raise ValueError("empty mask has no box")
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _unit_outline(shape: str, angle: float, star_inner: float = _STAR_INNER) -> np.ndarray | None:
    """Polygon with circumradius 1 around the origin (y down), or None for a circle."""
    a = math.radians(angle)
    if shape == "circle":
        return None
    if shape == "square":
        t = a + math.pi / 4 + np.arange(4) * math.pi / 2
        r = np.ones(4)
    elif shape == "triangle":
        t = a - math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        r = np.ones(3)
    elif shape == "star":
        t = a - math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, star_inner)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _coverage(
    shape: str, angle: float, extent: float, frac: tuple[float, float], star_inner: float = _STAR_INNER
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise a shape whose geometric bounding box has max side ``extent`` px, in a small crop.

    Returns (coverage in [0, 1], centre (x, y) in crop coordinates). ``frac`` in [-0.5, 0.5)² shifts the centre
    off the pixel grid so edges fall at every subpixel phase.
    """
    outline = _unit_outline(shape, angle, star_inner)
    span = 2.0 if outline is None else float(np.ptp(outline, 0).max())
    radius = extent / span  # circumradius in px
    n = int(math.ceil(2 * radius)) + 4
    centre = np.array([(n - 1) / 2 + frac[0], (n - 1) / 2 + frac[1]])
    s = _SUPERSAMPLE
    canvas = np.zeros((n * s, n * s), np.uint8)
    fixed = 16  # cv2 shift=4: 1/16 subpixel precision
    to_ss = lambda p: (p + 0.5) * s - 0.5  # noqa: E731  crop pixel coords -> supersampled pixel coords
    if outline is None:
        c = np.round(to_ss(centre) * fixed).astype(np.int64)
        cv2.circle(canvas, (int(c[0]), int(c[1])), int(round(radius * s * fixed)), 1, -1, cv2.LINE_8, 4)
    else:
        pts = np.round(to_ss(centre + radius * outline) * fixed).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 1, cv2.LINE_8, 4)
    cov = canvas.reshape(n, s, n, s).mean(axis=(1, 3), dtype=np.float32)
    return cov, centre


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[str, np.ndarray]:
    """A grey (single-channel) float background: solid, linear gradient, or blurred noise texture."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if kind == "solid":
        bg = np.full((h, w), rng.uniform(40, 215), np.float32)
    elif kind == "gradient":
        a, b = rng.uniform(30, 225, 2)
        while abs(a - b) < 40:
            a, b = rng.uniform(30, 225, 2)
        theta = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        proj = xx * math.cos(theta) + yy * math.sin(theta)
        t = (proj - proj.min()) / max(1e-6, float(np.ptp(proj)))
        bg = (a + (b - a) * t).astype(np.float32)
    else:
        noise = rng.standard_normal((h, w)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), float(rng.uniform(0.7, 3.0)))
        noise *= float(rng.uniform(8, 28)) / max(1e-6, float(noise.std()))
        bg = rng.uniform(60, 195) + noise
    return kind, np.clip(bg, 0, 255)


class ShapesRefGenerator:
    """Draws ShapesRef scenes. ``scene(index)`` depends only on (seed, index); ``scene()`` takes the next index."""

    def __init__(
        self,
        seed: int = 0,
        min_side: int = 160,
        max_side: int = 640,
        min_objects: int = 2,
        max_objects: int = 6,
        antialias: bool = True,
        max_hidden: float = MAX_HIDDEN,
        p_repeat: float = 0.25,
        star_inner: float = _STAR_INNER,
    ) -> None:
        """``p_repeat``: chance that an object copies an earlier one's colour and shape (its size is drawn anew).

        Uniform draws rarely give two objects of one colour and shape, and only such pairs make
        "on the left" / "at the top" / size-disambiguated phrases; this keeps those templates well represented.
        ``star_inner``: a star's inner/outer radius ratio. The spec leaves it open; another renderer may draw the
        sharper stars of a geometric pentagram (``appearance.PENTAGRAM_INNER``).
        """
        if not 1 <= min_side <= max_side:
            raise ValueError("need 1 <= min_side <= max_side")
        if not 1 <= min_objects <= max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        self.seed = int(seed)
        self.min_side, self.max_side = int(min_side), int(max_side)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.antialias = bool(antialias)
        self.max_hidden = float(max_hidden)
        self.p_repeat = float(p_repeat)
        if not 0.2 <= star_inner < 1.0:
            raise ValueError("star_inner must lie in [0.2, 1)")
        self.star_inner = float(star_inner)
        self._next = 0

    def rng(self, index: int, stream: int = 0) -> np.random.Generator:
        """Independent generator for (seed, index, stream): stream 0 draws the scene, others its samples."""
        return np.random.default_rng([self.seed, int(index), int(stream)])

    def item(self, index: int, k: int, **kwargs) -> tuple[Scene, list[Sample]]:
        """Scene ``index`` and ``k`` training turns on it, both deterministic (dataset ``__getitem__``)."""
        scene = self.scene(index)
        return scene, samples(scene, self.rng(index, 1), k, **kwargs)

    def scene(self, index: int | None = None) -> Scene:
        """Scene number ``index`` (or the next one): sides, background, then objects placed one on top of another."""
        if index is None:
            index, self._next = self._next, self._next + 1
        rng = self.rng(index)
        w = int(rng.integers(self.min_side, self.max_side + 1))
        lo = max(self.min_side, math.ceil(w * MIN_ASPECT))
        hi = min(self.max_side, math.floor(w * MAX_ASPECT))
        h = int(rng.integers(lo, hi + 1))
        kind, bg = _background(rng, h, w)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        objects: list[ShapeObject] = []
        covs: list[tuple[np.ndarray, int, int]] = []  # per object: coverage crop and its (row, col) offset
        for _ in range(n):
            placed = self._place(rng, h, w, objects)
            if placed is None:
                continue  # no room after many tries: a scene with fewer objects is still a valid scene
            obj, cov, oy, ox = placed
            for o in objects:
                o.mask &= ~obj.full_mask
            objects.append(obj)
            covs.append((cov, oy, ox))
        image = np.repeat(bg[..., None], 3, axis=2)
        for obj, (cov, oy, ox) in zip(objects, covs):  # composite in each object's crop only
            alpha = cov if self.antialias else (cov >= 0.5).astype(np.float32)
            y0, x0 = max(0, oy), max(0, ox)
            y1, x1 = min(h, oy + alpha.shape[0]), min(w, ox + alpha.shape[1])
            a = alpha[y0 - oy : y1 - oy, x0 - ox : x1 - ox, None]
            region = image[y0:y1, x0:x1]
            image[y0:y1, x0:x1] = region + (np.asarray(obj.rgb, np.float32) - region) * a
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        return Scene(image=image, objects=objects, background=kind, index=int(index))

    def _place(
        self, rng: np.random.Generator, h: int, w: int, objects: list[ShapeObject]
    ) -> tuple[ShapeObject, np.ndarray, int, int] | None:
        """Draw one object's attributes and a position that hides at most max_hidden of every object."""
        short = min(h, w)
        # pixels each existing object may still lose before max_hidden of it is covered
        budgets = [self.max_hidden * o.full_mask.sum() - (o.full_mask.sum() - o.mask.sum()) for o in objects]
        for _ in range(6):  # attribute draws
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            if objects and rng.random() < self.p_repeat:
                twin = objects[int(rng.integers(len(objects)))]
                shape, color = twin.shape, twin.color
            size = SIZES[int(rng.integers(len(SIZES)))]
            angle = 0.0 if shape == "circle" else float(rng.uniform(0, _ROTATION_PERIOD[shape]))
            jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
            rgb = tuple(int(v) for v in np.clip(np.add(COLORS[color], jitter), 0, 255))
            lo_px = math.ceil(SIZE_RANGES[size][0] * short)
            hi_px = math.floor(SIZE_RANGES[size][1] * short)
            target = float(rng.uniform(lo_px, hi_px + 1e-9))
            frac = (float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)))
            drawn = self._sized(shape, angle, target, frac, lo_px, hi_px, self.star_inner)
            if drawn is None:
                continue
            cov, centre, extent = drawn
            crop = cov >= 0.5
            # anti-aliasing only softens the mask's rim: thin tips' faint tails beyond it stay background
            cov = cov * cv2.dilate(crop.astype(np.uint8), np.ones((3, 3), np.uint8))
            x0, y0, x1, y1 = mask_box(crop)
            inner = crop[y0:y1, x0:x1]
            for _ in range(40):  # positions: integer shifts of the same raster, whole object inside the image
                ox = int(rng.integers(-x0, w - x1 + 1))
                oy = int(rng.integers(-y0, h - y1 + 1))
                region = np.s_[oy + y0 : oy + y1, ox + x0 : ox + x1]
                if all((inner & o.mask[region]).sum() <= b for o, b in zip(objects, budgets)):
                    full = _paste(crop, oy, ox, h, w)
                    obj = ShapeObject(
                        shape=shape, color=color, size=size,
                        center=(float(centre[0] + ox), float(centre[1] + oy)), bbox_size=extent, angle=angle,
                        rgb=rgb, mask=full.copy(), full_mask=full,
                    )
                    return obj, cov, oy, ox
        return None

    @staticmethod
    def _sized(
        shape: str, angle: float, target: float, frac: tuple[float, float], lo_px: int, hi_px: int,
        star_inner: float = _STAR_INNER,
    ) -> tuple[np.ndarray, np.ndarray, int] | None:
        """Rasterise so the *mask's* bounding size (what anyone can measure) lands in [lo_px, hi_px]."""
        extent_geom = target
        for _ in range(4):
            cov, centre = _coverage(shape, angle, extent_geom, frac, star_inner)
            x0, y0, x1, y1 = mask_box(cov >= 0.5)
            extent = max(x1 - x0, y1 - y0)
            if lo_px <= extent <= hi_px:
                return cov, centre, extent
            extent_geom *= target / extent
        return None


def _paste(crop: np.ndarray, oy: int, ox: int, h: int, w: int) -> np.ndarray:
    """Place a crop at row/col offset (oy, ox) in an (h, w) zero image, clipping at the borders."""
    out = np.zeros((h, w), crop.dtype)
    ch, cw = crop.shape
    y0, x0 = max(0, oy), max(0, ox)
    y1, x1 = min(h, oy + ch), min(w, ox + cw)
    if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] = crop[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    return out


def render_preview(scene: Scene) -> np.ndarray:
    """The image with each visible mask outlined and numbered, for eyeballing a scene."""
    out = scene.image.copy()
    for i, obj in enumerate(scene.objects):
        contours, _ = cv2.findContours(obj.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
        x, y = (int(round(v)) for v in obj.center)
        cv2.putText(out, str(i), (x - 4, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 2, cv2.LINE_AA)
        cv2.putText(out, str(i), (x - 4, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return out


# --- referring expressions -------------------------------------------------------------------------------------


def _matching(objects: Sequence[ShapeObject], color: str | None, shape: str | None, size: str | None) -> list[int]:
    def fits(word: str | None, value: str) -> bool:
        return word is None or word == value

    return [i for i, o in enumerate(objects) if fits(color, o.color) and fits(shape, o.shape) and fits(size, o.size)]


def _extreme(scene: Scene, idxs: Sequence[int], direction: str, margin: float) -> int | None:
    """The object of ``idxs`` furthest in ``direction``, or None unless it leads the runner-up by ``margin`` px.

    Both the geometric centre and the visible centroid must agree, so a checker using either gets the same
    answer.
    """
    if len(idxs) < 2:
        return None
    axis, sign = _DIRECTIONS[direction]
    winners = set()
    for pos in (lambda o: o.center, lambda o: o.centroid):
        keys = sorted((sign * pos(scene.objects[i])[axis], i) for i in idxs)
        (k_second, _), (k_first, first) = keys[-2], keys[-1]
        if k_first - k_second < margin:
            return None
        winners.add(first)
    return winners.pop() if len(winners) == 1 else None


def _spec_text(template: str, color: str | None, shape: str | None, size: str | None, direction: str | None) -> str:
    if template == T_COLOR_SHAPE:
        return f"{color} {shape}"
    if template == T_SIZE_COLOR_SHAPE:
        return f"{size} {color} {shape}"
    if template == T_SIZE_SHAPE:
        return f"{size} {shape}"
    if template == T_SIDE:
        return f"{color} {shape} on the {direction}"
    if template == T_VERTICAL:
        return f"{color} {shape} at the {direction}"
    if template == T_EXTREME:
        return f"{direction} {shape}"
    raise ValueError(f"unknown template {template!r}")


# Every phrase a template can make: (color, shape, size, direction); None where the template has no slot.
def _all_specs(template: str) -> list[tuple[str | None, str | None, str | None, str | None]]:
    cs = [(c, s) for c in COLORS for s in SHAPES]
    if template == T_COLOR_SHAPE:
        return [(c, s, None, None) for c, s in cs]
    if template == T_SIZE_COLOR_SHAPE:
        return [(c, s, z, None) for c, s in cs for z in SIZES]
    if template == T_SIZE_SHAPE:
        return [(None, s, z, None) for s in SHAPES for z in SIZES]
    if template == T_SIDE:
        return [(c, s, None, d) for c, s in cs for d in ("left", "right")]
    if template == T_VERTICAL:
        return [(c, s, None, d) for c, s in cs for d in ("top", "bottom")]
    if template == T_EXTREME:
        return [(None, s, None, d) for s in SHAPES for d in ("leftmost", "rightmost", "topmost", "bottommost")]
    raise ValueError(f"unknown template {template!r}")


def resolve(
    scene: Scene, template: str, color: str | None, shape: str | None, size: str | None, direction: str | None,
    margin: float | None = None,
) -> tuple[list[int], int | None]:
    """(objects matching the non-positional words, the one object the phrase names or None).

    A phrase names an object when it is unique (plain templates), or, for positional templates, when at least
    two objects match the rest of the phrase and one leads along the direction by a clear margin.
    """
    if margin is None:
        margin = POSITION_MARGIN * min(scene.height, scene.width)
    base = _matching(scene.objects, color, shape, size)
    if direction is None:
        return base, (base[0] if len(base) == 1 else None)
    return base, _extreme(scene, base, direction, margin)


def expressions(
    scene: Scene, rng: np.random.Generator, n_absent: int = 4, templates: Sequence[str] | None = None,
    p_the: float = 0.5,
) -> list[Expression]:
    """Every expression that names exactly one object of the scene, plus ``n_absent`` that name none.

    Absent phrases prefer near misses (one word away from a present object), so a model must check every word
    to answer "No target." rather than react to a colour or shape alone.
    """
    templates = TEMPLATES if templates is None else tuple(templates)
    out: list[Expression] = []
    absent: dict[str, list[tuple[tuple, bool]]] = {}
    for template in templates:
        for spec in _all_specs(template):
            base, target = resolve(scene, template, *spec)
            if target is not None:
                out.append(Expression(_with_the(_spec_text(template, *spec), rng, p_the), target, template))
            elif not base:
                absent.setdefault(template, []).append((spec, _near_miss(scene, spec)))
    for _ in range(n_absent):
        if not absent:
            break
        template = list(absent)[int(rng.integers(len(absent)))]
        pool = absent[template]
        near = [j for j, (_, is_near) in enumerate(pool) if is_near]
        j = near[int(rng.integers(len(near)))] if near and rng.random() < 0.6 else int(rng.integers(len(pool)))
        spec, _ = pool.pop(j)
        if not pool:
            del absent[template]
        out.append(Expression(_with_the(_spec_text(template, *spec), rng, p_the), None, template))
    return out


def _near_miss(scene: Scene, spec: tuple) -> bool:
    """True when some object differs from the phrase's colour/shape/size words in exactly one of them."""
    color, shape, size, _ = spec
    for o in scene.objects:
        diffs = sum(w is not None and w != v for w, v in ((color, o.color), (shape, o.shape), (size, o.size)))
        if diffs == 1:
            return True
    return False


def _with_the(text: str, rng: np.random.Generator, p_the: float) -> str:
    return f"the {text}" if rng.random() < p_the else text


_FLIP_WORDS = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_FLIP_RE = re.compile(r"\b(leftmost|rightmost|left|right)\b")


def flip_text(text: str) -> str:
    """Swap left/right and leftmost/rightmost, for horizontal-flip augmentation."""
    return _FLIP_RE.sub(lambda m: _FLIP_WORDS[m.group(1)], text)


def hflip_scene(scene: Scene) -> Scene:
    """The mirrored scene: image, masks, centres and rotations; object order (and indices) unchanged."""
    w = scene.width
    objects = [
        replace(
            o,
            center=(w - 1 - o.center[0], o.center[1]),
            angle=(-o.angle) % _ROTATION_PERIOD[o.shape] if o.shape != "circle" else 0.0,
            mask=o.mask[:, ::-1].copy(),
            full_mask=o.full_mask[:, ::-1].copy(),
        )
        for o in scene.objects
    ]
    return Scene(scene.image[:, ::-1].copy(), objects, scene.background, scene.index)


def hflip_expression(expr: Expression) -> Expression:
    return replace(expr, text=flip_text(expr.text))


def hflip_prompt(prompt: VisualPrompt, width: int) -> VisualPrompt:
    if prompt.kind == "point":
        x, y = prompt.point
        return replace(prompt, point=(width - 1 - x, y))
    if prompt.kind == "box":
        x0, y0, x1, y1 = prompt.box
        return replace(prompt, box=(width - x1, y0, width - x0, y1))
    return replace(prompt, mask=prompt.mask[:, ::-1].copy())


def hflip_sample(sample: Sample, width: int) -> Sample:
    """Mirror a turn to go with ``hflip_scene``: target, prompt and left/right words in the question."""
    return replace(
        sample,
        question=flip_text(sample.question),
        target=None if sample.target is None else sample.target[:, ::-1].copy(),
        prompt=None if sample.prompt is None else hflip_prompt(sample.prompt, width),
        expression=None if sample.expression is None else hflip_expression(sample.expression),
    )


# --- clicks, visual prompts, descriptions ----------------------------------------------------------------------


def describe(obj: ShapeObject) -> str:
    """The reference description of an object: size, colour and shape words."""
    return f"a {obj.size} {obj.color} {obj.shape}"


def click_point(mask: np.ndarray, rng: np.random.Generator, interior: float = 0.4) -> tuple[int, int]:
    """A pixel (x, y) of ``mask``, drawn among those at least ``interior`` × the deepest distance from its edge.

    Users click inside objects, rarely on their rim; the distance transform keeps clicks off the boundary while
    still spreading them over the object.
    """
    x0, y0, x1, y1 = mask_box(mask)
    crop = np.pad(mask[y0:y1, x0:x1].astype(np.uint8), 1)  # image border counts as an edge
    dist = cv2.distanceTransform(crop, cv2.DIST_L2, 3)[1:-1, 1:-1]
    ys, xs = np.nonzero(dist >= max(1.0, interior * float(dist.max())) - 1e-6)
    j = int(rng.integers(len(xs)))
    return int(xs[j]) + x0, int(ys[j]) + y0


def make_prompt(
    mask: np.ndarray, rng: np.random.Generator, probs: Mapping[str, float] = PROMPT_TYPE_PROBS
) -> VisualPrompt:
    """A point, box (the mask's tight box) or mask prompt for an object, drawn with ``probs``."""
    kinds = list(probs)
    p = np.asarray([probs[k] for k in kinds], float)
    kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    if kind == "point":
        return VisualPrompt("point", point=click_point(mask, rng))
    if kind == "box":
        return VisualPrompt("box", box=mask_box(mask))
    return VisualPrompt("mask", mask=mask.copy())


def vp_qa(obj: ShapeObject) -> list[tuple[str, str]]:
    """(question, answer) pairs about a visually prompted object's colour, shape and size."""
    return [(VP_COLOR_QUESTION, obj.color), (VP_SHAPE_QUESTION, obj.shape), (VP_SIZE_QUESTION, obj.size)]


def samples(
    scene: Scene,
    rng: np.random.Generator,
    k: int,
    mix: Mapping[str, float] | None = None,
    p_absent: float = 0.25,
    templates: Sequence[str] | None = None,
    prompt_probs: Mapping[str, float] = PROMPT_TYPE_PROBS,
) -> list[Sample]:
    """``k`` training turns on one scene's image, tasks drawn from ``mix`` (default TASK_MIX).

    Referring and text-description turns name an absent object with probability ``p_absent`` (answer
    "No target."), otherwise one present object; a template is drawn first, then a phrase, so positional
    templates are not drowned by the plain ones. ``templates`` restricts the phrases (for a curriculum).
    Repeated questions are avoided while the scene has others to ask.
    """
    mix = dict(TASK_MIX if mix is None else mix)
    unknown = set(mix) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}")
    tasks = [t for t in mix if mix[t] > 0]
    weights = np.asarray([mix[t] for t in tasks], float)
    weights /= weights.sum()
    exprs = expressions(scene, rng, n_absent=max(4, k), templates=templates)
    present: dict[str, list[Expression]] = {}
    for e in exprs:
        if e.target is not None:
            present.setdefault(e.template, []).append(e)
    absent = [e for e in exprs if e.target is None]
    out: list[Sample] = []
    asked: set[tuple] = set()  # (question, object): a VP question is only a repeat about the same object
    for _ in range(k):
        for attempt in range(8):
            task = tasks[int(rng.choice(len(tasks), p=weights))]
            s = _one_sample(scene, rng, task, present, absent, p_absent, prompt_probs)
            if s is not None and ((s.question, s.object_index) not in asked or attempt == 7):
                break
        if s is None:
            continue
        asked.add((s.question, s.object_index))
        out.append(s)
    return out


def _one_sample(
    scene: Scene, rng: np.random.Generator, task: str, present: dict[str, list[Expression]],
    absent: list[Expression], p_absent: float, prompt_probs: Mapping[str, float],
) -> Sample | None:
    if task in ("referring", "text_describe"):
        use_absent = bool(absent) and (not present or rng.random() < p_absent)
        if use_absent:
            e = absent[int(rng.integers(len(absent)))]
        elif present:
            group = list(present.values())[int(rng.integers(len(present)))]
            e = group[int(rng.integers(len(group)))]
        else:
            return None
        obj = None if e.target is None else scene.objects[e.target]
        if task == "referring":
            question = REFER_QUESTION.format(expr=e.text)
            answer = NO_TARGET_ANSWER if obj is None else SEG_ANSWER
            target = None if obj is None else obj.mask.copy()
        else:
            question = TEXT_DESCRIBE_QUESTION.format(expr=e.text)
            answer = NO_TARGET_ANSWER if obj is None else describe(obj)
            target = None
        return Sample(task, question, answer, target, None, e.target, e)
    if not scene.objects:
        return None
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    prompt = make_prompt(obj.mask, rng, prompt_probs)
    if task == "vp_segment":
        return Sample(task, VP_SEGMENT_QUESTION, SEG_ANSWER, obj.mask.copy(), prompt, i)
    if task == "vp_describe":
        return Sample(task, VP_DESCRIBE_QUESTION, describe(obj), None, prompt, i)
    if task == "vp_qa":
        pairs = vp_qa(obj)
        question, answer = pairs[int(rng.integers(len(pairs)))]
        return Sample(task, question, answer, None, prompt, i)
    raise ValueError(f"unknown task {task!r}")
