"""PixelSailEngine: load a Pixel-SAIL checkpoint once, then answer segment / describe requests.

This is what the ROS node, the eval CLI and the benchmarks call. No ROS here. One request = one image prefix
computed once (bidirectional, into a KV cache) and one short greedy answer per question, each answer starting
from a copy of that cache, or, with static decoding (opt-in), from one fixed-size cache rewound to the end
of the prefix, its one-token steps optionally replayed from a CUDA graph. Each answer is drafted from the same
question's previous answer (a camera stream asks the same thing frame after frame) and verified in one pass.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model.compiled_image import CompiledImagePasses
from .model.modeling_pixel_sail import PixelSailAnswer, PixelSailForConditionalGeneration, PixelSailPrefix
from .model.static_decoding import StaticDecoding
from .model.processing_pixel_sail import (
    SEG_ANSWER,
    ImageInputs,
    PixelSailProcessor,
    refer_describe_question,
    refer_seg_question,
    vp_describe_question,
    vp_seg_question,
)

from pixel_sail_ros import BUNDLED_CHECKPOINT, DECODING_MODES, DTYPE_NAMES  # noqa: E402 (one definition, shared with the light tools)

log = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 8192  # larger frames are refused rather than resized (a wrong encoding or a corrupt header)
MAX_PROMPT_TOKENS = 256
WARM_UP_PHRASE = "the object"  # PixelSailEngine.warm_up's standing prompt
_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES if name != "auto"}  # the names are torch's own


@dataclass
class SegmentationOutput:
    """One request's result: N masks at the input image's size, in question order."""

    masks: np.ndarray  # (N, H, W) bool
    scores: np.ndarray  # (N,) float32 in [0, 1]
    labels: list[str]  # the phrase or prompt each mask answers
    description: str = ""
    seconds: float = 0.0
    answers: list[str] = field(default_factory=list)  # the generated text of every turn, for logs


def resolve_decoding(decoding: str, device: torch.device) -> str:
    """The decoding mode an engine on ``device`` uses: "auto" is the dynamic cache (until CUDA graphs are
    measured on a GPU); "graphs" needs CUDA."""
    if decoding not in DECODING_MODES:
        raise ValueError(f"decoding must be one of {DECODING_MODES}, got {decoding!r}")
    if decoding == "graphs" and device.type != "cuda":
        raise ValueError("decoding='graphs' needs the model on a CUDA device")
    return "dynamic" if decoding == "auto" else decoding


def static_decoding_for(model: PixelSailForConditionalGeneration, mode: str) -> StaticDecoding | None:
    """The reusable static cache a resolved decoding ``mode`` decodes over (None for "dynamic")."""
    if mode == "dynamic":
        return None
    return StaticDecoding(model, use_graphs=mode == "graphs", compile_steps=mode == "compiled")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" → the first CUDA GPU if there is one, else the CPU; "cuda[:N]" must exist."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif resolved.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" → bfloat16 on a GPU that has it, else float16 on a GPU; float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


class PixelSailEngine:
    """Segmentation and description with one Pixel-SAIL model; thread-compatible, not thread-safe."""

    def __init__(
        self,
        model: PixelSailForConditionalGeneration,
        processor: PixelSailProcessor,
        max_new_tokens: int = 32,
        mask_threshold: float = 0.5,
        decoding: str = "auto",
        speculative: bool = True,
        compile_image: bool = False,
        fuse_first_turn: bool = True,
    ) -> None:
        """``decoding``: "dynamic" (a growing KV cache per answer), "static" (one fixed-size cache reused across
        frames), "compiled" (static, each one-token step through ``torch.compile``: the first answers pay the
        compilation), "graphs" (static, each one-token step replayed from a CUDA graph: CUDA only), or "auto"
        (dynamic, for now). All give the same answers; graphs are meant to remove most of the GPU's
        kernel-launch overhead, and become the CUDA default once measured on a GPU (see README "Performance").

        ``speculative``: draft each answer from the same question's previous answer ("It is [SEG]." for a
        segmentation question not asked yet) and let greedy decoding verify the draft in one pass
        (``generate_answer(draft_ids=...)``). The answers are the greedy ones either way; a right draft saves
        all but one of the answer's decoder passes, a wrong one costs a few extra tokens in the first pass.

        ``compile_image``: run the image prefix and the pixel decoder through ``torch.compile``
        (:class:`~.model.compiled_image.CompiledImagePasses`): the first request at each new image grid pays the
        compilation (tens of seconds on a small CPU); the answers match eager ones to float rounding.

        ``fuse_first_turn``: read each request's first question (and its draft) in the image prefix's own decoder
        pass (``prefill(first_turn_ids=...)``) rather than in a pass of its own after it: one decoder pass fewer
        per request, the same greedy answers (False: the separate pass, for comparison)."""
        self.model = model.eval()
        self.processor = processor
        self.logits_processor: Any = None  # passed to generate_answer (the benchmarks script answers with it)
        self.max_new_tokens = max_new_tokens
        self.mask_threshold = mask_threshold
        config = model.config
        self.stop_token_ids = (config.eos_token_id, config.im_end_token_id)
        # Per-request work that never changes: question token ids, and the prefix ids/positions/mask per grid.
        self._question_ids: OrderedDict[str, list[int]] = OrderedDict()
        self._prefix_statics: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()
        self.decoding = resolve_decoding(decoding, self.device)
        self._static = static_decoding_for(self.model, self.decoding)
        self.speculative = bool(speculative)
        self.compile_image = bool(compile_image)
        self._compiled = CompiledImagePasses.of(self.model) if self.compile_image else None
        self.fuse_first_turn = bool(fuse_first_turn)
        self._seg_answer_ids = processor.tokenizer.encode(SEG_ANSWER, add_special_tokens=False)
        self._previous_answers: OrderedDict[str, list[int]] = OrderedDict()  # question → its last answer's tokens
        # answers; draft tokens fed and accepted; decoder passes, counting a first turn read with the image as one
        self.draft_stats = {"answers": 0, "drafted_tokens": 0, "accepted_tokens": 0, "passes": 0, "with_prefix": 0}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        *,
        max_new_tokens: int = 32,
        mask_threshold: float = 0.5,
        decoding: str = "auto",
        speculative: bool = True,
        compile_image: bool = False,
        fuse_first_turn: bool = True,
    ) -> PixelSailEngine:
        """Load a checkpoint directory (None = the bundled ShapesRef model) onto a device, in a dtype."""
        directory = Path(path) if path is not None else BUNDLED_CHECKPOINT
        if not (directory / "config.json").is_file():
            if path is None:
                raise FileNotFoundError(
                    f"the bundled checkpoint is missing ({directory} has no config.json): train it with "
                    "`pixel-sail-train` or pass a checkpoint directory"
                )
            raise FileNotFoundError(f"{directory} is not a Pixel-SAIL checkpoint directory (no config.json)")
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a node's log is no place for a per-load progress bar
        model = PixelSailForConditionalGeneration.from_pretrained(
            str(directory), dtype=torch_dtype, attn_implementation="sdpa", distill_pixel_dim=0, distill_token_dim=0
        )
        model.to(torch_device)
        processor = PixelSailProcessor.from_pretrained(directory)
        return cls(model, processor, max_new_tokens=max_new_tokens, mask_threshold=mask_threshold, decoding=decoding,
                   speculative=speculative, compile_image=compile_image, fuse_first_turn=fuse_first_turn)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def close(self) -> None:
        """Drop the model and cached tensors and return GPU memory (e.g. when a lifecycle node deactivates)."""
        on_cuda = self.device.type == "cuda"
        self._prefix_statics.clear()
        self._previous_answers.clear()
        self._static = None
        self._compiled = None
        self.model = None  # type: ignore[assignment]
        if on_cuda:
            torch.cuda.empty_cache()

    # ---- the request -----------------------------------------------------------------------------------

    def segment(
        self,
        rgb: np.ndarray,
        text: str = "",
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        boxes: Sequence[Sequence[float]] | np.ndarray | None = None,
        describe: bool = False,
    ) -> SegmentationOutput:
        """Segment what ``text`` refers to and/or the objects under ``points`` / ``boxes``; optionally describe.

        Args:
            rgb: (H, W, 3) uint8 RGB image.
            text: a referring expression ("red circle"); "" for none.
            points: (N, 2) click positions (x = column, y = row) in image pixels; each is prompt <Prompt i>.
            boxes: (M, 4) boxes (x1, y1, x2, y2) in image pixels; prompts <Prompt N..N+M-1>.
            describe: also describe each prompted object (or, without prompts, the text-referred one).

        Masks come in order: the text's, then one per point, then one per box (an answer of "No target."
        gives none). A prompted object is labelled with its description when ``describe`` is set.

        If ``torch.compile`` cannot compile (``compile_image`` or ``decoding="compiled"``; e.g. no C++ compiler on a
        CPU machine), the engine says so once, turns that option off and answers this request eagerly: a robot
        whose image lacks a compiler still segments.
        """
        start = time.perf_counter()
        try:
            return self._segment(rgb, text, points, boxes, describe, start)
        except torch._dynamo.exc.TorchDynamoException as exc:
            if not self._drop_compilation(exc):
                raise
        return self._segment(rgb, text, points, boxes, describe, start)

    def warm_up(self, width: int, height: int) -> float:
        """Answer a synthetic ``width`` x ``height`` image the ways a camera stream will (a phrase; a click,
        described), so that the first real frame of that size does not pay the one-time costs: torch's kernel
        choices and, on CUDA, its libraries' start-up; with ``compile_image`` the compilation of that image grid
        (two question lengths, so the first-turn length is already symbolic); with ``decoding`` "compiled" or
        "graphs" the compiled or captured one-token step. A model without visual prompts describes the phrase
        instead of a click. The pixel decoder runs even if the model found nothing. Drafts and ``draft_stats``
        are left as they were. Returns the seconds it took."""
        if width < 1 or height < 1:
            raise ValueError(f"warm-up size must be positive, got {width}x{height}")
        start = time.perf_counter()
        image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        drafts, stats = OrderedDict(self._previous_answers), dict(self.draft_stats)
        try:
            found = len(self.segment(image, WARM_UP_PHRASE).masks)
            if self.processor.num_visual_prompts:
                found += len(self.segment(image, points=[(width / 2, height / 2)], describe=True).masks)
            else:  # a text-only model: the phrase again, described (another question length all the same)
                found += len(self.segment(image, WARM_UP_PHRASE, describe=True).masks)
            if not found:
                with torch.inference_mode():
                    self._prefill(image, []).pixel_features  # noqa: B018 - computed on first access
        finally:
            self._previous_answers, self.draft_stats = drafts, stats
        return time.perf_counter() - start

    def _drop_compilation(self, exc: BaseException) -> bool:
        """Turn off whatever runs through ``torch.compile`` after it failed; False when nothing did."""
        dropped = []
        if self._compiled is not None:
            self._compiled, self.compile_image = None, False
            dropped.append("compile_image")
        if self.decoding == "compiled":
            self.decoding, self._static = "static", static_decoding_for(self.model, "static")
            dropped.append('decoding="compiled" (now "static")')
        if dropped:
            log.warning("torch.compile failed (%s: %s); turned off %s and answering eagerly",
                        type(exc).__name__, str(exc).strip().splitlines()[0][:300], " and ".join(dropped))
        return bool(dropped)

    def _segment(self, rgb: np.ndarray, text: str, points: Any, boxes: Any, describe: bool,
                 start: float) -> SegmentationOutput:
        image = _check_image(rgb)
        height, width = image.shape[:2]
        text = _check_text(text)
        point_list = _check_points(points, height, width)
        prompts = point_list + _check_boxes(boxes, height, width)
        n_points, n_prompts = len(point_list), len(prompts)
        if n_prompts and not self.processor.num_visual_prompts:
            raise ValueError("this model takes no visual prompts (num_visual_prompts is 0): give text only")
        if n_prompts > self.processor.num_visual_prompts:
            raise ValueError(f"at most {self.processor.num_visual_prompts} points and boxes together, got {n_prompts}")
        if not text and not prompts:
            raise ValueError("nothing to do: give text, points or boxes")

        with torch.inference_mode():
            if text:  # the order below: the text's question, then descriptions, then one per prompt
                first = (refer_seg_question(text), True)
            else:
                first = (vp_describe_question(0), False) if describe else (vp_seg_question(0), True)
            prefix = self._prefill(image, prompts, first if self.fuse_first_turn else None)
            labels: list[str] = []
            seg_answers: list[PixelSailAnswer] = []
            answers: list[str] = []
            if text:
                answer = self._answer(prefix, refer_seg_question(text), segments=True)
                seg_answers.append(answer)
                labels.append(text)
                answers.append(self.processor.decode(answer.token_ids))
            prompt_labels = [f"point {i}" if i < n_points else f"box {i - n_points}" for i in range(n_prompts)]
            descriptions: list[str] = []
            if describe:
                questions = [vp_describe_question(k) for k in range(n_prompts)] or [refer_describe_question(text)]
                for question in questions:
                    descriptions.append(self.processor.decode(self._answer(prefix, question).token_ids))
                if prompts:
                    prompt_labels = list(descriptions)
                answers += descriptions
            for k in range(n_prompts):
                answer = self._answer(prefix, vp_seg_question(k), segments=True)
                seg_answers.append(answer)
                labels.append(prompt_labels[k])
                answers.append(self.processor.decode(answer.token_ids))
            masks, scores, mask_labels = self._masks(seg_answers, labels, (height, width))

        return SegmentationOutput(
            masks=masks,
            scores=scores,
            labels=mask_labels,
            description="; ".join(d for d in descriptions if d),
            seconds=time.perf_counter() - start,
            answers=answers,
        )

    # ---- steps -----------------------------------------------------------------------------------------

    def _prefill(self, image: np.ndarray, prompts: list[np.ndarray],
                 first: tuple[str, bool] | None = None) -> PixelSailPrefix:
        """The image prefix; ``first`` = (question, segments): the first question to be asked, read in the same pass
        with the draft ``_answer`` will feed with it."""
        inputs = self.processor.preprocess_image(image, device=self.device)
        statics = _cached(self._prefix_statics, inputs.grid_hw, lambda: self._prefix_static_inputs(inputs), 8)
        visual_prompt_ids = None
        if prompts:
            prompt_map = self.processor.visual_prompt_map(inputs.original_hw, inputs.grid_hw, prompts)
            visual_prompt_ids = self.processor.prefix_prompt_ids(inputs.grid_hw, prompt_map).view(1, -1).to(self.device)
        turn: list[int] | None = None
        logits = 1
        if first is not None:
            draft = (self._draft(*first) or [])[: self.max_new_tokens]  # as generate_answer cuts it
            turn, logits = self._question(first[0]) + draft, len(draft) + 1
        return self.model.prefill(
            pixel_values=inputs.pixel_values.to(self.dtype).unsqueeze(0), visual_prompt_ids=visual_prompt_ids,
            decoding=self._static, compiled=self._compiled, first_turn_ids=turn, first_turn_logits=logits, **statics,
        )

    def _prefix_static_inputs(self, inputs: ImageInputs) -> dict[str, torch.Tensor]:
        batch = self.processor.prefix_inputs(inputs, device=self.device)
        return {k: batch[k] for k in ("input_ids", "image_grid_hw", "position_ids", "attention_mask")}

    def _answer(self, prefix: PixelSailPrefix, question: str, segments: bool = False) -> PixelSailAnswer:
        """Greedy answer to ``question``; ``segments``: a segmentation question (drafted "It is [SEG]." at first)."""
        answer = self.model.generate_answer(
            prefix, self._question(question), max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_token_ids,
            logits_processor=self.logits_processor, draft_ids=self._draft(question, segments),
        )
        if self.speculative:
            _remember(self._previous_answers, question, answer.token_ids, 512)
        stats = self.draft_stats
        stats["answers"] += 1
        stats["drafted_tokens"] += answer.drafted
        stats["accepted_tokens"] += answer.draft_accepted
        stats["passes"] += answer.passes
        stats["with_prefix"] += answer.with_prefix
        return answer

    def _question(self, question: str) -> list[int]:
        return _cached(self._question_ids, question, lambda: self.processor.encode_question(question), 512)

    def _draft(self, question: str, segments: bool) -> list[int] | None:
        """What ``question``'s answer is drafted as: its previous answer, or "It is [SEG]." for a new segmentation
        question (None: no draft, or speculative decoding is off)."""
        if not self.speculative:
            return None
        return self._previous_answers.get(question, self._seg_answer_ids if segments else None)

    def _masks(
        self, answers: list[PixelSailAnswer], labels: list[str], size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Masks at the original size; score = mean foreground probability × the [SEG] token's probability."""
        logits = [a.mask_logits for a in answers if a.mask_logits.shape[0]]
        mask_labels = [label for a, label in zip(answers, labels) for _ in range(a.mask_logits.shape[0])]
        if not logits:
            return np.zeros((0, *size), dtype=bool), np.zeros(0, dtype=np.float32), []
        stacked = torch.cat(logits).float()
        token_probs = torch.cat([a.seg_token_probs for a in answers if a.mask_logits.shape[0]]).float()
        masks = self.processor.postprocess_masks(stacked, size, self.mask_threshold)
        probs = stacked.sigmoid()
        foreground = probs > self.mask_threshold
        mean_fg = (probs * foreground).sum(dim=(1, 2)) / foreground.sum(dim=(1, 2)).clamp(min=1)
        scores = (mean_fg * token_probs.to(mean_fg.device)).clamp(0.0, 1.0)
        return masks.cpu().numpy(), scores.cpu().numpy().astype(np.float32), mask_labels


