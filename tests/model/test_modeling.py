"""PixelSailForConditionalGeneration on the tiny preset (random weights): shapes, attention structure, visual
prompts, cached generation, independent turns, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
from pixel_sail_ros.model.processing_pixel_sail import (
    NO_TARGET_ANSWER,
    SEG_ANSWER,
    Turn,
    refer_seg_question,
    vp_describe_question,
    vp_seg_question,
)


def run(model, processor, samples, **kwargs):
    with torch.no_grad():
        return model(**processor.model_inputs(processor.collate(samples)), **kwargs)


def sample_for(processor, image, turns, prompts=None):
    inputs = processor.preprocess_image(image)
    prompt_map = processor.visual_prompt_map(inputs.original_hw, inputs.grid_hw, prompts) if prompts else None
    return processor.build_sequence(inputs, turns, prompt_map)


def extend_with_answer(sample, answer_ids):
    """Append generated tokens to a question-only sample: positions continue, attention stays causal."""
    ids = torch.cat([sample["input_ids"], torch.tensor(answer_ids, dtype=torch.long)])
    n, total = sample["input_ids"].shape[0], ids.shape[0]
    positions = torch.cat([sample["position_ids"], sample["position_ids"][:, -1:] + torch.arange(1, total - n + 1)], dim=1)
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:n, :n] = sample["attention_mask"]
    mask[n:, :] = torch.ones(total - n, total, dtype=torch.bool).tril(n)
    vp = torch.cat([sample["visual_prompt_ids"], torch.full((total - n,), -1)])
    return {**sample, "input_ids": ids, "position_ids": positions, "attention_mask": mask, "visual_prompt_ids": vp,
            "labels": torch.full((total,), -100)}


SIZES = [(160, 160), (100, 220), (240, 130), (37, 53)]


def test_shapes_for_several_sizes_and_aspect_ratios(model, processor, image_factory):
    answers = [SEG_ANSWER, "It is [SEG] and [SEG].", NO_TARGET_ANSWER, SEG_ANSWER]
    samples = [
        sample_for(processor, image_factory(h, w, seed=i), [Turn(refer_seg_question("red circle"), a)])
        for i, ((h, w), a) in enumerate(zip(SIZES, answers))
    ]
    out = run(model, processor, samples)
    batch, length = len(samples), max(s["input_ids"].shape[0] for s in samples)
    vocab, hidden, d_seg = model.config.text_config.vocab_size, 256, model.config.seg_hidden_size
    assert out.logits.shape == (batch, length, vocab) and out.last_hidden_state.shape == (batch, length, hidden)
    scale = model.config.patch_size // model.config.mask_output_stride
    for b, ((h, w), answer) in enumerate(zip(SIZES, answers)):
        gh, gw = processor.grid_size(h, w)
        n_seg = answer.count("[SEG]")
        assert out.pixel_features[b].shape == (d_seg, gh * scale, gw * scale)
        assert out.seg_embeddings[b].shape == (n_seg, d_seg)
        assert out.mask_logits[b].shape == (n_seg, gh * scale, gw * scale)
        assert processor.mask_logits_size((gh, gw)) == (gh * scale, gw * scale)
        assert torch.isfinite(out.mask_logits[b]).all()
        masks = processor.postprocess_masks(out.mask_logits[b], (h, w))
        assert masks.shape == (n_seg, h, w) and masks.dtype == torch.bool
    assert out.distill_pixel is None and out.distill_token is None
    # padding and batching never leak into a sample: each equals its own unpadded run
    for b, sample in enumerate(samples):
        alone = run(model, processor, [sample])
        n = sample["input_ids"].shape[0]
        torch.testing.assert_close(out.logits[b, :n], alone.logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.pixel_features[b], alone.pixel_features[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.mask_logits[b], alone.mask_logits[0], rtol=1e-4, atol=1e-4)


def test_image_block_is_bidirectional_and_text_is_causal(model, processor, image_factory):
    image = image_factory(64, 64)  # 4 × 4 patches, no resize
    sample = sample_for(processor, image, [Turn(refer_seg_question("red circle"), SEG_ANSWER)])
    base = run(model, processor, [sample]).last_hidden_state[0]

    later_patch = dict(sample, pixel_values=sample["pixel_values"].clone())
    later_patch["pixel_values"][-1] += 1.0  # the last patch (bottom-right)
    changed = run(model, processor, [later_patch]).last_hidden_state[0]
    first_patch, vision_start = 1, 0
    assert (changed[first_patch] - base[first_patch]).abs().max() > 1e-3
    assert (changed[vision_start] - base[vision_start]).abs().max() > 1e-3

    later_text = dict(sample, input_ids=sample["input_ids"].clone())
    position = sample["input_ids"].shape[0] - 3
    later_text["input_ids"][position] = processor.tokenizer.convert_tokens_to_ids("blue")
    changed = run(model, processor, [later_text]).last_hidden_state[0]
    assert torch.equal(changed[:position], base[:position])  # nothing earlier moves, image included
    assert (changed[position:] - base[position:]).abs().max() > 1e-3


def test_visual_prompt_changes_the_output(model, processor, image_factory):
    image = image_factory(96, 128)
    turns = [Turn(vp_seg_question(0), SEG_ANSWER)]
    plain = run(model, processor, [sample_for(processor, image, turns)])
    prompted_sample = sample_for(processor, image, turns, prompts=[(70.0, 40.0)])
    prompted = run(model, processor, [prompted_sample])
    covered = int((prompted_sample["visual_prompt_ids"] == 0).nonzero()[0, 0])
    assert covered == 1 + (40 // 16) * 8 + 70 // 16
    assert (prompted.last_hidden_state[0, covered] - plain.last_hidden_state[0, covered]).abs().max() > 1e-3
    assert (prompted.mask_logits[0] - plain.mask_logits[0]).abs().max() > 1e-4
    other_index = dict(prompted_sample, visual_prompt_ids=torch.where(prompted_sample["visual_prompt_ids"] == 0, 5, -1))
    other = run(model, processor, [other_index])
    assert (other.last_hidden_state[0, covered] - prompted.last_hidden_state[0, covered]).abs().max() > 1e-3


def test_cached_generation_equals_full_recompute(model, processor, image_factory):
    image = image_factory(80, 112, seed=3)
    inputs = processor.preprocess_image(image)
    prompt_map = processor.visual_prompt_map(inputs.original_hw, inputs.grid_hw, [(20.0, 30.0)])
    question = vp_seg_question(0)
    prefix = model.prefill(**processor.prefix_inputs(inputs, prompt_map))
    forced = processor.tokenizer.encode("It is [SEG]", add_special_tokens=False)
    answer = model.generate_answer(
        prefix, processor.encode_question(question), max_new_tokens=6, answer_prefix_ids=forced, return_logits=True
    )
    assert answer.token_ids[: len(forced)] == forced and answer.mask_logits.shape[0] >= 1
    assert prefix.past_key_values.get_seq_length() == prefix.length  # the prefix cache was copied, not extended

    full = extend_with_answer(processor.build_sequence(inputs, [question], prompt_map), answer.token_ids)
    out = run(model, processor, [full])
    first_answer = full["input_ids"].shape[0] - len(answer.token_ids)
    free_steps = answer.step_logits.shape[0]
    rows = torch.arange(free_steps) + first_answer + len(forced) - 1
    torch.testing.assert_close(answer.step_logits, out.logits[0, rows], rtol=1e-4, atol=1e-4)
    generated = answer.token_ids[len(forced):]
    assert out.logits[0, rows[: len(generated)]].argmax(-1).tolist() == generated
    torch.testing.assert_close(answer.mask_logits, out.mask_logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prefix.pixel_features, out.pixel_features[0], rtol=1e-4, atol=1e-4)

    again = model.generate_answer(prefix, processor.encode_question(question), max_new_tokens=6, answer_prefix_ids=forced)
    assert again.token_ids == answer.token_ids and torch.equal(again.mask_logits, answer.mask_logits)


def test_generation_stops_and_respects_max_new_tokens(model, processor, image_factory):
    inputs = processor.preprocess_image(image_factory(48, 48))
    prefix = model.prefill(**processor.prefix_inputs(inputs))
    question = processor.encode_question(refer_seg_question("red circle"))
    limited = model.generate_answer(prefix, question, max_new_tokens=3)
    assert len(limited.token_ids) <= 3
    forced_stop = model.generate_answer(prefix, question, max_new_tokens=5, stop_token_ids=list(range(model.config.text_config.vocab_size)))
    assert forced_stop.token_ids == [] and forced_stop.stopped and forced_stop.mask_logits.shape[0] == 0
    # no [SEG] in the answer: the pixel decoder never ran, yet the empty masks have the feature map's size
    assert not prefix.pixel_features_decoded
    forced = processor.tokenizer.encode("It is [SEG]", add_special_tokens=False)
    with_seg = model.generate_answer(prefix, question, max_new_tokens=0, answer_prefix_ids=forced)
    assert prefix.pixel_features_decoded and with_seg.mask_logits.shape[0] == 1
    assert forced_stop.mask_logits.shape[1:] == with_seg.mask_logits.shape[1:] == prefix.pixel_features.shape[1:]


def test_independent_turns_equal_single_turn_samples(model, processor, image_factory):
    image = image_factory(64, 96, seed=5)
    turns = [
        Turn(refer_seg_question("red circle"), SEG_ANSWER),
        Turn(vp_describe_question(0), "a small red circle"),
        Turn(refer_seg_question("the blue star on the left"), "It is [SEG] and [SEG]."),
    ]
    prompts = [(10.0, 10.0)]
    joint_sample = sample_for(processor, image, turns, prompts)
    joint = run(model, processor, [joint_sample])
    seg_row = 0
    for k, (turn, (start, end)) in enumerate(zip(turns, joint_sample["turn_spans"].tolist())):
        single_sample = sample_for(processor, image, [turn], prompts)
        single = run(model, processor, [single_sample])
        s_start, s_end = single_sample["turn_spans"][0].tolist()
        assert end - start == s_end - s_start
        torch.testing.assert_close(joint.logits[0, start:end], single.logits[0, s_start:s_end], rtol=1e-4, atol=1e-4)
        prefix_len = s_start
        torch.testing.assert_close(joint.logits[0, :prefix_len], single.logits[0, :prefix_len], rtol=1e-4, atol=1e-4)
        n_seg = turn.answer.count("[SEG]")
        torch.testing.assert_close(
            joint.mask_logits[0][seg_row : seg_row + n_seg], single.mask_logits[0], rtol=1e-4, atol=1e-4
        )
        assert joint_sample["seg_turn_ids"].tolist()[seg_row : seg_row + n_seg] == [k] * n_seg
        seg_row += n_seg
    assert seg_row == joint.mask_logits[0].shape[0] == 3


def test_save_load_round_trip_restores_every_weight_bit_exactly(model_factory, processor, image_factory, tmp_path):
    model = model_factory(1, distill_pixel_dim=16, distill_token_dim=8)
    model.save_pretrained(tmp_path)
    assert model.config.distill_pixel_dim == 16  # the live model keeps its heads
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert json.loads((tmp_path / "config.json").read_text())["distill_pixel_dim"] == 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
    assert not any("distill" in k for k in keys) and "vis_embed.weight" in keys and "upsample_blocks.1.3.ln.weight" in keys

    loaded = PixelSailForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.distill_pixel_head is None and loaded.config.text_config._attn_implementation == "sdpa"
    original = {k: v for k, v in model.state_dict().items() if "distill" not in k}
    restored = loaded.state_dict()
    assert set(original) == set(restored)
    for key, tensor in original.items():
        assert torch.equal(tensor, restored[key]), key
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()

    sample = sample_for(processor, image_factory(50, 70), [Turn(refer_seg_question("red star"), SEG_ANSWER)])
    a, b = run(model, processor, [sample]), run(loaded, processor, [sample])
    # Same weights, bit for bit (above); the outputs can still differ in the last bits: a loaded tensor lives in
    # the safetensors mapping, not at an allocator-aligned address, and CPU GEMV kernels pick their path by
    # alignment (seen on an AMD EPYC: a one-row Linear differed by ~1e-8).
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.mask_logits[0], b.mask_logits[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="safetensors"):
        PixelSailForConditionalGeneration.from_pretrained(tmp_path, use_safetensors=False)


def test_distillation_heads(model_factory, processor, image_factory):
    model = model_factory(2, distill_pixel_dim=16, distill_token_dim=8)
    samples = [sample_for(processor, image_factory(h, w), [Turn("a", SEG_ANSWER)]) for h, w in SIZES[:2]]
    out = run(model, processor, samples)
    scale = model.config.patch_size // model.config.mask_output_stride
    for b, (h, w) in enumerate(SIZES[:2]):
        gh, gw = processor.grid_size(h, w)
        assert out.distill_pixel[b].shape == (16, gh * scale, gw * scale)
        assert out.distill_token[b].shape == (8, gh, gw)


def test_eager_attention_matches_sdpa(model_factory, processor, image_factory):
    sdpa = model_factory(4)
    eager = model_factory(4)
    eager.set_attn_implementation("eager")
    assert eager.model.config._attn_implementation == "eager" and sdpa.model.config._attn_implementation == "sdpa"
    sample = sample_for(processor, image_factory(64, 48), [Turn("a", SEG_ANSWER), Turn("b", NO_TARGET_ANSWER)])
    a, b = run(sdpa, processor, [sample]), run(eager, processor, [sample])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.mask_logits[0], b.mask_logits[0], rtol=1e-4, atol=1e-4)


def test_text_only_input_defaults_to_causal_1d_positions(model, processor):
    ids = torch.tensor([processor.encode_question("what colour is the star?")])
    length = ids.shape[1]
    with torch.no_grad():
        implicit = model(input_ids=ids)
        explicit = model(
            input_ids=ids,
            position_ids=torch.arange(length).view(1, 1, -1).expand(3, 1, -1),
            attention_mask=torch.ones(length, length, dtype=torch.bool).tril().view(1, 1, length, length),
        )
    assert torch.equal(implicit.logits, explicit.logits)
    assert implicit.pixel_features == [None] and implicit.mask_logits == [None]


def test_bad_inputs_are_refused(model, processor, image_factory):
    sample = sample_for(processor, image_factory(32, 32), [Turn("a", SEG_ANSWER)])
    inputs = processor.model_inputs(processor.collate([sample]))
    with pytest.raises(ValueError, match="position_ids and attention_mask are required"):
        model(**{**inputs, "position_ids": None})
    with pytest.raises(ValueError, match="attention_mask must be bool"):
        model(**{**inputs, "attention_mask": inputs["attention_mask"].float()})
    with pytest.raises(ValueError, match="pixel_values is None"):
        model(**{**inputs, "pixel_values": None})
    with pytest.raises(ValueError, match="image_grid_hw says"):
        model(**{**inputs, "image_grid_hw": torch.tensor([[1, 3]])})
    with pytest.raises(ValueError, match="visual prompt index"):
        model(**{**inputs, "visual_prompt_ids": torch.full_like(inputs["visual_prompt_ids"], 15)})


def test_bfloat16_forward_is_finite(model_factory, processor, image_factory):
    model = model_factory(6).to(torch.bfloat16)
    sample = sample_for(processor, image_factory(40, 60), [Turn("a", SEG_ANSWER)])
    out = run(model, processor, [sample])
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.mask_logits[0].float()).all()


def test_rotary_is_the_authors_3_axis_split(model):
    """Frequency slots [0, d/4) rotate with the row position, [d/4, d/2) with the column; t gets none."""
    head_dim = 64
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    positions = torch.tensor([[[7, 0, 5]], [[3, 9, 1]], [[11, 2, 4]]])  # (3 axes, batch 1, 3 tokens)
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    axis_of_slot = torch.tensor([1] * (head_dim // 4) + [2] * (head_dim // 4))
    angles = positions[axis_of_slot, 0].T.double() * inv_freq  # (tokens, d/2)
    expected = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(cos[0].double(), expected.cos(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin[0].double(), expected.sin(), rtol=1e-5, atol=1e-5)


def test_training_step_reaches_every_parameter(model_factory, processor, image_factory, tmp_path):
    """Text CE + mask + distillation losses give every weight a gradient (with activation checkpointing)."""
    model_factory(12).save_pretrained(tmp_path)
    model = PixelSailForConditionalGeneration.from_pretrained(tmp_path, distill_pixel_dim=16, distill_token_dim=8)
    assert model.distill_pixel_head.weight.abs().sum() > 0  # heads missing from the checkpoint are initialised
    model.train()
    model.activation_checkpointing_enable()
    sample = sample_for(processor, image_factory(48, 80), [Turn(vp_seg_question(0), SEG_ANSWER)], prompts=[(5.0, 5.0)])
    batch = processor.collate([sample])
    out = model(**processor.model_inputs(batch))
    labels = batch["labels"][:, 1:]
    text = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss = text + out.mask_logits[0].sigmoid().mean() + out.distill_pixel[0].square().mean() + out.distill_token[0].square().mean()
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
