"""Pixel-SAIL training losses (brief §1.6–1.7), computed from the model output, the labels and GT masks.

- text: shifted cross-entropy over answer tokens (labels ``-100`` elsewhere); weight 1.0, ×0.1 when the
  batch also has a mask loss (the paper down-weights text so the masks dominate segmentation batches);
- mask: sigmoid BCE (weight 2.0) + naive Dice (eps 1, weight 0.5) on points sampled Mask2Former-style
  (uncertain points of the prediction plus random ones), summed over masks and divided by the number of
  masks; with ``num_points <= 0`` they are computed densely on the prediction's grid instead (cheaper for
  tiny maps, and what the tiny default uses);
- distillation: per-image MSE between the student's projected features and a frozen teacher's features
  bilinearly resized to the student grid, averaged over images, weight 0.5 per teacher;
- auxiliary (ours, optional, training-only): per-patch / per-pixel attribute classification (e.g. the
  colour, shape and size of the object under each pixel, background = class 0) from a linear probe on the
  last-layer vision tokens and the per-pixel features. They give a dense signal at every pixel, which
  teaches a tiny model from scratch which visual features the words refer to much faster than the single
  [SEG] mask per turn; the probe weights are not part of the saved model.

Point sampling is done with ``torch.nn.functional.grid_sample`` so predictions and GT masks can have
different resolutions (GT is typically at the image size, predictions at a stride).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LossWeights:
    """Loss weights and point-sampling settings; defaults are the paper's."""

    text: float = 1.0
    text_with_mask: float = 0.1  # multiplier on the text weight when the batch has mask loss
    bce: float = 2.0
    dice: float = 0.5
    distill: float = 0.5
    aux: float = 1.0
    aux_object: float = 0.0
    aux_place: float = 0.0
    aux_query_place: float = 0.0
    aux_mask_place: float = 0.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    dice_eps: float = 1.0


@dataclass
class LossOutput:
    """Total loss (for backward) and detached components (for logging)."""

    loss: Tensor
    parts: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- text


def text_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean shifted CE over labelled positions: logits at t predict the label at t+1.

    Returns a zero (with graph) when nothing is labelled, so backward works on any batch.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    if not bool((shift_labels != -100).any()):
        return shift_logits.sum() * 0.0
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
    )


# --------------------------------------------------------------------------------------- point sample


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """Values of ``maps`` (N, C, H, W) at normalised coords (N, P, 2) in [0,1]² (x, y) → (N, C, P).

    Bilinear, ``align_corners=False`` (pixel centres at (i+0.5)/W), as in Mask2Former/detectron2, but with
    border padding: their zero padding makes an object touching the image edge look half background in
    the outer half pixel, for prediction and GT alike.
    """
    grid = coords.unsqueeze(2) * 2.0 - 1.0  # (N, P, 1, 2) in [-1, 1]
    out = F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(3)


