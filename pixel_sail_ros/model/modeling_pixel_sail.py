"""Pixel-SAIL: one decoder-only transformer over raw image patches and text, plus a light mask decoder.

Layout (brief §1): patch slots embed as E(<vpatch>) + vis_embed(pixels) (+ vp_embed(E(<Prompt k>)) where a
visual prompt covers the patch); the decoder is transformers' ``Qwen2_5_VLTextModel`` fed those embeddings,
3-axis (t, h, w) positions and a 4-D boolean "prefix" mask (bidirectional over <vision>…</vision>, causal
elsewhere). Mask logits = seg_token_projector(h[SEG]) · image_feature_projector(upsample(h[<vpatch>])).

Module names follow the authors' code so that converting their checkpoint is a rename (``convert.py``).
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForImageTextToText, DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, StaticCache
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel
from transformers.utils import ModelOutput

from .compiled_image import CompiledImagePasses
from .configuration_pixel_sail import PixelSailConfig
from .rotary import InterleavedMRotaryEmbedding
from .static_decoding import StaticDecoding

# The SDPA kernels the decoder may use on CUDA. cuDNN's fused attention (PyTorch's first choice on Hopper) builds
# a graph for every new shape, reported at ~0.4 s each; here shapes change all the time (each image size, prompt
# length and decode step; every training batch), so it is left out. The memory-efficient kernel takes the boolean
# prefix mask; the math kernel is the fallback.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _attention_kernels(embeds: torch.Tensor) -> contextlib.AbstractContextManager:
    """The decoder's SDPA kernel choice for tensors like ``embeds`` (CUDA_SDPA_BACKENDS on CUDA)."""
    return sdpa_kernel(CUDA_SDPA_BACKENDS) if embeds.is_cuda else contextlib.nullcontext()

_DISTILL_KEYS = tuple(f"distill_{kind}_head.{p}" for kind in ("pixel", "token") for p in ("weight", "bias"))


@dataclass
class PixelSailOutput(ModelOutput):
    """Output of :meth:`PixelSailForConditionalGeneration.forward`.

    Per-sample lists hold ``None`` for a sample without image tokens in this call (e.g. a decoding step).
    ``mask_logits[b]`` is (n_seg_b, H_b/s, W_b/s), with the [SEG] tokens in sequence order.
    """

    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    mask_logits: list[torch.Tensor | None] | None = None
    pixel_features: list[torch.Tensor | None] | None = None
    seg_embeddings: list[torch.Tensor] | None = None
    distill_pixel: list[torch.Tensor | None] | None = None
    distill_token: list[torch.Tensor | None] | None = None
    past_key_values: Cache | None = None
    visual_prompt_features: torch.Tensor | None = None  # (B, K, hidden), pooled prompts (config.pools_visual_prompts)


@dataclass
class PixelSailPrefix:
    """An image prefix (<vision>…</vision>) computed once: its KV cache and last-layer patch states.

    The per-pixel features are decoded from the patch states on first use and kept: an answer without a
    [SEG] ("No target.", a description) never pays for the upsampler, which costs a large share of a
    small model's prefill.
    """

    past_key_values: Cache  # a DynamicCache, or StaticDecoding's cache
    vision_tokens: torch.Tensor  # (h, w, hidden) last-layer states of the <vpatch> tokens
    length: int  # tokens in the cache
    next_position: int  # first position id after </vision> (all three axes)
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    visual_prompt_features: torch.Tensor | None = None  # (1, K, hidden), only when config.pools_visual_prompts
    decoding: StaticDecoding | None = field(default=None, repr=False)  # holder of the static cache, if any
    decoding_generation: int = 0  # which of its prefills this is (a later one overwrites the cache)
    first_turn: _FirstTurn | None = field(default=None, repr=False)  # a turn read with the image (prefill)
    _pixel_features: torch.Tensor | None = field(default=None, repr=False)

    @property
    def pixel_features(self) -> torch.Tensor:
        """(D_seg, H/s, W/s) per-pixel features, decoded on first access."""
        if self._pixel_features is None:
            if self.decoder is None:
                raise ValueError("this prefix has no pixel decoder to compute its features with")
            with torch.no_grad():
                self._pixel_features = self.decoder(self.vision_tokens.unsqueeze(0))[0]
        return self._pixel_features

    @property
    def pixel_features_decoded(self) -> bool:
        return self._pixel_features is not None


@dataclass
class _FirstTurn:
    """The start of the first answer's turn, read in the prefix's own decoder pass (``prefill(first_turn_ids=...)``):
    its tokens, their last-layer states and the logits of its last rows. Its cache entries follow the prefix's."""

    token_ids: list[int]
    hidden: torch.Tensor  # (q, C)
    logits: torch.Tensor  # (logits_to_keep, V)


@dataclass
class PixelSailAnswer:
    """One greedy answer after a prefix: its tokens (stop token excluded) and the masks of its [SEG] tokens."""

    token_ids: list[int]
    seg_embeddings: torch.Tensor  # (n_seg, D_seg)
    mask_logits: torch.Tensor  # (n_seg, H/s, W/s)
    seg_token_probs: torch.Tensor  # (n_seg,) softmax probability with which each [SEG] was chosen
    stopped: bool  # ended on a stop token (False: max_new_tokens reached)
    step_logits: torch.Tensor | None = None  # (steps, vocab), when asked for
    passes: int = 0  # decoder passes the answer took (a fully accepted draft: one)
    with_prefix: bool = False  # its first pass was the prefix's own (prefill's first_turn_ids)
    drafted: int = 0  # how many draft tokens were fed with the question (the draft, cut at max_new_tokens)
    draft_accepted: int = 0  # how many of them greedy decoding confirmed


class PixelSailChannelNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (the authors' ``Norm2d``: key ``ln``)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PixelSailSeparableConv(nn.Module):
    """Depthwise 3×3 then pointwise 1×1 convolution (the authors' ``DWconv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


PATCH_STEM_CHANNELS = (16, 32)


def stride2_side(side: int) -> int:
    """Side of a map after one of the stem's stride-2 3×3 convolutions with padding 1."""
    return (side - 1) // 2 + 1


def patch_stem_side(patch_size: int) -> int:
    """Side of the stem's output map: two stride-2 convolutions."""
    return stride2_side(stride2_side(patch_size))


class PixelSailPatchStem(nn.Module):
    """Two stride-2 3×3 convolutions (GELU after each) within each patch, flattened, then a linear to the hidden
    size; ``proj`` starts at zero (``config.patch_stem``)."""

    def __init__(self, patch_size: int, hidden: int, channels: Sequence[int] = PATCH_STEM_CHANNELS) -> None:
        super().__init__()
        c1, c2 = channels
        self.patch_size = int(patch_size)
        self.convs = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1), nn.GELU(),
        )
        self.proj = nn.Linear(c2 * patch_stem_side(self.patch_size) ** 2, hidden, bias=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, 3·P·P) patch rows, channel-first like the processor's → (N, hidden)."""
        p = self.patch_size
        return self.proj(self.convs(rows.reshape(-1, 3, p, p)).flatten(1))


PATCH_POSITION_OCTAVES = 6  # Fourier frequencies π·2^k, k < 6: from half the image to ~1/64 of it


def patch_position_features_dim() -> int:
    return 2 + 4 * PATCH_POSITION_OCTAVES


