"""What the model suite benchmarks: a model plus the token ids that drive it, for every preset.

Why token ids: only the tiny preset has a tokenizer that can be built offline, and the paper presets' (Qwen2.5)
cannot be downloaded here. Both kinds of subject run the same model API with Qwen-shaped or real turns, so an
entry measures the model, not the availability of a tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("pixel_sail_bench.model")

SEG_EXPRESSION = "red circle"
# Token ids standing in for a Qwen2.5 turn when no tokenizer is available offline (0.5b): the lengths match
# "<|im_start|>user\nPlease segment the red circle in this image.<|im_end|>\n" and "It is [SEG].".
_QWEN_QUESTION_BODY = (872, 198, 5501, 10238, 279, 2518, 12671, 304, 419, 2168, 13)
_QWEN_NEWLINE, _QWEN_IT, _QWEN_IS, _QWEN_DOT, _QWEN_FILLER = 198, 2132, 374, 13, 264


@dataclass
class Subject:
    """A model ready to benchmark, with the token ids that drive it."""

    preset: str
    weights: str  # "bundled", "path" or "random"
    model: Any
    processor: Any  # preprocess_image / prefix_inputs / postprocess_masks
    seg_question: list[int]
    seg_answer: list[int]  # ends with a stop token
    describe_question: list[int]
    filler_id: int
    engine_processor: Optional[Any] = None  # the real processor (with tokenizer), when there is one
    source: str = ""

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype


def _with_config_ids(processor: Any, config: Any) -> Any:
    """A processor whose special ids are the config's (for presets whose tokenizer is not available)."""
    processor.vision_start_id = config.vision_start_token_id
    processor.vision_patch_id = config.vision_patch_token_id
    processor.vision_end_id = config.vision_end_token_id
    processor.seg_id = config.seg_token_id
    processor.eos_id = config.eos_token_id
    processor.im_end_id = config.im_end_token_id
    processor.pad_id = config.pad_token_id
    return processor


def tokenizer_subject(model: Any, processor: Any, preset: str, weights: str, source: str = "") -> Subject:
    """A subject whose questions and answers come from its real tokenizer (tiny / bundled checkpoints)."""
    from pixel_sail_ros.model.processing_pixel_sail import SEG_ANSWER, refer_describe_question, refer_seg_question

    tok = processor.tokenizer
    filler = tok.convert_tokens_to_ids("red")
    if filler is None or filler == tok.unk_token_id:
        filler = processor.encode_answer("a")[0]
    return Subject(
        preset=preset, weights=weights, model=model, processor=processor,
        seg_question=processor.encode_question(refer_seg_question(SEG_EXPRESSION)),
        seg_answer=processor.encode_answer(SEG_ANSWER),
        describe_question=processor.encode_question(refer_describe_question(SEG_EXPRESSION)),
        filler_id=int(filler), engine_processor=processor, source=source,
    )


def id_subject(model: Any, preset: str) -> Subject:
    """A subject driven by token ids only: Qwen2.5-shaped turns with the config's special ids."""
    from pixel_sail_ros.model.processing_pixel_sail import PixelSailProcessor
    from pixel_sail_ros.model.tokenization import build_tiny_tokenizer

    c = model.config
    processor = PixelSailProcessor(build_tiny_tokenizer(), patch_size=c.patch_size, max_image_size=c.max_image_size,
                                   image_mean=c.image_mean, image_std=c.image_std,
                                   num_visual_prompts=c.num_visual_prompts, mask_output_stride=c.mask_output_stride)
    _with_config_ids(processor, c)
    body = list(_QWEN_QUESTION_BODY)
    question = [c.im_start_token_id, *body, c.im_end_token_id, _QWEN_NEWLINE]
    describe = [c.im_start_token_id, *body[:3], 7512, *body[4:], c.im_end_token_id, _QWEN_NEWLINE]
    return Subject(preset=preset, weights="random", model=model, processor=processor, seg_question=question,
                   seg_answer=[_QWEN_IT, _QWEN_IS, c.seg_token_id, _QWEN_DOT, c.eos_token_id],
                   describe_question=describe, filler_id=_QWEN_FILLER)


def load_tiny(model_path: Optional[str], device: torch.device, dtype: torch.dtype) -> Subject:
    """The tiny subject: a given checkpoint, else the bundled one, else random weights (said in ``weights``)."""
    from pixel_sail_ros.engine import BUNDLED_CHECKPOINT
    from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
    from pixel_sail_ros.model.processing_pixel_sail import PixelSailProcessor

    directory = Path(model_path) if model_path else BUNDLED_CHECKPOINT
    if (directory / "config.json").is_file():
        model = PixelSailForConditionalGeneration.from_pretrained(
            str(directory), dtype=dtype, attn_implementation="sdpa", distill_pixel_dim=0, distill_token_dim=0)
        model = model.to(device).eval()
        processor = PixelSailProcessor.from_pretrained(directory)
        return tokenizer_subject(model, processor, "tiny", "path" if model_path else "bundled", str(directory))
    if model_path:
        raise FileNotFoundError(f"--model-path {model_path}: no config.json there")
    log.warning("no bundled checkpoint at %s: benchmarking the tiny preset with random weights", directory)
    from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig
    from pixel_sail_ros.model.tokenization import build_tiny_tokenizer

    from .random_model import random_model

    config = PixelSailConfig.from_preset("tiny")
    model = random_model(config, device, dtype)
    processor = PixelSailProcessor.from_config(config, build_tiny_tokenizer())
    return tokenizer_subject(model, processor, "tiny", "random", "random")


def load_random(preset: str, device: torch.device, dtype: torch.dtype) -> Subject:
    from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig

    from .random_model import random_model

    return id_subject(random_model(PixelSailConfig.from_preset(preset), device, dtype), preset)


__all__ = ["SEG_EXPRESSION", "Subject", "id_subject", "load_random", "load_tiny", "tokenizer_subject"]
