"""pixel-sail-train: overfitting a fixed batch, exact resume, outputs, manifest fine-tuning, LoRA, --init-llm.

Everything is tiny (2 layers, 64-px images) and runs a handful of steps on one CPU thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig
from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
from pixel_sail_ros.model.processing_pixel_sail import PixelSailProcessor
from pixel_sail_ros.model.tokenization import build_tiny_tokenizer
from pixel_sail_ros.training import checkpoint_files, optimization, train
from pixel_sail_ros.training.manifest import encode_rle, write_manifest

TINY_OVERRIDES = {"num_hidden_layers": 2}
TINY = [
    "--preset", "tiny", "--model-overrides", json.dumps(TINY_OVERRIDES), "--image-size", "64", "--threads", "1",
    "--no-progress", "--num-points", "256", "--turns-per-image", "4", "--batch-size", "2", "--lr", "1e-3",
    "--log-every", "1",
]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def tiny_parts(seed: int = 0) -> tuple[PixelSailForConditionalGeneration, PixelSailProcessor]:
    torch.manual_seed(seed)
    config = PixelSailConfig.from_preset("tiny", max_image_size=64, **TINY_OVERRIDES)
    return PixelSailForConditionalGeneration(config), PixelSailProcessor.from_config(config, build_tiny_tokenizer())


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny checkpoint directory (what --init and the engine load)."""
    model, processor = tiny_parts(seed)
    model.save_pretrained(str(path))
    processor.save_pretrained(path)
    return path


def write_shapes_manifest(root: Path, n: int = 3) -> Path:
    """A few 48×64 images with one red and one blue rectangle; masks as RLE, polygon and PNG."""
    lines = []
    for i in range(n):
        img = np.full((48, 64, 3), 128, np.uint8)
        red = np.zeros((48, 64), bool)
        red[6 + i : 20 + i, 4:24] = True
        blue = np.zeros((48, 64), bool)
        blue[26:42, 36 - i : 58 - i] = True
        img[red] = (220, 40, 40)
        img[blue] = (40, 80, 220)
        Image.fromarray(img).save(root / f"img{i}.png")
        Image.fromarray(blue.astype(np.uint8) * 255).save(root / f"blue{i}.png")
        x0, x1 = 36 - i, 58 - i
        lines.append({
            "image": f"img{i}.png",
            "turns": [
                {"expression": "the red square", "masks": [encode_rle(red)]},
                {"expression": "the blue square on the right", "masks": [f"blue{i}.png"]},
                {"expression": "the green circle", "masks": []},
                {"prompt": {"points": [[12, 12 + i]]}, "answer": "a small red square"},
                {"prompt": {"boxes": [[x0, 26, x1, 42]]}, "masks": [[[x0, 26, x1, 26, x1, 42, x0, 42]]]},
            ],
        })
    return write_manifest(lines, root / "train.jsonl")


# ------------------------------------------------------------------------------------------ pieces


