"""pixel-sail-convert: an authors'-layout state dict (brief §3) of a random tiny model converts exactly."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from pixel_sail_ros.model.convert import convert_checkpoint, main
from pixel_sail_ros.model.modeling_pixel_sail import PixelSailForConditionalGeneration
from pixel_sail_ros.model.processing_pixel_sail import PixelSailProcessor, Turn, SEG_ANSWER, vp_seg_question

OURS_TO_AUTHORS = (
    ("vis_embed.", "single_transformer.model.vis_embed."),
    ("vp_embed.", "single_transformer.model.vp_embed."),
    ("model.", "single_transformer.model."),
    ("lm_head.", "single_transformer.lm_head."),
)


def authors_state_dict(model: PixelSailForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The layout of the authors' Sa2VASTModel: LLM under single_transformer, a separate lm_head, and a few
    training-only tensors (teacher, distillation linear, rotary buffer) that conversion must drop."""
    out = {}
    for key, tensor in model.state_dict().items():
        for ours, theirs in OURS_TO_AUTHORS:
            if key.startswith(ours):
                key = theirs + key.removeprefix(ours)
                break
        out[key] = tensor.clone()
    out["mask2former_distill_linear.weight"] = torch.randn(256, model.config.seg_hidden_size)
    out["sam2_model.image_encoder.trunk.pos_embed"] = torch.randn(1, 8, 4, 4)
    out["single_transformer.model.rotary_emb.inv_freq"] = torch.randn(32)
    return out


def outputs(model, processor, image):
    inputs = processor.preprocess_image(image)
    prompt_map = processor.visual_prompt_map(inputs.original_hw, inputs.grid_hw, [(9.0, 30.0)])
    sample = processor.build_sequence(inputs, [Turn(vp_seg_question(0), SEG_ANSWER)], prompt_map)
    with torch.no_grad():
        return model(**processor.model_inputs(processor.collate([sample])))


@pytest.fixture()
def source_model(model_factory):
    # Not the preset's depth or stride: conversion must read both from the weights.
    return model_factory(7, num_hidden_layers=2, mask_output_stride=2)


def test_pth_in_authors_layout_converts_exactly(source_model, image_factory, tmp_path, capsys):
    pth = tmp_path / "iter_100.pth"
    torch.save({"meta": {"iter": 100}, "state_dict": authors_state_dict(source_model)}, pth)
    assert main([str(pth), str(tmp_path / "out")]) == 0
    assert "2 layers" in capsys.readouterr().out

    out_dir = tmp_path / "out"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out_dir.iterdir()}
    config = json.loads((out_dir / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 2 and config["mask_output_stride"] == 2
    converted = PixelSailForConditionalGeneration.from_pretrained(out_dir).eval()
    for key, tensor in source_model.state_dict().items():
        assert torch.equal(tensor, converted.state_dict()[key]), key
    processor = PixelSailProcessor.from_pretrained(out_dir)
    image = image_factory(70, 90)
    a, b = outputs(source_model, processor, image), outputs(converted, processor, image)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mask_logits[0], b.mask_logits[0])


def test_separate_lm_head_unties_and_safetensors_source(source_model, image_factory, tmp_path):
    with torch.no_grad():
        untied = authors_state_dict(source_model)
        untied["single_transformer.lm_head.weight"] = torch.randn_like(untied["single_transformer.lm_head.weight"])
    save_file({k: v.contiguous() for k, v in untied.items()}, str(tmp_path / "weights.safetensors"))
    config = convert_checkpoint(tmp_path / "weights.safetensors", tmp_path / "out")
    assert config.tie_word_embeddings is False
    converted = PixelSailForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert torch.equal(converted.lm_head.weight, untied["single_transformer.lm_head.weight"])
    assert not torch.equal(converted.lm_head.weight, converted.model.embed_tokens.weight)


def test_problems_are_named(source_model, tmp_path, capsys):
    state = authors_state_dict(source_model)
    del state["upsample_blocks.0.2.pointwise.weight"]
    state["single_transformer.model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    state["extra_head.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pth")
    assert main([str(tmp_path / "bad.pth"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "missing keys: upsample_blocks.0.2.pointwise.weight" in error
    assert "unexpected keys: extra_head.weight" in error
    assert "model.layers.0.mlp.up_proj.weight: checkpoint (3, 3)" in error
    assert not (tmp_path / "out" / "model.safetensors").exists()


class _Marker:
    """Unpickling this would create a file: the converter must refuse it without executing anything."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def test_pickled_objects_are_refused_not_executed(source_model, tmp_path, capsys):
    marker = tmp_path / "executed"
    torch.save({"state_dict": authors_state_dict(source_model), "hook": _Marker(marker)}, tmp_path / "evil.pth")
    assert main([str(tmp_path / "evil.pth"), str(tmp_path / "out")]) == 2
    assert "weights_only" in capsys.readouterr().err
    assert not marker.exists()


def test_wrong_tokenizer_size_is_refused(model_factory, tmp_path, capsys):
    model = model_factory(8, vocab_size=500)  # more rows than the tiny tokenizer, e.g. an authors' 0.5B
    torch.save(authors_state_dict(model), tmp_path / "w.pth")
    assert main([str(tmp_path / "w.pth"), str(tmp_path / "out"), "--preset", "tiny"]) == 0  # tiny tokenizer fits in 500
    small = model_factory(9, vocab_size=100)
    torch.save(authors_state_dict(small), tmp_path / "s.pth")
    assert main([str(tmp_path / "s.pth"), str(tmp_path / "out2")]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_base_tokenizer_gets_the_pixel_sail_tokens(model_factory, image_factory, tmp_path):
    """The paper-preset path: a base LLM tokenizer (here a small stand-in for Qwen2.5's) given with --tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pixel_sail_ros.model.tokenization import add_pixel_sail_tokens, special_token_ids

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "please", "segment", "the", "red", "circle", "in", "this", "image", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    base = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>")
    base.save_pretrained(str(tmp_path / "base_tokenizer"))
    add_pixel_sail_tokens(base)
    source = model_factory(13, vocab_size=64, **special_token_ids(base))  # embedding rows beyond the tokenizer, as Qwen's
    torch.save(authors_state_dict(source), tmp_path / "w.pth")
    assert main([str(tmp_path / "w.pth"), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "base_tokenizer")]) == 0
    converted = PixelSailForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert converted.config.special_ids() == special_token_ids(base) and converted.config.pad_token_id == 0
    processor = PixelSailProcessor.from_pretrained(tmp_path / "out")
    image = image_factory(40, 56)
    a, b = outputs(source, processor, image), outputs(converted, processor, image)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mask_logits[0], b.mask_logits[0])
