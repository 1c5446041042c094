"""Drafted answers (``generate_answer(draft_ids=...)``, the engine's ``speculative``) give the greedy answer and
save the decoder passes a right draft makes unnecessary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixel_sail_ros.engine import PixelSailEngine
from pixel_sail_ros.model.processing_pixel_sail import NO_TARGET_ANSWER, refer_seg_question
from pixel_sail_ros.training.shapesref import ShapesRefGenerator, describe

MAX = 8


@pytest.fixture(scope="module")
def model(wandering_model):
    return wandering_model


@pytest.fixture(scope="module")
def prefix_and_question(model, processor, image_factory):
    inputs = processor.preprocess_image(image_factory(64, 96, seed=7))
    prefix = model.prefill(**processor.prefix_inputs(inputs))
    return prefix, processor.encode_question(refer_seg_question("blue square"))


class Recorder:
    """A logits processor that changes nothing and records what each call was fed."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, fed, logits):
        self.calls.append(list(fed))
        return logits


def _answer(model, prefix, question, draft=None, **kwargs):
    recorder = Recorder()
    kwargs.setdefault("stop_token_ids", ())
    out = model.generate_answer(prefix, question, max_new_tokens=MAX, return_logits=True, draft_ids=draft,
                                logits_processor=recorder, **kwargs)
    return out, recorder.calls


def test_a_right_draft_is_accepted_in_one_pass(model, prefix_and_question):
    prefix, question = prefix_and_question
    plain, plain_calls = _answer(model, prefix, question)
    assert len(plain.token_ids) == MAX and not plain.stopped and len(set(plain.token_ids)) > 2
    assert plain.passes == MAX and plain.draft_accepted == 0  # the question, then one pass per fed token
    drafted, drafted_calls = _answer(model, prefix, question, draft=plain.token_ids)
    assert drafted.token_ids == plain.token_ids and drafted.passes == 1 and drafted.draft_accepted == MAX
    assert drafted_calls == plain_calls  # the logits processor sees the same calls with or without a draft
    torch.testing.assert_close(drafted.step_logits, plain.step_logits, rtol=1e-4, atol=1e-4)
    assert prefix.past_key_values.get_seq_length() == prefix.length  # the prefix's own cache is untouched


@pytest.mark.parametrize("wrong_at", [0, 3, MAX - 1])
def test_a_wrong_draft_is_cut_where_greedy_disagrees(model, prefix_and_question, wrong_at):
    prefix, question = prefix_and_question
    plain, plain_calls = _answer(model, prefix, question)
    draft = list(plain.token_ids)
    draft[wrong_at] = (draft[wrong_at] + 1) % model.config.text_config.vocab_size
    draft += [5, 6, 7]  # longer than max_new_tokens: cut to it
    drafted, drafted_calls = _answer(model, prefix, question, draft=draft)
    assert drafted.token_ids == plain.token_ids and drafted.draft_accepted == wrong_at
    assert drafted.drafted == MAX and plain.drafted == 0  # the draft was cut at max_new_tokens
    # the accepted tokens cost no pass of their own; the rest decode one at a time after the rejected guess
    assert drafted.passes == plain.passes - wrong_at
    assert drafted_calls == plain_calls
    torch.testing.assert_close(drafted.step_logits, plain.step_logits, rtol=1e-4, atol=1e-4)


def test_a_draft_after_forced_tokens_keeps_the_segment(model_factory, scripted, processor, image_factory):
    """A scripted model answers "It is [SEG]." and stops: drafting it gives the same mask in one pass."""
    model = model_factory(3, tie_word_embeddings=False)
    encode = processor.tokenizer.encode
    question = processor.encode_question(refer_seg_question("red circle"))
    answer = encode("It is [SEG].", add_special_tokens=False)
    chain = dict(zip([question[-1], *answer], [*answer, model.config.eos_token_id]))
    scripted(model, chain)
    inputs = processor.preprocess_image(image_factory(64, 64, seed=2))
    prefix = model.prefill(**processor.prefix_inputs(inputs))
    stops = {"stop_token_ids": (model.config.eos_token_id,)}
    plain, _ = _answer(model, prefix, question, **stops)
    assert plain.token_ids == answer and plain.stopped and plain.mask_logits.shape[0] == 1
    drafted, _ = _answer(model, prefix, question, draft=answer, **stops)
    assert drafted.token_ids == answer and drafted.stopped and drafted.passes == 1
    torch.testing.assert_close(drafted.mask_logits, plain.mask_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(drafted.seg_token_probs, plain.seg_token_probs)
    forced = answer[:2]  # "It is" forced, "[SEG] ." drafted
    both, _ = _answer(model, prefix, question, draft=answer[2:], answer_prefix_ids=forced, **stops)
    assert both.token_ids == answer and both.passes == 1 and both.draft_accepted == len(answer) - 2
    torch.testing.assert_close(both.mask_logits, plain.mask_logits, rtol=1e-4, atol=1e-4)
    wrong, _ = _answer(model, prefix, question, draft=encode(NO_TARGET_ANSWER, add_special_tokens=False), **stops)
    assert wrong.token_ids == answer and wrong.draft_accepted == 0 and wrong.passes == plain.passes
    torch.testing.assert_close(wrong.mask_logits, plain.mask_logits, rtol=1e-4, atol=1e-4)


# ---- the engine, with the bundled model -------------------------------------------------------------------


def _requests(n: int):
    gen = ShapesRefGenerator(seed=41)
    for i in range(n):
        scene = gen.scene(i)
        first = scene.objects[0]
        yield scene.image, {"text": describe(scene.objects[-1]), "points": [first.centroid], "boxes": [first.box],
                            "describe": True}


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_the_engine_drafts_from_previous_answers_and_answers_the_same(decoding):
    plain = PixelSailEngine.from_pretrained(None, device="cpu", decoding=decoding, speculative=False)
    drafting = PixelSailEngine(plain.model, plain.processor, decoding=decoding, speculative=True)
    requests = list(_requests(4))
    for image, request in requests:  # each scene's answers differ from the previous scene's: drafts are cut
        a, b = plain.segment(image, **request), drafting.segment(image, **request)
        assert a.answers == b.answers and a.labels == b.labels and a.description == b.description
        assert a.masks.shape == b.masks.shape and (a.masks == b.masks).mean() > 0.999
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    assert plain.draft_stats["drafted_tokens"] == 0
    first = dict(drafting.draft_stats)
    assert 0 < first["accepted_tokens"] <= first["drafted_tokens"]
    image, request = requests[-1]
    again = drafting.segment(image, **request)  # the same frame again: every draft is its own answer
    stats = {k: drafting.draft_stats[k] - first[k] for k in first}
    assert stats["answers"] == 5  # text, click, box, two descriptions
    assert stats["accepted_tokens"] == stats["drafted_tokens"] > 0
    assert stats["passes"] == 5  # one decoder pass per answer
    assert again.answers == plain.segment(image, **request).answers


def test_a_question_not_asked_before_is_drafted_as_a_segmentation():
    engine = PixelSailEngine.from_pretrained(None, device="cpu")
    image, request = next(_requests(1))
    engine.segment(image, text=request["text"])
    stats = engine.draft_stats
    assert stats["answers"] == 1 and stats["drafted_tokens"] == len(engine._seg_answer_ids) > 0