def test_lr_schedule_warmup_then_cosine():
    assert optimization.lr_lambda(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert optimization.lr_lambda(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert optimization.lr_lambda(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert optimization.lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_lr_schedule_follows_the_spent_time_when_it_is_further_along_than_the_steps():
    assert optimization.lr_lambda(20, 10, 1000, 0.0, time_progress=0.5) == pytest.approx(0.5)
    assert optimization.lr_lambda(20, 10, 1000, 0.2, time_progress=1.7) == pytest.approx(0.2)  # clamped at the floor
    assert optimization.lr_lambda(505, 10, 1000, 0.0, time_progress=0.1) == pytest.approx(0.5)  # steps lead
    assert optimization.lr_lambda(4, 10, 1000, 0.0, time_progress=0.1) == pytest.approx(0.5)  # warmup in steps...
    late = 0.5 * (1 + math.cos(math.pi * 0.9))
    assert optimization.lr_lambda(4, 10, 1000, 0.0, time_progress=0.9) == pytest.approx(late)  # ...capped by the time


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path: Path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(optimization.param_groups(m, 0.05), lr=1e-2)
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(m, opt, options=StateDictOptions(full_state_dict=True))
    tensors, meta = checkpoint_files.optimizer_to_files(osd)
    save_file(tensors, str(tmp_path / "o.safetensors"))
    meta = json.loads(json.dumps(meta))
    m.zero_grad(set_to_none=True)  # as at resume time: a fresh optimizer, no gradients yet
    opt2 = torch.optim.AdamW(optimization.param_groups(m, 0.05), lr=1e-2)
    checkpoint_files.load_optimizer_state(m, opt2, checkpoint_files.optimizer_from_files(load_file(str(tmp_path / "o.safetensors")), meta))
    for p in m.parameters():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[p][k])
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999)


def test_lr_scale_gives_the_named_modules_their_own_rate_through_the_schedule():
    torch.manual_seed(0)
    m = torch.nn.ModuleDict({"stem": torch.nn.Linear(3, 4), "body": torch.nn.Sequential(torch.nn.Linear(4, 2))})
    groups = optimization.param_groups(m, 0.05, lr=1e-3, lr_scale={"stem": 10.0})
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(m["stem"].weight)]["lr"] == pytest.approx(1e-2)
    assert by_param[id(m["stem"].bias)]["weight_decay"] == 0.0  # 1-D parameters keep no decay under a scale
    assert "lr" not in by_param[id(m["body"][0].weight)]  # the base rate, as before
    assert groups[0]["params"] == [m["body"][0].weight]  # the base group first: its rate is the one logged
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: optimization.lr_lambda(s, 2, 10, 0.0))
    for _ in range(5):
        opt.step()
        sched.step()
        rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert rates[id(m["stem"].weight)] == pytest.approx(10 * rates[id(m["body"][0].weight)])
    with pytest.raises(ValueError, match=r"no trainable parameter is named \['stm'\]"):
        optimization.param_groups(m, 0.05, lr=1e-3, lr_scale={"stm": 10.0})
    assert [p for g in optimization.param_groups(m, 0.05) for p in g["params"]] == [
        m["stem"].weight, m["body"][0].weight, m["stem"].bias, m["body"][0].bias]  # unchanged without scales


def test_lr_scale_on_the_command_line_trains_the_zero_initialised_stem_faster(tmp_path: Path):
    """Two real steps each way from the same start: the stem's zero-initialised projection moves ~10x as far."""
    argv = TINY + ["--model-overrides", json.dumps({**TINY_OVERRIDES, "patch_stem": True}), "--max-steps", "2", "--warmup-steps", "0",
                   "--eval-every", "0", "--save-every", "0", "--seed", "3"]

    def stem_after(extra: list[str], name: str) -> torch.Tensor:
        trainer = train.Trainer(train.build_parser().parse_args(argv + extra + ["--output-dir", str(tmp_path / name)]))
        trainer.run()
        return next(p for n, p in trainer.module.named_parameters() if "patch_stem" in n and n.endswith("proj.weight"))

    base = stem_after([], "base").abs().mean().item()
    fast = stem_after(["--lr-scale", "patch_stem=10"], "fast").abs().mean().item()
    assert base > 0 and 5 * base < fast < 20 * base
    with pytest.raises(SystemExit, match=r"--lr-scale patch_stm=10: no trainable parameter is named \['patch_stm'\]"):
        train.Trainer(train.build_parser().parse_args(argv + ["--lr-scale", "patch_stm=10", "--output-dir", str(tmp_path / "x")]))


def test_bf16_autocast_on_the_cpu_trains_like_float32(tmp_path: Path):
    """--bf16 yes on the CPU: the same first loss as float32 within bf16's precision, float32 weights saved.
    (Patch and visual-prompt embeddings from autocast linears are bf16 while the token table is float32:
    index_put refused the mix before; CUDA autocast follows the same rule.)"""
    argv = TINY + ["--model-overrides", json.dumps({**TINY_OVERRIDES, "visual_prompt_pooling": True}),
                   "--max-steps", "2", "--eval-every", "0", "--save-every", "0", "--seed", "4"]

    def first_loss(mode: str) -> float:
        out = tmp_path / mode
        assert train.main(argv + ["--bf16", mode, "--output-dir", str(out)]) == 0
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
        assert all(t.dtype == torch.float32 for t in load_file(str(out / "model.safetensors")).values())
        return recs[0]["loss"]

    full, half = first_loss("no"), first_loss("yes")
    assert half == pytest.approx(full, rel=0.03) and half != full


