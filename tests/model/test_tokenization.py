"""The tiny word-level tokenizer and the Pixel-SAIL special tokens."""

from __future__ import annotations

import itertools

from transformers import AutoTokenizer

from pixel_sail_ros.model import processing_pixel_sail as templates
from pixel_sail_ros.model.tokenization import (
    PIXEL_SAIL_TOKENS,
    PROMPT_TOKENS,
    TINY_SPECIAL_TOKENS,
    add_pixel_sail_tokens,
    build_tiny_tokenizer,
    special_token_ids,
)

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")


def shapesref_expressions():
    for colour, shape in itertools.product(COLOURS, SHAPES):
        yield f"{colour} {shape}"
        yield f"the small {colour} {shape}"
        yield f"large {shape}"
        yield f"{colour} {shape} on the left"
        yield f"{colour} {shape} at the bottom"
    for where, shape in itertools.product(("leftmost", "rightmost", "topmost", "bottommost"), SHAPES):
        yield f"the {where} {shape}"


def test_punctuation_splits_and_lowercases(tokenizer):
    ids = tokenizer.encode("The Image.", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["the", "image", "."]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("12", add_special_tokens=False)) == ["1", "2"]


def test_special_tokens_are_single_ids_and_not_lowercased(tokenizer):
    for token in TINY_SPECIAL_TOKENS:
        ids = tokenizer.encode(f"x{token}y", add_special_tokens=False)
        assert tokenizer.convert_ids_to_tokens(ids)[1] == token
    assert len(set(tokenizer.convert_tokens_to_ids(list(TINY_SPECIAL_TOKENS)))) == len(TINY_SPECIAL_TOKENS)
    ids = special_token_ids(tokenizer)
    assert ids["prompt_token_ids"] == tokenizer.convert_tokens_to_ids(list(PROMPT_TOKENS))
    assert ids["pad_token_id"] != ids["eos_token_id"]


def test_templates_and_shapesref_words_have_no_unknown_tokens(tokenizer):
    unk = tokenizer.unk_token_id
    texts = [templates.SEG_ANSWER, templates.NO_TARGET_ANSWER, "a small red circle", "a large purple star"]
    for expr in shapesref_expressions():
        texts += [templates.refer_seg_question(expr), templates.refer_describe_question(expr)]
    for k in range(15):
        texts += [templates.vp_seg_question(k), templates.vp_describe_question(k)]
        texts += [templates.vp_attribute_question(a, k) for a in ("colour", "shape", "size")]
    for text in texts:
        ids = tokenizer.encode(templates.USER_TURN_TEMPLATE.format(question=text), add_special_tokens=False)
        assert unk not in ids, text
    assert unk in tokenizer.encode("zebra", add_special_tokens=False)


def test_decode_skips_special_tokens_and_cleans_spaces(tokenizer):
    ids = tokenizer.encode("It is [SEG].<|endoftext|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "it is."


def test_extra_words_extend_the_vocabulary_deterministically():
    base = build_tiny_tokenizer()
    extended = build_tiny_tokenizer(extra_words=["Zebra", "zebra", "giraffe"])
    assert len(extended) == len(base) + 2
    assert extended.convert_tokens_to_ids("zebra") == len(base)
    assert build_tiny_tokenizer().get_vocab() == base.get_vocab()


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "<|im_start|>user\nPlease segment the red circle in this image.<|im_end|>\nIt is [SEG].<|endoftext|>"
    assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert special_token_ids(loaded) == special_token_ids(tokenizer)


def test_add_pixel_sail_tokens_to_a_base_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<|endoftext|>": 1, "<|im_start|>": 2, "<|im_end|>": 3, "hi": 4}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    base = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>")
    assert add_pixel_sail_tokens(base) == len(PIXEL_SAIL_TOKENS)
    assert add_pixel_sail_tokens(base) == 0
    ids = special_token_ids(base)
    assert ids["vision_start_token_id"] == 5 and ids["no_prompt_token_id"] == 5 + len(PIXEL_SAIL_TOKENS) - 1
    assert ids["pad_token_id"] == ids["eos_token_id"] == 1
