"""PixelSailProcessor: resize rule, patch order, visual prompts, sequence layout, collate, mask post-processing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pixel_sail_ros.model.processing_pixel_sail import (
    NO_TARGET_ANSWER,
    SEG_ANSWER,
    PixelSailProcessor,
    Turn,
    refer_seg_question,
    vp_seg_question,
)
from pixel_sail_ros.model.tokenization import build_tiny_tokenizer


@pytest.fixture(scope="module")
def paper_processor() -> PixelSailProcessor:
    """Paper settings (P 16, long side ≤ 1024) on the tiny tokenizer."""
    return PixelSailProcessor(build_tiny_tokenizer(), patch_size=16, max_image_size=1024)


@pytest.mark.parametrize(
    ("size", "expected"),
    [((480, 640), (480, 640)), ((1000, 2000), (512, 1024)), ((700, 1000), (720, 1008)), ((5, 10), (16, 16)), ((3000, 40), (1024, 16))],
)
def test_target_size_paper_rule(paper_processor, size, expected):
    assert paper_processor.target_size(*size) == expected


def test_target_size_tiny_cap(processor):
    assert processor.target_size(480, 640) == (176, 224)
    assert processor.target_size(640, 480) == (224, 176)
    assert processor.target_size(160, 160) == (160, 160)


@settings(max_examples=200, deadline=None, database=None)
@given(height=st.integers(1, 5000), width=st.integers(1, 5000))
def test_target_size_properties(paper_processor, height, width):
    th, tw = paper_processor.target_size(height, width)
    p = 16
    assert th % p == 0 and tw % p == 0 and 0 < th <= 1024 and 0 < tw <= 1024
    # the long side is rounded up to a multiple of P (never further), then capped; the short side follows the
    # long side's scale and is rounded up: the aspect ratio holds within one patch
    long_side, short_side = max(height, width), min(height, width)
    long_t, short_t = (th, tw) if height >= width else (tw, th)
    assert long_t == min(math.ceil(long_side / p) * p, 1024)
    assert short_t - p < short_side * long_t / long_side <= short_t


def test_patches_are_row_major_in_channel_height_width_order(processor, image_factory):
    p = processor.patch_size
    image = image_factory(2 * p, 3 * p)  # already a multiple of P: no resize
    inputs = processor.preprocess_image(image)
    assert inputs.grid_hw == (2, 3) and inputs.resized_hw == (2 * p, 3 * p) and inputs.pixel_values.shape == (6, 3 * p * p)
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    for index in range(6):
        r, c = divmod(index, 3)
        patch = torch.from_numpy(image[r * p : (r + 1) * p, c * p : (c + 1) * p]).permute(2, 0, 1).float() / 255.0
        expected = ((patch - mean) / std).reshape(-1)
        torch.testing.assert_close(inputs.pixel_values[index], expected, rtol=1e-5, atol=1e-5)


def test_preprocess_resizes_and_rejects_bad_images(processor, image_factory):
    inputs = processor.preprocess_image(image_factory(300, 500))
    assert inputs.original_hw == (300, 500) and inputs.resized_hw == (144, 224) and inputs.grid_hw == (9, 14)
    flat = np.full((50, 50, 3), 128, dtype=np.uint8)
    values = processor.preprocess_image(flat).pixel_values.view(-1, 3, 16 * 16)
    expected = (128 / 255 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    torch.testing.assert_close(values.mean(dim=(0, 2)), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        processor.preprocess_image(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        processor.preprocess_image(np.zeros((10, 10), dtype=np.uint8))


@pytest.mark.parametrize("size", [(480, 640), (720, 1280), (37, 301)])
def test_resize_gives_grey_levels_within_one_of_the_float_resize(processor, size):
    """The resized image is an 8-bit image, as the camera's was, within one grey level of float antialiased
    bilinear resizing (the CPU uses torch's uint8 kernel; other devices round the float one)."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    image[: size[0] // 2] = 255  # a saturated half: resizing must not overflow
    inputs = processor.preprocess_image(image)
    p, (gh, gw) = processor.patch_size, inputs.grid_hw
    mean = torch.tensor(processor.image_mean).view(3, 1, 1, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1, 1, 1)
    grey = (inputs.pixel_values.view(gh, gw, 3, p, p).permute(2, 0, 3, 1, 4) * std + mean) * 255.0
    grey = grey.reshape(3, gh * p, gw * p)
    torch.testing.assert_close(grey, grey.round(), rtol=0, atol=2e-3)  # whole grey levels
    reference = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(),
                                                size=inputs.resized_hw, mode="bilinear", align_corners=False,
                                                antialias=True)[0].clamp(0, 255)
    assert (grey - reference).abs().max() <= 1.0 + 2e-3
    assert grey.min() >= -2e-3 and grey.max() <= 255 + 2e-3


