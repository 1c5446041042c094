"""PixelSailEngine on tiny random models saved to a temporary checkpoint: outputs and input validation.

A random model rarely writes [SEG], so two models are "scripted" (conftest.script_model): greedy decoding
after any question reads "It is [SEG]." or "No target.", while masks still come from the real mask decoder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from pixel_sail_ros.engine import BUNDLED_CHECKPOINT, PixelSailEngine, SegmentationOutput, resolve_device, resolve_dtype
from pixel_sail_ros.model.processing_pixel_sail import PixelSailProcessor


def save_scripted(tmp_path_factory, model_factory, scripted, tokenizer, config, words):
    model = model_factory(11, tie_word_embeddings=False)
    ids = [config.im_end_token_id] + [tokenizer.convert_tokens_to_ids(w) for w in words] + [config.eos_token_id]
    scripted(model, dict(zip(ids[:-1], ids[1:])))
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    PixelSailProcessor.from_config(model.config, tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def seg_engine(tmp_path_factory, model_factory, scripted, tokenizer, config) -> PixelSailEngine:
    path = save_scripted(tmp_path_factory, model_factory, scripted, tokenizer, config, ["it", "is", "[SEG]", "."])
    return PixelSailEngine.from_pretrained(path, device="cpu")


@pytest.fixture(scope="module")
def no_target_engine(tmp_path_factory, model_factory, scripted, tokenizer, config) -> PixelSailEngine:
    path = save_scripted(tmp_path_factory, model_factory, scripted, tokenizer, config, ["no", "target", "."])
    return PixelSailEngine.from_pretrained(path, device="cpu", dtype="float32", max_new_tokens=8)


def check_well_formed(out: SegmentationOutput, n: int, size: tuple[int, int]) -> None:
    assert isinstance(out, SegmentationOutput)
    assert out.masks.dtype == bool and out.masks.shape == (n, *size)
    assert out.scores.dtype == np.float32 and out.scores.shape == (n,)
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert len(out.labels) == n and all(isinstance(label, str) for label in out.labels)
    assert isinstance(out.description, str) and out.seconds > 0


def test_text_prompt_gives_one_mask_at_the_image_size(seg_engine, image_factory):
    assert seg_engine.device.type == "cpu" and seg_engine.dtype == torch.float32
    image = image_factory(120, 200)
    out = seg_engine.segment(image, text="red circle")
    check_well_formed(out, 1, (120, 200))
    assert out.labels == ["red circle"] and out.description == "" and out.answers == ["it is."]
    # the mask is the thresholded decoder output, not a constant
    again = seg_engine.segment(image, text="red circle")
    assert np.array_equal(again.masks, out.masks) and np.array_equal(again.scores, out.scores)
    other = seg_engine.segment(image_factory(120, 200, seed=9), text="red circle")
    assert not np.array_equal(other.masks, out.masks)


def test_points_boxes_and_describe(seg_engine, image_factory):
    image = image_factory(90, 160)
    out = seg_engine.segment(image, text="blue star", points=[(10, 20), (150.5, 80)], boxes=[(5, 5, 60, 40)], describe=True)
    check_well_formed(out, 4, (90, 160))
    assert out.labels[0] == "blue star" and out.labels[1:] == ["it is."] * 3
    assert out.description == "it is.; it is.; it is."
    plain = seg_engine.segment(image, points=np.array([[10.0, 20.0]]))
    check_well_formed(plain, 1, (90, 160))
    assert plain.labels == ["point 0"]
    assert seg_engine.segment(image, boxes=[(0, 0, 160, 90)]).labels == ["box 0"]


def test_no_target_answer_gives_no_masks(no_target_engine, image_factory):
    out = no_target_engine.segment(image_factory(64, 64), text="purple triangle", describe=True)
    check_well_formed(out, 0, (64, 64))
    assert out.description == "no target."
    clicked = no_target_engine.segment(image_factory(64, 64), points=[(3, 3)])
    check_well_formed(clicked, 0, (64, 64))


@contextlib.contextmanager
def _pixel_decodings(engine: PixelSailEngine) -> Iterator[list[int]]:
    """A list that grows by one each time the engine's model decodes pixel features (a forward hook)."""
    calls: list[int] = []
    handle = engine.model.image_feature_projector.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_warm_up_answers_a_frame_of_that_size_and_keeps_drafts_and_stats(seg_engine, image_factory):
    image = image_factory(100, 300)
    seg_engine.segment(image, text="red circle")  # a draft and statistics the warm-up must not change
    drafts, stats = dict(seg_engine._previous_answers), dict(seg_engine.draft_stats)
    grid = seg_engine.processor.preprocess_image(image_factory(70, 90)).grid_hw
    assert grid not in seg_engine._prefix_statics
    with _pixel_decodings(seg_engine) as decoded:
        assert seg_engine.warm_up(90, 70) > 0
    assert dict(seg_engine._previous_answers) == drafts and seg_engine.draft_stats == stats
    assert grid in seg_engine._prefix_statics  # that size's per-grid inputs are built and kept
    assert len(decoded) == 2  # a phrase and a click answered with masks: no extra pixel decoding
    with pytest.raises(ValueError, match="must be positive"):
        seg_engine.warm_up(0, 480)