def patch_position_features(index: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Fourier features of the centre of patch number ``index`` (row-major) in an h×w grid, normalised to [0, 1].

    ``index`` is (B, N), ``h``/``w`` (B, 1). Returns (B, N, 2 + 4·octaves) float32: (x − ½, y − ½), then sin and cos
    of π·2^k·x and of π·2^k·y. Normalised, so the same feature marks "left edge" or "top" at any resolution.
    """
    x = ((index % w).float() + 0.5) / w.float()
    y = ((index // w).float() + 0.5) / h.float()
    freqs = torch.pi * 2.0 ** torch.arange(PATCH_POSITION_OCTAVES, device=index.device, dtype=torch.float32)
    angles = torch.stack([x, y], -1)[..., None] * freqs  # (B, N, 2, octaves)
    return torch.cat([torch.stack([x, y], -1) - 0.5, angles.sin().flatten(-2), angles.cos().flatten(-2)], -1)


@lru_cache(maxsize=16)
def grid_position_features(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h, w, features) :func:`patch_position_features` of every cell of an h×w grid; cached, since a camera's
    mask grid is the same every frame (treat it as read-only)."""
    index = torch.arange(h * w, device=device)[None]
    size = torch.tensor([[h, w]], device=device)
    return patch_position_features(index, size[:, :1], size[:, 1:]).view(h, w, -1)


def _upsample_block(channels: int) -> nn.Sequential:
    """×2 upsampling; indices 0/2/3 carry weights, as in the authors' ``upsample_blocks.{k}``."""
    return nn.Sequential(
        nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
        nn.GELU(),
        PixelSailSeparableConv(channels),
        PixelSailChannelNorm(channels),
    )


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear → ReLU → Linear; keys ``{0,2}.{weight,bias}`` like the authors' projectors."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


class PixelSailPreTrainedModel(PreTrainedModel):
    config: PixelSailConfig
    config_class = PixelSailConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2_5_VLDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    # The prefix mask is a dense 4-D mask: SDPA (bool) or eager (additive) only; flash/flex cannot express it.
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' defaults, except the pixel skip, the patch and pixel positions and the patch stem's
        projection start at zero (a model fine-tuned into any of them starts unchanged)."""
        super()._init_weights(module)
        zero_start = ("pixel_skip", "patch_position_embed", "pixel_position_embed")
        stem = getattr(self, "patch_stem", None)
        if any(module is getattr(self, name, None) for name in zero_start) or (stem is not None and module is stem.proj):
            init.zeros_(module.weight)
        elif stem is not None and isinstance(module, nn.Conv2d) and any(module is m for m in stem.convs):
            # He initialisation: the stem's features must be of order one for its zero projection to learn fast
            init.kaiming_normal_(module.weight, nonlinearity="relu")
            init.zeros_(module.bias)


class PixelSailForConditionalGeneration(PixelSailPreTrainedModel, GenerationMixin):
    """The Pixel-SAIL single transformer with its LM head and mask decoder.

    Use :class:`~pixel_sail_ros.model.processing_pixel_sail.PixelSailProcessor` to build the inputs; use
    :meth:`prefill` + :meth:`generate_answer` (not ``generate()``) for inference, since the image prefix needs
    its own mask and 3-axis positions.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _keys_to_ignore_on_save = list(_DISTILL_KEYS)
    _keys_to_ignore_on_load_missing = [r"^distill_(pixel|token)_head\."]

    def __init__(self, config: PixelSailConfig) -> None:
        super().__init__(config)
        text = config.text_config
        hidden = text.hidden_size
        patch_dim = 3 * config.patch_size**2
        in_dim = config.vision_feature_dim

        self.model = Qwen2_5_VLTextModel(text)
        if config.mrope_layout == "interleaved":
            self.model.rotary_emb = InterleavedMRotaryEmbedding(text)
        self.vis_embed = nn.Linear(patch_dim, hidden, bias=False)
        self.patch_position_embed = (
            nn.Linear(patch_position_features_dim(), hidden, bias=False) if config.patch_positions else None
        )
        self.patch_stem = PixelSailPatchStem(config.patch_size, hidden) if config.patch_stem else None
        self.vp_embed = nn.Linear(hidden, hidden, bias=False) if config.visual_prompt_injection else None
        self.lm_head = nn.Linear(hidden, text.vocab_size, bias=False)

        self.image_feature_pre_projector = _mlp(hidden, hidden, in_dim) if hidden > in_dim else None
        blocks = config.num_upsample_blocks if config.use_upsampler else 0
        self.upsample_blocks = nn.Sequential(*[_upsample_block(in_dim) for _ in range(blocks)])
        stride = config.mask_output_stride
        self.pixel_skip = nn.Linear(3 * stride * stride, in_dim, bias=False) if config.pixel_skip else None
        self.image_feature_projector = _mlp(in_dim, in_dim, config.seg_hidden_size)
        self.pixel_position_embed = (
            nn.Linear(patch_position_features_dim(), config.seg_hidden_size, bias=False) if config.pixel_positions else None
        )
        self.seg_token_projector = _mlp(hidden, in_dim, config.seg_hidden_size)

        # Training-only heads onto a teacher's pixel features (upsampled) and token features (patch grid).
        self.distill_pixel_head = (
            nn.Linear(config.seg_hidden_size, config.distill_pixel_dim) if config.distill_pixel_dim else None
        )
        self.distill_token_head = nn.Linear(hidden, config.distill_token_dim) if config.distill_token_dim else None
        self.post_init()

    # ---- transformers plumbing -------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> Qwen2_5_VLTextModel:
        return self.model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As transformers' ``from_pretrained``, restricted to safetensors (a pickle is never unpickled)."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("Pixel-SAIL checkpoints are loaded from safetensors only")
        kwargs["use_safetensors"] = True
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers' ``save_pretrained``; the distillation heads are left out, so the saved config says so."""
        dims = (self.config.distill_pixel_dim, self.config.distill_token_dim)
        self.config.distill_pixel_dim = self.config.distill_token_dim = 0
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.distill_pixel_dim, self.config.distill_token_dim = dims

    def generate(self, *args, **kwargs):
        """Not supported: the image prefix needs its own mask and 3-axis positions; use prefill + generate_answer."""
        raise NotImplementedError(
            "PixelSailForConditionalGeneration decodes with prefill() + generate_answer() (or PixelSailEngine)"
        )

    # ---- inputs ----------------------------------------------------------------------------------------

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        visual_prompt_ids: torch.LongTensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings, plus vis_embed(patch) (+ patch_stem(patch)) at each <vpatch> and vp_embed(E(<Prompt k>))
        where k >= 0.

        The i-th <vpatch> of sample b takes ``pixel_values[b, i]`` (rows past the sample's patch count are
        padding) and, with ``config.patch_positions``, the embedding of its place in the (h, w) grid of
        ``image_grid_hw[b]``.
        """
        embeds = self.model.embed_tokens(input_ids)
        is_patch = input_ids == self.config.vision_patch_token_id
        n_patches = is_patch.sum(dim=1)
        if bool(n_patches.any()):
            if pixel_values is None:
                raise ValueError("input_ids hold <vpatch> tokens but pixel_values is None")
            if pixel_values.dim() != 3 or pixel_values.shape[0] != input_ids.shape[0]:
                raise ValueError(f"pixel_values must be (B, N, 3·P·P), got {tuple(pixel_values.shape)}")
            if pixel_values.shape[-1] != self.vis_embed.in_features:
                raise ValueError(
                    f"pixel_values rows have {pixel_values.shape[-1]} values, expected {self.vis_embed.in_features}"
                )
            if bool((n_patches > pixel_values.shape[1]).any()):
                raise ValueError(
                    f"a sample has {int(n_patches.max())} <vpatch> tokens, pixel_values rows: {pixel_values.shape[1]}"
                )
            rows = torch.arange(pixel_values.shape[1], device=input_ids.device)[None, :] < n_patches[:, None]
            pixels = pixel_values[rows].to(embeds.dtype)
            patches = self.vis_embed(pixels)
            if self.patch_stem is not None:
                patches = patches + self.patch_stem(pixels)
            if self.patch_position_embed is not None:
                if image_grid_hw is None:
                    raise ValueError("config.patch_positions needs image_grid_hw to place the patches")
                index = torch.arange(pixel_values.shape[1], device=input_ids.device).expand_as(rows)
                grid = image_grid_hw.to(input_ids.device)
                features = patch_position_features(index, grid[:, :1], grid[:, 1:])[rows]
                patches = patches + self.patch_position_embed(features.to(embeds.dtype))
            # under autocast the linear layers give bf16 while the embedding table stays float32
            embeds = embeds.index_put(torch.nonzero(is_patch, as_tuple=True), patches.to(embeds.dtype), accumulate=True)
        if visual_prompt_ids is not None and self.vp_embed is not None:
            has_prompt = visual_prompt_ids >= 0
            if bool(has_prompt.any()):
                k = visual_prompt_ids[has_prompt]
                if int(k.max()) >= self.config.num_visual_prompts:
                    raise ValueError(f"visual prompt index {int(k.max())} >= {self.config.num_visual_prompts}")
                table = self.vp_embed(self.model.embed_tokens(self._prompt_token_tensor(input_ids.device)))
                embeds = embeds.index_put(torch.nonzero(has_prompt, as_tuple=True), table[k].to(embeds.dtype), accumulate=True)
        return embeds

    def _prompt_token_tensor(self, device: torch.device) -> torch.Tensor:
        """The ``<Prompt k>`` token ids on ``device``, made once (a copy from the host cannot be graph-captured)."""
        made = self.__dict__.setdefault("_prompt_tokens_by_device", {})
        if device not in made:
            made[device] = torch.tensor(self.config.prompt_token_ids[: self.config.num_visual_prompts], device=device)
        return made[device]

    def pool_visual_prompts(self, embeds: torch.Tensor, visual_prompt_ids: torch.Tensor) -> torch.Tensor:
        """(B, K, hidden): the mean input embedding of the patches each prompt k covers (zeros if none).

        The ablation baseline's prompt representation (``visual_prompt_injection=False``), or added to
        injection with ``visual_prompt_pooling=True``. With injection the patch embeddings pooled here already
        carry the prompt's own marker."""
        k = self.config.num_visual_prompts
        if int(visual_prompt_ids.max()) >= k:
            raise ValueError(f"visual prompt index {int(visual_prompt_ids.max())} >= {k}")
        covered = (visual_prompt_ids.unsqueeze(-1) == torch.arange(k, device=embeds.device)).to(embeds.dtype)
        sums = torch.einsum("blk,blc->bkc", covered, embeds)
        return sums / covered.sum(dim=1).clamp(min=1).unsqueeze(-1)

    def place_visual_prompts(self, embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Add pooled prompt k's features to every ``<Prompt k>`` token of the text."""
        is_prompt = (input_ids.unsqueeze(-1) == self._prompt_token_tensor(input_ids.device)).to(embeds.dtype)
        return embeds + torch.einsum("blk,bkc->blc", is_prompt, features.to(embeds.dtype))

    def _backend_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The boolean 4-D mask in the form the decoder's attention back-end needs."""
        implementation = self.model.config._attn_implementation
        if implementation == "sdpa":
            return attention_mask
        if implementation == "eager":  # eager adds the mask: a bool one would be silently wrong
            additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
            return additive.masked_fill(~attention_mask, torch.finfo(dtype).min)
        raise ValueError(f"attention implementation {implementation!r} cannot express the prefix mask; use 'sdpa'")

    # ---- mask decoder ----------------------------------------------------------------------------------

    def decode_pixel_features(self, vision_tokens: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """(n, h, w, hidden) last-layer patch states → (n, D_seg, h·P/s, w·P/s) per-pixel features.

        ``patches`` (n, h, w, 3·P·P): the normalised pixel patches the prefix read; needed only with
        ``config.pixel_skip``. With ``config.pixel_positions`` each cell's place is added last.
        """
        x = vision_tokens
        if self.image_feature_pre_projector is not None:
            x = self.image_feature_pre_projector(x)
        x = self.upsample_blocks(x.permute(0, 3, 1, 2))
        if self.pixel_skip is not None:
            if patches is None:
                raise ValueError("this model has a pixel skip: decode_pixel_features needs the image patches")
            x = x + self.pixel_skip(self.stride_cells(patches).to(x.dtype)).permute(0, 3, 1, 2)
        x = self.image_feature_projector(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if not self.config.use_upsampler:  # the baseline: per-patch features, interpolated
            scale = 2**self.config.num_upsample_blocks
            x = nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        if self.pixel_position_embed is not None:
            x = x + self.pixel_place_features(x.shape[-2], x.shape[-1], x.device, x.dtype).permute(2, 0, 1)
        return x

    def pixel_place_features(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(h, w, D_seg) what ``config.pixel_positions`` adds to an h×w grid of mask features: a [SEG] embedding's
        dot product with it is the place term of that query's mask logits."""
        if self.pixel_position_embed is None:
            raise ValueError("this model has no pixel positions (config.pixel_positions)")
        # traced by torch.compile, the cache wrapper is skipped (and warned about): call the function itself there
        grid = grid_position_features.__wrapped__ if torch.compiler.is_compiling() else grid_position_features
        return self.pixel_position_embed(grid(h, w, device).to(dtype))

    def stride_cells(self, patches: torch.Tensor) -> torch.Tensor:
        """(n, h, w, 3·P·P) patches (channel, row, column order) → (n, h·P/s, w·P/s, 3·s·s): each mask cell's pixels."""
        n, h, w, _ = patches.shape
        p, s = self.config.patch_size, self.config.mask_output_stride
        c = p // s
        x = patches.reshape(n, h, w, 3, c, s, c, s).permute(0, 1, 4, 2, 6, 3, 5, 7)
        return x.reshape(n, h * c, w * c, 3 * s * s)

    def _skip_patches(self, pixel_values: torch.Tensor | None, rows: Sequence[int], h: int, w: int) -> torch.Tensor | None:
        """(len(rows), h, w, 3·P·P) patch grids of samples ``rows`` for the pixel skip; None for a model without one."""
        if self.pixel_skip is None:
            return None
        return torch.stack([pixel_values[b, : h * w] for b in rows]).view(len(rows), h, w, -1)

    def _image_outputs(
        self, hidden: torch.Tensor, is_patch: torch.Tensor, image_grid_hw: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Per-sample pixel features and (h, w, hidden) vision tokens; images of one grid size run together."""
        batch = hidden.shape[0]
        counts = is_patch.sum(dim=1).tolist()
        pixel: list[torch.Tensor | None] = [None] * batch
        tokens: list[torch.Tensor | None] = [None] * batch
        if not any(counts):
            return pixel, tokens
        if image_grid_hw is None:
            raise ValueError("image_grid_hw (B, 2) is needed to reshape the image tokens")
        grids = [tuple(g) for g in image_grid_hw.tolist()]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for b, (count, (h, w)) in enumerate(zip(counts, grids)):
            if count == 0:
                continue
            if count != h * w:
                raise ValueError(f"sample {b} has {count} <vpatch> tokens but image_grid_hw says {h}×{w}")
            groups[(h, w)].append(b)
        for (h, w), members in groups.items():
            stacked = torch.stack([hidden[b][is_patch[b]] for b in members]).view(len(members), h, w, -1)
            features = self.decode_pixel_features(stacked, self._skip_patches(pixel_values, members, h, w))
            for i, b in enumerate(members):
                tokens[b], pixel[b] = stacked[i], features[i]
        return pixel, tokens

    # ---- forward ---------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        visual_prompt_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        output_mask_logits: bool = True,
        logits_to_keep: int = 0,
        visual_prompt_features: torch.Tensor | None = None,
        text_model: Callable | None = None,
    ) -> PixelSailOutput:
        """One pass of the single transformer (contract: docs/DEVELOPING.md "Model forward").

        Args:
            input_ids: (B, L) token ids, image slots as <vpatch>.
            pixel_values: (B, Nmax, 3·P·P) normalised patches, padded per sample.
            image_grid_hw: (B, 2) patch grid (h, w) of each sample's image.
            visual_prompt_ids: (B, L) prompt index k at covered patch slots, -1 elsewhere.
            position_ids: (3, B, L) t/h/w positions. Required whenever the input holds image tokens.
            attention_mask: (B, 1, L, past + L) bool, True = may attend. Required with image tokens.
            past_key_values / use_cache: a ``DynamicCache`` to extend.
            output_mask_logits: also run the mask decoder (pixel features, [SEG] embeddings, mask logits,
                distillation features).
            logits_to_keep: compute LM logits for the last n positions only (0 = all).
            visual_prompt_features: (B, K, hidden) pooled prompts from an earlier prefix, added at the
                ``<Prompt k>`` tokens (only models that pool prompts: ``config.pools_visual_prompts``).
            text_model: what runs the decoder layers (default ``self.model``; ``prefill`` passes a compiled one).
        """
        batch, length = input_ids.shape
        static = isinstance(past_key_values, StaticCache)  # a prefill into StaticDecoding's cache
        past = 0 if past_key_values is None or static else past_key_values.get_seq_length()
        kv_length = past_key_values.get_max_length() if static else past + length
        is_patch = input_ids == self.config.vision_patch_token_id
        has_image = bool(is_patch.any())
        if position_ids is None or attention_mask is None:
            if has_image or static:
                raise ValueError(
                    "position_ids and attention_mask are required with image tokens or a static cache (use the processor)"
                )
            if position_ids is None:
                position_ids = _text_positions(batch, length, past, input_ids.device)
            if attention_mask is None:
                attention_mask = _causal_mask(batch, length, past, input_ids.device)
        if position_ids.shape != (3, batch, length):
            raise ValueError(f"position_ids must be (3, {batch}, {length}), got {tuple(position_ids.shape)}")
        if attention_mask.dtype != torch.bool or attention_mask.shape != (batch, 1, length, kv_length):
            raise ValueError(
                f"attention_mask must be bool (B, 1, L, past+L) = ({batch}, 1, {length}, {kv_length}), "
                f"got {attention_mask.dtype} {tuple(attention_mask.shape)}"
            )

        embeds = self.embed_inputs(input_ids, pixel_values, visual_prompt_ids, image_grid_hw)
        if self.config.pools_visual_prompts and visual_prompt_ids is not None:
            visual_prompt_features = self.pool_visual_prompts(embeds, visual_prompt_ids)
        if visual_prompt_features is not None:
            embeds = self.place_visual_prompts(embeds, input_ids, visual_prompt_features)
        with _attention_kernels(embeds):
            decoded = (text_model or self.model)(
                inputs_embeds=embeds,
                attention_mask=self._backend_mask(attention_mask, embeds.dtype),
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
            )
        hidden = decoded.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)

        output = PixelSailOutput(
            logits=logits,
            last_hidden_state=hidden,
            past_key_values=decoded.past_key_values if use_cache else None,
            visual_prompt_features=visual_prompt_features,
        )
        if not output_mask_logits:
            return output

        pixel, tokens = self._image_outputs(hidden, is_patch, image_grid_hw, pixel_values)
        is_seg = input_ids == self.config.seg_token_id
        projected = self.seg_token_projector(hidden[is_seg])
        seg = list(projected.split(is_seg.sum(dim=1).tolist()))
        output.pixel_features = pixel
        output.seg_embeddings = seg
        output.mask_logits = [
            None if p is None else torch.einsum("qc,chw->qhw", s, p) for s, p in zip(seg, pixel)
        ]
        if self.distill_pixel_head is not None:
            output.distill_pixel = [
                None if p is None else self.distill_pixel_head(p.permute(1, 2, 0)).permute(2, 0, 1) for p in pixel
            ]
        if self.distill_token_head is not None:
            output.distill_token = [None if t is None else self.distill_token_head(t).permute(2, 0, 1) for t in tokens]
        return output

    # ---- inference -------------------------------------------------------------------------------------

    def text_step(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        cache: Cache,
        visual_prompt_features: torch.Tensor | None = None,
        logits_to_keep: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder pass over text tokens after a cached prefix: (hidden (B, L, C), logits of the last
        ``logits_to_keep`` tokens (B, logits_to_keep, V)).

        ``forward`` without its checks and image handling: nothing here waits for the GPU, so a CUDA graph can
        record it (:class:`~.static_decoding.StaticDecoding`).
        """
        embeds = self.model.embed_tokens(input_ids)
        if visual_prompt_features is not None:
            embeds = self.place_visual_prompts(embeds, input_ids, visual_prompt_features)
        mask = self._backend_mask(attention_mask, embeds.dtype)
        masks = {kind: mask for kind in set(self.config.text_config.layer_types)}  # as built: no mask re-derivation
        with _attention_kernels(embeds):
            decoded = self.model(
                inputs_embeds=embeds, attention_mask=masks, position_ids=position_ids, past_key_values=cache, use_cache=True
            )
        hidden = decoded.last_hidden_state
        return hidden, self.lm_head(hidden[:, -logits_to_keep:])

    def decode_tokens(
        self,
        token_ids: list[int],
        position: int,
        attention_mask: torch.Tensor,
        cache: Cache,
        visual_prompt_features: torch.Tensor | None = None,
        step: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        logits_to_keep: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``text_step`` (or ``step``, a compiled one) on text tokens from position id ``position`` on:
        (hidden (q, C), logits of the last ``logits_to_keep`` tokens (logits_to_keep, V))."""
        device = self.lm_head.weight.device
        q = len(token_ids)
        hidden, logits = (step or self.text_step)(
            torch.tensor([token_ids], device=device), _text_positions(1, q, position, device), attention_mask, cache,
            visual_prompt_features, logits_to_keep,
        )
        return hidden[0], logits[0]

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor,
        image_grid_hw: torch.LongTensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        visual_prompt_ids: torch.LongTensor | None = None,
        decoding: StaticDecoding | None = None,
        compiled: CompiledImagePasses | None = None,
        first_turn_ids: Sequence[int] | None = None,
        first_turn_logits: int = 1,
    ) -> PixelSailPrefix:
        """Run one image prefix (batch 1, <vision>…</vision>, bidirectional) into a fresh KV cache.

        With ``decoding``, the prefix goes into its reusable static cache (and answers decode there, on CUDA
        from a graph); that cache holds one prefix at a time, so a later prefill retires this one. With
        ``compiled`` (``CompiledImagePasses.of(self)``), the prefix and, later, the pixel decoder run compiled.

        ``first_turn_ids`` (the first answer's question, plus any forced or drafted answer tokens, exactly as
        ``generate_answer`` will feed them): read after the image in the same decoder pass, causally, keeping
        the logits of its last ``first_turn_logits`` tokens. The first ``generate_answer`` on this prefix with
        that chunk then starts from them instead of a pass of its own: one decoder pass fewer per request (for a
        standing prompt with a right draft, the whole answer comes out of the prefix's pass). A turn holding a
        ``<vpatch>`` token (a wandering draft) is not read here: in the prefix that token is an image slot.
        """
        if input_ids.shape[0] != 1:
            raise ValueError("prefill takes one image (batch size 1)")
        length = input_ids.shape[1]
        next_position = int(position_ids.max()) + 1
        turn = [int(t) for t in first_turn_ids] if first_turn_ids is not None else []
        if self.config.vision_patch_token_id in turn:
            turn = []  # read with the image it would become an image slot: the answer feeds it in a pass of its own
        if turn:
            if not 1 <= first_turn_logits <= len(turn):
                raise ValueError(f"first_turn_logits must be in 1..{len(turn)}, got {first_turn_logits}")
            input_ids, position_ids, attention_mask, visual_prompt_ids = _with_turn(
                input_ids, position_ids, attention_mask, visual_prompt_ids, turn, next_position)
        total = input_ids.shape[1]
        if decoding is None:
            cache = DynamicCache(config=self.config.text_config)
        else:
            cache = decoding.cache_for_prefill(total)
            padding = attention_mask.new_zeros(1, 1, total, decoding.max_len - total)
            attention_mask = torch.cat([attention_mask, padding], dim=-1)
        out = self(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_hw=image_grid_hw,
            visual_prompt_ids=visual_prompt_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            output_mask_logits=False,  # the pixel decoder runs lazily, on the first [SEG] (PixelSailPrefix)
            logits_to_keep=first_turn_logits if turn else 1,
            text_model=compiled.text_model if compiled is not None else None,
        )
        is_patch = input_ids[0] == self.config.vision_patch_token_id
        h, w = (int(v) for v in image_grid_hw[0])
        count = int(is_patch.sum())
        if count == 0:
            raise ValueError("the prefix holds no <vpatch> tokens")
        if count != h * w:
            raise ValueError(f"the prefix has {count} <vpatch> tokens but image_grid_hw says {h}×{w}")
        hidden = out.last_hidden_state[0]
        return PixelSailPrefix(
            past_key_values=out.past_key_values,
            vision_tokens=hidden[is_patch].view(h, w, -1),
            length=length,
            next_position=next_position,
            decoder=partial(compiled.pixel_decoder if compiled is not None else self.decode_pixel_features,
                            patches=self._skip_patches(pixel_values, [0], h, w)),
            visual_prompt_features=out.visual_prompt_features,
            decoding=decoding,
            decoding_generation=decoding.begin_prefix() if decoding is not None else 0,
            first_turn=_FirstTurn(turn, hidden[length:], out.logits[0]) if turn else None,
        )

    def _answer_cache(self, prefix: PixelSailPrefix, new_tokens: int, kept: int = 0) -> _AnswerCache:
        """Where one answer after ``prefix`` decodes: the prefix's static cache when it has one and room for
        ``new_tokens`` more (rewound: the prefix is kept, no copy), else a private dynamic copy of the prefix cache.
        ``kept``: entries of the prefix's first turn, which follow the prefix in its cache, to keep (0: none).
        """
        decoding = prefix.decoding
        if decoding is not None:
            if decoding.generation != prefix.decoding_generation:
                raise ValueError("this prefix's static cache now holds a later prefill; prefill the image again")
            if prefix.length + new_tokens <= decoding.max_len:
                decoding.rewind(prefix.length + kept)
                return _AnswerCache(partial(decoding.run, visual_prompt_features=prefix.visual_prompt_features),
                                    decoding.rewind)
        cache = _dynamic_copy(prefix.past_key_values, prefix.length + kept, self.config.text_config)
        device = prefix.vision_tokens.device

        def step(token_ids: list[int], past: int, position: int, logits_to_keep: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
            mask = _causal_mask(1, len(token_ids), past, device)
            return self.decode_tokens(token_ids, position, mask, cache, prefix.visual_prompt_features,
                                      logits_to_keep=logits_to_keep)

        return _AnswerCache(step, lambda length: cache.crop(length - cache.get_seq_length()))

    @torch.no_grad()
    def generate_answer(
        self,
        prefix: PixelSailPrefix,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int = 64,
        stop_token_ids: Sequence[int] | None = None,
        answer_prefix_ids: Sequence[int] | None = None,
        return_logits: bool = False,
        logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
        draft_ids: Sequence[int] | None = None,
    ) -> PixelSailAnswer:
        """Greedy-decode one turn after an image prefix; the prefix's own cache entries are never changed (the
        answer decodes on a copy, or on the static cache past them).

        ``prompt_ids`` is the turn's question (``<|im_start|>user\n…<|im_end|>\n``); ``answer_prefix_ids``
        optionally forces the start of the answer (e.g. "It is [SEG]" to always get a mask). Positions continue
        from ``prefix.next_position`` on all three axes; each [SEG] of the answer is embedded from the hidden
        state of the step that reads it. ``step_logits`` are the logits of each free (not forced) choice.
        ``logits_processor(fed_token_ids, logits)`` may change each choice's logits (V,) before it is made (the
        benchmarks script a random model's answers with it); it sees the same calls with or without a draft.

        ``draft_ids`` (speculative decoding with a guessed answer, e.g. this question's answer on the previous
        frame): the draft is fed together with the question in one pass, and greedy decoding keeps the longest
        start of it that it would have chosen itself; the rest is dropped from the cache and decoding goes on
        one token at a time. The answer is the greedy one either way (up to floating-point rounding of a chunked
        pass); a right guess turns "It is [SEG]." from five passes into one.
        """
        device = prefix.vision_tokens.device
        if stop_token_ids is None:
            stop_token_ids = (self.config.eos_token_id, self.config.im_end_token_id)
        stops = set(stop_token_ids)
        seg_id = self.config.seg_token_id
        prompt = torch.as_tensor(prompt_ids).reshape(-1).tolist()
        if not prompt:
            raise ValueError("prompt_ids is empty")
        tokens = [int(t) for t in (answer_prefix_ids if answer_prefix_ids is not None else ())]
        draft = [int(t) for t in (draft_ids if draft_ids is not None else ())][:max(max_new_tokens, 0)]
        chunk, answer_start, drafted = prompt + tokens + draft, len(prompt), len(draft)
        # The prefix's first turn serves the first answer that feeds exactly its chunk; any answer retires it
        # (on a static cache, a later answer overwrites its entries).
        first, prefix.first_turn = prefix.first_turn, None
        if first is not None and (first.token_ids != chunk or len(first.logits) != len(draft) + 1):
            first = None
        with_prefix = first is not None
        cache = self._answer_cache(prefix, len(chunk) + max_new_tokens + 1, kept=len(chunk) if first else 0)
        past, position = prefix.length, prefix.next_position
        seg_states: list[torch.Tensor] = []
        seg_probs = [torch.ones((), device=device) for t in tokens if t == seg_id]
        step_logits: list[torch.Tensor] = []
        new_tokens, stopped, passes, accepted = 0, False, 0, 0
        while True:
            q, guessed = len(chunk), len(draft)
            if first is not None:
                hidden, rows, first = first.hidden, first.logits, None
            else:
                hidden, rows = cache.step(chunk, past, position, logits_to_keep=guessed + 1)
            passes += 1
            next_id = None  # a token chosen but not fed yet; None: the answer is over
            for j in range(guessed + 1):  # row j chooses the token after chunk[q - guessed - 1 + j]
                if j and new_tokens >= max_new_tokens and draft[j - 1] != seg_id:
                    break  # as without a draft: no pass after the last token
                fed = chunk[: q - guessed] if j == 0 else [draft[j - 1]]
                logits = rows[j]
                if logits_processor is not None:
                    logits = logits_processor(fed, logits)
                if new_tokens >= max_new_tokens:
                    break
                logits = logits.float()
                if return_logits:
                    step_logits.append(logits.clone())
                choice = int(logits.argmax())
                if choice in stops:
                    stopped = True
                    break
                if choice == seg_id:
                    seg_probs.append(logits.softmax(-1)[choice])
                tokens.append(choice)
                new_tokens += 1
                if j < guessed and choice == draft[j]:
                    accepted += 1
                    continue
                next_id = choice
                break
            kept = q - guessed + j  # chunk tokens whose cache entries (and hidden states) stand
            # clones: a graph-replayed step's outputs are overwritten by the next step
            seg_states += [hidden[i].clone() for i in range(answer_start, kept) if chunk[i] == seg_id]
            if next_id is None:
                break
            past, position = past + kept, position + kept
            if kept < q:
                cache.rewind(past)  # the rest of the draft was wrong: its cache entries go
            draft = []
            # The last token is fed only when its hidden state is needed (a trailing [SEG]).
            if new_tokens >= max_new_tokens and next_id != seg_id:
                break
            chunk, answer_start = [next_id], 0

        if seg_states:
            seg_embeddings = self.seg_token_projector(torch.stack(seg_states))
            mask_logits = torch.einsum("qc,chw->qhw", seg_embeddings, prefix.pixel_features)
        else:  # no [SEG]: the pixel features are not needed, so not computed
            h, w, _ = prefix.vision_tokens.shape
            scale = 2 ** self.config.num_upsample_blocks
            ref = prefix.vision_tokens
            seg_embeddings = ref.new_zeros(0, self.config.seg_hidden_size)
            mask_logits = ref.new_zeros(0, h * scale, w * scale)
        return PixelSailAnswer(
            token_ids=tokens,
            seg_embeddings=seg_embeddings,
            mask_logits=mask_logits,
            seg_token_probs=torch.stack(seg_probs).float() if seg_probs else torch.zeros(0, device=device),
            stopped=stopped,
            step_logits=torch.stack(step_logits) if step_logits else None,
            passes=passes,
            with_prefix=with_prefix,
            drafted=drafted,
            draft_accepted=accepted,
        )


@dataclass
class _AnswerCache:
    """Where one answer decodes: ``step(token_ids, past, position, logits_to_keep) → (hidden (q, C), logits
    (logits_to_keep, V))`` feeds tokens; ``rewind(length)`` drops the entries from ``length`` on (a wrong draft)."""

    step: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rewind: Callable[[int], None]


def _dynamic_copy(cache: Cache, length: int, config: PretrainedConfig) -> DynamicCache:
    """A DynamicCache holding the first ``length`` entries of every layer of ``cache``."""
    if isinstance(cache, DynamicCache):
        out = copy.deepcopy(cache)
        if out.get_seq_length() > length:
            out.crop(length - out.get_seq_length())  # (a negative crop drops that many; a positive one is refused)
        return out
    out = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone(), i)
    return out


def _with_turn(
    input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
    visual_prompt_ids: torch.Tensor | None, turn: list[int], start: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batch-1 prefix's ids, positions, mask and prompt ids extended by a text turn read after it: the turn
    sees the whole prefix and, causally, itself (positions from ``start`` on every axis); the prefix never sees it."""
    device, length, q = input_ids.device, input_ids.shape[1], len(turn)
    ids = torch.cat([input_ids, torch.tensor([turn], dtype=input_ids.dtype, device=device)], dim=1)
    positions = torch.cat([position_ids, _text_positions(1, q, start, device)], dim=-1)
    mask = torch.zeros(1, 1, length + q, length + q, dtype=torch.bool, device=device)
    mask[..., :length, :length] = attention_mask
    mask[..., length:, :] = _causal_mask(1, q, length, device)
    if visual_prompt_ids is not None:
        visual_prompt_ids = torch.cat([visual_prompt_ids, visual_prompt_ids.new_full((1, q), -1)], dim=1)
    return ids, positions, mask, visual_prompt_ids


def _text_positions(batch: int, length: int, start: int, device: torch.device) -> torch.Tensor:
    """t = h = w positions ``start``, ``start + 1``, … (text after the image, or text-only input)."""
    return (torch.arange(length, device=device) + start).view(1, 1, length).expand(3, batch, length)


def _causal_mask(batch: int, length: int, past: int, device: torch.device) -> torch.Tensor:
    """New tokens see every cached token and, causally, each other."""
    mask = torch.ones(length, past + length, dtype=torch.bool, device=device).tril(past)
    return mask.view(1, 1, length, past + length).expand(batch, 1, length, past + length)


AutoModelForImageTextToText.register(PixelSailConfig, PixelSailForConditionalGeneration, exist_ok=True)

__all__ = [
    "PixelSailAnswer",
    "PixelSailForConditionalGeneration",
    "PixelSailOutput",
    "PixelSailPreTrainedModel",
    "PixelSailPrefix",
]
