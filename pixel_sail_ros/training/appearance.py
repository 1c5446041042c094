"""Appearance shifts: the same ShapesRef scene as another renderer or another camera would show it.

DESIGN.md §5 fixes what a scene contains, not how it is drawn, and the bundled model is also judged on scenes
that no one in this project generated. A model that learned this project's anti-aliasing, star outline or
noiseless pixels would fail there. So:

- ``pixel-sail-eval --appearance NAME`` scores a model on a shifted rendering of the same held-out set (same
  objects, same expressions, same ground-truth masks), to measure how much it depends on the renderer;
- ``pixel-sail-train --appearance-aug P`` trains on a random photometric shift of each image with probability P.

Two kinds of shift. *Renderer* shifts draw the scene differently (no anti-aliasing; sharper stars, as a
geometric pentagram has): they are generator options, so masks follow the new outline. *Photometric* shifts
change pixels only (JPEG compression, blur, sensor noise): the masks stay the scene's own.
"""

from __future__ import annotations

from typing import Any, Callable

import cv2
import numpy as np

# The inner/outer radius ratio of a regular pentagram (sin 18° / sin 54°); this generator draws 0.45.
PENTAGRAM_INNER = 0.382

RENDERER_SHIFTS: dict[str, dict[str, Any]] = {
    "aliased": {"antialias": False},
    "pointed-stars": {"star_inner": PENTAGRAM_INNER},
}


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode as JPEG (4:2:0 chroma, as most cameras and image topics compress)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur: a slightly defocused lens."""
    return cv2.GaussianBlur(image, (0, 0), float(sigma))


def noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Independent Gaussian noise per pixel and channel: sensor noise."""
    noisy = image.astype(np.float32) + rng.normal(0.0, float(sigma), image.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# The fixed strength each photometric shift is evaluated at: visible, well within what a camera delivers.
PHOTOMETRIC_SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "jpeg": lambda im, rng: jpeg(im, 40),
    "blur": lambda im, rng: blur(im, 1.0),
    "noise": lambda im, rng: noise(im, 8.0, rng),
}

APPEARANCES: tuple[str, ...] = ("none", *RENDERER_SHIFTS, *PHOTOMETRIC_SHIFTS)


def generator_kwargs(name: str) -> dict[str, Any]:
    """ShapesRefGenerator options for an appearance (empty for photometric ones)."""
    check(name)
    return dict(RENDERER_SHIFTS.get(name, {}))


def apply(name: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image under a photometric appearance (unchanged for "none" and renderer shifts)."""
    check(name)
    shift = PHOTOMETRIC_SHIFTS.get(name)
    return image if shift is None else shift(image, rng)


def random_photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One photometric shift at a random strength, for training: JPEG q 30–90, blur σ 0.4–1.2 or noise σ 2–10."""
    kind = int(rng.integers(3))
    if kind == 0:
        return jpeg(image, int(rng.integers(30, 91)))
    if kind == 1:
        return blur(image, float(rng.uniform(0.4, 1.2)))
    return noise(image, float(rng.uniform(2.0, 10.0)), rng)


def check(name: str) -> None:
    if name not in APPEARANCES:
        raise ValueError(f"unknown appearance {name!r}; choose from {', '.join(APPEARANCES)}")