def test_warm_up_decodes_pixels_even_when_the_model_finds_nothing(no_target_engine, image_factory):
    with _pixel_decodings(no_target_engine) as decoded:
        no_target_engine.segment(image_factory(48, 64), text="red circle", points=[(3, 3)], describe=True)
        assert decoded == []  # "No target." never needs the pixel decoder...
        no_target_engine.warm_up(64, 48)
    assert len(decoded) == 1  # ...but the warm-up runs it, so the first mask does not pay its start-up


def test_a_text_only_model_warms_up_and_refuses_clicks_saying_why(tmp_path, model_factory, tokenizer, image_factory):
    model = model_factory(3, num_visual_prompts=0)  # a checkpoint trained without visual prompts
    model.save_pretrained(tmp_path)
    PixelSailProcessor.from_config(model.config, tokenizer).save_pretrained(tmp_path)
    engine = PixelSailEngine.from_pretrained(tmp_path, device="cpu", max_new_tokens=4)
    with _pixel_decodings(engine) as decoded:
        assert engine.warm_up(64, 48) > 0  # the phrase, then the phrase described: no click to refuse
    assert len(decoded) >= 1
    with pytest.raises(ValueError, match="no visual prompts"):
        engine.segment(image_factory(48, 64), points=[(3, 3)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rgb": np.zeros((10, 10, 3), dtype=np.float32)}, "uint8"),
        ({"rgb": np.zeros((10, 10), dtype=np.uint8)}, r"\(H, W, 3\)"),
        ({"rgb": np.zeros((10, 10, 4), dtype=np.uint8)}, r"\(H, W, 3\)"),
        ({"rgb": np.zeros((0, 10, 3), dtype=np.uint8)}, "empty"),
        ({"rgb": np.zeros((9000, 2, 3), dtype=np.uint8)}, "refused"),
        ({"rgb": [[0]]}, "numpy array"),
        ({"text": ""}, "nothing to do"),
        ({"text": 5}, "string"),
        ({"text": "red " * 300}, "too long"),
        ({"points": [(50, 5)]}, "outside"),
        ({"points": [(-1, 5)]}, "outside"),
        ({"points": [(float("nan"), 5)]}, "NaN"),
        ({"points": [(1, 2, 3)]}, r"\(N, 2\)"),
        ({"boxes": [(10, 10, 5, 20)]}, "x1 < x2"),
        ({"boxes": [(0, 0, 41, 20)]}, "not inside"),
        ({"points": [(1, 1)] * 16}, "at most 15"),
    ],
)
def test_bad_inputs_raise_value_errors_that_say_why(seg_engine, kwargs, message):
    call = {"rgb": np.zeros((30, 40, 3), dtype=np.uint8), **kwargs}
    with pytest.raises(ValueError, match=message):
        seg_engine.segment(**call)


def test_missing_bundled_checkpoint_and_paths(tmp_path):
    if not (BUNDLED_CHECKPOINT / "config.json").is_file():
        with pytest.raises(FileNotFoundError, match="bundled checkpoint"):
            PixelSailEngine.from_pretrained(None)
    with pytest.raises(FileNotFoundError, match="not a Pixel-SAIL checkpoint"):
        PixelSailEngine.from_pretrained(tmp_path)


def test_device_and_dtype_resolution():
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_clicks_reach_the_model_as_visual_prompts(seg_engine, image_factory, monkeypatch):
    seen = []
    original = seg_engine.model.prefill

    def spy(**kwargs):
        seen.append(kwargs["visual_prompt_ids"])
        return original(**kwargs)

    monkeypatch.setattr(seg_engine.model, "prefill", spy)
    seg_engine.segment(image_factory(64, 96), points=[(70, 40)], boxes=[(0, 0, 20, 20)])
    ids = seen[0][0].cpu()
    grid_w = 96 // 16
    assert ids[1 + (40 // 16) * grid_w + 70 // 16] == 0  # the clicked patch carries <Prompt0>
    assert (ids == 0).sum() == 1 and (ids == 1).sum() == 4  # the box covers 2 × 2 patches with <Prompt1>
    seg_engine.segment(image_factory(64, 96), text="red circle")
    assert seen[1] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_half_precision_matches_cpu(tmp_path_factory, model_factory, scripted, tokenizer, config, image_factory):
    path = save_scripted(tmp_path_factory, model_factory, scripted, tokenizer, config, ["it", "is", "[SEG]", "."])
    gpu = PixelSailEngine.from_pretrained(path, device="auto", dtype="auto")
    assert gpu.device.type == "cuda" and gpu.dtype in (torch.bfloat16, torch.float16)
    cpu = PixelSailEngine.from_pretrained(path, device="cpu")
    image = image_factory(200, 150)
    a, b = gpu.segment(image, text="red circle", points=[(30, 40)]), cpu.segment(image, text="red circle", points=[(30, 40)])
    check_well_formed(a, 2, (200, 150))
    assert a.answers == b.answers
    agreement = (a.masks == b.masks).mean()
    assert agreement > 0.95


def test_close_releases_the_model(tmp_path_factory, model_factory, scripted, tokenizer, config, image_factory):
    path = save_scripted(tmp_path_factory, model_factory, scripted, tokenizer, config, ["it", "is", "[SEG]", "."])
    engine = PixelSailEngine.from_pretrained(path, device="cpu")
    engine.segment(image_factory(32, 32), text="red circle")
    engine.close()
    assert engine.model is None
