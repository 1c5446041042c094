"""The first question read with the image (``prefill(first_turn_ids=...)``, the engine's ``fuse_first_turn``):
the same greedy answers as a pass of its own, one decoder pass fewer, and the prefix's cache intact for the
questions after it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixel_sail_ros.engine import PixelSailEngine
from pixel_sail_ros.model.processing_pixel_sail import refer_seg_question, vp_describe_question
from pixel_sail_ros.model.static_decoding import StaticDecoding
from pixel_sail_ros.training.shapesref import ShapesRefGenerator, describe

MAX = 6


@pytest.fixture(scope="module")
def setup(model_factory, processor, image_factory):
    """A random model with an untied head, whose greedy answers wander over the vocabulary (no stop tokens are
    given) but, for this seed, never through ``<vpatch>`` (a turn holding one is not read with the image); an
    image's prefix inputs; two questions."""
    model = model_factory(8, tie_word_embeddings=False)
    inputs = processor.preprocess_image(image_factory(64, 96, seed=3))
    batch = processor.prefix_inputs(inputs)
    first = processor.encode_question(refer_seg_question("blue square"))
    second = processor.encode_question(refer_seg_question("red circle"))
    return model, batch, first, second


def _answer(model, prefix, question, draft=None):
    return model.generate_answer(prefix, question, max_new_tokens=MAX, stop_token_ids=(), return_logits=True,
                                 draft_ids=draft)


def _same(a, b) -> None:
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(a.step_logits, b.step_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.mask_logits, b.mask_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("static", [False, True])
# None: a right draft; "short": a right draft of 3 tokens, the answer goes on after it; k: wrong from token k on
@pytest.mark.parametrize("wrong_at", [None, "short", 0, 2])
def test_a_first_turn_read_with_the_image_answers_like_its_own_pass(setup, static, wrong_at):
    model, batch, first, second = setup
    decoding = (lambda: StaticDecoding(model)) if static else (lambda: None)
    with torch.no_grad():
        plain_prefix = model.prefill(**batch, decoding=decoding())
        plain = _answer(model, plain_prefix, first)
        plain_second = _answer(model, plain_prefix, second)
        assert model.config.vision_patch_token_id not in plain.token_ids and len(set(plain.token_ids)) > 2
        draft = list(plain.token_ids)
        if wrong_at == "short":
            draft = draft[:3]
        elif wrong_at is not None:
            draft[wrong_at] = (draft[wrong_at] + 1) % model.config.text_config.vocab_size
        reference = _answer(model, model.prefill(**batch, decoding=decoding()), first, draft)

        prefix = model.prefill(**batch, decoding=decoding(), first_turn_ids=first + draft,
                               first_turn_logits=len(draft) + 1)
        assert prefix.length == plain_prefix.length and prefix.next_position == plain_prefix.next_position
        torch.testing.assert_close(prefix.vision_tokens, plain_prefix.vision_tokens, rtol=1e-4, atol=1e-4)
        fused = _answer(model, prefix, first, draft)
        assert fused.with_prefix and not reference.with_prefix
        _same(fused, plain)
        assert fused.draft_accepted == reference.draft_accepted == {None: MAX, "short": 3}.get(wrong_at, wrong_at)
        assert fused.passes == reference.passes  # the prefix's pass counts as the answer's first
        # the next question starts from the prefix alone: the first turn's cache entries are not in its way
        after = _answer(model, prefix, second)
        assert not after.with_prefix
        _same(after, plain_second)
    if not static:
        assert prefix.past_key_values.get_seq_length() == prefix.length + len(first) + len(draft)  # untouched


def test_a_first_turn_serves_only_the_answer_that_feeds_it(setup):
    model, batch, first, second = setup
    with torch.no_grad():
        plain_second = _answer(model, model.prefill(**batch), second)
        plain_first = _answer(model, model.prefill(**batch), first)
        prefix = model.prefill(**batch, first_turn_ids=first)
        other = _answer(model, prefix, second)  # another question comes first: the read turn is not used...
        assert not other.with_prefix
        _same(other, plain_second)
        again = _answer(model, prefix, first)  # ...and is retired, so the question it was read for decodes anew
        assert not again.with_prefix
        _same(again, plain_first)
        mismatched = model.prefill(**batch, first_turn_ids=first, first_turn_logits=2)  # logits for a 1-token draft
        assert not _answer(model, mismatched, first).with_prefix  # no draft given: not the same turn


def test_a_turn_holding_an_image_slot_token_is_left_to_its_own_pass(setup):
    model, batch, first, _ = setup
    with torch.no_grad():
        plain = _answer(model, model.prefill(**batch), first, [model.config.vision_patch_token_id])
        prefix = model.prefill(**batch, first_turn_ids=first + [model.config.vision_patch_token_id], first_turn_logits=2)
        assert prefix.first_turn is None and prefix.past_key_values.get_seq_length() == prefix.length
        _same(_answer(model, prefix, first, [model.config.vision_patch_token_id]), plain)


def test_first_turn_logits_are_checked(setup):
    model, batch, first, _ = setup
    with pytest.raises(ValueError, match="first_turn_logits"):
        model.prefill(**batch, first_turn_ids=first, first_turn_logits=len(first) + 1)


# ---- the engine, with the bundled model -------------------------------------------------------------------


def _requests(n: int):
    gen = ShapesRefGenerator(seed=47)
    for i in range(n):
        scene = gen.scene(i)
        first = scene.objects[0]
        request = {"points": [first.centroid], "boxes": [first.box], "describe": i % 2 == 0}
        if i != 1:  # scene 1 has prompts only: its first question is a click's description
            request["text"] = describe(scene.objects[-1])
        yield scene.image, request


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_the_engine_reads_each_first_question_with_the_image_and_answers_the_same(decoding):
    apart = PixelSailEngine.from_pretrained(None, device="cpu", decoding=decoding, fuse_first_turn=False)
    fused = PixelSailEngine(apart.model, apart.processor, decoding=decoding)
    assert fused.fuse_first_turn
    requests = list(_requests(4)) * 2  # the second round: every draft is the same frame's previous answer
    for image, request in requests:
        a, b = apart.segment(image, **request), fused.segment(image, **request)
        assert a.answers == b.answers and a.labels == b.labels and a.description == b.description
        assert a.masks.shape == b.masks.shape and (a.masks == b.masks).mean() > 0.999
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    assert apart.draft_stats["with_prefix"] == 0
    assert fused.draft_stats["with_prefix"] == len(requests)  # every request's first answer
    assert fused.draft_stats["passes"] == apart.draft_stats["passes"]
    assert vp_describe_question(0) in fused._previous_answers  # scene 1's first question was read with it too
