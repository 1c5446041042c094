"""Shared fixtures for the model-core tests: a random tiny Pixel-SAIL, its processor, and input builders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig
from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
from pixel_sail_ros.model.processing_pixel_sail import PixelSailProcessor
from pixel_sail_ros.model.tokenization import build_tiny_tokenizer


def make_model(seed: int = 0, **overrides) -> PixelSailForConditionalGeneration:
    torch.manual_seed(seed)
    return PixelSailForConditionalGeneration(PixelSailConfig.from_preset("tiny", **overrides)).eval()


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def image_factory():
    """``image_factory(height, width, seed=0)`` → a random uint8 RGB image."""
    return random_image


@pytest.fixture(scope="session")
def model_factory():
    """``model_factory(seed=0, **preset_overrides)`` → a fresh random tiny model in eval mode."""
    return make_model


@pytest.fixture(scope="session")
def wandering_model() -> PixelSailForConditionalGeneration:
    """Random weights, untied head: greedy answers wander over the vocabulary (no stop tokens are given), so a
    test can follow many distinct tokens; never modified by a test."""
    return make_model(5, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def scripted():
    """``scripted(model, chain)``: see :func:`script_model`."""
    return script_model


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def config() -> PixelSailConfig:
    return PixelSailConfig.from_preset("tiny")


@pytest.fixture(scope="session")
def processor(config, tokenizer) -> PixelSailProcessor:
    return PixelSailProcessor.from_config(config, tokenizer)


@pytest.fixture(scope="session")
def model() -> PixelSailForConditionalGeneration:
    """The tiny preset with random weights (6 layers, hidden 256); never modified by a test."""
    return make_model(0)


def script_model(model: PixelSailForConditionalGeneration, chain: dict[int, int]) -> PixelSailForConditionalGeneration:
    """Make greedy decoding follow ``chain`` (token → next token) on a random model, in place.

    Attention and MLP outputs are zeroed, so the last hidden state is RMSNorm(E[token]); each chained token
    gets its own basis direction, and the LM head row of its successor points along it (untied head).
    """
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for successor in set(chain.values()):
            model.lm_head.weight[successor] = 0.0
        for axis, (token, successor) in enumerate(chain.items()):
            model.model.embed_tokens.weight[token] = 0.0
            model.model.embed_tokens.weight[token, axis] = 1.0
            model.lm_head.weight[successor, axis] = 10.0
    return model
