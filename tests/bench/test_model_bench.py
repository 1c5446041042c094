"""The model suite: its JSON shape and sane values, the scripted decoding it relies on, the random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixel_sail_ros.bench import flops
from pixel_sail_ros.bench.model_bench import Case, plan_cases
from pixel_sail_ros.bench.scripted import ScriptedAnswers, fixed_answer
from pixel_sail_ros.cpu_features import fast_bf16_flags
from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig

from .conftest import run_bench

REQUIRED = ("preset", "resolution", "device", "dtype", "prefix_ms_p50", "prefix_ms_p95", "segment_ms_p50",
            "describe_tokens_per_s", "prefix_gflop", "achieved_gflops", "matmul_gflops", "efficiency",
            "peak_memory_mb")
POSITIVE = ("prefix_ms_p50", "prefix_ms_p95", "segment_ms_p50", "describe_tokens_per_s", "prefix_gflop",
            "achieved_gflops", "matmul_gflops", "efficiency", "peak_memory_mb", "decoder_ms_p50")


@pytest.mark.slow
def test_model_suite_quick_tiny_prints_sane_json(bench_model_dir: str) -> None:
    code, doc, err = run_bench("--suite", "model", "--json", "--quick", "--presets", "tiny", "--resolution", "1280x720",
                               "--device", "cpu", "--model-path", bench_model_dir, timeout=300)
    assert code == 0, err[-3000:]
    assert doc["suite"] == "model" and doc["machine"]["cpu_count"] >= 1
    assert doc["machine"]["cpu_fast_bf16"] == fast_bf16_flags()  # the run says whether bf16 products are fast here
    entries = doc["model"]
    assert [e["resolution"] for e in entries] == [[320, 240], [640, 480], [1280, 720]]  # + the camera's size
    cfg = PixelSailConfig.from_pretrained(bench_model_dir)  # the benched checkpoint's own switches count too
    for e in entries:
        missing = [k for k in REQUIRED if k not in e]
        assert not missing, missing
        assert e["preset"] == "tiny" and e["device"] == "cpu" and e["dtype"] == "float32"
        assert e["weights"] in ("path", "bundled")
        assert e["speculative"] is True and e["answer_passes"] == 1  # "It is [SEG]." drafted, verified at once
        assert e["compile_image"] is False
        assert e["keep_freed_memory"] is True  # the CLI's default, as the node's
        # the question and its draft were read in the prefix's pass, and their work is counted with it
        assert e["fused_first_turn"] is True and e["first_turn_tokens"] > 0
        assert e["prefill_gflop"] > e["prefix_gflop"]
        for key in POSITIVE:
            assert e[key] is not None and e[key] > 0, (key, e[key])
        assert 0 < e["efficiency"] <= 1.5, e
        assert e["efficiency"] == pytest.approx(e["achieved_gflops"] / e["matmul_gflops"], rel=0.02)
        assert e["prefix_ms_p50"] <= e["prefix_ms_p95"]
        # a segmentation request contains its prefix; the decoder is part of the prefix
        assert e["decoder_ms_p50"] <= e["prefix_ms_p50"] < e["segment_ms_p50"]
        tokens = e["grid"][0] * e["grid"][1] + 2
        assert e["prefix_tokens"] == tokens
        assert e["prefix_gflop"] == pytest.approx(flops.prefix_flops(cfg, tokens) / 1e9, abs=1e-4)
        assert e["matmul_shape"] == [tokens, 256, 768]
        # achieved FLOP/s is the counted prefill work over the measured prefill time
        assert e["achieved_gflops"] == pytest.approx(e["prefill_gflop"] / (e["prefix_ms_p50"] / 1000), rel=0.02)
        assert e["peak_memory_kind"] == "process_rss" and 50 < e["peak_memory_mb"] < 16000


@pytest.mark.slow
def test_model_suite_with_compiled_image_passes_times_them(bench_model_dir: str) -> None:
    """--compile-image on (and --keep-freed-memory off): the compiled decoder is still timed (it bypasses the
    module's hooks), the scripted answer still yields its mask (the suite raises otherwise), and the engine figure is
    there."""
    code, doc, err = run_bench("--suite", "model", "--json", "--quick", "--presets", "tiny", "--compile-image", "on",
                               "--keep-freed-memory", "off", "--device", "cpu", "--model-path", bench_model_dir,
                               timeout=400)
    assert code == 0, err[-3000:]
    for e in doc["model"]:
        assert e["compile_image"] is True and e["answer_passes"] == 1
        assert e["keep_freed_memory"] is False
        assert 0 < e["decoder_ms_p50"] <= e["prefix_ms_p50"] < e["segment_ms_p50"], e
        assert e["engine_segment_ms_p50"] is not None and e["engine_segment_ms_p50"] > 0


def test_cli_rejects_bad_arguments_with_a_json_error() -> None:
    code, doc, err = run_bench("--suite", "model", "--presets", "tiny,7b", timeout=60)
    assert code == 2 and "7b" in doc["error"] and "7b" in err
    code, doc, _ = run_bench("--suite", "soak", "--seconds", "0", timeout=60)
    assert code == 2 and "--seconds" in doc["error"]


def test_plan_cases_cpu_and_cuda() -> None:
    cpu = plan_cases(["tiny", "0.5b"], "auto", has_cuda=False)
    assert cpu == [Case("tiny", (320, 240), "cpu"), Case("tiny", (640, 480), "cpu"), Case("0.5b", (320, 240), "cpu")]
    gpu = plan_cases(["tiny", "0.5b"], "auto", has_cuda=True)
    assert Case("0.5b", (320, 240), "cpu") in gpu
    assert Case("0.5b", (640, 480), "cuda") in gpu and Case("0.5b", (1024, 768), "cuda") in gpu
    assert all(c.device == "cuda" for c in gpu if c.preset == "tiny")
    assert all(c.device == "cpu" for c in plan_cases(["tiny", "0.5b"], "cpu", has_cuda=True))
    with pytest.raises(ValueError, match="CUDA"):
        plan_cases(["tiny"], "cuda", has_cuda=False)
    # a camera's size: one more entry per preset on the main device, next to that preset's others, none twice
    camera = plan_cases(["tiny", "0.5b"], "auto", has_cuda=False, resolution=(1280, 720))
    assert camera == cpu[:2] + [Case("tiny", (1280, 720), "cpu"), cpu[2], Case("0.5b", (1280, 720), "cpu")]
    assert plan_cases(["tiny"], "auto", has_cuda=False, resolution=(640, 480)) == cpu[:2]
    assert Case("0.5b", (1280, 720), "cuda") in plan_cases(["0.5b"], "auto", has_cuda=True, resolution=(1280, 720))


def _tiny_prefix(model, processor):
    image = processor.preprocess_image(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    return model.prefill(**processor.prefix_inputs(image))


def test_scripted_answers_make_a_random_model_say_it_is_seg() -> None:
    """The bench's segment latency relies on this: forced tokens, real forwards, one mask from the [SEG]."""
    from pixel_sail_ros.bench.random_model import random_model
    from pixel_sail_ros.model.processing_pixel_sail import SEG_ANSWER, PixelSailProcessor, refer_seg_question
    from pixel_sail_ros.model.tokenization import build_tiny_tokenizer

    cfg = PixelSailConfig.from_preset("tiny", num_hidden_layers=2)
    model = random_model(cfg, seed=3)
    processor = PixelSailProcessor.from_config(cfg, build_tiny_tokenizer())
    answer_ids = processor.encode_answer(SEG_ANSWER)  # It is [SEG] . <|endoftext|>
    question = processor.encode_question(refer_seg_question("red circle"))
    with torch.inference_mode():
        prefix = _tiny_prefix(model, processor)
        s = ScriptedAnswers(fixed_answer(answer_ids), cfg.im_start_token_id, filler_id=answer_ids[0])
        answer = model.generate_answer(prefix, question, max_new_tokens=32, logits_processor=s)
        assert answer.token_ids == answer_ids[:-1] and answer.stopped
        assert answer.mask_logits.shape[0] == 1
        assert s.steps == len(answer_ids)  # the question chunk + one forward per fed token
        assert answer.passes == len(answer_ids)
        # drafted as the engine drafts a standing prompt: the script sees the same calls, all in one pass
        drafted = model.generate_answer(prefix, question, max_new_tokens=32, logits_processor=s,
                                        draft_ids=answer_ids[:-1])
        assert drafted.token_ids == answer.token_ids and drafted.passes == 1 and s.steps == 2 * len(answer_ids)
        torch.testing.assert_close(drafted.mask_logits, answer.mask_logits, rtol=1e-4, atol=1e-4)
        # without it, the random model does not follow the script
        free = model.generate_answer(prefix, question, max_new_tokens=4, stop_token_ids=[])
        assert free.token_ids != answer_ids[:4]


def test_random_model_matches_an_ordinary_build_in_everything_but_values() -> None:
    from pixel_sail_ros.bench.random_model import random_model
    from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration

    cfg = PixelSailConfig.from_preset("tiny", num_hidden_layers=1)
    fast = random_model(cfg)
    ref = PixelSailForConditionalGeneration(cfg)
    assert {n: p.shape for n, p in fast.named_parameters()} == {n: p.shape for n, p in ref.named_parameters()}
    for (name, a), (_, b) in zip(fast.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), name  # rotary frequencies recomputed, not left as garbage
    assert all(torch.isfinite(p).all() for p in fast.parameters())
    assert fast.lm_head.weight.data_ptr() == fast.model.embed_tokens.weight.data_ptr()  # tied like the preset
