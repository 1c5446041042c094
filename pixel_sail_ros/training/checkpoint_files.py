"""Training checkpoints on disk: the files of a ``checkpoint-{step}/`` folder and their round trips.

::

    checkpoint-{step}/
      config.json, model.safetensors, tokenizer, processor_config.json   loadable model (not for LoRA runs)
      trainable.safetensors    tensors not in model.safetensors: aux probes, distill heads, LoRA + heads
      optimizer.safetensors    optimizer tensors "state/{param FQN}/{name}"
      trainer_state.json       step, scheduler, optimizer scalars/param groups, data position, args
      rng_state_{rank}.safetensors / .json     each rank's torch/CUDA/numpy/python RNG state
    No pickle: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
EXTRA_FILE = "trainable.safetensors"


def jsonable(x: Any) -> Any:
    """Tensors, numpy scalars and tuples as plain JSON values (one-element tensors as numbers)."""
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x


def optimizer_to_files(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an FQN-keyed optimizer state dict into safetensors tensors and a JSON part."""
    tensors, scalars = {}, {}
    for fqn, st in osd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state/{fqn}/{name}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(fqn, {})[name] = jsonable(v)
    return tensors, {"scalars": scalars, "param_groups": jsonable(osd["param_groups"])}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_to_files`."""
    state: dict[str, dict] = {}
    for key, v in tensors.items():
        fqn, name = key[len("state/"):].rsplit("/", 1)
        state.setdefault(fqn, {})[name] = v
    for fqn, sc in meta["scalars"].items():
        state.setdefault(fqn, {}).update(sc)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, osd: dict) -> None:
    """Load an FQN-keyed full optimizer state (plain, DDP or FSDP module); call before any gradient exists."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    for g in optimizer.param_groups:  # the loader hands back lists; keep torch's own tuple type
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])


def rng_to_files() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch CPU + every CUDA device (tensors), numpy and python (JSON)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": jsonable(random.getstate()), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def rng_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`rng_to_files`; CUDA states only where the same number of devices is present."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(len(tensors)) if f"torch_cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_json(path: Path, obj: Any) -> None:
    """Indented UTF-8 JSON with a final newline."""
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def saved_keys(model_dir: Path) -> set[str]:
    """Tensor names in a model directory's safetensors file(s), read from the headers only."""
    from safetensors import safe_open

    keys: set[str] = set()
    for f in model_dir.glob("model*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys.update(h.keys())
    return keys


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The highest-step complete ``checkpoint-*`` folder (one with its trainer state), or None."""
    best, best_step = None, -1
    for d in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        try:
            step = int(d.name[len(CHECKPOINT_PREFIX):])
        except ValueError:
            continue
        if (d / TRAINER_STATE).is_file() and step > best_step:
            best, best_step = d, step
    return best