def _cached(cache: OrderedDict, key: Any, make: Any, size: int) -> Any:
    """A small LRU: the value for ``key``, made with ``make()`` on a miss."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = make()
    _remember(cache, key, value, size)
    return value


def _remember(cache: OrderedDict, key: Any, value: Any, size: int) -> None:
    """Store ``value`` as the newest entry of a small LRU."""
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > size:
        cache.popitem(last=False)


# ---- input checks (ValueError messages say what is wrong) -------------------------------------------------


def _check_image(rgb: Any) -> np.ndarray:
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"image is empty ({height}×{width})")
    if max(height, width) > MAX_IMAGE_SIDE:
        raise ValueError(f"image is {height}×{width}; sides above {MAX_IMAGE_SIDE} px are refused")
    return rgb


def _check_text(text: Any) -> str:
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    text = text.strip()
    if len(text.split()) > MAX_PROMPT_TOKENS or len(text) > 8 * MAX_PROMPT_TOKENS:
        raise ValueError(f"text is too long ({len(text)} characters); keep it under {MAX_PROMPT_TOKENS} words")
    return text


def _as_rows(values: Any, columns: int, name: str) -> np.ndarray:
    if values is None:
        return np.zeros((0, columns))
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers shaped (N, {columns})") from error
    if arr.size == 0:
        return np.zeros((0, columns))
    if arr.ndim == 1 and arr.shape[0] == columns:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != columns:
        raise ValueError(f"{name} must be shaped (N, {columns}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} hold a NaN or infinite value")
    return arr


def _check_points(points: Any, height: int, width: int) -> list[np.ndarray]:
    arr = _as_rows(points, 2, "points")
    for i, (x, y) in enumerate(arr):
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"point {i} ({x:g}, {y:g}) is outside the {width}×{height} image (x < width, y < height)")
    return list(arr)


def _check_boxes(boxes: Any, height: int, width: int) -> list[np.ndarray]:
    arr = _as_rows(boxes, 4, "boxes")
    for i, (x1, y1, x2, y2) in enumerate(arr):
        if not (x1 < x2 and y1 < y2):
            raise ValueError(f"box {i} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) needs x1 < x2 and y1 < y2")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise ValueError(f"box {i} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is not inside the {width}×{height} image")
    return list(arr)


__all__ = ["BUNDLED_CHECKPOINT", "PixelSailEngine", "SegmentationOutput", "resolve_device", "resolve_dtype"]
