"""Manifest round trips (RLE, polygons, PNG), templates, error messages, the RefCOCO converter, the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixel_sail_ros.training.manifest import (
    NO_TARGET,
    ManifestError,
    decode_turn,
    encode_rle,
    load_image,
    load_manifest,
    refcoco_to_manifest,
    write_manifest,
)

H, W = 40, 60


def _masks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.zeros((H, W), bool)
    a[5:15, 5:20] = True
    b = np.zeros((H, W), bool)
    b[20:35, 30:55] = True
    c = np.zeros((H, W), bool)
    c[2:10, 40:58] = True
    return a, b, c


def _write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    a, b, c = _masks()
    _write_image(tmp_path / "images" / "one.png")
    Image.fromarray(c.astype(np.uint8) * 255).save(tmp_path / "c_mask.png")
    write_manifest(
        [
            {
                "image": "images/one.png",
                "turns": [
                    {"expression": "the red mug", "masks": [encode_rle(a)]},
                    {"expression": "the green kettle", "masks": []},
                    {"question": "Please segment both boxes in this image.", "answer": "They are [SEG] and [SEG].",
                     "masks": [[[30, 20, 55, 20, 55, 35, 30, 35]], "c_mask.png"]},
                    {"prompt": {"points": [[10, 8]]}, "answer": "a small red mug"},
                    {"prompt": {"boxes": [[30, 20, 55, 35]]}, "masks": [{"polygons": [[30, 20, 55, 20, 55, 35, 30, 35]]}]},
                    {"question": "What colour is <Prompt0>?", "answer": "red", "prompt": {"mask": encode_rle(a)}},
                ],
            }
        ],
        tmp_path / "train.jsonl",
    )
    return tmp_path


def _iou(x: np.ndarray, y: np.ndarray) -> float:
    return (x & y).sum() / max(1, (x | y).sum())


def test_round_trip_rle_polygon_png_and_templates(data_dir: Path):
    a, b, c = _masks()
    (rec,) = load_manifest(data_dir / "train.jsonl")
    assert rec.image == data_dir / "images" / "one.png"
    assert load_image(rec).shape == (H, W, 3)
    t = rec.turns
    assert t[0].question == "Please segment the red mug in this image." and t[0].answer == "It is [SEG]."
    assert t[1].answer == NO_TARGET and t[1].masks == []
    assert t[3].question == "Please describe the object marked by <Prompt0> briefly." and t[3].masks is None
    assert t[4].question == "Please segment the object marked by <Prompt0>." and t[4].answer == "It is [SEG]."
    m0, _ = decode_turn(t[0], H, W, data_dir)
    assert m0.shape == (1, H, W) and (m0[0] == a).all()  # RLE is exact
    m1, _ = decode_turn(t[1], H, W, data_dir)
    assert m1.shape == (0, H, W)
    m2, _ = decode_turn(t[2], H, W, data_dir)
    assert _iou(m2[0], b) > 0.85 and (m2[1] == c).all()  # polygon rasterised; PNG exact
    masks, prompt = decode_turn(t[5], H, W, data_dir)
    assert masks is None and (prompt["mask"] == a).all()
    assert decode_turn(t[3], H, W, data_dir)[1] == {"points": [[10, 8]]}


@pytest.mark.parametrize(
    "turn, message",
    [
        ({"expression": "x"}, r"turns\[0\]\.masks: an 'expression' turn needs masks"),
        ({"question": "q?", "answer": "It is [SEG].", "masks": []}, r"turns\[0\]\.answer: has 1 \[SEG\] but the turn has 0 masks"),
        ({"expression": "x", "masks": [[1, 2, 3, 4]]}, r"turns\[0\]\.masks\[0\]: polygon 0: a polygon needs at least 3 points"),
        ({"expression": "x", "masks": [{"counts": "abc"}]}, r"masks\[0\]: RLE needs 'size'"),
        ({"expression": "x", "masks": [7]}, r"masks\[0\]: a mask must be"),
        ({"prompt": {"scribble": []}, "answer": "a"}, r"turns\[0\]\.prompt: unknown prompt kind 'scribble'"),
        ({"question": "What is <Prompt0>?", "answer": "a"}, r"turns\[0\]\.prompt: the question names <PromptK>"),
        ({"question": "q", "masks": [[[0, 0, 5, 0, 5, 5]], [[0, 0, 5, 0, 5, 5]]]}, r"turns\[0\]\.answer: 2 masks need an answer"),
        ({"expression": "x", "masks": [], "colour": "red"}, r"unknown field\(s\) \['colour'\]"),
    ],
)
def test_structural_errors_name_line_and_field(tmp_path: Path, turn, message):
    _write_image(tmp_path / "i.png")
    path = tmp_path / "m.jsonl"
    path.write_text("# a comment\n\n" + json.dumps({"image": "i.png", "turns": [turn]}) + "\n")
    with pytest.raises(ManifestError, match=r"^m\.jsonl:3: " + ".*" + message):
        load_manifest(path)


def test_file_errors(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "missing.png", "turns": [{"expression": "x", "masks": []}]}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: image: file not found"):
        load_manifest(path)
    path.write_text('{"image": "i.png", "turns": [}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: invalid JSON"):
        load_manifest(path)
    _write_image(tmp_path / "i.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    path.write_text('{"image": "i.png", "turns": [{"expression": "x", "masks": ["small.png"]}, {"expression": "y", "masks": ["nope.png"]}]}\n')
    (rec,) = load_manifest(path)
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: turns\[0\]\.masks\[0\]: mask is 10x10 but the image is 60x40"):
        decode_turn(rec.turns[0], H, W, rec.base)
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: turns\[1\]\.masks\[0\]: mask file not found"):
        decode_turn(rec.turns[1], H, W, rec.base)


def test_refcoco_converter(tmp_path: Path):
    a, b, _ = _masks()
    _write_image(tmp_path / "coco" / "COCO_1.jpg")
    instances = {
        "images": [{"id": 1, "file_name": "COCO_1.jpg", "height": H, "width": W}],
        "annotations": [
            {"id": 10, "image_id": 1, "segmentation": [[5, 5, 20, 5, 20, 15, 5, 15]], "category_id": 1},
            {"id": 11, "image_id": 1, "segmentation": encode_rle(b), "category_id": 1},
        ],
    }
    refs = [
        {"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "train", "sentences": [{"sent": "left box"}, {"sent": "small one"}]},
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "val", "sentences": [{"sent": "big box"}]},
    ]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs(unc).json").write_text(json.dumps(refs))
    out = tmp_path / "out" / "train.jsonl"
    assert refcoco_to_manifest(tmp_path / "instances.json", tmp_path / "refs(unc).json", tmp_path / "coco", out, splits=["train"]) == 1
    (rec,) = load_manifest(out)
    assert [t.question for t in rec.turns] == ["Please segment left box in this image.", "Please segment small one in this image."]
    m, _ = decode_turn(rec.turns[0], H, W, rec.base)
    assert _iou(m[0], a) > 0.8
    refcoco_to_manifest(tmp_path / "instances.json", tmp_path / "refs(unc).json", tmp_path / "coco", out)
    recs = load_manifest(out)
    assert (decode_turn(recs[0].turns[2], H, W, tmp_path)[0][0] == b).all()
    (tmp_path / "refs(unc).p").write_bytes(b"\x80\x04")
    with pytest.raises(ManifestError, match="pickled refs are not loaded"):
        refcoco_to_manifest(tmp_path / "instances.json", tmp_path / "refs(unc).p", tmp_path / "coco", out)


def test_manifest_dataset_items_and_flip(data_dir: Path):
    from pixel_sail_ros.model.configuration_pixel_sail import PixelSailConfig
    from pixel_sail_ros.model.processing_pixel_sail import PixelSailProcessor
    from pixel_sail_ros.model.tokenization import build_tiny_tokenizer
    from pixel_sail_ros.training.data import ItemCollator, ManifestDataset

    cfg = PixelSailConfig.from_preset("tiny", max_image_size=64)
    proc = PixelSailProcessor.from_config(cfg, build_tiny_tokenizer())
    a, _, _ = _masks()
    plain = ManifestDataset(proc, data_dir / "train.jsonl", flip_prob=0.0)[0]
    flipped = ManifestDataset(proc, data_dir / "train.jsonl", flip_prob=1.0)[0]
    assert flipped.flipped and not plain.flipped
    assert (flipped.image == plain.image[:, ::-1]).all()
    assert (flipped.sequences[0].turns[0].masks[0] == a[:, ::-1]).all()
    # three plain turns share one prefix; the prompted ones are packed, numbered <Prompt0>, <Prompt1>...
    assert len(plain.sequences[0].turns) == 3 and not plain.sequences[0].prompts
    prompted = [t.question for s in plain.sequences[1:] for t in s.turns]
    assert len(prompted) == 3 and all("<Prompt" in q for q in prompted)
    batch = ItemCollator(proc)([plain, flipped])
    assert batch["input_ids"].shape[0] == 2 * len(plain.sequences)
    assert sum(m.shape[0] for m in batch["seg_masks"]) == 2 * 4  # [SEG] masks: 1 + 2 + 1 per image
