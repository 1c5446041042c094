"""``pixel-sail-convert``: the authors' checkpoint layout (brief §3) → a Pixel-SAIL checkpoint directory.

Their ``Sa2VASTModel`` state dict keeps the LLM under ``single_transformer.`` (with ``vis_embed``/``vp_embed``
inside its ``model``) and the mask heads at the top level under the same names as ours, so conversion is a
rename plus validation. Teachers and distillation linears are dropped. A ``.pth`` is read with
``torch.load(weights_only=True)`` only: a file holding arbitrary pickled objects is refused, never executed.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .configuration_pixel_sail import PixelSailConfig
from .modeling_pixel_sail import PixelSailForConditionalGeneration
from .processing_pixel_sail import PixelSailProcessor
from .tokenization import add_pixel_sail_tokens, build_tiny_tokenizer, special_token_ids

# Authors' prefix → ours; first match wins (vis_embed/vp_embed sit inside their LLM's ``model``).
_RENAMES = (
    ("single_transformer.model.vis_embed.", "vis_embed."),
    ("single_transformer.model.vp_embed.", "vp_embed."),
    ("single_transformer.model.", "model."),
    ("single_transformer.lm_head.", "lm_head."),
    ("image_feature_pre_projector.", "image_feature_pre_projector."),
    ("upsample_blocks.", "upsample_blocks."),
    ("image_feature_projector.", "image_feature_projector."),
    ("seg_token_projector.", "seg_token_projector."),
)
# Training-only parts of their model (teachers, distillation linears) and non-weights.
_DROPPED = re.compile(
    r"^(mask2former_model|mask2former_processor|mask2former_distill_linear|sam2_model|_sam2|sam2_distill_linear"
    r"|radio_model|radio_processor|radio_distill_linear)\.|\.rotary_emb\.inv_freq$"
)
_PRESET_BY_HIDDEN = {256: "tiny", 896: "0.5b", 2048: "3b"}


def load_source_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt`` (weights only; mmengine ``state_dict``/DeepSpeed ``module`` unwrapped),
    a DeepSpeed checkpoint folder, or a ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("mp_rank_00_model_states.pt")) or sorted(path.glob("*.safetensors"))
        if not candidates:
            raise FileNotFoundError(f"{path} is a folder without mp_rank_00_model_states.pt or *.safetensors")
        path = candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors, and it is only read with weights_only=True. Re-save just the "
            f"weights (torch.save(ckpt['state_dict'], 'weights.pth')) in a trusted environment. ({error})"
        ) from None
    for key in ("state_dict", "module", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    tensors = {str(k).removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return tensors


def rename_authors_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Authors' key names → ours. Returns the renamed tensors and the dropped keys; unknown keys stay as they are
    (validation names them)."""
    renamed: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, tensor in state_dict.items():
        # Their wrapper also exposes the LLM as ``llm`` (an alias of single_transformer).
        if key.startswith("llm."):
            alias = "single_transformer." + key.removeprefix("llm.")
            if alias in state_dict:
                dropped.append(key)
                continue
            key = alias
        if _DROPPED.search(key):
            dropped.append(key)
            continue
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key.removeprefix(old)
                break
        renamed[key] = tensor
    return renamed, dropped


