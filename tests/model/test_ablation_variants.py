"""The paper's ablation baselines as config switches: no learnable upsampler, and pooled visual prompts
instead of injecting them into the patches. Same processor, same training and inference paths."""

from __future__ import annotations

import pytest
import torch

from pixel_sail_ros.bench import flops
from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
from pixel_sail_ros.model.processing_pixel_sail import SEG_ANSWER, Turn, vp_seg_question

from .test_modeling import extend_with_answer, run, sample_for

BASELINE = {"use_upsampler": False, "visual_prompt_injection": False}
HYBRID = {"visual_prompt_pooling": True}  # injection (the default) and pooled prompts at <Prompt k>


@pytest.fixture(scope="module")
def baseline(model_factory) -> PixelSailForConditionalGeneration:
    return model_factory(0, **BASELINE)


@pytest.fixture(scope="module")
def hybrid(model_factory) -> PixelSailForConditionalGeneration:
    return model_factory(0, **HYBRID)


def test_baseline_has_no_upsampler_or_prompt_injection_but_the_same_mask_size(baseline, model, processor, image_factory):
    names = {n for n, _ in baseline.named_parameters()}
    assert not any(n.startswith(("upsample_blocks.", "vp_embed.")) for n in names)
    assert any(n.startswith("upsample_blocks.") for n, _ in model.named_parameters())
    sample = sample_for(processor, image_factory(96, 128), [Turn(vp_seg_question(0), SEG_ANSWER)], [(20.0, 30.0)])
    out, ref = run(baseline, processor, [sample]), run(model, processor, [sample])
    assert out.pixel_features[0].shape == ref.pixel_features[0].shape
    assert out.mask_logits[0].shape == ref.mask_logits[0].shape == (1, *ref.pixel_features[0].shape[1:])


