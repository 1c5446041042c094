"""Pixel-SAIL special tokens and the tiny word-level tokenizer of the bundled model.

The paper models use their base LLM's tokenizer (Qwen2.5) with the Pixel-SAIL tokens added
(:func:`add_pixel_sail_tokens`). The tiny model, trained on ShapesRef on a CPU, needs only a few hundred
words, so a lower-casing word-level tokenizer keeps its embedding table and softmax small.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

VISION_START = "<vision>"
VISION_PATCH = "<vpatch>"
VISION_END = "</vision>"
SEG = "[SEG]"
PHRASE_START = "<p>"
PHRASE_END = "</p>"
NUM_PROMPT_TOKENS = 15
PROMPT_TOKENS = tuple(f"<Prompt{k}>" for k in range(NUM_PROMPT_TOKENS))
NO_PROMPT = "<NO_Prompt>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"

# Added to any base tokenizer, in this order (the paper presets' default ids assume it).
PIXEL_SAIL_TOKENS = (VISION_START, VISION_PATCH, VISION_END, SEG, PHRASE_START, PHRASE_END, *PROMPT_TOKENS, NO_PROMPT)
# The tiny tokenizer's own specials come first, so their ids are small and stable.
TINY_SPECIAL_TOKENS = (PAD, UNK, ENDOFTEXT, IM_START, IM_END, *PIXEL_SAIL_TOKENS)

_TEMPLATE_WORDS = """
user assistant please segment in this image it is no target the object marked by describe briefly what
colour color shape size region picture area thing item select answer question correct choice not there
"""
_SHAPESREF_WORDS = """
red green blue yellow purple orange grey gray white black brown pink
circle square triangle star rectangle
small large big tiny medium
left right top bottom middle center centre leftmost rightmost topmost bottommost
on at of and or with to from near next above below behind front between
a an one two three four five six
"""
_ROBOT_WORDS = """
cup mug bottle box ball can bowl plate spoon fork knife book phone keyboard mouse laptop pen tool
hammer screwdriver wrench chair table door handle shelf drawer bag toy block cube cylinder apple banana
person hand robot gripper
"""
_PUNCTUATION = tuple(".,?!:;'\"()-/")
_DIGITS = tuple("0123456789")


def _base_words() -> list[str]:
    words: list[str] = []
    for chunk in (_TEMPLATE_WORDS, _SHAPESREF_WORDS, _ROBOT_WORDS):
        words.extend(chunk.split())
    words.extend(_PUNCTUATION)
    words.extend(_DIGITS)
    return words


def build_tiny_tokenizer(extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer covering the templates, the ShapesRef words and common robot words.

    "image." splits into "image" "." (whitespace, then punctuation and single digits isolated); special tokens
    are matched before lower-casing. Unknown words map to ``<unk>``. The ids are deterministic: specials,
    the built-in words, then ``extra_words`` (lower-cased, first occurrence wins).
    """
    vocab: dict[str, int] = {}
    for token in (*TINY_SPECIAL_TOKENS, *_base_words(), *(w.lower() for w in extra_words)):
        if token and token not in vocab:
            vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated"), pre_tokenizers.Digits(True)]
    )
    # Word-level decoding joins with spaces; the WordPiece decoder's cleanup removes the space before "." etc.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in TINY_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, eos_token=ENDOFTEXT)


def add_pixel_sail_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the Pixel-SAIL tokens a base tokenizer (e.g. Qwen2.5's) lacks; returns how many were added.

    Resize the model's embeddings to ``len(tokenizer)`` afterwards if the count is not zero.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in PIXEL_SAIL_TOKENS if t not in vocab]
    if not missing:
        return 0
    return tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in missing], special_tokens=True)


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of a token that must be a single vocabulary entry."""
    return _lookup(tokenizer.get_vocab(), token)


def _lookup(vocab: dict[str, int], token: str) -> int:
    if token not in vocab:
        raise ValueError(f"tokenizer has no {token!r} token; call add_pixel_sail_tokens(tokenizer) first")
    return int(vocab[token])


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The ``PixelSailConfig`` special-token fields for this tokenizer (pad falls back to ``<|endoftext|>``)."""
    vocab = tokenizer.get_vocab()  # once: a Qwen2.5 vocabulary is 150k entries
    eos = _lookup(vocab, ENDOFTEXT)
    return {
        "vision_start_token_id": _lookup(vocab, VISION_START),
        "vision_patch_token_id": _lookup(vocab, VISION_PATCH),
        "vision_end_token_id": _lookup(vocab, VISION_END),
        "seg_token_id": _lookup(vocab, SEG),
        "phrase_start_token_id": _lookup(vocab, PHRASE_START),
        "phrase_end_token_id": _lookup(vocab, PHRASE_END),
        "prompt_token_ids": [_lookup(vocab, t) for t in PROMPT_TOKENS],
        "no_prompt_token_id": _lookup(vocab, NO_PROMPT),
        "im_start_token_id": _lookup(vocab, IM_START),
        "im_end_token_id": _lookup(vocab, IM_END),
        "eos_token_id": eos,
        "pad_token_id": int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos,
    }


__all__ = [
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "NO_PROMPT",
    "PHRASE_END",
    "PHRASE_START",
    "PIXEL_SAIL_TOKENS",
    "PROMPT_TOKENS",
    "SEG",
    "VISION_END",
    "VISION_PATCH",
    "VISION_START",
    "add_pixel_sail_tokens",
    "build_tiny_tokenizer",
    "special_token_ids",
    "token_id",
]