def config_for_weights(
    state_dict: Mapping[str, torch.Tensor], preset: str | None = None, config: PixelSailConfig | None = None
) -> PixelSailConfig:
    """A config whose shapes follow the (renamed) weights: vocab, layers, patch size, D_seg, upsample depth.

    Heads / KV heads / intermediate size come from ``config`` or the preset (by hidden size if not named).
    """
    try:
        vocab, hidden = state_dict["model.embed_tokens.weight"].shape
        patch_dim = state_dict["vis_embed.weight"].shape[1]
        seg_hidden = state_dict["image_feature_projector.2.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"the checkpoint lacks {error.args[0]} (after renaming): not Pixel-SAIL weights") from None
    layers = len({k.split(".")[2] for k in state_dict if k.startswith("model.layers.")})
    blocks = len({k.split(".")[1] for k in state_dict if k.startswith("upsample_blocks.")})
    patch = int(round((patch_dim / 3) ** 0.5))
    if 3 * patch * patch != patch_dim:
        raise ValueError(f"vis_embed takes {patch_dim} values, not 3·P·P for any P")
    if config is None:
        name = preset or _PRESET_BY_HIDDEN.get(int(hidden))
        if name is None:
            raise ValueError(f"hidden size {hidden} matches no preset; pass --preset or --config")
        config = PixelSailConfig.from_preset(name)
    text = config.text_config.to_dict()
    text.update(vocab_size=int(vocab), num_hidden_layers=layers, hidden_size=int(hidden))
    text["layer_types"] = None  # recomputed for the new depth
    values = config.to_dict()
    values.update(
        text_config=text,
        patch_size=patch,
        seg_hidden_size=int(seg_hidden),
        mask_output_stride=patch // (2**blocks),
        distill_pixel_dim=0,
        distill_token_dim=0,
    )
    for key in ("model_type", "transformers_version", "architectures"):
        values.pop(key, None)
    return PixelSailConfig(**values)


def validate_state_dict(state_dict: Mapping[str, torch.Tensor], config: PixelSailConfig) -> None:
    """Raise ValueError naming every missing key, unexpected key and shape mismatch against ``config``."""
    with torch.device("meta"):
        reference = PixelSailForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state_dict) - optional)
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise ValueError("the checkpoint does not fit the model: " + " | ".join(problems))


def convert_checkpoint(
    source: str | Path,
    output_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    preset: str | None = None,
    config: PixelSailConfig | None = None,
    dtype: torch.dtype | None = None,
) -> PixelSailConfig:
    """Convert an authors' checkpoint into ``output_dir`` (config.json, model.safetensors, tokenizer files).

    Without a tokenizer the tiny one is used, which fits only the tiny preset's vocabulary.
    """
    state_dict, dropped = rename_authors_state_dict(load_source_state_dict(source))
    config = config_for_weights(state_dict, preset=preset, config=config)
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    else:
        add_pixel_sail_tokens(tokenizer)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's embedding only "
            f"{config.text_config.vocab_size} rows: pass the checkpoint's own tokenizer with --tokenizer"
        )
    for name, value in special_token_ids(tokenizer).items():
        setattr(config, name, value)
    config.text_config.pad_token_id = config.pad_token_id
    config.text_config.eos_token_id = config.eos_token_id

    head, embed = state_dict.get("lm_head.weight"), state_dict["model.embed_tokens.weight"]
    if config.tie_word_embeddings and head is not None and not torch.equal(head, embed):
        config.tie_word_embeddings = False  # their LM head is a separate Linear: keep it
    validate_state_dict(state_dict, config)
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    tensors = {k: v.contiguous() for k, v in state_dict.items()}

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.architectures = [PixelSailForConditionalGeneration.__name__]
    config.save_pretrained(str(output_dir))
    save_file(tensors, str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    PixelSailProcessor.from_config(config, tokenizer).save_pretrained(output_dir)
    if dropped:
        print(f"dropped {len(dropped)} training-only tensors (teachers, distillation)", file=sys.stderr)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pixel-sail-convert",
        description="Convert the Pixel-SAIL authors' checkpoint (.pth, weights only, or .safetensors) into a "
        "checkpoint directory (config.json, model.safetensors, tokenizer files).",
    )
    parser.add_argument("source", help="authors' .pth / .pt / .safetensors file (or a DeepSpeed checkpoint folder)")
    parser.add_argument("output_dir", help="directory to write")
    parser.add_argument("--preset", choices=PixelSailConfig.presets, help="shape preset (default: by hidden size)")
    parser.add_argument("--config", help="a config.json to start from instead of a preset")
    parser.add_argument("--tokenizer", help="tokenizer directory (e.g. the base Qwen2.5 one); default: the tiny one")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast floating tensors")
    args = parser.parse_args(argv)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True) if args.tokenizer else None
        config = PixelSailConfig.from_json_file(args.config) if args.config else None
        dtype = getattr(torch, args.dtype) if args.dtype else None
        result = convert_checkpoint(args.source, args.output_dir, tokenizer, args.preset, config, dtype)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"pixel-sail-convert: error: {error}", file=sys.stderr)
        return 2
    text = result.text_config
    print(
        f"wrote {args.output_dir}: hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
        f"vocab {text.vocab_size}, patch {result.patch_size}, D_seg {result.seg_hidden_size}, "
        f"mask stride {result.mask_output_stride}, tied LM head: {result.tie_word_embeddings}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
