"""Random-weight Pixel-SAIL models for benchmarking shapes no trained checkpoint exists for (yet).

Why meta + materialise: building the 0.5b preset the ordinary way initialises ~500M parameters twice on the
CPU (PyTorch's default init, then transformers' ``_init_weights``); allocating on the meta device and filling
each tensor once is several times faster and never touches the hub. Speed does not depend on the values,
but they must be finite and not denormal, so they are drawn like a trained model's (N(0, 0.02), norms at 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig
from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration


def _rebuild_rotary(model: torch.nn.Module, device: torch.device) -> None:
    """Rotary modules hold non-persistent buffers computed in __init__: recompute them on the real device."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            fresh = type(module)(config=module.config).to(device)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def random_model(config: PixelSailConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0, attn_implementation: str = "sdpa") -> PixelSailForConditionalGeneration:
    """A Pixel-SAIL model with random weights, built on the meta device and materialised on ``device``."""
    device = torch.device(device)
    with torch.device("meta"):
        model = PixelSailForConditionalGeneration._from_config(config, attn_implementation=attn_implementation,
                                                                dtype=dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if param.dim() == 1 and leaf == "weight":  # RMSNorm / LayerNorm scales
                param.fill_(1.0)
            elif leaf == "bias":
                param.zero_()
            else:  # in place: no temporary copy of the 545 MB embedding table
                param.normal_(0.0, 0.02, generator=gen)
    _rebuild_rotary(model, device)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    leftover = [n for n, b in model.named_buffers() if b.device.type != device.type or not torch.isfinite(b.float()).all()]
    if leftover:
        raise RuntimeError(f"buffers not materialised for the benchmark: {leftover}")
    return model.eval()


def save_random_checkpoint(directory: str | Path, preset: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a random-weight checkpoint directory (config, safetensors, tokenizer) that the engine loads.

    Only the tiny preset has a tokenizer that can be built offline, so only it makes a loadable checkpoint.
    """
    if preset != "tiny":
        raise ValueError("only the tiny preset has an offline tokenizer; other presets are driven by token ids")
    from pixel_sail_ros.model.processing_pixel_sail import PixelSailProcessor
    from pixel_sail_ros.model.tokenization import build_tiny_tokenizer

    directory = Path(directory)
    config = PixelSailConfig.from_preset(preset, **overrides)
    torch.manual_seed(seed)
    model = PixelSailForConditionalGeneration(config).eval()
    model.save_pretrained(str(directory))
    PixelSailProcessor.from_config(config, build_tiny_tokenizer()).save_pretrained(directory)
    return directory


__all__ = ["random_model", "save_random_checkpoint"]