def test_point_box_and_mask_prompts_cover_the_right_patches(processor):
    original, grid = (100, 200), (5, 10)  # 20 px per patch in the original image
    point = processor.prompt_coverage((45.0, 61.0), original, grid)
    assert point.sum() == 1 and point[3, 2]
    box = processor.prompt_coverage((30, 10, 70, 50), original, grid)
    assert box.sum() == 3 * 3 and box[0:3, 1:4].all()
    mask = np.zeros(original, dtype=bool)
    mask[99, 199] = True
    mask[0, 0] = True
    covered = processor.prompt_coverage(mask, original, grid)
    assert covered.sum() == 2 and covered[0, 0] and covered[4, 9]
    with pytest.raises(ValueError, match="mask prompt"):
        processor.prompt_coverage(np.zeros((10, 10), dtype=bool), original, grid)
    with pytest.raises(ValueError, match="point"):
        processor.prompt_coverage((1, 2, 3), original, grid)


def test_visual_prompt_map_later_prompts_win(processor):
    prompt_map = processor.visual_prompt_map((100, 100), (5, 5), [(0, 0, 60, 60), (50, 50)], indices=[3, 7])
    assert prompt_map.dtype == torch.long and prompt_map.shape == (5, 5)
    assert prompt_map[2, 2] == 7 and prompt_map[0, 0] == 3 and prompt_map[4, 4] == -1
    assert (prompt_map == 3).sum() == 8
    with pytest.raises(ValueError, match="outside"):
        processor.visual_prompt_map((100, 100), (5, 5), [(1, 1)], indices=[15])


def test_build_sequence_layout_positions_mask_and_labels(processor, tokenizer, image_factory):
    image = processor.preprocess_image(image_factory(48, 64))  # grid 3 × 4
    prompt_map = processor.visual_prompt_map(image.original_hw, image.grid_hw, [(5, 5)])
    sample = processor.build_sequence(
        image, [Turn(refer_seg_question("red circle"), SEG_ANSWER), Turn(vp_seg_question(0), NO_TARGET_ANSWER)], prompt_map
    )
    ids, pos, mask = sample["input_ids"], sample["position_ids"], sample["attention_mask"]
    n, prefix_len = 12, 14
    assert ids[0] == processor.vision_start_id and ids[prefix_len - 1] == processor.vision_end_id
    assert (ids[1 : 1 + n] == processor.vision_patch_id).all()
    # positions: <vision> 0; patch (r, c) → (1, 1 + r, 1 + c); </vision> max + 1; text continues per turn
    assert pos[:, 0].tolist() == [0, 0, 0]
    assert pos[:, 1 + 1 * 4 + 2].tolist() == [1, 2, 3]
    assert pos[:, prefix_len - 1].tolist() == [5, 5, 5]
    (s0, e0), (s1, e1) = sample["turn_spans"].tolist()
    assert s0 == prefix_len and e1 == ids.shape[0]
    assert pos[:, s0].tolist() == [6, 6, 6] and pos[:, s1].tolist() == [6, 6, 6]
    assert (pos[0, s1:e1] == torch.arange(6, 6 + e1 - s1)).all()
    # mask: image block bidirectional and blind to text; each turn sees the image and itself causally
    assert mask[:prefix_len, :prefix_len].all() and not mask[:prefix_len, prefix_len:].any()
    assert mask[s0:, :prefix_len].all()
    assert not mask[s1:e1, s0:e0].any() and not mask[s0:e0, s1:e1].any()
    assert torch.equal(mask[s1:e1, s1:e1], torch.ones(e1 - s1, e1 - s1, dtype=torch.bool).tril())
    # labels: only the answers and their closing <|endoftext|>
    labelled = (sample["labels"] != -100).nonzero().flatten().tolist()
    answer = tokenizer.encode(SEG_ANSWER, add_special_tokens=False) + [processor.eos_id]
    no_target = tokenizer.encode(NO_TARGET_ANSWER, add_special_tokens=False) + [processor.eos_id]
    assert sample["labels"][labelled].tolist() == answer + no_target
    assert labelled == list(range(e0 - len(answer), e0)) + list(range(e1 - len(no_target), e1))
    # visual prompts only on the covered patch; [SEG] bookkeeping
    assert sample["visual_prompt_ids"].tolist().count(0) == 1 and sample["visual_prompt_ids"][1] == 0
    assert sample["seg_turn_ids"].tolist() == [0]
    assert sample["seg_masks"] is None


