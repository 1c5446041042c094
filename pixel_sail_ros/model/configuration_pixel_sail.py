"""Pixel-SAIL configuration: one decoder-only transformer (Qwen2.5 text shape) plus the mask heads.

The decoder is transformers' own ``Qwen2_5_VLTextModel`` (its rotary already reproduces the authors' 3-axis
M-RoPE with ``mrope_section = [0, head_dim/4, head_dim/4]``), so its settings live in a nested
``Qwen2_5_VLTextConfig``; everything Pixel-SAIL adds (patching, visual prompts, mask heads, distillation,
special token ids) is a top-level field. See ``docs/pixel_sail_brief.md`` §1 for where each value comes from.
"""

from __future__ import annotations

import copy
import math
from dataclasses import fields
from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

MROPE_LAYOUTS = ("chunked", "interleaved")  # how the row/column rotary frequencies are laid out (rotary.py)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Qwen2.5 base vocabulary (embedding rows) and its own special token ids.
QWEN25_VOCAB_SIZE = 151936
QWEN25_ENDOFTEXT_ID = 151643
QWEN25_IM_START_ID = 151644
QWEN25_IM_END_ID = 151645


def _qwen25_special_ids(base: int = QWEN25_VOCAB_SIZE) -> dict[str, Any]:
    """Special token ids for a paper preset: the 22 Pixel-SAIL tokens appended after the Qwen2.5 vocabulary.

    The order is that of ``tokenization.PIXEL_SAIL_TOKENS``; a checkpoint made with a real tokenizer stores the
    tokenizer's own ids instead (``tokenization.special_token_ids``).
    """
    return {
        "vision_start_token_id": base,
        "vision_patch_token_id": base + 1,
        "vision_end_token_id": base + 2,
        "seg_token_id": base + 3,
        "phrase_start_token_id": base + 4,
        "phrase_end_token_id": base + 5,
        "prompt_token_ids": [base + 6 + k for k in range(15)],
        "no_prompt_token_id": base + 21,
        "im_start_token_id": QWEN25_IM_START_ID,
        "im_end_token_id": QWEN25_IM_END_ID,
        "eos_token_id": QWEN25_ENDOFTEXT_ID,
        "pad_token_id": QWEN25_ENDOFTEXT_ID,
    }


def _tiny_preset() -> dict[str, Any]:
    # Imported here: building the tiny tokenizer is cheap but the paper presets do not need it.
    from .tokenization import build_tiny_tokenizer, special_token_ids

    tokenizer = build_tiny_tokenizer()
    return {
        "text_config": {
            "vocab_size": len(tokenizer),
            "hidden_size": 256,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 768,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
        },
        "patch_size": 16,
        "max_image_size": 224,
        "seg_hidden_size": 128,
        "mask_output_stride": 4,
        "tie_word_embeddings": True,
        **special_token_ids(tokenizer),
    }


def _paper_preset(hidden: int, layers: int, heads: int, intermediate: int, tied: bool) -> dict[str, Any]:
    return {
        "text_config": {
            "vocab_size": QWEN25_VOCAB_SIZE + 22,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "intermediate_size": intermediate,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            # The authors' Qwen2MM config default; their checkpoints' value is unknown (brief §1.3).
            "rope_theta": 10000.0,
        },
        "patch_size": 16,
        "max_image_size": 1024,
        "seg_hidden_size": 512,
        "mask_output_stride": 2,
        "tie_word_embeddings": tied,
        **_qwen25_special_ids(),
    }


