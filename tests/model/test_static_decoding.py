"""Static-cache decoding (the CUDA-graph path's cache, run eagerly here) answers exactly like dynamic decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixel_sail_ros.engine import PixelSailEngine
from pixel_sail_ros.model.static_decoding import StaticDecoding
from pixel_sail_ros.training.shapesref import ShapesRefGenerator, describe


@pytest.fixture(scope="module")
def engines():
    return (PixelSailEngine.from_pretrained(None, device="cpu", decoding="dynamic"),
            PixelSailEngine.from_pretrained(None, device="cpu", decoding="static"))


def _requests(n: int):
    gen = ShapesRefGenerator(seed=31)
    for i in range(n):
        scene = gen.scene(i)
        first = scene.objects[0]
        x1, y1, x2, y2 = first.box
        yield scene.image, {"text": describe(scene.objects[-1]), "points": [first.centroid], "boxes": [(x1, y1, x2, y2)],
                            "describe": True}


def test_static_decoding_answers_and_segments_like_dynamic_decoding(engines):
    dynamic, static = engines
    assert dynamic._static is None and static._static is not None and not static._static.use_graphs
    before = static._static.generation
    for image, request in _requests(4):  # text, a click and a box: three answers per prefix, plus descriptions
        a, b = dynamic.segment(image, **request), static.segment(image, **request)
        assert a.answers == b.answers and a.labels == b.labels and a.description == b.description
        assert a.masks.shape == b.masks.shape and (a.masks == b.masks).mean() > 0.999
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    assert static._static.generation == before + 4  # one prefill per request, into the one reused cache
    assert static._static.max_len % 256 == 0


def test_static_steps_give_the_dynamic_logits(engines, monkeypatch):
    dynamic, static = engines
    image, request = next(_requests(1))
    logits = {}
    for name, engine in (("dynamic", dynamic), ("static", static)):
        original = engine.model.generate_answer
        seen = []

        def spy(*args, _original=original, _seen=seen, **kwargs):
            out = _original(*args, **{**kwargs, "return_logits": True})
            _seen.append(out.step_logits)
            return out

        monkeypatch.setattr(engine.model, "generate_answer", spy)
        engine.segment(image, **request)
        logits[name] = seen
    assert len(logits["dynamic"]) == len(logits["static"]) == 5  # text, click, box, and the two descriptions
    for a, b in zip(logits["dynamic"], logits["static"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_turn_longer_than_the_reserve_falls_back_to_a_dynamic_copy(engines):
    dynamic, _ = engines
    tight = PixelSailEngine(dynamic.model, dynamic.processor, decoding="static")
    tight._static = StaticDecoding(dynamic.model, reserve=3, granularity=1)  # too small for any question + answer
    image, request = next(_requests(1))
    a, b = dynamic.segment(image, **request), tight.segment(image, **request)
    assert a.answers == b.answers and (a.masks == b.masks).mean() > 0.999
    static = tight._static
    # every answer went to a dynamic copy: the static cache still ends where the last prefix did
    assert int(static.cache.layers[0].cumulative_length) == static.max_len - 3


def test_a_prefix_whose_cache_was_refilled_is_refused(engines):
    _, static = engines
    image, request = next(_requests(1))
    with torch.inference_mode():  # as segment() runs
        old = static._prefill(image, [])
        static._prefill(image[:, ::-1].copy(), [])  # the next frame takes over the cache
        with pytest.raises(ValueError, match="later prefill"):
            static._answer(old, "red circle")


def test_decoding_modes_are_checked():
    with pytest.raises(ValueError, match="decoding must be one of"):
        PixelSailEngine.from_pretrained(None, device="cpu", decoding="fast")
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        PixelSailEngine.from_pretrained(None, device="cpu", decoding="graphs")


@pytest.mark.slow
def test_compiled_steps_answer_and_segment_like_dynamic_decoding(engines):
    """decoding="compiled": the one-token steps really go through torch.compile and change no answer."""
    dynamic, _ = engines
    compiled = PixelSailEngine(dynamic.model, dynamic.processor, decoding="compiled")
    for image, request in _requests(2):
        a, b = dynamic.segment(image, **request), compiled.segment(image, **request)
        assert a.answers == b.answers and a.labels == b.labels and a.description == b.description
        assert a.masks.shape == b.masks.shape and (a.masks == b.masks).mean() > 0.999
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    # every answer has at least one one-token step after its question chunk
    assert compiled._static.compiled_steps >= 2 * 5