def test_baseline_pixel_features_are_interpolated_patch_features(baseline, processor, image_factory):
    inputs = processor.preprocess_image(image_factory(64, 96, seed=2))
    prefix = baseline.prefill(**processor.prefix_inputs(inputs))
    per_patch = baseline.image_feature_projector(prefix.vision_tokens.unsqueeze(0)).permute(0, 3, 1, 2)
    scale = 2**baseline.config.num_upsample_blocks
    expected = torch.nn.functional.interpolate(per_patch, scale_factor=scale, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(prefix.pixel_features, expected)


def test_pooled_prompt_reaches_the_question_not_the_patches(baseline, processor, image_factory):
    image = image_factory(96, 128, seed=4)
    turns = [Turn(vp_seg_question(0), SEG_ANSWER)]
    plain = sample_for(processor, image, turns)
    left, right = (sample_for(processor, image, turns, prompts=[p]) for p in [(10.0, 10.0), (120.0, 90.0)])
    outs = [run(baseline, processor, [s]) for s in (plain, left, right)]
    is_patch = plain["input_ids"] == baseline.config.vision_patch_token_id
    prompt_pos = int((plain["input_ids"] == baseline.config.prompt_token_ids[0]).nonzero()[0, 0])
    # the image block is untouched by the prompt (no injection; image tokens never attend to text) ...
    for o in outs[1:]:
        torch.testing.assert_close(o.last_hidden_state[0, is_patch], outs[0].last_hidden_state[0, is_patch])
    # ... but the <Prompt0> token of the question carries the pooled region, so where the prompt is matters
    hidden = [o.last_hidden_state[0, prompt_pos] for o in outs]
    assert (hidden[1] - hidden[0]).abs().max() > 1e-3 and (hidden[1] - hidden[2]).abs().max() > 1e-3
    assert (outs[1].mask_logits[0] - outs[2].mask_logits[0]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["baseline", "hybrid"])
def test_pooled_prompts_cached_generation_equals_full_recompute(variant, request, processor, image_factory):
    """The pooled prompts travel with the prefix to the question tokens decoded later."""
    baseline = request.getfixturevalue(variant)
    inputs = processor.preprocess_image(image_factory(80, 112, seed=3))
    prompt_map = processor.visual_prompt_map(inputs.original_hw, inputs.grid_hw, [(20.0, 30.0)])
    question = vp_seg_question(0)
    prefix = baseline.prefill(**processor.prefix_inputs(inputs, prompt_map))
    assert prefix.visual_prompt_features is not None and prefix.visual_prompt_features[0, 0].abs().sum() > 0
    assert prefix.visual_prompt_features[0, 1:].abs().sum() == 0  # prompts not given pool to nothing
    forced = processor.tokenizer.encode("It is [SEG]", add_special_tokens=False)
    answer = baseline.generate_answer(prefix, processor.encode_question(question), max_new_tokens=4,
                                      answer_prefix_ids=forced, return_logits=True)
    full = extend_with_answer(processor.build_sequence(inputs, [question], prompt_map), answer.token_ids)
    out = run(baseline, processor, [full])
    first_answer = full["input_ids"].shape[0] - len(answer.token_ids)
    rows = torch.arange(answer.step_logits.shape[0]) + first_answer + len(forced) - 1
    torch.testing.assert_close(answer.step_logits, out.logits[0, rows], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(answer.mask_logits, out.mask_logits[0], rtol=1e-4, atol=1e-4)


def test_hybrid_injects_into_the_patches_and_pools_into_the_question(hybrid, model, processor, image_factory):
    assert hybrid.config.pools_visual_prompts and not model.config.pools_visual_prompts
    assert {n for n, _ in hybrid.named_parameters()} == {n for n, _ in model.named_parameters()}  # no new weights
    image = image_factory(96, 128, seed=5)
    turns = [Turn(vp_seg_question(0), SEG_ANSWER)]
    plain, prompted = (sample_for(processor, image, turns, prompts=p) for p in (None, [(10.0, 10.0)]))
    is_patch = plain["input_ids"] == hybrid.config.vision_patch_token_id
    prompt_pos = int((plain["input_ids"] == hybrid.config.prompt_token_ids[0]).nonzero()[0, 0])
    h_plain, h_prompted = (run(hybrid, processor, [s]) for s in (plain, prompted))
    assert (h_prompted.last_hidden_state[0, is_patch] - h_plain.last_hidden_state[0, is_patch]).abs().max() > 1e-3
    assert h_prompted.visual_prompt_features is not None and h_prompted.visual_prompt_features[0, 0].abs().sum() > 0
    # the same weights without pooling: the <Prompt0> token's input differs by exactly the pooled features
    with torch.no_grad():
        embeds = hybrid.embed_inputs(prompted["input_ids"][None], prompted["pixel_values"][None],
                                     prompted["visual_prompt_ids"][None])
        pooled = hybrid.pool_visual_prompts(embeds, prompted["visual_prompt_ids"][None])
        placed = hybrid.place_visual_prompts(embeds, prompted["input_ids"][None], pooled)
    torch.testing.assert_close(placed[0, prompt_pos] - embeds[0, prompt_pos], pooled[0, 0])


def test_baseline_saves_and_loads_with_its_switches(baseline, tmp_path):
    baseline.save_pretrained(tmp_path)
    again = PixelSailForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (again.config.use_upsampler, again.config.visual_prompt_injection) == (False, False)
    for (n, a), (_, b) in zip(baseline.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_baseline_pixel_decoder_flops_match_the_flop_counter(baseline, processor, image_factory):
    from torch.utils.flop_counter import FlopCounterMode

    inputs = processor.preprocess_image(image_factory(240, 320))
    prefix = baseline.prefill(**processor.prefix_inputs(inputs))
    with FlopCounterMode(display=False) as counter:
        prefix.pixel_features
    assert counter.get_total_flops() == flops.pixel_decoder_flops(baseline.config, inputs.grid_hw)
    assert flops.pixel_decoder_flops(baseline.config, inputs.grid_hw) < flops.pixel_decoder_flops(
        PixelSailForConditionalGeneration.config_class.from_preset("tiny"), inputs.grid_hw) / 10