def test_overfits_a_fixed_batch():
    from pixel_sail_ros.training.data import ItemCollator, ShapesRefDataset
    from pixel_sail_ros.training.losses import LossWeights

    torch.set_num_threads(1)
    model, processor = tiny_parts()
    module = train.TrainModule(model, LossWeights(num_points=0), aux=False)
    data = ShapesRefDataset(processor, seed=3, turns_per_image=4, flip_prob=0.0)
    batch = ItemCollator(processor)([data[i] for i in range(2)])
    opt = torch.optim.AdamW(optimization.param_groups(module, 0.0), lr=2e-3)
    history = []
    for _ in range(20):
        loss, parts = module(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(parts)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["loss_text"] < 0.7 * history[0]["loss_text"]
    assert history[-1]["loss_mask"] < 0.5 * history[0]["loss_mask"]


# ------------------------------------------------------------------------------------------ the CLI


def _files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def test_exact_resume(tmp_path: Path):
    common = TINY + ["--max-steps", "4", "--save-every", "2", "--eval-every", "0", "--save-total-limit", "5",
                     "--aux-weight", "1", "--aux-object-weight", "1", "--aux-place-weight", "1", "--aux-query-place-weight", "1",
                     "--appearance-aug", "0.5", "--aux-mask-place-weight", "1",
                     "--model-overrides", json.dumps({**TINY_OVERRIDES, "pixel_positions": True})]
    a, c = tmp_path / "a", tmp_path / "c"
    assert train.main(common + ["--output-dir", str(a)]) == 0
    ckpt = a / "checkpoint-2"
    # no pickle anywhere: safetensors, JSON and tokenizer files only
    assert all(p.suffix in (".json", ".safetensors") for p in ckpt.iterdir()), _files(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["micro_step"] == 2
    assert checkpoint_files.latest_checkpoint(a) == a / "checkpoint-4"
    assert train.main(common + ["--output-dir", str(c), "--resume", str(ckpt)]) == 0
    wa, wc = load_file(str(a / "model.safetensors")), load_file(str(c / "model.safetensors"))
    assert wa.keys() == wc.keys()
    assert all(torch.equal(wa[k], wc[k]) for k in wa)  # 4 steps == 2 steps + save + resume + 2 steps
    oa = load_file(str(a / "checkpoint-4" / "optimizer.safetensors"))
    oc = load_file(str(c / "checkpoint-4" / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], oc[k]) for k in oa)
    ea = load_file(str(a / "checkpoint-4" / "trainable.safetensors"))
    assert any(k.startswith("aux_") for k in ea)  # the auxiliary probes are resumed too
    assert any(k.startswith("aux_object.") for k in ea) and any(k.startswith("aux_place.") for k in ea)
    logged = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("loss_aux_object", 0) > 0 for r in logged)  # the per-object loss ran and was logged
    assert any(r.get("loss_aux_place", 0) > 0 for r in logged)
    assert any(r.get("loss_aux_query_place", 0) > 0 for r in logged)
    assert any(r.get("loss_aux_mask_place", 0) > 0 for r in logged)
    # and it really trained: weights moved away from step 2
    w2 = load_file(str(ckpt / "model.safetensors"))
    assert any(not torch.equal(w2[k], wa[k]) for k in wa)