def test_build_sequence_masks_bookkeeping_and_errors(processor, image_factory):
    image = processor.preprocess_image(image_factory(40, 40))
    gt = np.zeros((40, 40), dtype=bool)
    gt[5:10, 5:10] = True
    sample = processor.build_sequence(
        image, [Turn("a", NO_TARGET_ANSWER, []), Turn("b", "It is [SEG] and [SEG].", [gt, ~gt])]
    )
    assert sample["seg_turn_ids"].tolist() == [1, 1]
    assert sample["seg_masks"].shape == (2, 40, 40) and sample["seg_masks"][0].sum() == 25
    with pytest.raises(ValueError, match="1 \\[SEG\\] but 2 masks"):
        processor.build_sequence(image, [Turn("a", SEG_ANSWER, [gt, gt])])
    with pytest.raises(ValueError, match="must not contain"):
        processor.build_sequence(image, [Turn("segment [SEG]", SEG_ANSWER)])
    question_only = processor.build_sequence(image, ["Please segment the red circle in this image."])
    assert (question_only["labels"] == -100).all()


def test_collate_pads_without_empty_attention_rows(processor, image_factory):
    short = processor.build_sequence(processor.preprocess_image(image_factory(32, 32)), [Turn("a", SEG_ANSWER)])
    long = processor.build_sequence(processor.preprocess_image(image_factory(64, 96)), [Turn("a b c", SEG_ANSWER)] * 2)
    batch = processor.collate([short, long])
    length = long["input_ids"].shape[0]
    n = short["input_ids"].shape[0]
    assert batch["input_ids"].shape == (2, length) and batch["attention_mask"].shape == (2, 1, length, length)
    assert batch["pixel_values"].shape == (2, 24, 768) and batch["position_ids"].shape == (3, 2, length)
    assert (batch["input_ids"][0, n:] == processor.pad_id).all() and (batch["labels"][0, n:] == -100).all()
    assert batch["attention_mask"].any(dim=-1).all()
    assert torch.equal(batch["attention_mask"][0, 0, n:, n:], torch.eye(length - n, dtype=torch.bool))
    assert not batch["attention_mask"][0, 0, :n, n:].any()
    assert (batch["pixel_values"][0, 4:] == 0).all()
    assert batch["image_grid_hw"].tolist() == [[2, 2], [4, 6]]
    assert set(processor.model_inputs(batch)) == {
        "input_ids", "pixel_values", "image_grid_hw", "visual_prompt_ids", "position_ids", "attention_mask"
    }


def test_postprocess_masks_resizes_and_thresholds(processor):
    logits = torch.full((2, 4, 4), -5.0)
    logits[0, :2, :2] = 5.0
    logits[1] = 0.0  # probability exactly 0.5 is not above the threshold
    masks = processor.postprocess_masks(logits, (40, 30), threshold=0.5)
    assert masks.dtype == torch.bool and masks.shape == (2, 40, 30)
    assert masks[0, :15, :10].all() and not masks[0, 25:, :].any() and not masks[1].any()
    assert processor.postprocess_masks(torch.zeros(0, 4, 4), (7, 9)).shape == (0, 7, 9)
    lower = processor.postprocess_masks(logits, (40, 30), threshold=0.4)
    assert lower[1].all()
    with pytest.raises(ValueError, match="threshold"):
        processor.postprocess_masks(logits, (40, 30), threshold=1.0)


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = PixelSailProcessor.from_pretrained(tmp_path)
    for name in ("patch_size", "max_image_size", "image_mean", "image_std", "num_visual_prompts", "mask_output_stride"):
        assert getattr(loaded, name) == getattr(processor, name)
    assert loaded.encode_question("red star") == processor.encode_question("red star")
