"""The CUDA path (skipped without a GPU): bf16 against float32 within stated tolerances, and the GPU really used.

Tolerances, bf16 weights and activations on the GPU against float32 on the CPU:
- random tiny model, one forward: relative L2 error ≤ 3 % on the LM logits, pixel features and mask logits,
  and the mask logits' signs agree on ≥ 97 % of cells (random logits sit near zero, so a few flip);
- the bundled model on ShapesRef scenes, through the engine: the same answers on ≥ 5 of 6 requests and a mean
  IoU ≥ 0.95 between the two engines' masks;
- resizing the camera image: the GPU's within one grey level of the CPU's;
- graph-replayed decoding with drafted answers against plain dynamic decoding, both bf16 on the GPU: ≥ 90 % of
  answers the same, mean mask IoU ≥ 0.98; a warm-up captures the graph the first real frame replays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pixel_sail_ros.engine import BUNDLED_CHECKPOINT as BUNDLED, PixelSailEngine
from pixel_sail_ros.model.processing_pixel_sail import Turn
from pixel_sail_ros.training.shapesref import ShapesRefGenerator

from .test_modeling import SEG_ANSWER, run, sample_for

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_bf16_forward_on_the_gpu_matches_float32_on_the_cpu(model_factory, processor, image_factory):
    reference = model_factory(7)
    gpu = model_factory(7).to("cuda", torch.bfloat16)
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in gpu.parameters())
    samples = [
        sample_for(processor, image_factory(96, 128, seed=1), [Turn("red circle", SEG_ANSWER)]),
        sample_for(processor, image_factory(160, 112, seed=2), [Turn("blue square", "It is [SEG] and [SEG].")]),
    ]
    want = run(reference, processor, samples)
    inputs = processor.model_inputs(processor.collate(samples))
    inputs = {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda")) for k, v in inputs.items()}
    with torch.no_grad():
        got = gpu(**inputs)
    assert got.logits.device.type == "cuda" and got.logits.dtype == torch.bfloat16
    assert _relative_error(got.logits, want.logits) <= 0.03
    for b in range(len(samples)):
        assert _relative_error(got.pixel_features[b], want.pixel_features[b]) <= 0.03
        assert _relative_error(got.mask_logits[b], want.mask_logits[b]) <= 0.03
        signs = (got.mask_logits[b].float().cpu() > 0) == (want.mask_logits[b] > 0)
        assert signs.float().mean() >= 0.97


def test_resizing_on_the_gpu_matches_the_cpu_within_one_grey_level(processor):
    """The GPU rounds the float kernel's output; the CPU runs torch's uint8 kernel: one grey level apart at most."""
    image = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    cpu = processor.preprocess_image(image).pixel_values
    gpu = processor.preprocess_image(image, device="cuda").pixel_values
    assert gpu.device.type == "cuda"
    one_level = 1.0 / (255.0 * min(processor.image_std))
    assert (gpu.cpu() - cpu).abs().max() <= one_level * 1.01


def test_the_decoder_avoids_cudnn_attention_which_rebuilds_per_shape(model_factory, processor, image_factory):
    from torch.profiler import ProfilerActivity, profile

    gpu = model_factory(8).to("cuda", torch.bfloat16)
    ops: set[str] = set()
    for size in [(64, 96), (112, 80)]:  # two sequence lengths, as a stream of requests has
        sample = sample_for(processor, image_factory(*size), [Turn("red circle", SEG_ANSWER)])
        inputs = processor.model_inputs(processor.collate([sample]))
        inputs = {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda")) for k, v in inputs.items()}
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            gpu(**inputs)
        ops |= {e.key for e in prof.key_averages()}
    assert any("efficient_attention" in op or "flash_attention" in op for op in ops), sorted(ops)
    assert not any("cudnn_attention" in op for op in ops)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_bundled_model_on_the_gpu_answers_and_segments_like_the_cpu():
    gpu = PixelSailEngine.from_pretrained(BUNDLED, device="auto", dtype="auto")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    cpu = PixelSailEngine.from_pretrained(BUNDLED, device="cpu")
    gen = ShapesRefGenerator(seed=77)
    same, ious = 0, []
    torch.cuda.reset_peak_memory_stats()
    weights = sum(p.numel() * p.element_size() for p in gpu.model.parameters())
    for i in range(6):
        scene = gen.scene(i)
        obj = scene.objects[0]
        x, y = obj.centroid
        request = {"text": "the object on the left" if i % 2 else "", "points": [(x, y)], "describe": True}
        a, b = gpu.segment(scene.image, **request), cpu.segment(scene.image, **request)
        same += a.answers == b.answers
        if len(a.masks) == len(b.masks):
            ious += [_iou(m, n) for m, n in zip(a.masks, b.masks)]
        else:
            ious.append(0.0)
    # the work happened on the GPU: activations beyond the weights were allocated there
    assert torch.cuda.max_memory_allocated() > weights
    assert same >= 5
    assert float(np.mean(ious)) >= 0.95


def test_graph_replayed_decoding_answers_like_dynamic_decoding():
    graphs = PixelSailEngine.from_pretrained(BUNDLED, device="cuda", decoding="graphs")
    dynamic = PixelSailEngine(graphs.model, graphs.processor, decoding="dynamic", speculative=False)
    assert graphs.decoding == "graphs" and graphs._static.use_graphs and graphs.speculative
    gen = ShapesRefGenerator(seed=78)
    same = total = 0
    ious = []
    for i in range(6):
        scene = gen.scene(i)
        first = scene.objects[0]
        request = {"text": "the object on the left" if i % 2 else "", "points": [first.centroid], "boxes": [first.box],
                   "describe": True}
        a, b = graphs.segment(scene.image, **request), dynamic.segment(scene.image, **request)
        same += sum(x == y for x, y in zip(a.answers, b.answers))
        total += len(b.answers)
        if len(a.masks) == len(b.masks):
            ious += [_iou(m, n) for m, n in zip(a.masks, b.masks)]
    assert graphs._static.graph_replays > 0  # the one-token steps really came from the graph
    assert graphs.draft_stats["accepted_tokens"] > 0  # drafts verified eagerly, then graph steps after a cut
    assert same >= 0.9 * total  # bf16 both ways; the masked-out cache tail may tip a rare near-tie
    assert ious and float(np.mean(ious)) >= 0.98


def test_a_warm_up_captures_the_decoding_graph_that_the_first_real_frame_replays():
    engine = PixelSailEngine.from_pretrained(BUNDLED, device="cuda", decoding="graphs")
    scene = ShapesRefGenerator(seed=79, min_side=480, max_side=480).scene(0)
    height, width = scene.image.shape[:2]
    assert engine._static._graph is None
    engine.warm_up(width, height)  # a phrase, then a click described: one-token steps, so a capture
    graph, replays = engine._static._graph, engine._static.graph_replays
    assert graph is not None and replays > 0
    out = engine.segment(scene.image, points=[scene.objects[0].centroid], describe=True)
    assert out.description and engine._static.graph_replays > replays  # the description's steps replayed...
    assert engine._static._graph is graph  # ...from the warm-up's graph: nothing captured on the first frame


def test_compiled_image_passes_on_the_gpu_answer_like_eager():
    """compile_image on CUDA (inductor's GPU kernels) with graph-replayed decoding: the same answers and masks as
    the eager engine on the same GPU, and compiled graphs really were made."""
    import torch

    eager = PixelSailEngine.from_pretrained(BUNDLED, device="cuda", decoding="graphs")
    compiled = PixelSailEngine(eager.model, eager.processor, decoding="graphs", compile_image=True)
    before = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    gen = ShapesRefGenerator(seed=79, min_side=480, max_side=480)  # one size: one compilation
    same = total = 0
    ious = []
    for i in range(4):
        scene = gen.scene(i)
        request = {"text": "the object on the left", "points": [scene.objects[0].centroid], "describe": True}
        a, b = compiled.segment(scene.image, **request), eager.segment(scene.image, **request)
        same += sum(x == y for x, y in zip(a.answers, b.answers))
        total += len(b.answers)
        if len(a.masks) == len(b.masks):
            ious += [_iou(m, n) for m, n in zip(a.masks, b.masks)]
    assert int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) - before >= 2
    assert same >= 0.9 * total  # bf16: fused kernels round differently, which may tip a rare near-tie
    assert ious and float(np.mean(ious)) >= 0.98


def test_a_training_step_on_the_gpu_uses_bf16_autocast_and_learns(tmp_path: Path):
    import json

    from pixel_sail_ros.training import train

    out = tmp_path / "run"
    args = ["--preset", "tiny", "--model-overrides", json.dumps({"num_hidden_layers": 2}), "--image-size", "96",
            "--device", "cuda", "--no-progress", "--num-points", "256", "--turns-per-image", "4", "--batch-size", "4",
            "--lr", "2e-3", "--log-every", "1", "--max-steps", "30", "--warmup-steps", "3", "--eval-every", "0",
            "--save-every", "0", "--seed", "3", "--output-dir", str(out)]
    trainer = train.Trainer(train.build_parser().parse_args(args))
    assert trainer.use_bf16 and trainer.device.type == "cuda"
    trainer.run()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["type"] == "train"]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # it learned on the GPU
    engine = PixelSailEngine.from_pretrained(out, device="cuda")
    assert engine.device.type == "cuda"