def test_init_from_a_training_checkpoint_warm_starts_the_probes_with_a_fresh_optimizer(tmp_path: Path):
    probes = ["--aux-weight", "1", "--aux-object-weight", "1", "--aux-place-weight", "1", "--eval-every", "0"]
    a = tmp_path / "a"
    assert train.main(TINY + probes + ["--max-steps", "2", "--save-every", "2", "--output-dir", str(a)]) == 0
    saved = load_file(str(a / "checkpoint-2" / "trainable.safetensors"))
    assert any(k.startswith("aux_object.") for k in saved)

    def probes_after_init(init: Path) -> dict[str, torch.Tensor]:
        argv = TINY + probes + ["--model-overrides", "{}", "--max-steps", "3", "--init", str(init),
                                "--output-dir", str(tmp_path / init.name)]
        trainer = train.Trainer(train.build_parser().parse_args(argv))
        assert trainer.step == 0 and not trainer.optimizer.state  # a fresh optimizer and schedule
        return {n: p.detach() for n, p in trainer.module.named_parameters() if not n.startswith("model.")}

    warm = probes_after_init(a / "checkpoint-2")
    assert set(saved) <= set(warm)
    assert all(torch.equal(warm[k], saved[k]) for k in saved)
    # the final model folder has no probes: they start from their own initialisation there
    cold = probes_after_init(a)
    assert not all(torch.equal(cold[k], saved[k]) for k in saved)


def test_probe_warmup_trains_only_the_probes_and_leaves_the_main_optimizer_fresh(tmp_path: Path):
    init = make_tiny_checkpoint(tmp_path / "init")
    probes = ["--aux-weight", "1", "--aux-object-weight", "1", "--aux-place-weight", "1", "--eval-every", "0"]
    argv = TINY + probes + ["--model-overrides", "{}", "--max-steps", "2", "--init", str(init),
                            "--probe-warmup-steps", "3", "--output-dir", str(tmp_path / "out")]
    trainer = train.Trainer(train.build_parser().parse_args(argv))
    before = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    grad_flags = {n: p.requires_grad for n, p in trainer.module.named_parameters()}
    trainer.warm_up_probes(3)
    after = dict(trainer.module.named_parameters())
    model_names = [n for n in before if n.startswith("model.")]
    probe_names = [n for n in before if not n.startswith("model.")]
    assert model_names and probe_names
    assert all(torch.equal(after[n], before[n]) for n in model_names)  # the model stayed frozen
    assert any(not torch.equal(after[n], before[n]) for n in probe_names)  # the probes learned
    assert {n: p.requires_grad for n, p in after.items()} == grad_flags  # and the model trains again afterwards
    assert trainer.step == 0 and not trainer.optimizer.state
    warm = [r for r in trainer.history if r["type"] == "probe_warmup"]
    assert [r["step"] for r in warm] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in warm)
    with pytest.raises(SystemExit, match="probe-warmup-steps"):
        train.main(argv[:-4] + ["--probe-warmup-steps", "-1", "--output-dir", str(tmp_path / "neg")])


def test_outputs_eval_plots_time_budget_and_engine_load(tmp_path: Path):
    out = tmp_path / "run"
    args = TINY + ["--max-steps", "50", "--eval-every", "1", "--eval-samples", "4", "--save-every", "0",
                   "--time-budget-minutes", "0.000001", "--output-dir", str(out)]
    assert train.main(args) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["type"] for r in recs} == {"train", "eval"}
    assert max(r["step"] for r in recs) == 1  # the budget stopped it after one step, cleanly
    ev = [r for r in recs if r["type"] == "eval"][-1]
    assert ev["num_samples"] == 4 and 0.0 <= ev["ciou"] <= 1.0
    assert {"curves.png", "examples.png", "config.json", "model.safetensors", "processor_config.json",
            "checkpoint-1", "training_args.json"} <= _files(out)
    from pixel_sail_ros.engine import PixelSailEngine

    engine = PixelSailEngine.from_pretrained(out, device="cpu")
    res = engine.segment(np.zeros((40, 50, 3), np.uint8), text="red circle")
    assert res.masks.shape[1:] == (40, 50)


