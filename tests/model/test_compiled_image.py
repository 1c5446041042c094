"""compile_image: the image prefix and the pixel decoder really run compiled, once per image grid, and change no
answer, mask or score beyond float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixel_sail_ros.engine import PixelSailEngine
from pixel_sail_ros.model.compiled_image import CompiledImagePasses
from pixel_sail_ros.training.shapesref import ShapesRefGenerator, describe


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _requests(n: int, side: int):
    """ShapesRef scenes of one size (one patch grid), each with a phrase, a click and a box, described."""
    gen = ShapesRefGenerator(seed=43, min_side=side, max_side=side)
    for i in range(n):
        scene = gen.scene(i)
        first = scene.objects[0]
        yield scene.image, {"text": describe(scene.objects[-1]), "points": [first.centroid], "boxes": [first.box],
                            "describe": True}


def _assert_same(a, b) -> None:
    assert a.answers == b.answers and a.labels == b.labels and a.description == b.description
    assert a.masks.shape == b.masks.shape and (a.masks.size == 0 or (a.masks == b.masks).mean() > 0.999)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


@pytest.fixture(scope="module")
def engines():
    eager = PixelSailEngine.from_pretrained(None, device="cpu")
    return eager, PixelSailEngine(eager.model, eager.processor, compile_image=True)


@pytest.mark.slow
def test_compiled_image_passes_answer_like_eager_and_compile_once_per_grid(engines):
    """Per grid: two graphs (the prefix pass, the pixel decoder); the prefix pass also reads the first question, so
    a question of another length compiles it once more with the length symbolic, and then no length does."""
    eager, compiled = engines
    assert eager._compiled is None and isinstance(compiled._compiled, CompiledImagePasses)
    scenes = [image for image, _ in _requests(4, 320)]
    phrases = ["red circle", "blue square", "the large green triangle", "the small yellow star on the left"]
    new_graphs = []
    for image, phrase in zip(scenes, phrases):  # each phrase asked once: each drafted as "It is [SEG]."
        before = _graphs()
        request = {"text": phrase, "points": [(40, 50)], "describe": True}
        _assert_same(eager.segment(image, **request), compiled.segment(image, **request))
        new_graphs.append(_graphs() - before)
    # 11 + 4 tokens, the same 15, 13 + 4 (recompiled, length now symbolic), 16 + 4 (no compilation)
    assert new_graphs == [2, 0, 1, 0]


@pytest.mark.slow
def test_a_new_image_size_compiles_again_and_still_matches(engines):
    eager, compiled = engines
    image, request = next(_requests(1, 320))
    compiled.segment(image, **request)  # this grid is compiled (here or by the test before)
    before = _graphs()
    wide = np.ascontiguousarray(np.concatenate([image, image], axis=1))  # 320×640: another patch grid
    assert eager.processor.preprocess_image(wide).grid_hw != eager.processor.preprocess_image(image).grid_hw
    _assert_same(eager.segment(wide, text=request["text"]), compiled.segment(wide, text=request["text"]))
    # the pixel decoder compiles for the new grid; the prefix pass too, unless its length is symbolic already
    assert _graphs() - before in (1, 2)


def test_prefill_with_compiled_passes_gives_the_eager_prefix(model, processor, image_factory):
    """The model API: prefill(compiled=...) keeps the prefix's cache, patch states and pixel features."""
    inputs = processor.preprocess_image(image_factory(96, 128, seed=5))
    batch = processor.prefix_inputs(inputs, None)
    passes = CompiledImagePasses.of(model)
    with torch.no_grad():
        eager, fast = model.prefill(**batch), model.prefill(**batch, compiled=passes)
        torch.testing.assert_close(fast.vision_tokens, eager.vision_tokens, rtol=1e-4, atol=1e-4)
        for a, b in zip(eager.past_key_values.layers, fast.past_key_values.layers):
            torch.testing.assert_close(b.keys, a.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast.pixel_features, eager.pixel_features, rtol=1e-4, atol=1e-4)
        assert fast.length == eager.length and fast.next_position == eager.next_position


@pytest.mark.slow
def test_without_a_working_compiler_the_engine_answers_eagerly(engines, caplog):
    """A robot image without a C++ compiler: the first request notices, turns compilation off, and still answers."""
    import torch._inductor.config as inductor

    eager, _ = engines
    engine = PixelSailEngine(eager.model, eager.processor, compile_image=True, decoding="compiled")
    # a size no other test compiles: no in-process kernel cache can stand in for the missing compiler
    image = np.ascontiguousarray(next(_requests(1, 272))[0][:208, :176])
    # inductor's own patch (monkeypatch would delete its config entries on undo, breaking later compilations)
    with caplog.at_level("WARNING", logger="pixel_sail_ros.engine"), \
            inductor.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):
        out = engine.segment(image, text="red circle", points=[(40, 50)], describe=True)
    assert "torch.compile failed" in caplog.text and "compile_image" in caplog.text
    assert engine.compile_image is False and engine._compiled is None and engine.decoding == "static"
    _assert_same(eager.segment(image, text="red circle", points=[(40, 50)], describe=True), out)
    caplog.clear()
    _assert_same(eager.segment(image, text="blue square"), engine.segment(image, text="blue square"))
    assert "torch.compile failed" not in caplog.text  # said once


@pytest.mark.slow
def test_warm_up_compiles_a_new_size_so_that_its_first_frame_compiles_nothing(engines):
    eager, compiled = engines
    before = _graphs()
    compiled.warm_up(300, 100)  # 3:1, a grid no other test uses
    assert _graphs() > before
    image = np.ascontiguousarray(ShapesRefGenerator(seed=5, min_side=300, max_side=300).scene(0).image[:100])
    before = _graphs()
    request = {"text": "the small yellow star on the left", "points": [(40, 50)], "describe": True}
    _assert_same(eager.segment(image, **request), compiled.segment(image, **request))
    assert _graphs() == before