@torch.no_grad()
def uncertain_point_coords(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask2Former point selection for logits (N, 1, H, W) → coords (N, num_points, 2) in [0,1]².

    Draw ``oversample_ratio × num_points`` random points, keep the ``importance_sample_ratio`` share whose
    logits are closest to 0 (most uncertain), fill the rest with fresh uniform points.
    """
    n = logits.shape[0]
    dev = logits.device
    num_sampled = max(int(num_points * oversample_ratio), num_points)
    cand = torch.rand(n, num_sampled, 2, device=dev, generator=generator)
    uncertainty = -point_sample(logits.float(), cand).abs().squeeze(1)  # (N, S): higher = more uncertain
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    parts = []
    if num_uncertain > 0:
        idx = uncertainty.topk(num_uncertain, dim=1).indices
        parts.append(torch.gather(cand, 1, idx.unsqueeze(-1).expand(-1, -1, 2)))
    if num_random > 0:
        parts.append(torch.rand(n, num_random, 2, device=dev, generator=generator))
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------------------------- masks


def _dice(prob: Tensor, target: Tensor, eps: float) -> Tensor:
    """Naive Dice per row: 1 − (2·Σpg + eps)/(Σp + Σg + eps), rows = masks."""
    inter = (prob * target).sum(-1)
    return 1.0 - (2.0 * inter + eps) / (prob.sum(-1) + target.sum(-1) + eps)


def mask_losses(
    pred: Sequence[Tensor],
    gt: Sequence[Tensor],
    w: LossWeights,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, int]:
    """(sum-of-BCE, sum-of-Dice, number of masks) over a batch; divide by the count outside.

    ``pred[b]`` (n_pred, h, w) logits, ``gt[b]`` (n_gt, H, W) {0,1}. A sample whose counts differ is
    truncated to the common count and weighted 0 (paper behaviour: it still runs, so DDP sees the graph).
    """
    preds, gts, weights = [], [], []
    for p, g in zip(pred, gt):
        if p is None or g is None:
            continue
        k = min(p.shape[0], g.shape[0])
        if k == 0:
            continue
        preds.append(p[:k].float())
        gts.append(g[:k].to(p.device, torch.float32))
        weights.append(torch.full((k,), 1.0 if p.shape[0] == g.shape[0] else 0.0, device=p.device))
    if not preds:
        zero = sum((p.sum() * 0.0 for p in pred if p is not None), torch.zeros(()))
        return zero, zero, 0
    bce_terms, dice_terms = [], []
    for p, g in zip(preds, gts):
        p4, g4 = p.unsqueeze(1), g.unsqueeze(1)  # (k,1,h,w), (k,1,H,W)
        if w.num_points > 0:
            coords = uncertain_point_coords(
                p4.detach(), w.num_points, w.oversample_ratio, w.importance_sample_ratio, generator
            )
            pl = point_sample(p4, coords).squeeze(1)  # (k, P)
            gl = point_sample(g4, coords).squeeze(1)
        else:
            if g4.shape[-2:] != p4.shape[-2:]:  # soft GT: the fraction of each logit cell the object covers
                down = g4.shape[-2] >= p4.shape[-2] and g4.shape[-1] >= p4.shape[-1]
                g4 = F.interpolate(g4, size=p4.shape[-2:], mode="area") if down else F.interpolate(
                    g4, size=p4.shape[-2:], mode="bilinear", align_corners=False
                )
            pl, gl = p4.flatten(1), g4.flatten(1)
        bce_terms.append(F.binary_cross_entropy_with_logits(pl, gl, reduction="none").mean(-1))
        dice_terms.append(_dice(pl.sigmoid(), gl, w.dice_eps))
    wt = torch.cat(weights)
    n = int(wt.numel())
    return (torch.cat(bce_terms) * wt).sum(), (torch.cat(dice_terms) * wt).sum(), n


# -------------------------------------------------------------------------------------- distillation


def distill_loss(student: Sequence[Tensor] | Tensor | None, teacher: Sequence[Tensor] | Tensor | None) -> Tensor | None:
    """Per-image MSE of student (C, h, w) vs teacher (C, H', W') resized to (h, w), mean over images."""
    if student is None or teacher is None:
        return None
    terms = []
    for s, t in zip(student, teacher):
        if s is None or t is None:
            continue
        t = t.to(s.device, torch.float32)
        if t.dim() == 2:  # (C, N) flattened or (N, C) tokens are not accepted: ask for a grid
            raise ValueError("teacher features must be (C, H, W) grids")
        if t.shape[-2:] != s.shape[-2:]:
            t = F.interpolate(t.unsqueeze(0), size=s.shape[-2:], mode="bilinear", align_corners=False)[0]
        if t.shape[0] != s.shape[0]:
            raise ValueError(f"teacher has {t.shape[0]} channels, the student's distillation head {s.shape[0]}")
        terms.append(F.mse_loss(s.float(), t))
    if not terms:
        return None
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------------- auxiliary


class AttributeProbe(nn.Module):
    """Linear per-location classifiers (one per attribute) used only for the auxiliary loss."""

    def __init__(self, in_dim: int, num_classes: Sequence[int]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(in_dim, c, 1) for c in num_classes)

    def forward(self, feats: Tensor) -> list[Tensor]:  # (B, C, h, w) → [(B, c_i, h, w)]
        return [h(feats) for h in self.heads]


def aux_attribute_loss(probe: AttributeProbe, feats: Sequence[Tensor], targets: Sequence[Tensor | None]) -> Tensor | None:
    """Mean CE of ``probe`` on each image's features (C, h, w) vs class maps (A, H, W) (nearest-resized).

    ``targets[b][a]`` holds attribute a's class id per pixel (0 = background; any integer dtype, -100 =
    ignore where the dtype is signed).
    """
    terms = []
    for f, t in zip(feats, targets):
        if f is None or t is None:
            continue
        t = t.to(f.device)
        if t.shape[-2:] != f.shape[-2:]:
            t = F.interpolate(t[None].float(), size=f.shape[-2:], mode="nearest")[0].long()
        for logits, tgt in zip(probe(f[None].float()), t[: len(probe.heads)]):
            terms.append(F.cross_entropy(logits, tgt[None].long(), ignore_index=-100))
    if not terms:
        return None
    return torch.stack(terms).mean()


def seg_query_attribute_loss(probe: AttributeProbe, seg_embeddings: Sequence[Tensor | None],
                             seg_masks: Sequence[Tensor | None] | None, targets: Sequence[Tensor | None]) -> Tensor | None:
    """Mean CE of ``probe`` on each [SEG] embedding vs the attributes of the object it must segment.

    Why: from scratch, the [SEG] query first learns "any object" (masks every object alike) and binds to the
    words of the phrase only slowly. Reading the same linear probe as the pixel features (``aux_pixel``) off the
    query puts both in one attribute space, so the dot product that makes the mask favours matching pixels.
    The target's class is the most common class of ``targets`` (A, H, W) under its ground-truth mask.
    """
    if seg_masks is None:
        return None
    # Vectorised over the queries of a sample and free of host syncs but one: on a GPU, a per-mask loop that
    # asks the device for each mask's class stalls the step hundreds of times.
    total: Tensor | None = None
    count: Tensor | None = None
    for emb, masks, t in zip(seg_embeddings, seg_masks, targets):
        if emb is None or masks is None or t is None or emb.shape[0] == 0:
            continue
        t = t.to(emb.device)
        masks = masks.to(emb.device)
        if masks.shape[-2:] != t.shape[-2:]:
            continue
        n = min(emb.shape[0], masks.shape[0])
        on = masks[:n].flatten(1).float()  # (n, H·W)
        for logits, classes in zip(probe(emb[:n].float()[:, :, None, None]), t[: len(probe.heads)]):
            c = logits.shape[1]
            flat = classes.flatten().long()
            # (H·W, c) one-hot by comparison (F.one_hot checks its input's range on the host); ignored pixels
            # (-100) match no class, so they vote for nothing
            votes = (flat[:, None] == torch.arange(c, device=flat.device)).float()
            tally = on @ votes  # (n, c): pixels of each class under each query's mask
            cls = tally.argmax(dim=1)  # the most common class (ties: the smallest id, as torch.mode)
            keep = (tally.sum(dim=1) > 0) & (cls != 0)  # an empty mask, or one on background only, teaches nothing
            ce = F.cross_entropy(logits.reshape(n, c), cls, reduction="none")
            part, kept = (ce * keep).sum(), keep.sum()
            total, count = (part, kept) if total is None else (total + part, count + kept)
    if count is None or int(count) == 0:
        return None
    return total / count


def object_cell_weights(masks: Tensor, grid_hw: Sequence[int], min_share: float = 0.5) -> Tensor:
    """(n, H, W) object masks → (n, h, w) pooling weights on a feature grid.

    A cell's weight is the share of it the object covers, kept where that share is at least ``min_share`` of
    the object's best cell: the object's own cells, without the rims it barely touches.
    """
    share = F.adaptive_avg_pool2d(masks.float()[None], tuple(grid_hw))[0]
    best = share.flatten(1).amax(dim=1)
    return share * (share >= min_share * best[:, None, None])


def pool_objects(feats: Tensor, weights: Tensor) -> Tensor:
    """(C, h, w) features, (n, h, w) weights → (n, C) weighted means (zero for an object with no weight)."""
    w = weights.flatten(1)
    return (w @ feats.float().flatten(1).T) / w.sum(1, keepdim=True).clamp_min(1e-6)


def _objects_of(f: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(pooled (n, C), keep (n,), one-hot masks (n, H, W)) of the objects numbered in the last map of ``t``."""
    ids = t[-1]
    n = int(ids.max())
    if n == 0:
        return None
    onehot = (ids[None] == torch.arange(1, n + 1, device=ids.device)[:, None, None]).float()  # (n, H, W)
    weight = object_cell_weights(onehot, f.shape[-2:])
    keep = weight.flatten(1).sum(1) > 0  # an object wholly hidden has no pixels, so no class
    return pool_objects(f, weight), keep, onehot


