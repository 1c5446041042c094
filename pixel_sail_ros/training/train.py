"""``pixel-sail-train``: train Pixel-SAIL from scratch or fine-tune it, on one CPU/GPU or many (torchrun).

Examples::

    # the bundled default: tiny preset from scratch on ShapesRef, CPU, one hour
    pixel-sail-train --preset tiny --data shapesref --output-dir runs/tiny --max-steps 20000 \\
        --time-budget-minutes 60 --threads 2
    # fine-tune a checkpoint on your own data (manifest format: pixel_sail_ros/training/manifest.py)
    pixel-sail-train --init runs/tiny --manifest my_data/train.jsonl --output-dir runs/mine --epochs 5
    # a 3B model on 8 GPUs with LoRA, or fully sharded
    torchrun --nproc-per-node 8 -m pixel_sail_ros.training.train --init ckpt_3b --manifest m.jsonl \\
        --output-dir runs/3b --lora-r 16      # or --fsdp for a full fine-tune
    # start from a plain Qwen2-family LLM directory, fresh vision parts
    pixel-sail-train --init-llm Qwen2.5-0.5B --manifest m.jsonl --output-dir runs/q05

What comes out in ``--output-dir``: the final model directory (``config.json``, ``model.safetensors``,
tokenizer, ``processor_config.json``; loadable by ``PixelSailEngine.from_pretrained``), ``checkpoint-{step}/``
folders for exact resume (``--resume auto``), ``metrics.jsonl``, ``curves.png`` and ``examples.png``.
Checkpoints are safetensors + JSON only, never pickle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.configuration_pixel_sail import PixelSailConfig
from ..model.modeling_pixel_sail import PixelSailForConditionalGeneration
from ..model.processing_pixel_sail import PixelSailProcessor
from ..model.tokenization import add_pixel_sail_tokens, build_tiny_tokenizer, special_token_ids
from . import plots
from .checkpoint_files import (
    CHECKPOINT_PREFIX, EXTRA_FILE, OPTIMIZER_FILE, TRAINER_STATE, jsonable, latest_checkpoint, load_optimizer_state,
    optimizer_from_files, optimizer_to_files, rng_from_files, rng_to_files, saved_keys, write_json,
)
from .data import (
    AUX_NUM_CLASSES,
    ItemCollator,
    ManifestDataset,
    ResumableBatchSampler,
    ShapesRefDataset,
    batch_to_device,
)
from .losses import (
    AttributeProbe, LossWeights, aux_attribute_loss, compute_losses, mask_place_loss, object_attribute_loss,
    object_place_loss, query_place_loss, seg_query_attribute_loss,
)
from .optimization import lr_lambda, param_groups

# Values averaged over ranks for the log (a fixed list, so every rank's all_reduce has the same shape).
LOG_KEYS = (
    "loss", "loss_text", "loss_mask", "loss_dice", "num_masks", "loss_distill_pixel", "loss_distill_token",
    "loss_aux_pixel", "loss_aux_token", "loss_aux_query", "loss_aux_object", "loss_aux_place", "loss_aux_query_place",
    "loss_aux_mask_place",
    "grad_norm",
)
METRICS_FILE = "metrics.jsonl"

# Modules that stay fully trainable under LoRA: the paper's new parts and this project's zero-initialised
# switches (all small; a switch frozen at zero under LoRA would never turn on).
HEAD_MODULES = (
    "vis_embed", "vp_embed", "image_feature_pre_projector", "upsample_blocks", "image_feature_projector",
    "seg_token_projector", "distill_pixel_head", "distill_token_head",
    "pixel_skip", "patch_position_embed", "pixel_position_embed", "patch_stem",
)
LORA_TARGETS = r".*\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


# =============================================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pixel-sail-train",
        description="Train or fine-tune Pixel-SAIL (single process, or many with torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--init", metavar="DIR",
                     help="fine-tune this Pixel-SAIL checkpoint directory; a training checkpoint-N folder also "
                     "warm-starts the training-only probes that match (fresh optimizer and schedule, unlike --resume)")
    src.add_argument("--init-llm", metavar="DIR", help="a plain Qwen2-family LLM directory (safetensors); vision parts start fresh")
    g.add_argument("--preset", default="tiny", choices=PixelSailConfig.presets, help="architecture when training from scratch (or the head sizes with --init-llm)")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer for a from-scratch non-tiny preset")
    g.add_argument("--model-overrides", default="{}", metavar="JSON", help='config fields to override, e.g. \'{"num_hidden_layers": 4}\'')
    g.add_argument("--image-size", type=int, default=None, help="long side of the resized image (multiple of the patch size); tiny default 224")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the transformer's linears (0 = full fine-tune); heads stay fully trainable, merged on save")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; unset = 2·r")
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-train-embeddings", action="store_true", help="also train the token embeddings/LM head under LoRA (on by default with --init-llm)")

    g = p.add_argument_group("data")
    d = g.add_mutually_exclusive_group()
    d.add_argument("--data", choices=["shapesref"], default=None, help="the synthetic benchmark (default when no --manifest)")
    d.add_argument("--manifest", metavar="FILE", help="a JSONL manifest of your images (see pixel_sail_ros/training/manifest.py)")
    g.add_argument("--train-size", type=int, default=1_000_000, help="ShapesRef scenes in the training set (indices 0..N-1 of --seed)")
    g.add_argument("--turns-per-image", type=int, default=16, help="turns per image; they share image prefixes, so more turns cost little")
    g.add_argument("--max-prompts-per-sequence", type=int, default=6, help="visual prompts packed into one prefix (<Prompt0..k>)")
    g.add_argument("--flip-prob", type=float, default=0.5, help="horizontal flip probability (left/right words swapped)")
    g.add_argument("--appearance-aug", type=float, default=0.0, metavar="P",
                   help="probability of a random camera-like shift per image (JPEG, blur or noise; see "
                        "pixel_sail_ros/training/appearance.py), so the model depends less on how images were drawn")
    g.add_argument("--mix", default=None, metavar="TASK=W,...", help="ShapesRef task mix, e.g. referring=0.5,vp_describe=0.2,vp_segment=0.1,text_describe=0.1,vp_qa=0.1")
    g.add_argument("--p-absent", type=float, default=0.25, help="share of referring turns whose object is absent")
    g.add_argument("--prompt-probs", default=None, metavar="KIND=W,...", help="ShapesRef visual-prompt kinds, e.g. point=0.5,box=0.25,mask=0.25 (paper: 0.3/0.3/0.4; the node's clicks are points)")
    g.add_argument("--curriculum-steps", type=int, default=0, help="steps of single-attribute phrases before relational ones")
    g.add_argument("--scene-max-side", type=int, default=None, help="cap ShapesRef image sides (cheaper rendering; spec: 640)")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=4, help="images per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs over a manifest; required for ShapesRef)")
    g.add_argument("--epochs", type=float, default=1.0, help="epochs over a manifest when --max-steps is not given")
    g.add_argument("--lr", type=float, default=4e-5, help="peak learning rate (paper: 4e-5 fine-tune; ~1e-3 suits tiny from scratch)")
    g.add_argument("--lr-scale", default=None, metavar="MODULE=F,...", help="multiply --lr by F for the parameters under MODULE, e.g. patch_stem=10 (a zero-initialised switch in a trained model)")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--warmup-ratio", type=float, default=0.05)
    g.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-ratio")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--probe-warmup-steps", type=int, default=0,
                   help="before training, this many steps that train only the training-only probes (model frozen, "
                   "constant --lr): a continuation from a plain model directory, whose probes start fresh, then does "
                   "not push the model along random probe gradients; single process only")

    g = p.add_argument_group("losses")
    g.add_argument("--num-points", type=int, default=12544, help="sampled points per mask for BCE/Dice (0 = dense on the logit grid)")
    g.add_argument("--oversample-ratio", type=float, default=3.0)
    g.add_argument("--importance-sample-ratio", type=float, default=0.75)
    g.add_argument("--bce-weight", type=float, default=2.0)
    g.add_argument("--dice-weight", type=float, default=0.5)
    g.add_argument("--text-weight", type=float, default=1.0)
    g.add_argument("--text-weight-with-mask", type=float, default=0.1, help="text weight multiplier in batches with mask loss (paper: 0.1)")
    g.add_argument("--aux-weight", type=float, default=0.0, help="ShapesRef only: per-patch/pixel colour/shape/size probes (training-only, not saved)")
    g.add_argument("--aux-object-weight", type=float, default=0.0,
                   help="ShapesRef only: a probe on each object's pooled patch states (its colour/shape/size as one "
                   "region, which teaches shape where per-pixel probes do not; training-only, not saved)")
    g.add_argument("--aux-place-weight", type=float, default=0.0,
                   help="ShapesRef only: a regression of each object's centre from its pooled patch states (positional "
                   "phrases need the states to know where they are; training-only, not saved)")
    g.add_argument("--aux-query-place-weight", type=float, default=0.0,
                   help="a regression of the centre of each [SEG] token's target mask from its hidden state, through "
                   "the same head as --aux-place-weight (the query must say where its object is; any data with "
                   "masks; training-only, not saved)")
    g.add_argument("--aux-query-place-on", choices=("state", "embedding"), default="state",
                   help="what --aux-query-place-weight reads: the [SEG] token's hidden state (through the object place "
                   "head) or its projected embedding, the vector that makes the mask (through a head of its own)")
    g.add_argument("--aux-mask-place-weight", type=float, default=0.0,
                   help="the place part of each [SEG] mask alone (its embedding against the pixel positions, without "
                   "the image) must cover its target, with the mask loss; needs a model with pixel_positions and, to "
                   "learn more than a centre bias, --aux-query-place-on embedding (any data with masks)")
    g.add_argument("--distill-weight", type=float, default=0.5)
    t = g.add_mutually_exclusive_group()
    t.add_argument("--teacher-model", metavar="DIR", help="a transformers vision model directory (safetensors) to distil from")
    t.add_argument("--teacher-features", metavar="DIR", help="precomputed teacher features: DIR/{index}.safetensors with 'pixel' and/or 'token' (C,H,W)")
    g.add_argument("--teacher-target", choices=["pixel", "token"], default="pixel", help="which student features a --teacher-model supervises")

    g = p.add_argument_group("runtime")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--resume", metavar="DIR|auto", help="resume from a checkpoint directory, or the latest in --output-dir")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0 = only at the end)")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (oldest deleted)")
    g.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="dtype of the final model.safetensors")
    g.add_argument("--eval-every", type=int, default=500, help="held-out eval every N steps (0 = off)")
    g.add_argument("--eval-samples", type=int, default=200)
    g.add_argument("--eval-seed", type=int, default=424242, help="ShapesRef seed of the held-out set")
    g.add_argument("--eval-manifest", metavar="FILE", help="held-out manifest for --manifest runs")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--time-budget-minutes", type=float, default=None, help="stop cleanly after this long (this invocation), then eval and save")
    g.add_argument("--schedule-over-time", action="store_true",
                   help="run the cosine over --time-budget-minutes of training (summed over resumes) instead of "
                        "--max-steps, and stop when that time is spent: for a fixed slot of GPU time")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)")
    g.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto", help="bf16 autocast; auto = on a CUDA device that supports it, yes = also on the CPU (faster matmuls with AVX512-BF16 / AMX)")
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (for 3B+; needs torchrun)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


# ====================================================================================== distributed


class Dist:
    """Rank/world from torchrun's environment; a no-op shell for one process."""

    def __init__(self, device_arg: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        if device_arg == "cuda":  # an index, which set_device needs; under torchrun the local rank's GPU
            device_arg = f"cuda:{self.local_rank}"
        self.device = torch.device(device_arg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = self.world > 1 and not dist.is_initialized()  # a caller's group is left to the caller
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def max(self, values: list[float]) -> list[float]:
        """Each value's maximum over all ranks (so all ranks stop, save and schedule together)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def mean(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        """Mean of each logged value over all ranks' steps; ranks may lack a key (e.g. no mask that step)."""
        keys = sorted(set(sums) | set(LOG_KEYS)) if not self.enabled else list(LOG_KEYS)
        t = torch.tensor([[sums.get(k, 0.0), counts.get(k, 0)] for k in keys], dtype=torch.float64)
        if self.enabled:
            if self.device.type == "cuda":
                t = t.to(self.device)
            dist.all_reduce(t)
        return {k: float(s / c) for k, (s, c) in zip(keys, t.tolist()) if c > 0}

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while another still talks to it
            dist.destroy_process_group()


# ============================================================================================ model


def _parse_overrides(text: str) -> dict[str, Any]:
    try:
        out = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise SystemExit(f"--model-overrides is not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise SystemExit("--model-overrides must be a JSON object")
    return out


def _llm_state_dict(llm_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors LLM directory (single file or an index of shards); never pickle."""
    single = llm_dir / "model.safetensors"
    index = llm_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(load_file(str(llm_dir / s)))
        return out
    raise SystemExit(f"{llm_dir}: no model.safetensors (or index); .bin/.pth weights are not loaded (pickle)")


def init_from_llm(llm_dir: str | Path, preset: str, overrides: dict[str, Any]) -> tuple[PixelSailForConditionalGeneration, PixelSailProcessor]:
    """A Pixel-SAIL model whose transformer is a plain Qwen2-family LLM; vis/vp embeds and heads start fresh.

    The LLM's tokenizer gets the Pixel-SAIL tokens; new embedding rows start at the mean of the old ones.
    """
    from transformers import AutoTokenizer

    llm_dir = Path(llm_dir)
    cfg = json.loads((llm_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
    add_pixel_sail_tokens(tokenizer)
    text_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "max_position_embeddings", "rms_norm_eps")
    text = {k: cfg[k] for k in text_keys if k in cfg}
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta:
        text["rope_theta"] = float(theta)
    old_vocab = int(cfg["vocab_size"])
    text["vocab_size"] = max(old_vocab, len(tokenizer))
    text.update(overrides.pop("text_config", {}) or {})
    config = PixelSailConfig.from_preset(
        preset, text_config=text, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        **special_token_ids(tokenizer), **overrides,
    )
    model = PixelSailForConditionalGeneration(config)
    src = _llm_state_dict(llm_dir)
    own = model.state_dict()
    load: dict[str, torch.Tensor] = {}
    for k, v in src.items():
        key = k[len("language_model."):] if k.startswith("language_model.") else k
        if key not in own:
            continue
        if key in ("model.embed_tokens.weight", "lm_head.weight") and v.shape != own[key].shape:
            w = own[key].clone()
            w[:old_vocab] = v[:old_vocab].to(w.dtype)
            w[old_vocab:] = v[:old_vocab].float().mean(0).to(w.dtype)
            v = w
        if v.shape != own[key].shape:
            raise SystemExit(f"{llm_dir}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[key].shape)}")
        load[key] = v.to(own[key].dtype)
    if not any(k.startswith("model.layers.") for k in load):
        raise SystemExit(f"{llm_dir}: no Qwen2-style 'model.layers.*' weights found")
    model.load_state_dict(load, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    processor = PixelSailProcessor.from_config(config, tokenizer)
    return model, processor


def wants_attribute_maps(args: argparse.Namespace) -> bool:
    """Whether any auxiliary probe counts, so ShapesRef items must carry attribute and object-number maps."""
    return max(args.aux_weight, args.aux_object_weight, args.aux_place_weight) > 0


def build_model(args: argparse.Namespace, distill_dims: tuple[int, int]) -> tuple[PixelSailForConditionalGeneration, PixelSailProcessor]:
    """The starting model and its processor, from --init / --init-llm / --preset."""
    overrides = _parse_overrides(args.model_overrides)
    if args.image_size:
        overrides["max_image_size"] = int(args.image_size)
    dims = {"distill_pixel_dim": distill_dims[0], "distill_token_dim": distill_dims[1]}
    if args.init:
        from dataclasses import fields

        top = {f.name for f in fields(PixelSailConfig)}
        bad = sorted(set(overrides) - top)
        if bad:
            raise SystemExit(f"--model-overrides {bad}: an --init checkpoint's architecture cannot change")
        model = PixelSailForConditionalGeneration.from_pretrained(
            args.init, dtype=torch.float32, attn_implementation="sdpa", **dims, **overrides
        )
        processor = PixelSailProcessor.from_pretrained(args.init)
        processor.max_image_size = int(model.config.max_image_size)
        return model, processor
    if args.init_llm:
        model, processor = init_from_llm(args.init_llm, args.preset if args.preset != "tiny" else "0.5b", {**overrides, **dims})
        return model, processor
    if args.preset == "tiny":
        tokenizer = build_tiny_tokenizer()
    else:
        if not args.tokenizer:
            raise SystemExit(f"--preset {args.preset} from scratch needs --tokenizer DIR (e.g. a Qwen2.5 tokenizer)")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        add_pixel_sail_tokens(tokenizer)
        text = dict(overrides.pop("text_config", {}) or {})
        text.setdefault("vocab_size", len(tokenizer))
        overrides["text_config"] = text
        overrides.update(special_token_ids(tokenizer))
    config = PixelSailConfig.from_preset(args.preset, **overrides, **dims)
    config._attn_implementation = "sdpa"
    model = PixelSailForConditionalGeneration(config)
    return model, PixelSailProcessor.from_config(config, tokenizer)


def apply_lora(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """Wrap the transformer's linears with LoRA adapters; heads (and optionally embeddings) stay trainable."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=args.lora_dropout,
        target_modules=LORA_TARGETS, bias="none",
    )
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, cfg)
    train_embeddings = args.lora_train_embeddings or bool(args.init_llm)
    for name, param in peft_model.named_parameters():
        parts = name.split(".")
        if any(h in parts for h in HEAD_MODULES) or (train_embeddings and ("embed_tokens" in parts or "lm_head" in parts)):
            param.requires_grad_(True)
    return peft_model


def base_model(model: nn.Module) -> PixelSailForConditionalGeneration:
    """The PixelSail model under DDP / FSDP / peft wrappers."""
    m = model.module if hasattr(model, "module") and not isinstance(model, PixelSailForConditionalGeneration) else model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


# ==================================================================================== train module


class TrainModule(nn.Module):
    """The model plus training-only parts (auxiliary probes); ``forward(batch)`` → (loss, logged parts).

    One module so DDP/FSDP wrap and synchronise everything that gets gradients.
    """

    def __init__(self, model: nn.Module, weights: LossWeights, aux: bool, query_place_on: str = "state") -> None:
        super().__init__()
        self.model = model
        self.weights = weights
        cfg = base_model(model).config
        # Each probe exists only while its loss counts (aux: the dataset gives attribute maps at all).
        per_pixel, per_object = aux and weights.aux > 0, aux and weights.aux_object > 0
        self.aux_pixel = AttributeProbe(cfg.seg_hidden_size, AUX_NUM_CLASSES) if per_pixel else None
        self.aux_token = AttributeProbe(cfg.text_config.hidden_size, AUX_NUM_CLASSES) if per_pixel else None
        self.aux_object = AttributeProbe(cfg.text_config.hidden_size, AUX_NUM_CLASSES) if per_object else None
        on_state = weights.aux_query_place > 0 and query_place_on == "state"
        place = (aux and weights.aux_place > 0) or on_state
        self.aux_place = nn.Linear(cfg.text_config.hidden_size, 2) if place else None
        on_embedding = weights.aux_query_place > 0 and query_place_on == "embedding"
        self.aux_query_place = nn.Linear(cfg.seg_hidden_size, 2) if on_embedding else None
        if weights.aux_mask_place > 0 and not cfg.pixel_positions:
            raise ValueError("--aux-mask-place-weight needs a model with pixel_positions (--model-overrides)")
        self.patch_token_id = cfg.vision_patch_token_id
        self.seg_token_id = cfg.seg_token_id

    def forward(self, batch: dict[str, Any], teacher_pixel=None, teacher_token=None) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.model(**PixelSailProcessor.model_inputs(batch))
        res = compute_losses(out, batch["labels"], batch.get("seg_masks"), self.weights, teacher_pixel, teacher_token)
        loss, parts = res.loss, res.parts
        targets = batch.get("aux_targets", [])
        probes = (self.aux_pixel, self.aux_object, self.aux_place)
        if any(p is not None for p in probes) and any(t is not None for t in targets):
            tokens = []
            for b, grid in enumerate(batch["image_grid_hw"].tolist()):
                h = out.last_hidden_state[b][batch["input_ids"][b] == self.patch_token_id]
                tokens.append(h.view(grid[0], grid[1], -1).permute(2, 0, 1) if h.shape[0] else None)
            terms = []
            if self.aux_pixel is not None:
                terms += [
                    ("loss_aux_pixel", aux_attribute_loss(self.aux_pixel, out.pixel_features, targets), self.weights.aux),
                    ("loss_aux_token", aux_attribute_loss(self.aux_token, tokens, targets), self.weights.aux),
                    # The [SEG] queries read through the pixel probe: one attribute space for queries and pixels.
                    ("loss_aux_query", seg_query_attribute_loss(self.aux_pixel, out.seg_embeddings,
                                                                batch.get("seg_masks"), targets), self.weights.aux),
                ]
            if self.aux_object is not None:
                terms.append(("loss_aux_object", object_attribute_loss(self.aux_object, tokens, targets),
                              self.weights.aux_object))
            if self.aux_place is not None and self.weights.aux_place > 0:
                terms.append(("loss_aux_place", object_place_loss(self.aux_place, tokens, targets), self.weights.aux_place))
            loss = self._add_terms(loss, parts, terms)
        if self.weights.aux_query_place > 0:
            head, queries = self.query_place_inputs(out, batch)
            loss = self._add_terms(loss, parts, [(
                "loss_aux_query_place", query_place_loss(head, queries, batch.get("seg_masks")),
                self.weights.aux_query_place)])
        if self.weights.aux_mask_place > 0:
            loss = self._add_terms(loss, parts, [(
                "loss_aux_mask_place", mask_place_loss(self.mask_place_logits(out), batch.get("seg_masks"), self.weights),
                self.weights.aux_mask_place)])
        # Give every trainable parameter a gradient on every rank (0 where unused this batch, e.g. vp_embed
        # without visual prompts): DDP then needs no unused-parameter search and FSDP's reduce-scatters
        # have the same shape on all ranks. The decoder layers are always used.
        touch = [p.reshape(-1)[:1] for n, p in self.named_parameters() if p.requires_grad and ".layers." not in n]
        if touch:
            loss = loss + 0.0 * torch.cat(touch).sum()
        return loss, parts

    def query_place_inputs(self, out: Any, batch: dict[str, Any]) -> tuple[nn.Linear, list[torch.Tensor]]:
        """(head, per-sample queries) that ``--aux-query-place-weight`` reads: the projected [SEG] embeddings that
        make the masks through their own head, or the [SEG] hidden states through the object place head."""
        if self.aux_query_place is not None:
            return self.aux_query_place, out.seg_embeddings
        return self.aux_place, [h[ids == self.seg_token_id] for h, ids in zip(out.last_hidden_state, batch["input_ids"])]

    def mask_place_logits(self, out: Any) -> list[torch.Tensor | None]:
        """Per sample, (n, h, w): the place term of each [SEG] mask alone, its embedding · the pixel positions."""
        model = base_model(self.model)
        logits: list[torch.Tensor | None] = []
        for seg, pixel in zip(out.seg_embeddings, out.pixel_features):
            if pixel is None:
                logits.append(None)
                continue
            places = model.pixel_place_features(pixel.shape[-2], pixel.shape[-1], pixel.device, pixel.dtype)
            logits.append(torch.einsum("qc,hwc->qhw", seg, places))
        return logits

    @staticmethod
    def _add_terms(loss: torch.Tensor, parts: dict[str, float], terms: list[tuple[str, torch.Tensor | None, float]]
                   ) -> torch.Tensor:
        """``loss`` plus each weighted term that applies to this batch (None: it does not); logs each."""
        for name, a, w in terms:
            if a is not None:
                loss = loss + w * a
                parts[name] = float(a.detach())
        parts["loss"] = float(loss.detach())
        return loss


# ============================================================================================ teachers


class Teacher:
    """Distillation targets for a batch: precomputed feature files, or a frozen transformers vision model."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.features_dir = Path(args.teacher_features) if args.teacher_features else None
        self.target = args.teacher_target
        self.model = None
        self.device = device
        if args.teacher_model:
            from transformers import AutoImageProcessor, AutoModel

            self.image_processor = AutoImageProcessor.from_pretrained(args.teacher_model, local_files_only=True)
            self.model = AutoModel.from_pretrained(args.teacher_model, use_safetensors=True, local_files_only=True)
            self.model.eval().requires_grad_(False).to(device)

    def dims(self) -> tuple[int, int]:
        """(pixel, token) channel sizes of the targets (0 = none)."""
        if self.model is not None:
            c = self._model_features(np.zeros((64, 64, 3), np.uint8)).shape[0]
            return (c, 0) if self.target == "pixel" else (0, c)
        if self.features_dir is not None:
            files = sorted(self.features_dir.glob("*.safetensors"))
            if not files:
                raise SystemExit(f"--teacher-features {self.features_dir}: no *.safetensors files")
            t = load_file(str(files[0]))
            return (t["pixel"].shape[0] if "pixel" in t else 0, t["token"].shape[0] if "token" in t else 0)
        return 0, 0

    @torch.no_grad()
    def _model_features(self, image: np.ndarray) -> torch.Tensor:
        inputs = self.image_processor(images=image, return_tensors="pt").to(self.device)
        out = self.model(**inputs)
        feats = getattr(out, "pixel_decoder_last_hidden_state", None)
        if feats is None:
            feats = out.last_hidden_state
        if feats.dim() == 3:  # (1, N, C) tokens: drop leading CLS/register tokens, reshape to the patch grid
            ph = inputs["pixel_values"].shape[-2] // _patch(self.model)
            pw = inputs["pixel_values"].shape[-1] // _patch(self.model)
            feats = feats[:, -ph * pw :].reshape(1, ph, pw, -1).permute(0, 3, 1, 2)
        return feats[0].float()

    def batch_targets(self, batch: dict[str, Any], images: list[np.ndarray] | None) -> tuple[list | None, list | None]:
        """Per-sequence (pixel, token) target lists for a collated batch."""
        seq_keys = batch["seq_keys"]
        pixel, token = [], []
        cache: dict[tuple, dict[str, torch.Tensor]] = {}
        for i, (key, flipped) in enumerate(seq_keys):
            ck = (tuple(key), bool(flipped))
            if ck not in cache:
                if self.model is not None:  # it sees the augmented image itself: nothing to mirror
                    cache[ck] = {self.target: self._model_features(images[i])}
                else:
                    path = self.features_dir / f"{key[0]}.safetensors"
                    cache[ck] = load_file(str(path)) if path.is_file() else {}
            feats = cache[ck]
            p, t = feats.get("pixel"), feats.get("token")
            if flipped and self.model is None:
                p = None if p is None else p.flip(-1)
                t = None if t is None else t.flip(-1)
            pixel.append(None if p is None else p.to(self.device))
            token.append(None if t is None else t.to(self.device))
        return (pixel if any(x is not None for x in pixel) else None, token if any(x is not None for x in token) else None)


def _patch(model: nn.Module) -> int:
    cfg = model.config
    p = getattr(cfg, "patch_size", None) or getattr(getattr(cfg, "vision_config", None), "patch_size", None)
    if not p:
        raise SystemExit("teacher model: cannot tell its patch size (give --teacher-features instead)")
    return int(p[0] if isinstance(p, (list, tuple)) else p)


# ============================================================================================ trainer


def _log(msg: str) -> None:
    print(f"[pixel-sail-train] {msg}", file=sys.stderr, flush=True)


def _parse_mix(text: str | None, flag: str = "--mix") -> dict[str, float] | None:
    """"a=0.5,b=0.5" → {"a": 0.5, "b": 0.5}."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise SystemExit(f"{flag}: cannot read {part!r} (want name=weight)") from None
    return out


class Trainer:
    """Owns the run: model, optimiser, data, checkpoints, logging. ``run()`` trains to the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Writing model shards" bars between our own
        if args.threads:
            torch.set_num_threads(int(args.threads))
        self.dist = Dist(args.device)
        self.device = self.dist.device
        self.out = Path(args.output_dir)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        if args.fsdp and not self.dist.enabled:
            _log("--fsdp without torchrun: running unsharded")
        if args.data is None and args.manifest is None:
            args.data = "shapesref"
        # Seed everything that is not keyed explicitly (initialisation, dropout, point sampling).
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        # bf16 autocast: by default on a CUDA device that has it; on the CPU when asked (--bf16 yes), where
        # CPUs with AVX512-BF16 / AMX run its matmuls faster. The weights and the optimizer stay float32.
        self.use_bf16 = args.bf16 == "yes" or (
            args.bf16 == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )

        self.teacher = Teacher(args, self.device) if (args.teacher_model or args.teacher_features) else None
        distill_dims = self.teacher.dims() if self.teacher else (0, 0)
        model, self.processor = build_model(args, distill_dims)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.lora = args.lora_r > 0
        if self.lora:
            model = apply_lora(model, args)
        weights = LossWeights(
            text=args.text_weight, text_with_mask=args.text_weight_with_mask, bce=args.bce_weight,
            dice=args.dice_weight, distill=args.distill_weight, aux=args.aux_weight, aux_object=args.aux_object_weight,
            aux_place=args.aux_place_weight, aux_query_place=args.aux_query_place_weight,
            aux_mask_place=args.aux_mask_place_weight, num_points=args.num_points,
            oversample_ratio=args.oversample_ratio, importance_sample_ratio=args.importance_sample_ratio,
        )
        aux = wants_attribute_maps(args) and args.data == "shapesref"
        self.module = TrainModule(model, weights, aux, args.aux_query_place_on)
        if args.init and not args.resume:
            self._warm_start_probes(Path(args.init))
        self.module.to(self.device)
        self.module.train()
        self.wrapped = self._wrap(self.module)

        try:
            groups = param_groups(self.module, args.weight_decay, args.lr, _parse_mix(args.lr_scale, "--lr-scale"))
        except ValueError as exc:
            raise SystemExit(f"--lr-scale {args.lr_scale}: {exc}") from None
        self.optimizer = torch.optim.AdamW(
            groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.weight_decay, foreach=True,
        )
        self.dataset = self._dataset()
        per_step = args.batch_size * self.dist.world * args.grad_accum
        if args.max_steps is None:
            if args.data == "shapesref":
                raise SystemExit("--max-steps is required with ShapesRef (it is endless)")
            args.max_steps = max(1, math.ceil(len(self.dataset) * args.epochs / per_step))
        self.max_steps = int(args.max_steps)
        warmup = args.warmup_steps if args.warmup_steps is not None else int(round(args.warmup_ratio * self.max_steps))
        self.warmup = int(warmup)
        self.time_progress = 0.0  # the spent fraction of the time budget, with --schedule-over-time
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, self.warmup, self.max_steps, args.min_lr_ratio, self.time_progress)
        )
        self.step = 0
        self.micro = 0
        self.history: list[dict] = []
        self.stop_requested = False
        self.elapsed_before = 0.0
        if args.resume:
            self._resume(args.resume)
            if args.schedule_over_time:
                self.time_progress = self.elapsed_before / (args.time_budget_minutes * 60)
        if self.dist.main:
            n_params = sum(p.numel() for p in self.module.model.parameters())
            n_train = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
            _log(
                f"{n_params / 1e6:.2f} M parameters ({n_train / 1e6:.2f} M trainable), device {self.device}, "
                f"world {self.dist.world}, {self.max_steps} steps of {per_step} images, from step {self.step}"
            )

    # -- setup helpers --

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return module
        if self.args.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.use_bf16 else MixedPrecisionPolicy()
            for layer in base_model(module.model).model.layers:
                fully_shard(layer, mp_policy=mp)
            fully_shard(module, mp_policy=mp)
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # TrainModule.forward touches every parameter, so no unused-parameter search is needed.
        return DDP(module, device_ids=ids)

    def _dataset(self):
        a = self.args
        if a.data == "shapesref":
            from . import shapesref as sr

            mix, probs = _parse_mix(a.mix), _parse_mix(a.prompt_probs, "--prompt-probs")
            if mix and set(mix) - set(sr.TASKS):
                raise SystemExit(f"--mix: unknown task(s) {sorted(set(mix) - set(sr.TASKS))}; known: {', '.join(sr.TASKS)}")
            if probs and set(probs) - set(sr.PROMPT_TYPE_PROBS):
                raise SystemExit(f"--prompt-probs: unknown kind(s) {sorted(set(probs) - set(sr.PROMPT_TYPE_PROBS))}")
            gen_kwargs = {"max_side": a.scene_max_side, "min_side": min(160, a.scene_max_side)} if a.scene_max_side else {}
            return ShapesRefDataset(
                self.processor, seed=a.seed, length=a.train_size, turns_per_image=a.turns_per_image,
                flip_prob=a.flip_prob, mix=mix, p_absent=a.p_absent,
                curriculum_steps=a.curriculum_steps, max_prompts_per_sequence=a.max_prompts_per_sequence,
                prompt_probs=probs, aux_targets=wants_attribute_maps(a),
                generator_kwargs=gen_kwargs, appearance_prob=a.appearance_aug,
            )
        return ManifestDataset(
            self.processor, a.manifest, seed=a.seed, turns_per_image=a.turns_per_image, flip_prob=a.flip_prob,
            max_prompts_per_sequence=a.max_prompts_per_sequence, appearance_prob=a.appearance_aug,
        )

    def loader(self) -> Iterable[dict[str, Any]]:
        """Collated batches from the current data position (this rank's share; workers if asked)."""
        a = self.args
        sampler = ResumableBatchSampler(
            len(self.dataset), a.batch_size, seed=a.seed, rank=self.dist.rank, world_size=self.dist.world,
            grad_accum=a.grad_accum, start=self.micro,
        )
        collate = ItemCollator(self.processor)
        if a.num_workers > 0:
            from torch.utils.data import DataLoader

            return iter(DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=a.num_workers,
                                   persistent_workers=True, prefetch_factor=2))
        return (collate([self.dataset[k] for k in keys]) for keys in sampler)

    # -- one optimiser step --

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """Forward/backward over ``grad_accum`` micro-batches, clip, step; returns averaged loss parts."""
        totals: dict[str, float] = {}
        seen: dict[str, int] = {}
        n = len(batches)
        for i, batch in enumerate(batches):
            teacher = self.teacher.batch_targets(batch, batch.get("images")) if self.teacher else (None, None)
            batch = batch_to_device(batch, self.device)
            sync = contextlib.nullcontext()
            if i < n - 1 and hasattr(self.wrapped, "no_sync"):
                sync = self.wrapped.no_sync()
            amp = self._autocast()
            with sync:
                with amp:
                    loss, parts = self.wrapped(batch, *teacher)
                (loss / n).backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
                seen[k] = seen.get(k, 0) + 1
        totals = {k: v / seen[k] for k, v in totals.items()}
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.args.max_grad_norm)
            totals["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.micro += n
        return totals

    # -- the loop --

    def run(self) -> Path:
        a = self.args
        if a.probe_warmup_steps > 0 and self.step == 0:
            self.warm_up_probes(a.probe_warmup_steps)
        start = time.time()
        budget = a.time_budget_minutes * 60 if a.time_budget_minutes else None
        self._install_signal_handlers()
        loader = self.loader()
        bar = None
        if self.dist.main and not a.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stderr)
        window: dict[str, float] = {}
        counts: dict[str, int] = {}
        window_n = 0
        data_wait = 0.0  # seconds this window spent waiting for batches (data-bound when near the window's length)
        t_window = time.time()
        images_per_step = a.batch_size * a.grad_accum * self.dist.world
        while self.step < self.max_steps:
            t_data = time.time()
            batches = [next(loader) for _ in range(a.grad_accum)]
            data_wait += time.time() - t_data
            parts = self.train_step(batches)
            for k, v in parts.items():
                window[k] = window.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            window_n += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{parts.get('loss', float('nan')):.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if self.step % a.log_every == 0 or self.step == self.max_steps:
                avg = self.dist.mean(window, counts)
                dt = time.time() - t_window
                rec = {"type": "train", "step": self.step, "lr": self.scheduler.get_last_lr()[0],
                       "images_per_s": window_n * images_per_step / max(dt, 1e-9),
                       "data_wait_frac": min(1.0, data_wait / max(dt, 1e-9)),
                       "elapsed_s": self.elapsed_before + time.time() - start, **avg}
                self._record(rec)
                window, counts, window_n, data_wait, t_window = {}, {}, 0, 0.0, time.time()
            spent = time.time() - start + (self.elapsed_before if a.schedule_over_time else 0.0)
            flag, frac = self.dist.max([1.0 if self.stop_requested else 0.0, spent / budget if budget else 0.0])
            if a.schedule_over_time:
                self.time_progress = frac
            stop = flag > 0 or frac > 1.0
            last = self.step == self.max_steps or stop
            t_pause = time.time()
            if a.eval_every and (self.step % a.eval_every == 0 or last):
                self.evaluate()
            if (a.save_every and self.step % a.save_every == 0) or last:
                self.save_checkpoint(self.elapsed_before + time.time() - start)
            t_window += time.time() - t_pause  # throughput counts training only
            if stop:
                if self.dist.main:
                    _log(f"stopping at step {self.step} ({'signal' if self.stop_requested else 'time budget'})")
                break
        if bar is not None:
            bar.close()
        final = self.save_final()
        self.dist.close()
        return final

    def warm_up_probes(self, steps: int) -> None:
        """Train only the probes (the parts outside the model) for ``steps`` steps, the model frozen.

        Fresh probes' first gradients into the model are random directions; a trained model continued from a plain
        directory (no saved probes) lost much of its quality to them (model card, stage 9). Own AdamW at constant
        --lr, so the main run's optimizer and schedule start as without it.
        """
        if self.dist.enabled:
            raise SystemExit("--probe-warmup-steps runs in a single process (each rank would train its own probes)")
        probes = [p for p in self._probe_parameters().values() if p.requires_grad]
        if not probes:
            _log("--probe-warmup-steps: this run has no probes; skipped")
            return
        flags = {n: p.requires_grad for n, p in self.module.model.named_parameters()}
        self.module.model.requires_grad_(False)
        opt = torch.optim.AdamW(probes, lr=self.args.lr, weight_decay=self.args.weight_decay)
        loader = self.loader()
        t0, window = time.time(), []
        try:
            for i in range(1, steps + 1):
                batch = batch_to_device(next(loader), self.device)
                with self._autocast():
                    loss, _ = self.module(batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                window.append(float(loss.detach()))
                if i % self.args.log_every == 0 or i == steps:
                    self._record({"type": "probe_warmup", "step": i, "loss": sum(window) / len(window),
                                  "elapsed_s": time.time() - t0})
                    window = []
        finally:
            for n, p in self.module.model.named_parameters():
                p.requires_grad_(flags[n])

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self.stop_requested = True

        with contextlib.suppress(ValueError):  # not in the main thread (e.g. called from a test thread)
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGUSR1, handler)

    def _record(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if self.dist.main:
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    # -- eval --

    def evaluate(self) -> dict[str, Any] | None:
        """Held-out metrics (sharded over ranks); writes the eval record, curves.png and examples.png."""
        from . import evaluate as ev

        a = self.args
        if a.data != "shapesref" and not a.eval_manifest:
            return None
        if self.args.fsdp and self.dist.enabled:
            if self.dist.main and not getattr(self, "_fsdp_eval_note", False):
                _log("--fsdp: no in-training eval (parameters are sharded); run pixel-sail-eval on a checkpoint")
                self._fsdp_eval_note = True
            return None
        model = base_model(self.module.model)
        t0 = time.time()
        was_training = self.module.training
        amp = self._autocast()
        with amp:
            if a.data == "shapesref":
                acc, examples = ev.evaluate_shapesref_model(
                    model, self.processor, seed=a.eval_seed, num_samples=a.eval_samples,
                    rank=self.dist.rank, world_size=self.dist.world, num_examples=8 if self.dist.main else 0,
                )
            else:
                acc, examples = ev.evaluate_manifest_model(
                    model, self.processor, a.eval_manifest, rank=self.dist.rank, world_size=self.dist.world,
                    num_examples=8 if self.dist.main else 0,
                )
        self.module.train(was_training)
        if self.dist.enabled:
            ev.all_reduce_accumulator(acc, self.device)
        metrics = acc.compute()
        rec = {"type": "eval", "step": self.step, "eval_seconds": time.time() - t0, **metrics}
        self._record(rec)
        if self.dist.main:
            brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items() if not isinstance(v, dict)}
            _log("eval step {}: {}".format(self.step, json.dumps(brief)))  # per-template figures: metrics.jsonl
            plots.plot_curves(plots.read_jsonl(self.out / METRICS_FILE), self.out / "curves.png")
            if examples:
                plots.plot_examples(examples, self.out / "examples.png")
        return metrics

    # -- checkpoints --

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded, CPU) state dict of the train module, FQNs without wrapper prefixes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _full_optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            self.module, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def _model_dir_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of the train-module state that ``save_pretrained`` writes (plain runs only).

        A tied LM head is left out (FSDP's full state dict lists it under both names).
        """
        tied = base_model(self.module.model).config.tie_word_embeddings
        return {
            k[len("model."):]: v for k, v in state.items()
            if k.startswith("model.") and not (tied and k == "model.lm_head.weight")
        }

    def save_checkpoint(self, elapsed: float) -> Path | None:
        """Write ``checkpoint-{step}`` (every rank contributes its RNG state; rank 0 the rest)."""
        state = self._full_model_state()
        osd = self._full_optimizer_state()
        final = self.out / f"{CHECKPOINT_PREFIX}{self.step}"
        tmp = self.out / f"{CHECKPOINT_PREFIX}{self.step}.tmp"
        if self.dist.main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            model = base_model(self.module.model)
            if self.lora:
                extra = {k: v for k, v in state.items() if self._is_trainable(k) or not k.startswith("model.")}
            else:
                model_state = self._model_dir_state(state)
                model.save_pretrained(str(tmp), state_dict=model_state)
                self.processor.save_pretrained(tmp)
                saved = saved_keys(tmp)
                extra = {k: v for k, v in state.items() if not (k.startswith("model.") and k[len("model."):] in saved)}
                # tied weights are dropped by save_pretrained and restored by tying: not extra
                tied = set(getattr(model, "_tied_weights_keys", {}) or {}) if model.config.tie_word_embeddings else set()
                extra = {k: v for k, v in extra.items() if k[len("model."):] not in tied}
            save_file({k: v.contiguous() for k, v in extra.items()}, str(tmp / EXTRA_FILE))
            tensors, meta = optimizer_to_files(osd)
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            write_json(tmp / TRAINER_STATE, {
                "step": self.step, "micro_step": self.micro, "max_steps": self.max_steps, "warmup": self.warmup,
                "elapsed_seconds": elapsed, "world_size": self.dist.world, "lora": self.lora,
                "scheduler": jsonable(self.scheduler.state_dict()), "optimizer": meta,
                "args": vars(self.args), "history_tail": self.history[-50:],
            })
        self.dist.barrier()
        rng_tensors, rng_meta = rng_to_files()
        save_file(rng_tensors, str(tmp / f"rng_state_{self.dist.rank}.safetensors"))
        write_json(tmp / f"rng_state_{self.dist.rank}.json", rng_meta)
        self.dist.barrier()
        if self.dist.main:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._rotate()
        self.dist.barrier()
        return final

    def _is_trainable(self, fqn: str) -> bool:
        if not hasattr(self, "_trainable_names"):
            self._trainable_names = {n for n, p in self.module.named_parameters() if p.requires_grad}
        return fqn in self._trainable_names

    def _rotate(self) -> None:
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        ckpts = sorted(
            (d for d in self.out.glob(f"{CHECKPOINT_PREFIX}*") if d.name[len(CHECKPOINT_PREFIX):].isdigit()),
            key=lambda d: int(d.name[len(CHECKPOINT_PREFIX):]),
        )
        for d in ckpts[:-limit]:
            shutil.rmtree(d, ignore_errors=True)

    def _probe_parameters(self) -> dict[str, nn.Parameter]:
        """The training-only probes: every parameter of the train module outside the model itself."""
        return {n: p for n, p in self.module.named_parameters() if not n.startswith("model.")}

    def _warm_start_probes(self, ckpt: Path) -> None:
        """Load the training-only probes a checkpoint-N folder saved, so a continuation does not restart them.

        Only tensors outside the model (the probes) are taken, and only those this run has with the same shape;
        the model itself came from ``from_pretrained``. A plain model directory has no such file: nothing to do.
        """
        extra = ckpt / EXTRA_FILE
        if not extra.is_file():
            return
        own = self._probe_parameters()
        saved = {k: v for k, v in load_file(str(extra)).items() if not k.startswith("model.")}
        taken = [k for k, v in saved.items() if k in own and own[k].shape == v.shape]
        with torch.no_grad():
            for k in taken:
                own[k].copy_(saved[k])
        if self.dist.main:
            left = sorted(set(own) - set(taken))
            _log(f"warm-started {len(taken)} probe tensors from {extra}" + (f"; fresh: {left}" if left else ""))

    def _resume(self, where: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        ckpt = latest_checkpoint(self.out) if where == "auto" else Path(where)
        if ckpt is None:
            if self.dist.main:
                _log(f"--resume auto: no checkpoint in {self.out}, starting fresh")
            return
        meta = json.loads((ckpt / TRAINER_STATE).read_text())
        if meta.get("world_size", 1) != self.dist.world and self.dist.main:
            _log(f"resuming a {meta['world_size']}-process run on {self.dist.world}: the data order changes")
        state: dict[str, torch.Tensor] = {}
        if (ckpt / "model.safetensors").is_file() or (ckpt / "model.safetensors.index.json").is_file():
            state.update({f"model.{k}": v for k, v in _llm_state_dict(ckpt).items()})
        state.update(load_file(str(ckpt / EXTRA_FILE)))
        opts = StateDictOptions(full_state_dict=True, strict=False)
        result = set_model_state_dict(self.module, state, options=opts)
        missing = [k for k in getattr(result, "missing_keys", []) if self._is_trainable(k) and "lm_head" not in k]
        if missing:
            raise SystemExit(f"{ckpt}: checkpoint lacks trainable tensors, e.g. {missing[:3]}")
        if base_model(self.module.model).config.tie_word_embeddings:
            base_model(self.module.model).tie_weights()
        osd = optimizer_from_files(load_file(str(ckpt / OPTIMIZER_FILE)), meta["optimizer"])
        load_optimizer_state(self.module, self.optimizer, osd)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.micro = int(meta["step"]), int(meta["micro_step"])
        self.elapsed_before = float(meta.get("elapsed_seconds", 0.0))
        self.history = list(meta.get("history_tail", []))
        if self.dist.main:  # drop log records the interrupted run wrote after this checkpoint
            log = self.out / METRICS_FILE
            recs = [r for r in plots.read_jsonl(log) if r.get("step", 0) <= self.step]
            if log.is_file():
                log.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        rng_file = ckpt / f"rng_state_{self.dist.rank}.safetensors"
        if rng_file.is_file():
            rng_from_files(load_file(str(rng_file)), json.loads((ckpt / f"rng_state_{self.dist.rank}.json").read_text()))
        if self.dist.main:
            _log(f"resumed from {ckpt} at step {self.step}")

    def save_final(self) -> Path:
        """The final model directory (= --output-dir): LoRA merged, distillation heads dropped."""
        state = self._full_model_state()
        if self.dist.main:
            model = base_model(self.module.model)
            if self.lora:
                merged = self.module.model.merge_and_unload()
                model_state = merged.state_dict()
                model = merged
            else:
                model_state = self._model_dir_state(state)
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.args.save_dtype]
            model_state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model_state.items()}
            model.save_pretrained(str(self.out), state_dict=model_state)
            self.processor.save_pretrained(self.out)
            write_json(self.out / "training_args.json", {**vars(self.args), "final_step": self.step})
            plots.plot_curves(plots.read_jsonl(self.out / METRICS_FILE), self.out / "curves.png")
            _log(f"saved the model to {self.out}")
        self.dist.barrier()
        return self.out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.lora_r and args.fsdp:
        raise SystemExit("--lora-r with --fsdp is not supported; LoRA fits on one GPU per process (use DDP)")
    if args.image_size is not None and args.image_size <= 0:
        raise SystemExit("--image-size must be positive")
    for flag in ("flip_prob", "appearance_aug"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            raise SystemExit(f"--{flag.replace('_', '-')} is a probability: give a value in [0, 1]")
    weights = [k for k in vars(args) if k.endswith("_weight") or k == "text_weight_with_mask"]
    negative = [k for k in weights if getattr(args, k) < 0]
    if negative:  # a negative weight would train the model to do worse on that term
        raise SystemExit(f"loss weights must be >= 0: {', '.join('--' + k.replace('_', '-') for k in negative)}")
    if args.data is None and args.manifest is None and not args.max_steps:
        raise SystemExit("--max-steps is required with ShapesRef (it is endless)")
    if args.probe_warmup_steps < 0:
        raise SystemExit("--probe-warmup-steps must be >= 0")
    if args.schedule_over_time and not args.time_budget_minutes:
        raise SystemExit("--schedule-over-time needs --time-budget-minutes (the time the schedule runs over)")
    trainer = Trainer(args)
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
