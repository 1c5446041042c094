"""The model suite: image-prefix latency, segmentation latency, decode speed and efficiency per preset.

Every entry drives the model the way the engine does (preprocess → ``prefill`` → ``generate_answer`` →
masks at the input size) but through token ids, so presets without an offline tokenizer (0.5b) run the same
path. Answers are scripted (see ``scripted.py``): the forwards are real, only the choice of token is forced,
so a random-weight model decodes exactly as many steps as a trained one ("It is [SEG]." then stop).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pixel_sail_ros.allocator import keeps_freed_memory
from pixel_sail_ros.engine import PixelSailEngine, resolve_decoding, static_decoding_for
from pixel_sail_ros.model.compiled_image import CompiledImagePasses
from pixel_sail_ros.model.static_decoding import StaticDecoding

from . import flops
from .scripted import ScriptedAnswers, fixed_answer
from .stats import PeakRSS, percentile, rounded
from .subjects import SEG_EXPRESSION, Subject, load_random, load_tiny

log = logging.getLogger("pixel_sail_bench.model")


@dataclass
class Case:
    preset: str
    resolution: tuple[int, int]  # (width, height)
    device: str


@dataclass
class Budget:
    """How many runs an entry gets; --quick shrinks everything for tests."""

    warmup: int = 2
    repeats: int = 10
    describe_tokens: int = 32
    describe_repeats: int = 3
    matmul_calls: int = 3


def budget_for(preset: str, device: str, quick: bool, repeats: Optional[int] = None) -> Budget:
    """A 0.5b prefix costs seconds on a CPU, milliseconds on a GPU: size the runs to keep the suite short."""
    heavy_cpu = preset != "tiny" and device == "cpu"
    if quick:
        b = Budget(warmup=1, repeats=2 if heavy_cpu else 4, describe_tokens=6, describe_repeats=1, matmul_calls=2)
    elif heavy_cpu:
        b = Budget(warmup=1, repeats=5, describe_tokens=12, describe_repeats=2, matmul_calls=2)
    else:
        b = Budget(warmup=3, repeats=20, describe_tokens=32, describe_repeats=5, matmul_calls=5)
    if repeats:
        b.repeats = repeats
    return b


# ------------------------------------------------------------------------------------------- measuring

def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def bench_image(width: int, height: int) -> np.ndarray:
    """A ShapesRef scene at width×height (what the synthetic camera publishes)."""
    from pixel_sail_ros.training.camera_frames import render_frame

    return render_frame(seed=7, index=0, width=width, height=height).rgb


class DecoderTimer:
    """Times the decoder stack (``model.model``) with forward hooks, only while ``armed`` (the prefill); a compiled
    decoder is called without the module's hooks, so it is timed through :meth:`wrap`."""

    def __init__(self, model: Any, sync: Callable[[], None]) -> None:
        self._module, self._sync = model.model, sync
        self.seconds: list[float] = []
        self.armed = False
        self._t0 = 0.0
        self._handles: list[Any] = []

    def _pre(self, *_: Any, **__: Any) -> None:
        if self.armed:
            self._sync()
            self._t0 = time.perf_counter()

    def _post(self, *_: Any, **__: Any) -> None:
        if self.armed:
            self._sync()
            self.seconds.append(time.perf_counter() - self._t0)

    def wrap(self, decoder: Callable[..., Any]) -> Callable[..., Any]:
        """``decoder`` (e.g. a compiled ``model.model.forward``), timed like the hooked module."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._pre()
            out = decoder(*args, **kwargs)
            self._post()
            return out

        return timed

    def __enter__(self) -> DecoderTimer:
        self._handles = [self._module.register_forward_pre_hook(self._pre),
                         self._module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


def segment_once(subject: Subject, rgb: np.ndarray, sync: Callable[[], None], script: ScriptedAnswers,
                 decoder: Optional[DecoderTimer] = None, decoding: Optional[StaticDecoding] = None,
                 draft: Optional[Sequence[int]] = None,
                 compiled: Optional[CompiledImagePasses] = None, fuse: bool = False) -> dict[str, float]:
    """One referring-segmentation request through the model API; seconds per stage (and the answer's decoder
    passes). ``draft``: the answer's draft, as the engine drafts a standing prompt from its previous answer;
    ``compiled``: the image passes compiled, as the engine's ``compile_image``; ``fuse``: the question and its
    draft are read in the prefix's pass, as the engine's ``fuse_first_turn`` (the prefix time then includes them)."""
    model, proc, dev = subject.model, subject.processor, subject.device
    sync()
    t0 = time.perf_counter()
    inputs = proc.preprocess_image(rgb, device=dev)
    batch = proc.prefix_inputs(inputs, None, device=dev)
    batch["pixel_values"] = batch["pixel_values"].to(subject.dtype)
    sync()
    t1 = time.perf_counter()
    if decoder is not None:
        decoder.armed = True
    turn = {}
    if fuse:
        turn = {"first_turn_ids": list(subject.seg_question) + list(draft or []), "first_turn_logits": len(draft or []) + 1}
    prefix = model.prefill(**batch, decoding=decoding, compiled=compiled, **turn)
    sync()
    t2 = time.perf_counter()
    if decoder is not None:
        decoder.armed = False
    stops = (subject.config.eos_token_id, subject.config.im_end_token_id)
    answer = model.generate_answer(prefix, subject.seg_question, max_new_tokens=32, stop_token_ids=stops,
                                   logits_processor=script, draft_ids=draft)
    sync()
    t3 = time.perf_counter()
    masks = proc.postprocess_masks(answer.mask_logits, rgb.shape[:2], 0.5).cpu().numpy()
    t4 = time.perf_counter()
    if masks.shape[0] != 1:
        raise RuntimeError(f"scripted answer gave {masks.shape[0]} masks, expected 1 (the [SEG] was not decoded)")
    if fuse and not answer.with_prefix:
        raise RuntimeError("the answer did not start from the turn read with the prefix")
    return {"preprocess": t1 - t0, "prefix": t2 - t1, "answer": t3 - t2, "postprocess": t4 - t3, "segment": t4 - t0,
            "passes": answer.passes}


def describe_tokens_per_s(subject: Subject, rgb: np.ndarray, tokens: int, repeats: int, sync: Callable[[], None],
                          script: ScriptedAnswers, decoding: Optional[StaticDecoding] = None,
                          compiled: Optional[CompiledImagePasses] = None) -> float:
    """Decode speed: (N−1) tokens ÷ (time for N − time for 1), so the question chunk and cache copy cancel."""
    model, proc, dev = subject.model, subject.processor, subject.device
    batch = proc.prefix_inputs(proc.preprocess_image(rgb, device=dev), None, device=dev)
    batch["pixel_values"] = batch["pixel_values"].to(subject.dtype)
    prefix = model.prefill(**batch, decoding=decoding, compiled=compiled)
    stops = (subject.config.eos_token_id, subject.config.im_end_token_id)

    def run(n: int) -> float:
        sync()
        t = time.perf_counter()
        model.generate_answer(prefix, subject.describe_question, max_new_tokens=n, stop_token_ids=stops,
                              logits_processor=script)
        sync()
        return time.perf_counter() - t

    tokens = max(2, tokens)
    rates = []
    for _ in range(max(1, repeats)):
        one, many = run(1), run(tokens)
        rates.append((tokens - 1) / max(many - one, 1e-9))
    return percentile(rates, 50)


class MatmulProbe:
    """The device's own FLOP/s on the prefix's MLP shape, [tokens × hidden] @ [hidden × intermediate].

    Sampled between the model's runs, not before or after them: on a shared machine the load changes from
    second to second, and interleaving lets both numbers see the same conditions.
    """

    def __init__(self, tokens: int, hidden: int, intermediate: int, device: torch.device, dtype: torch.dtype,
                 calls: int = 3) -> None:
        self.shape = (tokens, hidden, intermediate)
        self._sync = _sync(device)
        self._x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        self._w = torch.randn(intermediate, hidden, device=device, dtype=dtype)
        self._calls = calls
        # A GPU matmul of this size takes microseconds: time a burst so launch and sync costs do not count.
        self._burst = 20 if device.type == "cuda" else 1
        self.gflops: list[float] = []
        self.sample()  # warm-up (kernel selection, page faults); kept out of the results
        self.gflops.clear()

    def sample(self) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(self._calls):
                self._sync()
                t = time.perf_counter()
                for _ in range(self._burst):
                    F.linear(self._x, self._w)
                self._sync()
                times.append((time.perf_counter() - t) / self._burst)
        t, h, i = self.shape
        value = 2.0 * t * h * i / percentile(times, 50) / 1e9
        self.gflops.append(value)
        return value


def engine_segment_seconds(subject: Subject, rgb: np.ndarray, repeats: int, script: ScriptedAnswers,
                           decoding: str, speculative: bool = True, compile_image: bool = False,
                           fuse: bool = True) -> list[float]:
    """engine.segment (what the node calls) with the same scripted answer; needs the real tokenizer."""
    engine = PixelSailEngine(subject.model, subject.engine_processor, decoding=decoding, speculative=speculative,
                             compile_image=compile_image, fuse_first_turn=fuse)
    engine.logits_processor = script
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        out = engine.segment(rgb, text=SEG_EXPRESSION)
        times.append(time.perf_counter() - t)
        if len(out.masks) != 1:
            raise RuntimeError(f"engine.segment gave {len(out.masks)} masks with a scripted [SEG] answer")
    return times[1:]


def run_case(subject: Subject, width: int, height: int, budget: Budget, decoding: str = "auto",
             speculative: bool = True, compile_image: bool = False, fuse: bool = True) -> dict[str, Any]:
    """One JSON entry: latencies, decode speed, analytic FLOPs vs the same-run matmul FLOP/s, peak memory.

    ``speculative``: segmentation answers are drafted, as the engine drafts a standing prompt's answer from the
    previous frame's ("It is [SEG]." again); descriptions are timed without a draft (tokens/s of plain decoding).
    ``compile_image``: the prefix and the pixel decoder run compiled (the warm-up requests pay the compilation).
    ``fuse``: the question (and its draft) is read in the prefix's own pass, as the engine's ``fuse_first_turn``.
    """
    dev, dtype, config = subject.device, subject.dtype, subject.config
    mode = resolve_decoding(decoding, dev)
    static = static_decoding_for(subject.model, mode)
    sync = _sync(dev)
    rgb = bench_image(width, height)
    grid = subject.processor.grid_size(height, width)
    tokens = grid[0] * grid[1] + 2
    draft = subject.seg_answer[:-1] if speculative else None  # the answer without its stop token
    turn = len(subject.seg_question) + len(draft or []) if fuse else 0
    counts = flops.prefill_flops(config, grid, turn, len(draft or []) + 1)
    answer = fixed_answer(subject.seg_answer)  # every turn: "It is [SEG]." + stop
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    runs: list[dict[str, float]] = []
    probe = MatmulProbe(tokens, config.text_config.hidden_size, config.text_config.intermediate_size, dev, dtype,
                        budget.matmul_calls)
    with PeakRSS() as rss, torch.inference_mode():
        script = ScriptedAnswers(answer, config.im_start_token_id, subject.filler_id)
        with DecoderTimer(subject.model, sync) as dec:
            compiled = None
            if compile_image:
                passes = CompiledImagePasses.of(subject.model)
                compiled = dataclasses.replace(passes, text_model=dec.wrap(passes.text_model))
            for i in range(budget.warmup + budget.repeats):
                r = segment_once(subject, rgb, sync, script, dec, static, draft, compiled, fuse)
                if i >= budget.warmup:
                    runs.append(r)
                    probe.sample()
            decoder_s = dec.seconds[budget.warmup:]
        filler = ScriptedAnswers(fixed_answer([]), config.im_start_token_id, subject.filler_id)
        tps = describe_tokens_per_s(subject, rgb, budget.describe_tokens, budget.describe_repeats, sync, filler, static,
                                    compiled)
        engine_s: list[float] = []
        if subject.engine_processor is not None:
            try:
                engine_s = engine_segment_seconds(subject, rgb, max(2, budget.repeats // 2), script, mode,
                                                  speculative, compile_image, fuse)
            except Exception as exc:  # noqa: BLE001 - the engine is optional here; say why it is missing
                log.warning("engine.segment could not be benchmarked: %s: %s", type(exc).__name__, exc)
    mm = percentile(probe.gflops, 50)
    peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else rss.peak_mb

    def p(key: str, q: float) -> float:
        return 1000 * percentile([r[key] for r in runs], q)

    prefix_s = percentile([r["prefix"] for r in runs], 50)
    decoder_p50 = percentile(decoder_s, 50)
    achieved = counts["total"] / prefix_s / 1e9
    decoder_gflop = flops.decoder_flops(config, tokens) / 1e9
    entry: dict[str, Any] = {
        "preset": subject.preset,
        "weights": subject.weights,
        "resolution": [width, height],
        "grid": list(grid),
        "prefix_tokens": tokens,
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "attention": subject.model.model.config._attn_implementation,
        "decoding": mode,
        "speculative": speculative,
        "compile_image": compile_image,
        "keep_freed_memory": keeps_freed_memory(),  # this process's malloc keeps freed pages (allocator.py)
        "fused_first_turn": fuse,  # the question read in the prefix's pass: prefix_ms includes it
        "first_turn_tokens": turn,  # its tokens (question + draft), counted in prefill_gflop
        "answer_passes": max(r["passes"] for r in runs),  # decoder passes of "It is [SEG]." after the prefix
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "repeats": len(runs),
        "preprocess_ms_p50": rounded(p("preprocess", 50)),
        "prefix_ms_p50": rounded(p("prefix", 50)),
        "prefix_ms_p95": rounded(p("prefix", 95)),
        "decoder_ms_p50": rounded(1000 * decoder_p50),
        "answer_ms_p50": rounded(p("answer", 50)),
        "postprocess_ms_p50": rounded(p("postprocess", 50)),
        "segment_ms_p50": rounded(p("segment", 50)),
        "segment_ms_p95": rounded(p("segment", 95)),
        "engine_segment_ms_p50": rounded(1000 * percentile(engine_s, 50)) if engine_s else None,
        "describe_tokens_per_s": rounded(tps, 2),
        "prefix_gflop": rounded(counts["prefix"] / 1e9, 4),
        "pixel_decoder_gflop": rounded(flops.pixel_decoder_flops(config, grid) / 1e9, 4),  # in answer_ms, lazily
        "prefill_gflop": rounded(counts["total"] / 1e9, 4),
        "achieved_gflops": rounded(achieved, 2),
        "matmul_gflops": rounded(mm, 2),
        "matmul_shape": list(probe.shape),
        "efficiency": rounded(achieved / mm, 3),
        "decoder_achieved_gflops": rounded(decoder_gflop / decoder_p50, 2),
        "decoder_efficiency": rounded(decoder_gflop / decoder_p50 / mm, 3),
        "peak_memory_mb": rounded(peak_mb, 1),
        "peak_memory_kind": "cuda_max_allocated" if dev.type == "cuda" else "process_rss",
    }
    return entry


# --------------------------------------------------------------------------------------------- the suite

def plan_cases(presets: Sequence[str], device: str, has_cuda: bool,
               resolution: Optional[tuple[int, int]] = None) -> list[Case]:
    """tiny at 320×240 and 640×480 on the main device; 0.5b at 320×240 on the CPU, larger on CUDA; with
    ``resolution`` (a camera's size) also every preset at it on the main device, where not planned already."""
    if device == "cuda" and not has_cuda:
        raise ValueError("--device cuda asked for but CUDA is not available")
    main = "cuda" if has_cuda and device in ("auto", "cuda") else "cpu"
    cases: list[Case] = []
    for preset in presets:
        if preset == "tiny":
            cases += [Case("tiny", (320, 240), main), Case("tiny", (640, 480), main)]
        else:
            if device != "cuda":
                cases.append(Case(preset, (320, 240), "cpu"))
            if main == "cuda":
                cases += [Case(preset, (640, 480), "cuda"), Case(preset, (1024, 768), "cuda")]
        extra = Case(preset, tuple(resolution), main) if resolution else None
        if extra is not None and extra not in cases:
            cases.append(extra)
    return cases


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    from pixel_sail_ros.engine import resolve_dtype as engine_resolve

    return engine_resolve(name, device)


def _free(subject: Optional[Subject]) -> None:
    if subject is None:
        return
    on_cuda = subject.device.type == "cuda"
    subject.model = None
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()


def run(presets: Sequence[str] = ("tiny", "0.5b"), model_path: Optional[str] = None, device: str = "auto",
        dtype: str = "auto", quick: bool = False, repeats: Optional[int] = None,
        decoding: str = "auto", speculative: bool = True, compile_image: bool = False,
        fuse: bool = True, resolution: Optional[tuple[int, int]] = None) -> list[dict[str, Any]]:
    """The model suite: one entry per (preset, resolution, device), models loaded once per (preset, device)."""
    cases = plan_cases(presets, device, torch.cuda.is_available(), resolution)
    entries: list[dict[str, Any]] = []
    subject: Optional[Subject] = None
    key: Optional[tuple[str, str]] = None
    for case in cases:
        if key != (case.preset, case.device):
            _free(subject)
            subject = None
            dev = torch.device(case.device)
            dt = resolve_dtype(dtype, dev)
            t0 = time.perf_counter()
            subject = load_tiny(model_path, dev, dt) if case.preset == "tiny" else load_random(case.preset, dev, dt)
            key = (case.preset, case.device)
            log.info("loaded %s (%s weights) on %s/%s in %.1f s", case.preset, subject.weights, dev, dt,
                     time.perf_counter() - t0)
        assert subject is not None
        budget = budget_for(case.preset, case.device, quick, repeats)
        t0 = time.perf_counter()
        entry = run_case(subject, *case.resolution, budget, decoding, speculative, compile_image, fuse)
        log.info("%s %dx%d on %s: prefix p50 %.1f ms, segment p50 %.1f ms, efficiency %s (%.1f s)", case.preset,
                 *case.resolution, case.device, entry["prefix_ms_p50"], entry["segment_ms_p50"], entry["efficiency"],
                 time.perf_counter() - t0)
        entries.append(entry)
    _free(subject)
    return entries


__all__ = ["Budget", "Case", "Subject", "plan_cases", "run", "run_case"]