def object_attribute_loss(probe: AttributeProbe, feats: Sequence[Tensor | None], targets: Sequence[Tensor | None]
                          ) -> Tensor | None:
    """Mean CE of ``probe`` on each object's pooled features vs that object's attributes.

    Why: per-pixel attribute losses are dominated by background and by the inside of objects, where a circle
    and a square look alike, so a small model learns colour and size from them but hardly shape (a linear
    probe on the bundled model's object-pooled patch states read shape right 0.44 of the time, colour 0.99).
    Pooling each object's cells and classifying the pool asks the cells *together* to say what shape they
    form. ``feats[b]``: (C, h, w); ``targets[b]``: (A + 1, H, W) attribute maps whose last map numbers the
    objects (``attribute_maps(scene, instances=True)``); cells are weighted by :func:`object_cell_weights`.
    """
    total: Tensor | None = None
    count = 0
    for f, t in zip(feats, targets):
        if f is None or t is None or t.shape[0] != len(probe.heads) + 1:
            continue
        t = t.to(f.device).long()
        objects = _objects_of(f, t)
        if objects is None:
            continue
        pooled, keep, onehot = objects
        # every pixel of an object has its classes, so the largest value under its map is the class
        classes = (onehot.flatten(1)[:, None, :] * t[:-1].flatten(1)[None].float()).amax(dim=2).long()  # (n, A)
        for a, logits in enumerate(probe(pooled[:, :, None, None])):
            ce = F.cross_entropy(logits.flatten(1)[keep], classes[keep, a], reduction="sum")
            total = ce if total is None else total + ce
        count += int(keep.sum()) * len(probe.heads)
    if total is None or count == 0:
        return None
    return total / count


