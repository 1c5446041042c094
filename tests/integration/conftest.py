"""Integration fixtures: the checkpoint the node runs (the bundled model; a random tiny one before it exists)."""

from __future__ import annotations

import pytest

from .node_harness import BUNDLED


@pytest.fixture(scope="session")
def quality_model() -> bool:
    """True when the trained bundled model is there, so answers can be scored against ground truth."""
    return (BUNDLED / "config.json").is_file()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, quality_model: bool) -> str:
    if quality_model:
        return str(BUNDLED)
    import torch

    from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig
    from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
    from pixel_sail_ros.model.processing_pixel_sail import PixelSailProcessor
    from pixel_sail_ros.model.tokenization import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("random_tiny")
    torch.manual_seed(0)
    config = PixelSailConfig.from_preset("tiny")
    PixelSailForConditionalGeneration(config).save_pretrained(out)
    PixelSailProcessor.from_config(config, build_tiny_tokenizer()).save_pretrained(out)
    return str(out)
