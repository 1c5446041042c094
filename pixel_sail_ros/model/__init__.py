"""Pixel-SAIL model: configuration, modeling, processing. Imports torch and transformers only.

The main names are importable from here; each is loaded on first use, so ``import pixel_sail_ros.model`` stays
cheap.
"""

from importlib import import_module

_EXPORTS = {
    "PixelSailConfig": "configuration_pixel_sail",
    "PixelSailForConditionalGeneration": "modeling_pixel_sail",
    "PixelSailOutput": "modeling_pixel_sail",
    "PixelSailPrefix": "modeling_pixel_sail",
    "PixelSailAnswer": "modeling_pixel_sail",
    "PixelSailProcessor": "processing_pixel_sail",
    "Turn": "processing_pixel_sail",
    "build_tiny_tokenizer": "tokenization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