def mask_centres(masks: Tensor) -> Tensor:
    """(n, H, W) masks → (n, 2) centres (x, y) of their pixels, normalised to the image and centred (−½ … ½);
    (0, 0) for an empty mask."""
    h, w = masks.shape[-2:]
    m = masks.float()
    ys = (torch.arange(h, device=m.device, dtype=torch.float32) + 0.5) / h - 0.5
    xs = (torch.arange(w, device=m.device, dtype=torch.float32) + 0.5) / w - 0.5
    area = m.sum((1, 2)).clamp_min(1.0)
    return torch.stack([(m.sum(1) * xs).sum(1) / area, (m.sum(2) * ys).sum(1) / area], 1)


def object_place_loss(head: nn.Linear, feats: Sequence[Tensor | None], targets: Sequence[Tensor | None]) -> Tensor | None:
    """Mean squared error of ``head`` on each object's pooled features vs the centre of its visible pixels,
    (x, y) normalised to the image and centred (−½ … ½), in units of the image's width and height.

    Why: "the leftmost star" and "the red circle at the top" compare where objects are, but rotary positions
    reach only attention scores: a probe on the bundled model's pooled object states told which third of the
    image an object lies in no better than chance (``training/probe.py``). This asks the states to carry their
    place (with ``patch_positions`` the embeddings hold it; the loss keeps it through the layers). Same inputs
    as :func:`object_attribute_loss`; only the last map (object numbers) is read.
    """
    total: Tensor | None = None
    count = 0
    for f, t in zip(feats, targets):
        if f is None or t is None:
            continue
        objects = _objects_of(f, t.to(f.device).long())
        if objects is None:
            continue
        pooled, keep, onehot = objects
        se = F.mse_loss(head(pooled)[keep], mask_centres(onehot)[keep], reduction="sum")
        total = se if total is None else total + se
        count += int(keep.sum()) * 2
    if total is None or count == 0:
        return None
    return total / count