class PixelSailConfig(PreTrainedConfig):
    r"""Configuration of [`PixelSailForConditionalGeneration`].

    Args:
        text_config: the decoder (a `Qwen2_5_VLTextConfig` or a dict of its fields). Its rotary
            `mrope_section` defaults to `[0, head_dim/4, head_dim/4]` (the authors' split).
        patch_size: side P of the square raw-pixel patches (16 for the 0.5B/3B models).
        max_image_size: cap on the resized long side, a multiple of P (1024 in the paper).
        image_mean, image_std: per-channel normalisation (ImageNet).
        num_visual_prompts: number of `<Prompt k>` tokens usable as visual prompts (15).
        seg_hidden_size: D_seg, the channel size of [SEG] embeddings and per-pixel features (512).
        mask_output_stride: stride of the mask logits relative to the resized image; P/stride must be a
            power of two and gives the number of upsample blocks, log2(P/stride). The authors' code gives 2,
            the paper text 4.
        projector_max_dim: vision features wider than this go through `image_feature_pre_projector` first
            (1024 in the authors' code: 0.5B has none, 3B/7B have one).
        use_upsampler: False = the ablation baseline without learnable upsampling: per-patch features are
            projected and bilinearly interpolated to the mask resolution.
        visual_prompt_injection: False = the ablation baseline for visual prompts: instead of adding
            `vp_embed(E(<Prompt k>))` to the covered patches, the mean embedding of those patches is added
            to the `<Prompt k>` tokens of the text.
        visual_prompt_pooling: add the mean embedding of a prompt's patches to its `<Prompt k>` tokens.
            None (default) = exactly when there is no injection (the paper's two designs); True with
            injection = both, so the question's `<Prompt k>` token points at the region directly (at this
            project's scale injection alone learned clicks poorly: see the README's ablation).
        pixel_skip: add a zero-initialised linear of each stride-s cell's raw pixels (3·s·s values, cut from the
            same patches the transformer reads) to the upsampled features, before the projector. Not in the
            paper (off in its presets): a small model's patch states carry sub-patch boundaries poorly, and this
            gives the mask head the cell's own colour at no cost in the transformer. Zero-initialised, so a
            checkpoint without it loads unchanged and can be fine-tuned into it (``--model-overrides``).
        mrope_layout: "chunked" (the paper's: the row axis takes the first d/4 frequency slots, the fastest, and
            the column axis the next d/4, the slowest) or "interleaved" (rows and columns alternate, so both
            span all frequencies; see ``rotary.py``). Not in the paper: with the chunked layout and rope_theta
            1e4, a small model hardly tells its image columns apart. Text positions rotate identically in both,
            so only the image attention changes: a checkpoint trained with one layout needs fine-tuning into the
            other (``--model-overrides``).
        patch_positions: add a zero-initialised linear of Fourier features of each patch's centre, (row, column)
            normalised to the image, to its embedding. Not in the paper (off in its presets): rotary positions
            only reach attention scores, never the values, so a small model's image states hardly know where they
            are, and "the leftmost star" or "the red circle on the left" needs exactly that. Normalised, so one
            feature means "left edge" at every resolution. Zero-initialised, so a checkpoint without it loads
            unchanged and can be fine-tuned into it (``--model-overrides``).
        pixel_positions: add a zero-initialised linear of the same Fourier features, taken at each mask cell's
            centre, to the per-pixel mask features (after their projector). Not in the paper (off in its presets):
            a mask logit is the dot product of the [SEG] embedding with a pixel's features, and unless those
            features say where the pixel is, a query for "the leftmost star" can only pick a star, not the
            leftmost one; with them the query can add a place term to its logits. Zero-initialised, like
            ``patch_positions``.
        patch_stem: add a zero-initialised linear of a small convolutional stem's features to each patch's
            embedding: two stride-2 3×3 convolutions with GELU, run within each patch on the same pixels
            ``vis_embed`` reads. Not in the paper (off in its presets): one linear map of a patch's raw pixels
            must find a small object's corners wherever they fall in the patch, and early convolutions are the
            usual cure for that in vision transformers (on star-vs-triangle crops the size of ShapesRef's small
            objects it cut a linear embedding's errors from 5.2 % to 3.1 %). About 4 % more prefix work at the
            tiny preset. Zero-initialised, like ``patch_positions``.
        distill_pixel_dim, distill_token_dim: teacher channel sizes for the training-only distillation heads
            (0 = no head). The heads are never saved, and a saved config always has both set to 0.
        *_token_id: ids of the special tokens in the checkpoint's tokenizer.
    """

    model_type = "pixel_sail"
    sub_configs_defaults = {"text_config": Qwen2_5_VLTextConfig}
    keys_to_ignore_at_inference = ["past_key_values"]
    presets: ClassVar[tuple[str, ...]] = ("tiny", "0.5b", "3b")

    text_config: dict | PreTrainedConfig | None = None
    patch_size: int = 16
    max_image_size: int = 1024
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    num_visual_prompts: int = 15
    seg_hidden_size: int = 512
    mask_output_stride: int = 2
    projector_max_dim: int = 1024
    use_upsampler: bool = True
    visual_prompt_injection: bool = True
    visual_prompt_pooling: bool | None = None
    pixel_skip: bool = False
    mrope_layout: str = "chunked"
    patch_positions: bool = False
    pixel_positions: bool = False
    patch_stem: bool = False
    distill_pixel_dim: int = 0
    distill_token_dim: int = 0
    vision_start_token_id: int | None = None
    vision_patch_token_id: int | None = None
    vision_end_token_id: int | None = None
    seg_token_id: int | None = None
    phrase_start_token_id: int | None = None
    phrase_end_token_id: int | None = None
    prompt_token_ids: list[int] | None = None
    no_prompt_token_id: int | None = None
    im_start_token_id: int | None = None
    im_end_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.image_mean is None:
            self.image_mean = list(IMAGENET_MEAN)
        if self.image_std is None:
            self.image_std = list(IMAGENET_STD)
        super().__post_init__(**kwargs)
        text = self.text_config
        head_dim = text.hidden_size // text.num_attention_heads
        if head_dim % 4:
            raise ValueError(f"head_dim {head_dim} must be a multiple of 4 for the [0, d/4, d/4] M-RoPE split")
        rope = text.rope_parameters
        rope.setdefault("mrope_section", [0, head_dim // 4, head_dim // 4])
        if sum(rope["mrope_section"]) != head_dim // 2:
            raise ValueError(f"mrope_section {rope['mrope_section']} must sum to head_dim/2 = {head_dim // 2}")
        # The decoder's own copies, so that its embedding keeps the pad row and its cache/generation defaults agree.
        text.pad_token_id = self.pad_token_id
        text.eos_token_id = self.eos_token_id
        text.bos_token_id = None
        self._validate()

    def _validate(self) -> None:
        p, s = self.patch_size, self.mask_output_stride
        if p <= 0 or s <= 0 or p % s or (p // s) & (p // s - 1):
            raise ValueError(f"patch_size/mask_output_stride = {p}/{s} must be a power of two (>= 1)")
        if self.mrope_layout not in MROPE_LAYOUTS:
            raise ValueError(f"mrope_layout must be one of {MROPE_LAYOUTS}, got {self.mrope_layout!r}")
        section = self.text_config.rope_parameters.get("mrope_section")
        if self.mrope_layout == "interleaved" and (section[0] != 0 or section[1] != section[2]):
            raise ValueError(f"mrope_layout 'interleaved' needs mrope_section [0, k, k], got {section}")
        if self.pixel_skip and not self.use_upsampler:
            raise ValueError("pixel_skip adds to the upsampled features: it needs use_upsampler=True")
        if self.max_image_size < p or self.max_image_size % p:
            raise ValueError(f"max_image_size {self.max_image_size} must be a positive multiple of patch_size {p}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std need 3 values each (std > 0)")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) < self.num_visual_prompts:
            raise ValueError(
                f"prompt_token_ids has {len(self.prompt_token_ids)} ids for {self.num_visual_prompts} visual prompts"
            )

    @property
    def pools_visual_prompts(self) -> bool:
        """Whether prompt k's pooled patch embedding is added to the ``<Prompt k>`` tokens."""
        if self.visual_prompt_pooling is None:
            return not self.visual_prompt_injection
        return bool(self.visual_prompt_pooling)

    @property
    def num_upsample_blocks(self) -> int:
        """log2(P / stride): each block doubles the resolution of the patch grid."""
        return int(math.log2(self.patch_size // self.mask_output_stride))

    @property
    def vision_feature_dim(self) -> int:
        """Channels entering the upsampler: the hidden size, capped by the pre-projector."""
        return min(self.text_config.hidden_size, self.projector_max_dim)

    def special_ids(self) -> dict[str, Any]:
        """The special token id fields, e.g. to compare with a tokenizer's."""
        names = [f.name for f in fields(self) if f.name.endswith("_token_id") or f.name == "prompt_token_ids"]
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PixelSailConfig:
        """Build a preset: "tiny" (tests, the bundled CPU model), "0.5b" / "3b" (the paper's Qwen2.5 shapes).

        Overrides may name top-level fields or decoder fields (e.g. ``num_hidden_layers=2``); a ``text_config``
        dict is merged into the preset's. Both paper presets tie the LM head to the embeddings, as Qwen2.5-0.5B
        and Qwen2.5-3B do (the converter unties when an authors' checkpoint holds a different head).
        """
        key = name.lower()
        if key == "tiny":
            preset = _tiny_preset()
        elif key in ("0.5b", "0_5b", "05b"):
            preset = _paper_preset(896, 24, 14, 4864, tied=True)
        elif key == "3b":
            preset = _paper_preset(2048, 36, 16, 11008, tied=True)
        else:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.presets)}")
        text = dict(preset.pop("text_config"))
        text.update(overrides.pop("text_config", None) or {})
        top_names = {f.name for f in fields(cls)}
        text_names = {f.name for f in fields(Qwen2_5_VLTextConfig)} | {"rope_theta"}
        for field_name, value in overrides.items():
            if field_name in top_names:
                preset[field_name] = value
            elif field_name in text_names:
                text[field_name] = value
            else:
                raise ValueError(f"unknown PixelSailConfig/text_config field {field_name!r}")
        # The decoder's token ids mirror the top-level ones (set here too, so its own checks see them at once).
        text.update(bos_token_id=None, eos_token_id=preset["eos_token_id"], pad_token_id=preset["pad_token_id"])
        return cls(text_config=copy.deepcopy(text), **preset)


AutoConfig.register(PixelSailConfig.model_type, PixelSailConfig, exist_ok=True)

__all__ = ["PixelSailConfig", "IMAGENET_MEAN", "IMAGENET_STD"]