def test_schedule_over_time_decays_the_lr_to_its_floor_within_the_budget(tmp_path: Path):
    out = tmp_path / "run"
    args = TINY + ["--max-steps", "100000", "--warmup-steps", "1", "--min-lr-ratio", "0.1", "--eval-every", "0",
                   "--save-every", "0", "--time-budget-minutes", "0.25", "--schedule-over-time", "--output-dir", str(out)]
    assert train.main(args) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    lrs = [r["lr"] for r in recs]
    assert len(lrs) >= 4 and recs[-1]["step"] < 100000  # the time budget stopped it, long before --max-steps
    assert lrs[-1] == pytest.approx(1e-4, rel=0.15)  # at the floor (0.1 × 1e-3) as the time ran out
    mid = lrs[len(lrs) // 2]
    assert 1.2e-4 < mid < 1e-3  # on the way down in between, not a step at the end
    assert all(b <= a * 1.0001 for a, b in zip(lrs[1:], lrs[2:]))  # monotone after the warmup
    # without data workers, every batch is drawn in the training process: part of each window waits for data
    assert all(0.0 < r["data_wait_frac"] < 1.0 for r in recs)


def test_schedule_over_time_needs_a_time_budget():
    with pytest.raises(SystemExit, match="needs --time-budget-minutes"):
        train.main(TINY + ["--max-steps", "3", "--schedule-over-time", "--output-dir", "unused"])


def test_manifest_finetune_end_to_end(tmp_path: Path):
    base = make_tiny_checkpoint(tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    manifest = write_shapes_manifest(data)
    out = tmp_path / "ft"
    args = ["--init", str(base), "--manifest", str(manifest), "--eval-manifest", str(manifest), "--epochs", "4",
            "--batch-size", "2", "--threads", "1", "--no-progress", "--num-points", "256", "--lr", "2e-3",
            "--flip-prob", "0.5", "--eval-every", "3", "--log-every", "1", "--warmup-ratio", "0",
            "--output-dir", str(out)]
    assert train.main(args) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["type"] == "train"]
    assert len(losses) == 6  # ceil(3 images × 4 epochs / 2 per step)
    assert losses[-1] < losses[0]
    ev = [r for r in recs if r["type"] == "eval"][-1]  # the final eval on the manifest
    assert ev["num_samples"] == 15 and ev["n_segmentation"] == 12 and ev["n_no_target"] == 3
    from pixel_sail_ros.engine import PixelSailEngine

    engine = PixelSailEngine.from_pretrained(out, device="cpu")
    img = np.array(Image.open(data / "img0.png"))
    assert engine.segment(img, points=[[12, 12]], describe=True).masks.shape[1:] == (48, 64)


def test_lora_finetune_merges_and_keeps_the_base_frozen(tmp_path: Path):
    base = make_tiny_checkpoint(tmp_path / "base")
    out = tmp_path / "lora"
    args = TINY[4:] + ["--init", str(base), "--lora-r", "2", "--max-steps", "2", "--eval-every", "0",
                       "--save-every", "1", "--output-dir", str(out), "--model-overrides", '{"pixel_positions": true}']
    assert train.main(args) == 0
    ckpt = load_file(str(out / "checkpoint-1" / "trainable.safetensors"))
    assert any("lora_A" in k for k in ckpt) and any("seg_token_projector" in k for k in ckpt)
    assert not any("layers.0.mlp.up_proj.base_layer" in k for k in ckpt)  # frozen base not duplicated
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    # merged: a plain checkpoint, no adapter keys; the switch turned on here starts at zero and trains under LoRA
    assert after.keys() == before.keys() | {"pixel_position_embed.weight"}
    assert after["pixel_position_embed.weight"].abs().max() > 0
    assert not torch.equal(before["seg_token_projector.0.weight"], after["seg_token_projector.0.weight"])
    assert torch.equal(before["model.norm.weight"], after["model.norm.weight"])  # not a LoRA target, frozen


def test_init_from_a_plain_qwen2_llm(tmp_path: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tiny_tokenizer()
    llm_cfg = Qwen2Config(vocab_size=len(tok) - 4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True)
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(llm_cfg)
    llm.save_pretrained(str(tmp_path / "llm"))
    tok.save_pretrained(str(tmp_path / "llm"))
    overrides = {"seg_hidden_size": 32, "mask_output_stride": 4, "max_image_size": 64}
    model, processor = train.init_from_llm(tmp_path / "llm", "0.5b", dict(overrides))
    sd = llm.state_dict()
    own = model.state_dict()
    assert torch.equal(own["model.layers.1.self_attn.q_proj.weight"], sd["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(own["model.layers.0.self_attn.k_proj.bias"], sd["model.layers.0.self_attn.k_proj.bias"])
    old = llm_cfg.vocab_size
    assert torch.equal(own["model.embed_tokens.weight"][:old], sd["model.embed_tokens.weight"])
    assert torch.allclose(own["model.embed_tokens.weight"][old:], sd["model.embed_tokens.weight"].mean(0).expand(len(tok) - old, -1))
    assert model.config.text_config.hidden_size == 64 and processor.max_image_size == 64
    out = tmp_path / "run"
    args = ["--init-llm", str(tmp_path / "llm"), "--model-overrides", json.dumps(overrides), "--max-steps", "1",
            "--eval-every", "0", "--threads", "1", "--no-progress", "--batch-size", "1", "--turns-per-image", "3",
            "--num-points", "64", "--output-dir", str(out)]
    assert train.main(args) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_distillation_from_feature_files_and_from_a_teacher_model(tmp_path: Path):
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    base = make_tiny_checkpoint(tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    manifest = write_shapes_manifest(data)
    feats = tmp_path / "feats"
    feats.mkdir()
    for i in range(3):  # one file per manifest line: 8-channel teacher "pixel" features on any grid
        save_file({"pixel": torch.randn(8, 6, 8)}, str(feats / f"{i}.safetensors"))
    common = ["--init", str(base), "--manifest", str(manifest), "--max-steps", "2", "--eval-every", "0",
              "--threads", "1", "--no-progress", "--batch-size", "2", "--num-points", "64", "--log-every", "1"]
    out = tmp_path / "files"
    assert train.main(common + ["--teacher-features", str(feats), "--output-dir", str(out)]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_distill_pixel"] > 0 for r in recs)
    assert not any(k.startswith("distill_") for k in load_file(str(out / "model.safetensors")))
    assert json.loads((out / "config.json").read_text())["distill_pixel_dim"] == 0  # heads are training-only

    vit = tmp_path / "vit"
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32), add_pooling_layer=False).save_pretrained(str(vit))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(vit))
    out = tmp_path / "model"
    assert train.main(common + ["--teacher-model", str(vit), "--teacher-target", "token", "--output-dir", str(out)]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_distill_token"] > 0 for r in recs)


def test_shapesref_items_are_keyed_packed_and_flipped():
    import re

    from pixel_sail_ros.training.data import ShapesRefDataset

    _, processor = tiny_parts()
    data = ShapesRefDataset(processor, seed=2, turns_per_image=16, flip_prob=0.5, aux_targets=True)
    a, b, c = data[(5, 0, 0)], data[(5, 0, 0)], data[(5, 1, 0)]
    questions = lambda item: [t.question for s in item.sequences for t in s.turns]  # noqa: E731
    assert questions(a) == questions(b) and (a.image == b.image).all()  # a key is a pure function
    assert questions(a) != questions(c)  # another epoch: other turns on the same scene
    for item in (data[(i, 0, 0)] for i in range(6)):
        assert sum(len(s.turns) for s in item.sequences) == 16
        assert sum(1 for s in item.sequences if not s.prompts) <= 1  # all plain turns share one prefix
        for s in item.sequences:
            used = {int(k) for t in s.turns for k in re.findall(r"<Prompt(\d+)>", t.question)}
            assert used == set(range(len(s.prompts)))  # every prompt asked about, numbered from 0
            assert s.aux_targets.shape == (4, *item.image.shape[:2])  # colour, shape, size, object number
    flipped = [i for i in range(40) if data.is_flipped((i, 0, 0))]
    assert 5 < len(flipped) < 35
    i = flipped[0]
    scene, _ = data.scene_and_samples((i, 0, 0))
    assert (scene.image == data.generator.scene(i).image[:, ::-1]).all()
    ids = data[(i, 0, 0)].sequences[0].aux_targets[-1]  # the object numbers are flipped with the image
    assert all((ids == 1 + k)[o.mask].all() for k, o in enumerate(scene.objects))


def test_a_negative_loss_weight_is_refused_before_anything_starts(tmp_path: Path):
    with pytest.raises(SystemExit, match="loss weights must be >= 0: --dice-weight, --aux-query-place-weight$"):
        train.main(["--data", "shapesref", "--max-steps", "1", "--aux-query-place-weight", "-1", "--dice-weight", "-0.5",
                    "--output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("on", ["state", "embedding"])
def test_query_place_loss_reads_the_state_or_the_embedding_that_makes_the_mask(on: str):
    from pixel_sail_ros.training.data import ItemCollator, ShapesRefDataset
    from pixel_sail_ros.training.losses import LossWeights

    torch.manual_seed(0)
    model, processor = tiny_parts()
    module = train.TrainModule(model, LossWeights(num_points=0, aux_query_place=1.0), aux=False, query_place_on=on)
    # the state shares the object place head; the embedding (seg_hidden_size wide) has a head of its own
    assert (module.aux_place is not None) == (on == "state") and (module.aux_query_place is not None) == (on == "embedding")
    data = ShapesRefDataset(processor, seed=3, turns_per_image=4, flip_prob=0.0, mix={"referring": 1.0}, p_absent=0.0)
    batch = ItemCollator(processor)([data[i] for i in range(2)])
    loss, parts = module(batch)
    assert parts["loss_aux_query_place"] > 0
    # the place term alone: its gradient reaches the projector (which comes after the state) only when it reads
    # the embedding
    from pixel_sail_ros.training.losses import query_place_loss

    module.zero_grad()
    head, queries = module.query_place_inputs(model(**train.PixelSailProcessor.model_inputs(batch)), batch)
    assert head is (module.aux_place if on == "state" else module.aux_query_place)
    query_place_loss(head, queries, batch["seg_masks"]).backward()
    reached = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.seg_token_projector.parameters()]
    assert any(reached) == (on == "embedding")


def test_mask_place_loss_trains_the_place_part_of_the_mask_and_not_the_pixel_decoder():
    from pixel_sail_ros.training.data import ItemCollator, ShapesRefDataset
    from pixel_sail_ros.training.losses import LossWeights, mask_place_loss

    weights = LossWeights(num_points=0, aux_mask_place=1.0)
    plain, processor = tiny_parts()
    with pytest.raises(ValueError, match="pixel_positions"):
        train.TrainModule(plain, weights, aux=False)
    torch.manual_seed(0)
    model = PixelSailForConditionalGeneration(plain.config.__class__.from_dict({**plain.config.to_dict(), "pixel_positions": True}))
    with torch.no_grad():
        model.pixel_position_embed.weight.normal_(0.0, 0.3)
    module = train.TrainModule(model, weights, aux=False)
    data = ShapesRefDataset(processor, seed=5, turns_per_image=4, flip_prob=0.0, mix={"referring": 1.0}, p_absent=0.0)
    batch = ItemCollator(processor)([data[i] for i in range(2)])
    out = model(**train.PixelSailProcessor.model_inputs(batch))
    place = module.mask_place_logits(out)
    # it is exactly the place term of the model's own mask logits: the rest is the image's content
    for logits, full, seg, pixel in zip(place, out.mask_logits, out.seg_embeddings, out.pixel_features):
        field = full - logits
        torch.testing.assert_close(field, torch.einsum("qc,chw->qhw", seg, pixel) - logits, atol=1e-5, rtol=1e-5)
        assert logits.shape == full.shape and logits.abs().max() > 0
    mask_place_loss(place, batch["seg_masks"], weights).backward()

    def reached(m: torch.nn.Module) -> bool:
        return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())

    # the query (which reads the image to find its target) and the positions learn; the pixel decoder does not
    assert reached(model.pixel_position_embed) and reached(model.seg_token_projector) and reached(model.vis_embed)
    assert not reached(model.upsample_blocks) and not reached(model.image_feature_projector)
    # and it learns: the place terms alone come to cover the targets better on this batch
    trainable = list(model.pixel_position_embed.parameters()) + list(model.seg_token_projector.parameters())
    opt = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = mask_place_loss(module.mask_place_logits(model(**train.PixelSailProcessor.model_inputs(batch))),
                               batch["seg_masks"], weights)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
