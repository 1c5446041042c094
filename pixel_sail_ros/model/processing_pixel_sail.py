"""Pixel-SAIL processor: images → patches, visual prompts → per-patch indices, templates → token sequences.

Token layout, templates, positions and masks follow docs/DEVELOPING.md ("Token layout and prompt templates"):
``<vision>`` + h·w ``<vpatch>`` + ``</vision>`` then turns ``<|im_start|>user\\n{q}<|im_end|>\\n{answer}<|endoftext|>``
(the authors' xtuner ``qwen_chat`` instruction, no system prompt, no assistant header). Training turns are
independent: each sees the image block and itself only, and restarts its positions after ``</vision>``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .configuration_pixel_sail import IMAGENET_MEAN, IMAGENET_STD, PixelSailConfig
from .tokenization import IM_END, IM_START, PROMPT_TOKENS, SEG, special_token_ids

# ---- templates (docs/DEVELOPING.md) --------------------------------------------------------------------

USER_TURN_TEMPLATE = IM_START + "user\n{question}" + IM_END + "\n"
REFER_SEG_QUESTION = "Please segment {expr} in this image."
VP_SEG_QUESTION = "Please segment the object marked by {prompt}."
VP_DESCRIBE_QUESTION = "Please describe the object marked by {prompt} briefly."
REFER_DESCRIBE_QUESTION = "Please describe {expr} briefly."
VP_COLOUR_QUESTION = "What colour is {prompt}?"
VP_SHAPE_QUESTION = "What shape is {prompt}?"
VP_SIZE_QUESTION = "What size is {prompt}?"
SEG_ANSWER = "It is " + SEG + "."
NO_TARGET_ANSWER = "No target."

MODEL_INPUT_NAMES = (
    "input_ids", "pixel_values", "image_grid_hw", "visual_prompt_ids", "position_ids", "attention_mask"
)
PROCESSOR_CONFIG_NAME = "processor_config.json"
_PROCESSOR_FIELDS = (
    "patch_size", "max_image_size", "image_mean", "image_std", "num_visual_prompts", "mask_output_stride"
)


def _prompt(k: int) -> str:
    if not 0 <= k < len(PROMPT_TOKENS):
        raise ValueError(f"visual prompt index {k} is outside 0..{len(PROMPT_TOKENS) - 1}")
    return PROMPT_TOKENS[k]


def refer_seg_question(expr: str) -> str:
    """Referring segmentation: answer ``SEG_ANSWER`` or ``NO_TARGET_ANSWER``."""
    return REFER_SEG_QUESTION.format(expr=expr)


def vp_seg_question(k: int = 0) -> str:
    """Click / visual-prompt segmentation of the object under ``<Prompt k>``: answer ``SEG_ANSWER``."""
    return VP_SEG_QUESTION.format(prompt=_prompt(k))


def vp_describe_question(k: int = 0) -> str:
    """Short description of the object under ``<Prompt k>`` ("a small red circle")."""
    return VP_DESCRIBE_QUESTION.format(prompt=_prompt(k))


def refer_describe_question(expr: str) -> str:
    """Short description of a text-referred object, or ``NO_TARGET_ANSWER``."""
    return REFER_DESCRIBE_QUESTION.format(expr=expr)


def vp_attribute_question(attribute: str, k: int = 0) -> str:
    """Visual-prompt QA: ``attribute`` is "colour", "shape" or "size"; the answer is one word."""
    templates = {
        "colour": VP_COLOUR_QUESTION, "color": VP_COLOUR_QUESTION, "shape": VP_SHAPE_QUESTION, "size": VP_SIZE_QUESTION
    }
    if attribute not in templates:
        raise ValueError(f"attribute must be colour, shape or size, got {attribute!r}")
    return templates[attribute].format(prompt=_prompt(k))


# ---- data holders --------------------------------------------------------------------------------------


@dataclass
class ImageInputs:
    """One preprocessed image: row-major patches of the resized image and the sizes that locate them."""

    pixel_values: torch.Tensor  # (h·w, 3·P·P) float32, each row in (C, Ph, Pw) order
    grid_hw: tuple[int, int]
    original_hw: tuple[int, int]
    patch_size: int

    @property
    def resized_hw(self) -> tuple[int, int]:
        return self.grid_hw[0] * self.patch_size, self.grid_hw[1] * self.patch_size


@dataclass
class Turn:
    """One question; for training, its answer and one ground-truth mask per [SEG] of the answer."""

    question: str
    answer: str | None = None
    masks: Sequence[Any] | None = field(default=None)


def _as_turn(turn: Turn | Sequence[Any] | str) -> Turn:
    if isinstance(turn, Turn):
        return turn
    if isinstance(turn, str):
        return Turn(turn)
    return Turn(*turn)


# ---- the processor -------------------------------------------------------------------------------------


class PixelSailProcessor:
    """Turns images, visual prompts and question/answer turns into model inputs, and mask logits back to masks."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        patch_size: int = 16,
        max_image_size: int = 1024,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        num_visual_prompts: int = 15,
        mask_output_stride: int = 2,
    ) -> None:
        if patch_size <= 0 or max_image_size < patch_size or max_image_size % patch_size:
            raise ValueError(f"max_image_size {max_image_size} must be a positive multiple of patch_size {patch_size}")
        self.tokenizer = tokenizer
        self.patch_size = int(patch_size)
        self.max_image_size = int(max_image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.num_visual_prompts = int(num_visual_prompts)
        self.mask_output_stride = int(mask_output_stride)
        self.special_ids = ids = special_token_ids(tokenizer)
        self.vision_start_id: int = ids["vision_start_token_id"]
        self.vision_patch_id: int = ids["vision_patch_token_id"]
        self.vision_end_id: int = ids["vision_end_token_id"]
        self.seg_id: int = ids["seg_token_id"]
        self.eos_id: int = ids["eos_token_id"]
        self.im_end_id: int = ids["im_end_token_id"]
        self.pad_id: int = ids["pad_token_id"]
        self._norm_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- construction / persistence --

    @classmethod
    def from_config(cls, config: PixelSailConfig, tokenizer: PreTrainedTokenizerBase) -> PixelSailProcessor:
        """A processor matching a model config; checks the tokenizer's special ids against it."""
        processor = cls(tokenizer, **{name: getattr(config, name) for name in _PROCESSOR_FIELDS})
        mismatched = {k: v for k, v in processor.special_ids.items() if getattr(config, k) != v}
        if mismatched:
            raise ValueError(f"tokenizer and config disagree on special token ids: {sorted(mismatched)}")
        return processor

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PixelSailProcessor:
        """Load from a checkpoint directory (tokenizer files + processor_config.json or config.json)."""
        path = Path(path)
        settings_file = path / PROCESSOR_CONFIG_NAME
        if not settings_file.is_file():
            settings_file = path / "config.json"
        if not settings_file.is_file():
            raise FileNotFoundError(f"{path} has neither {PROCESSOR_CONFIG_NAME} nor config.json")
        settings = json.loads(settings_file.read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(tokenizer, **{k: settings[k] for k in _PROCESSOR_FIELDS if k in settings})

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        settings = {name: getattr(self, name) for name in _PROCESSOR_FIELDS}
        (path / PROCESSOR_CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")

    # -- images --

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized (H, W): long side ceil'd to a multiple of P and capped; short side scaled, then ceil'd."""
        p = self.patch_size
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}×{width}")
        long_side, short_side = max(height, width), min(height, width)
        long_target = min(-(-long_side // p) * p, self.max_image_size)
        short_target = max(-(-short_side * long_target // (long_side * p)), 1) * p
        return (long_target, short_target) if height >= width else (short_target, long_target)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        th, tw = self.target_size(height, width)
        return th // self.patch_size, tw // self.patch_size

    def mask_logits_size(self, grid_hw: Sequence[int]) -> tuple[int, int]:
        """(H, W) of the model's mask logits for a patch grid."""
        scale = self.patch_size // self.mask_output_stride
        return int(grid_hw[0]) * scale, int(grid_hw[1]) * scale

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._norm_cache:
            mean = torch.tensor(self.image_mean, device=device).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(self.image_std, device=device).view(1, 3, 1, 1) * 255.0
            self._norm_cache[device] = (mean, std)
        return self._norm_cache[device]

    def preprocess_image(
        self, image: np.ndarray | torch.Tensor, device: torch.device | str | None = None
    ) -> ImageInputs:
        """uint8 RGB (H, W, 3) → normalised (h·w, 3·P·P) float32 patches of the resized image.

        Resizing is bilinear with antialiasing, to an 8-bit image like the camera's; it runs on ``device`` (e.g.
        the GPU) when given. On the CPU torch's vectorised uint8 kernel does it, 3–5× faster than the float one at
        camera sizes (640×480: ~1.1 → 0.3 ms, 1920×1080: 7.3 → 1.3 ms); elsewhere the float kernel, rounded to
        grey levels. The two agree within one grey level.
        """
        is_uint8 = image.dtype == torch.uint8 if isinstance(image, torch.Tensor) else image.dtype == np.uint8
        if not is_uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {tuple(image.shape)}")
        height, width = int(image.shape[0]), int(image.shape[1])
        th, tw = self.target_size(height, width)
        pixels = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
        pixels = pixels.to(device=device).permute(2, 0, 1).unsqueeze(0)  # channels-last, as the uint8 kernel wants
        if (th, tw) != (height, width):
            if pixels.device.type == "cpu":
                pixels = F.interpolate(pixels, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
            else:
                pixels = F.interpolate(pixels.float(), size=(th, tw), mode="bilinear", align_corners=False,
                                       antialias=True).round_().clamp_(0.0, 255.0)
        pixels = pixels.float()
        mean, std = self._normalisation(pixels.device)
        pixels = (pixels - mean) / std
        p, gh, gw = self.patch_size, th // self.patch_size, tw // self.patch_size
        patches = pixels.view(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3 * p * p)
        return ImageInputs(patches, (gh, gw), (height, width), p)

    # -- visual prompts --

    def prompt_coverage(self, prompt: Any, original_hw: Sequence[int], grid_hw: Sequence[int]) -> np.ndarray:
        """Patches (gh, gw bool) a prompt covers: a point (x, y), a box (x1, y1, x2, y2) or an (H, W) mask.

        Coordinates are original-image pixels (x = column). A point covers the patch it falls in; a box every
        patch it overlaps; a mask every patch holding the centre of one of its pixels.
        """
        height, width = int(original_hw[0]), int(original_hw[1])
        gh, gw = int(grid_hw[0]), int(grid_hw[1])
        arr = np.asarray(prompt)
        cover = np.zeros((gh, gw), dtype=bool)
        if arr.ndim == 2:
            if arr.shape != (height, width):
                raise ValueError(f"mask prompt is {arr.shape}, the image is {(height, width)}")
            ys, xs = np.nonzero(arr)
            rows = np.minimum(((ys + 0.5) * gh / height).astype(np.int64), gh - 1)
            cols = np.minimum(((xs + 0.5) * gw / width).astype(np.int64), gw - 1)
            cover[rows, cols] = True
        elif arr.shape == (2,):
            x, y = float(arr[0]), float(arr[1])
            cover[min(max(int(y * gh / height), 0), gh - 1), min(max(int(x * gw / width), 0), gw - 1)] = True
        elif arr.shape == (4,):
            x1, y1, x2, y2 = (float(v) for v in arr)
            c1 = min(max(int(math.floor(x1 * gw / width)), 0), gw - 1)
            r1 = min(max(int(math.floor(y1 * gh / height)), 0), gh - 1)
            c2 = min(max(int(math.ceil(x2 * gw / width)), c1 + 1), gw)
            r2 = min(max(int(math.ceil(y2 * gh / height)), r1 + 1), gh)
            cover[r1:r2, c1:c2] = True
        else:
            raise ValueError(f"a visual prompt is a point (2,), a box (4,) or a mask (H, W); got shape {arr.shape}")
        return cover

    def visual_prompt_map(
        self,
        original_hw: Sequence[int],
        grid_hw: Sequence[int],
        prompts: Sequence[Any],
        indices: Sequence[int] | None = None,
    ) -> torch.LongTensor:
        """(gh, gw) prompt index per patch, -1 where none; prompt i gets ``indices[i]`` (default i), later wins."""
        indices = list(range(len(prompts))) if indices is None else list(indices)
        if len(indices) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(indices)} indices")
        out = np.full((int(grid_hw[0]), int(grid_hw[1])), -1, dtype=np.int64)
        for k, prompt in zip(indices, prompts):
            if not 0 <= k < self.num_visual_prompts:
                raise ValueError(f"visual prompt index {k} is outside 0..{self.num_visual_prompts - 1}")
            out[self.prompt_coverage(prompt, original_hw, grid_hw)] = k
        return torch.from_numpy(out)

    # -- text --

    def encode_question(self, question: str) -> list[int]:
        """Token ids of one user turn, ``<|im_start|>user\\n{question}<|im_end|>\\n``."""
        return self.tokenizer.encode(USER_TURN_TEMPLATE.format(question=question), add_special_tokens=False)

    def encode_answer(self, answer: str) -> list[int]:
        """Token ids of an answer followed by ``<|endoftext|>``."""
        return self.tokenizer.encode(answer, add_special_tokens=False) + [self.eos_id]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Answer text without special tokens ([SEG], <Prompt k>, …)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()

    # -- sequences --

    def prefix_tokens(self, grid_hw: Sequence[int]) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Ids (Lp,) and 3-axis positions (3, Lp) of ``<vision>`` + h·w ``<vpatch>`` + ``</vision>``.

        ``<vision>`` is at (0, 0, 0), patch (r, c) at (1, 1 + r, 1 + c), ``</vision>`` at max + 1.
        """
        gh, gw = int(grid_hw[0]), int(grid_hw[1])
        ids = torch.full((gh * gw + 2,), self.vision_patch_id, dtype=torch.long)
        ids[0], ids[-1] = self.vision_start_id, self.vision_end_id
        rows = torch.arange(gh).repeat_interleave(gw)
        cols = torch.arange(gw).repeat(gh)
        positions = torch.empty(3, gh * gw + 2, dtype=torch.long)
        positions[:, 0] = 0
        positions[0, 1:-1] = 1
        positions[1, 1:-1] = 1 + rows
        positions[2, 1:-1] = 1 + cols
        positions[:, -1] = max(gh, gw) + 1
        return ids, positions

    def prefix_inputs(
        self, image: ImageInputs, prompt_map: torch.LongTensor | None = None, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Batch-1 inputs of :meth:`PixelSailForConditionalGeneration.prefill` for one image."""
        ids, positions = self.prefix_tokens(image.grid_hw)
        length = ids.shape[0]
        inputs = {
            "input_ids": ids.view(1, length),
            "pixel_values": image.pixel_values.unsqueeze(0),
            "image_grid_hw": torch.tensor([image.grid_hw], dtype=torch.long),
            "position_ids": positions.view(3, 1, length),
            "attention_mask": torch.ones(1, 1, length, length, dtype=torch.bool),
            "visual_prompt_ids": self.prefix_prompt_ids(image.grid_hw, prompt_map).view(1, length),
        }
        return {k: v.to(device) for k, v in inputs.items()}

    def prefix_prompt_ids(self, grid_hw: Sequence[int], prompt_map: torch.LongTensor | None) -> torch.LongTensor:
        """(Lp,) visual prompt index of every prefix token: the prompt map on the patches, -1 elsewhere."""
        gh, gw = int(grid_hw[0]), int(grid_hw[1])
        out = torch.full((gh * gw + 2,), -1, dtype=torch.long)
        if prompt_map is not None:
            if tuple(prompt_map.shape) != (gh, gw):
                raise ValueError(f"prompt_map is {tuple(prompt_map.shape)}, the patch grid is {(gh, gw)}")
            out[1:-1] = prompt_map.reshape(-1).to(torch.long).cpu()
        return out

    def build_sequence(
        self,
        image: ImageInputs,
        turns: Sequence[Turn | Sequence[Any] | str],
        prompt_map: torch.LongTensor | None = None,
    ) -> dict[str, Any]:
        """One image and K independent turns → one training/eval sample (unpadded).

        Returns ``input_ids`` (L,), ``labels`` (L,; answer tokens + closing ``<|endoftext|>``, -100 elsewhere),
        ``position_ids`` (3, L), ``attention_mask`` (L, L) bool, ``visual_prompt_ids`` (L,), ``pixel_values``
        (h·w, 3·P·P), ``image_grid_hw`` (2,), ``turn_spans`` (K, 2) [start, end) of each turn,
        ``seg_turn_ids`` (n_seg,) turn of each [SEG] in order, ``seg_masks`` (n_seg, H, W) bool ground truth at
        the original size (None unless every turn with a [SEG] gives its masks), ``original_size`` (2,).
        """
        prefix_ids, prefix_pos = self.prefix_tokens(image.grid_hw)
        prefix_len = prefix_ids.shape[0]
        first_text_position = int(prefix_pos[:, -1].max()) + 1
        ids: list[int] = prefix_ids.tolist()
        labels: list[int] = [-100] * prefix_len
        text_positions: list[int] = []
        spans: list[tuple[int, int]] = []
        seg_turns: list[int] = []
        seg_masks: list[torch.Tensor] | None = []
        for index, raw in enumerate(turns):
            turn = _as_turn(raw)
            question = self.encode_question(turn.question)
            if self.seg_id in question:
                raise ValueError(f"turn {index}: the question must not contain {SEG}")
            answer = self.encode_answer(turn.answer) if turn.answer is not None else []
            n_seg = answer.count(self.seg_id)
            start = len(ids)
            ids += question + answer
            labels += [-100] * len(question) + answer
            text_positions += range(first_text_position, first_text_position + len(question) + len(answer))
            spans.append((start, len(ids)))
            seg_turns += [index] * n_seg
            if turn.masks is None:
                if n_seg:
                    seg_masks = None
                continue
            if len(turn.masks) != n_seg:
                raise ValueError(f"turn {index}: the answer has {n_seg} {SEG} but {len(turn.masks)} masks are given")
            if seg_masks is not None:
                for mask in turn.masks:
                    mask = torch.as_tensor(np.asarray(mask)).bool()
                    if tuple(mask.shape) != tuple(image.original_hw):
                        raise ValueError(f"turn {index}: mask is {tuple(mask.shape)}, the image is {image.original_hw}")
                    seg_masks.append(mask)
        length = len(ids)
        positions = torch.empty(3, length, dtype=torch.long)
        positions[:, :prefix_len] = prefix_pos
        positions[:, prefix_len:] = torch.tensor(text_positions, dtype=torch.long)
        mask = torch.zeros(length, length, dtype=torch.bool)
        mask[:, :prefix_len] = True  # every token sees the whole image block; the block sees only itself
        for start, end in spans:
            mask[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        vp = torch.full((length,), -1, dtype=torch.long)
        vp[:prefix_len] = self.prefix_prompt_ids(image.grid_hw, prompt_map)
        height, width = image.original_hw
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": positions,
            "attention_mask": mask,
            "visual_prompt_ids": vp,
            "pixel_values": image.pixel_values.float().cpu(),
            "image_grid_hw": torch.tensor(image.grid_hw, dtype=torch.long),
            "turn_spans": torch.tensor(spans, dtype=torch.long).view(-1, 2),
            "seg_turn_ids": torch.tensor(seg_turns, dtype=torch.long),
            "seg_masks": (torch.stack(seg_masks) if seg_masks else torch.zeros(0, height, width, dtype=torch.bool))
            if seg_masks is not None
            else None,
            "original_size": torch.tensor([height, width], dtype=torch.long),
        }

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Pad samples from :meth:`build_sequence` into a batch.

        Model inputs (see ``MODEL_INPUT_NAMES``/:meth:`model_inputs`) are padded at the end: ids with the pad
        token, labels -100, prompt ids -1, positions 0, patches 0; a pad token attends to itself only (never an
        empty row). Bookkeeping is kept per sample: ``seg_turn_ids``, ``seg_masks``, ``turn_spans`` (lists) and
        ``original_sizes`` (B, 2).
        """
        if not samples:
            raise ValueError("collate needs at least one sample")
        batch = len(samples)
        length = max(s["input_ids"].shape[0] for s in samples)
        n_patches = max(s["pixel_values"].shape[0] for s in samples)
        patch_dim = samples[0]["pixel_values"].shape[1]
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        vp = torch.full((batch, length), -1, dtype=torch.long)
        positions = torch.zeros(3, batch, length, dtype=torch.long)
        pixel_values = torch.zeros(batch, n_patches, patch_dim, dtype=torch.float32)
        attention = torch.eye(length, dtype=torch.bool).repeat(batch, 1, 1, 1)
        for b, s in enumerate(samples):
            n = s["input_ids"].shape[0]
            input_ids[b, :n] = s["input_ids"]
            labels[b, :n] = s["labels"]
            vp[b, :n] = s["visual_prompt_ids"]
            positions[:, b, :n] = s["position_ids"]
            pixel_values[b, : s["pixel_values"].shape[0]] = s["pixel_values"]
            attention[b, 0, :n, :n] = s["attention_mask"]
        return {
            "input_ids": input_ids,
            "pixel_values": pixel_values,
            "image_grid_hw": torch.stack([s["image_grid_hw"] for s in samples]),
            "visual_prompt_ids": vp,
            "position_ids": positions,
            "attention_mask": attention,
            "labels": labels,
            "seg_turn_ids": [s["seg_turn_ids"] for s in samples],
            "seg_masks": [s["seg_masks"] for s in samples],
            "turn_spans": [s["turn_spans"] for s in samples],
            "original_sizes": torch.stack([s["original_size"] for s in samples]),
        }

    @staticmethod
    def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of the model's forward from a :meth:`collate` batch."""
        return {k: batch[k] for k in MODEL_INPUT_NAMES}

    # -- outputs --

    @staticmethod
    def postprocess_masks(
        logits: torch.Tensor, original_size: Sequence[int], threshold: float = 0.5
    ) -> torch.BoolTensor:
        """(n, h, w) mask logits → (n, H, W) bool at the original size: bilinear, then sigmoid > threshold."""
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        height, width = int(original_size[0]), int(original_size[1])
        if logits.shape[0] == 0:
            return torch.zeros(0, height, width, dtype=torch.bool, device=logits.device)
        resized = F.interpolate(logits[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
        # sigmoid(x) > t  ⇔  x > logit(t): one comparison instead of a sigmoid over every pixel.
        return resized > math.log(threshold / (1.0 - threshold))


__all__ = [
    "ImageInputs",
    "MODEL_INPUT_NAMES",
    "NO_TARGET_ANSWER",
    "PixelSailProcessor",
    "REFER_DESCRIBE_QUESTION",
    "REFER_SEG_QUESTION",
    "SEG_ANSWER",
    "Turn",
    "USER_TURN_TEMPLATE",
    "VP_COLOUR_QUESTION",
    "VP_DESCRIBE_QUESTION",
    "VP_SEG_QUESTION",
    "VP_SHAPE_QUESTION",
    "VP_SIZE_QUESTION",
    "refer_describe_question",
    "refer_seg_question",
    "vp_attribute_question",
    "vp_describe_question",
    "vp_seg_question",
]