def query_place_loss(head: nn.Linear, seg_states: Sequence[Tensor | None], seg_masks: Sequence[Tensor | None] | None
                     ) -> Tensor | None:
    """Mean squared error of ``head`` on each [SEG] token's hidden state vs the centre of the mask it must make
    (same units as :func:`object_place_loss`; empty masks are skipped).

    Why: with ``object_place_loss`` the patch states know where each object lies, yet the bundled model still
    picked the wrong one of two red circles for "the red circle on the left" (cIoU 0.29 on that phrasing,
    0.86 on "red circle"). The mask is the [SEG] query against the states; this asks the query to say *where*
    its object is, through the same head, so query and objects carry place in one subspace. ``seg_states[b]``:
    (n, hidden) in order of the [SEG] tokens, ``seg_masks[b]``: (n, H, W), as the mask loss pairs them.
    """
    if seg_masks is None:
        return None
    total: Tensor | None = None
    count = 0
    for q, masks in zip(seg_states, seg_masks):
        if q is None or masks is None or q.shape[0] == 0:
            continue
        n = min(q.shape[0], masks.shape[0])
        masks = masks[:n].to(q.device)
        keep = masks.flatten(1).any(dim=1)
        if not bool(keep.any()):
            continue
        se = F.mse_loss(head(q[:n].float())[keep], mask_centres(masks)[keep], reduction="sum")
        total = se if total is None else total + se
        count += int(keep.sum()) * 2
    if total is None or count == 0:
        return None
    return total / count


def mask_place_loss(place_logits: Sequence[Tensor | None], seg_masks: Sequence[Tensor | None] | None, w: LossWeights
                    ) -> Tensor | None:
    """The mask loss (BCE + Dice, weighted as the mask's own, on every cell) of the place part of each [SEG]
    mask alone: its embedding against the pixel positions, without the image.

    Why: ``pixel_positions`` lets a mask logit add a place term, but the term is a product of two things that
    start knowing nothing of place (the zero-initialised position linear and a query projection that reads
    place at chance), so the mask loss alone left it at zero (450 steps: weights stayed below 0.01). Asked to
    cover the target on its own, the term must learn where the target is. It cannot while the query carries no
    place: with this loss alone it learned a fixed centre bias (450 steps: peak third at chance, the target
    ranked first 0.26), so pair it with ``--aux-query-place-on embedding``, which puts the place into the query.
    ``place_logits[b]``: (n, h, w), paired with ``seg_masks[b]`` (n, H, W) as the mask loss pairs them.
    """
    if seg_masks is None:
        return None
    bce, dice, n = mask_losses(place_logits, seg_masks, replace(w, num_points=0))
    if n == 0:
        return None
    return (w.bce * bce + w.dice * dice) / n


# ------------------------------------------------------------------------------------------ combined


def compute_losses(
    output,
    labels: Tensor,
    gt_masks: Sequence[Tensor] | None,
    weights: LossWeights | None = None,
    teacher_pixel: Sequence[Tensor] | None = None,
    teacher_token: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Total Pixel-SAIL loss from a ``PixelSailOutput`` (see docs/DEVELOPING.md) and the batch's targets."""
    w = weights or LossWeights()
    ce = text_loss(output.logits, labels)
    total = ce * 0.0
    parts: dict[str, float] = {"loss_text": float(ce.detach())}
    has_mask = False
    if gt_masks is not None and getattr(output, "mask_logits", None) is not None:
        bce, dice, n = mask_losses(output.mask_logits, gt_masks, w, generator)
        if n > 0:
            has_mask = True
            total = total + w.bce * bce / n + w.dice * dice / n
            parts["loss_mask"] = float(bce.detach()) / n
            parts["loss_dice"] = float(dice.detach()) / n
        else:
            total = total + bce  # zero with graph
        parts["num_masks"] = float(n)
    total = total + ce * (w.text * (w.text_with_mask if has_mask else 1.0))
    for name, student, teacher in (
        ("distill_pixel", getattr(output, "distill_pixel", None), teacher_pixel),
        ("distill_token", getattr(output, "distill_token", None), teacher_token),
    ):
        d = distill_loss(student, teacher)
        if d is not None:
            total = total + w.distill * d
            parts[f"loss_{name}"] = float(d.detach())
    parts["loss"] = float(total.detach())
    return LossOutput(total, parts)
