"""A small segmentation expert to distil from (the paper's ablation, issue 4 item 5).

Pixel-SAIL distils from experts' features (Mask2Former, SAM2). At this project's scale the expert is a small
SegFormer (transformers) trained on ShapesRef to label every pixel with its object's colour, shape and size
(background = 0). It is saved as a plain transformers model directory (safetensors + preprocessor config), so
``pixel-sail-train --teacher-model DIR`` loads it like any other vision model and distils its last hidden
state (stride 8) into the student's pixel features.

    python -m pixel_sail_ros.training.teacher --steps 600 --output-dir runs/teacher
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import shapesref as sr
from .data import AUX_ATTRIBUTES, AUX_NUM_CLASSES, attribute_maps
from .evaluate import DEFAULT_SEED
from .losses import AttributeProbe, aux_attribute_loss

EVAL_SEED = DEFAULT_SEED  # the held-out scenes pixel-sail-eval uses (training uses --seed)


def teacher_config(hidden_sizes: tuple[int, int] = (32, 64)) -> Any:
    """Two SegFormer stages (stride 4, then 8): a small, fast expert whose features keep small shapes."""
    from transformers import SegformerConfig

    return SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[2, 2], sr_ratios=[4, 2], hidden_sizes=list(hidden_sizes),
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[4, 4],
        decoder_hidden_size=hidden_sizes[-1],
    )


def image_processor(size: int = 224) -> Any:
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    return SegformerImageProcessorPil(size={"height": size, "width": size})


class AttributeExpert(nn.Module):
    """SegFormer encoder + the same linear per-pixel attribute heads the student's auxiliary loss uses."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import SegformerModel

        self.backbone = SegformerModel(config)
        self.heads = AttributeProbe(config.hidden_sizes[-1], AUX_NUM_CLASSES)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).last_hidden_state  # (B, C, H/8, W/8)


def _batch(gen: sr.ShapesRefGenerator, indices: list[int], processor: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    scenes = [gen.scene(i) for i in indices]
    pixels = processor(images=[s.image for s in scenes], return_tensors="pt")["pixel_values"]
    size = pixels.shape[-2:]
    targets = []
    for s in scenes:  # squash the class maps like the processor squashes the image
        t = torch.from_numpy(attribute_maps(s)).float()[None]
        targets.append(nn.functional.interpolate(t, size=size, mode="nearest")[0].long())
    return pixels, targets


@torch.no_grad()
def pixel_accuracy(model: AttributeExpert, processor: Any, num_images: int = 32, seed: int = EVAL_SEED) -> dict[str, float]:
    """Per-attribute accuracy over object pixels of held-out scenes (what the expert knows)."""
    model.eval()
    gen = sr.ShapesRefGenerator(seed=seed)
    correct = np.zeros(len(AUX_NUM_CLASSES))
    total = 0
    for start in range(0, num_images, 8):
        pixels, targets = _batch(gen, list(range(start, min(start + 8, num_images))), processor)
        feats = model.features(pixels)
        for b, t in enumerate(targets):
            logits = [nn.functional.interpolate(lg, size=t.shape[-2:], mode="bilinear", align_corners=False)[0]
                      for lg in model.heads(feats[b:b + 1])]
            fg = t[0] > 0
            total += int(fg.sum())
            for a, lg in enumerate(logits):
                correct[a] += int((lg.argmax(0)[fg] == t[a][fg]).sum())
    model.train()
    return {name: float(correct[a] / max(total, 1)) for a, name in enumerate(AUX_ATTRIBUTES)}


def train_teacher(output_dir: str | Path, steps: int = 600, batch_size: int = 8, lr: float = 2e-3, seed: int = 7,
                  image_size: int = 224, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the expert, save backbone + processor to ``output_dir``, return its held-out accuracies."""
    torch.manual_seed(seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = image_processor(image_size)
    model = AttributeExpert(teacher_config())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    gen = sr.ShapesRefGenerator(seed=seed)
    before = pixel_accuracy(model, processor)
    t0 = time.time()
    loss = torch.zeros(())
    for step in range(steps):
        pixels, targets = _batch(gen, [step * batch_size + k for k in range(batch_size)], processor)
        feats = model.features(pixels)
        loss = aux_attribute_loss(model.heads, list(feats), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"[teacher] step {step + 1}/{steps} loss {float(loss.detach()):.4f} ({time.time() - t0:.0f} s)")
    after = pixel_accuracy(model, processor)
    model.backbone.save_pretrained(out)
    processor.save_pretrained(out)
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "image_size": image_size,
              "final_loss": float(loss.detach()), "seconds": round(time.time() - t0, 1),
              "pixel_accuracy_before": before, "pixel_accuracy": after}
    (out / "teacher_eval.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(train_teacher(a.output_dir, a.steps, a.batch_size, a.lr, a.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
