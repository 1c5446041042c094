"""Losses on hand-checkable cases: perfect predictions cost ~0, wrong ones a lot, gradients reach the inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pixel_sail_ros.training.losses import (
    AttributeProbe,
    LossWeights,
    aux_attribute_loss,
    compute_losses,
    distill_loss,
    mask_losses,
    point_sample,
    text_loss,
    uncertain_point_coords,
)


def _square(h: int = 32, w: int = 32) -> torch.Tensor:
    m = torch.zeros(1, h, w)
    m[0, h // 4 : h // 2, w // 4 : 3 * w // 4] = 1.0
    return m


def test_text_loss_is_shifted_and_ignores_unlabelled():
    vocab, labels = 7, torch.tensor([[-100, -100, 3, 5, -100]])
    logits = torch.full((1, 5, vocab), -20.0)
    logits[0, 1, 3] = 20.0  # position 1 predicts the label at 2
    logits[0, 2, 5] = 20.0
    assert text_loss(logits, labels).item() < 1e-6
    wrong = torch.full((1, 5, vocab), -20.0)
    wrong[0, 2, 3] = 20.0  # unshifted guess: heavily penalised
    wrong[0, 3, 5] = 20.0
    assert text_loss(wrong, labels).item() > 10
    uniform = torch.zeros(1, 5, vocab, requires_grad=True)
    assert text_loss(uniform, labels).item() == pytest.approx(math.log(vocab), rel=1e-5)
    none = text_loss(uniform, torch.full((1, 5), -100))
    none.backward()  # no labelled token: zero loss that still backpropagates
    assert none.item() == 0.0 and uniform.grad is not None


def test_point_sample_reads_pixel_centres():
    maps = torch.arange(12.0).view(1, 1, 3, 4)
    coords = torch.tensor([[[(1 + 0.5) / 4, (2 + 0.5) / 3], [0.5 / 4, 0.5 / 3]]])
    assert point_sample(maps, coords)[0, 0].tolist() == pytest.approx([9.0, 0.0], abs=1e-5)


def test_uncertainty_sampling_prefers_the_boundary():
    logits = (_square(64, 64) * 2 - 1) * 10  # |logit| = 10 everywhere except a blur-free edge
    torch.manual_seed(0)
    coords = uncertain_point_coords(logits[None], 400, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert coords.shape == (1, 400, 2) and coords.min() >= 0 and coords.max() <= 1
    picked = point_sample(logits[None], coords[:, :300]).abs().mean()
    random = point_sample(logits[None], torch.rand(1, 300, 2)).abs().mean()
    assert picked < random  # the uncertain share sits where logits are near 0


def test_mask_losses_perfect_vs_wrong_dense():
    gt = _square()
    perfect = ((gt * 2 - 1) * 30).requires_grad_()
    bce, dice, n = mask_losses([perfect], [gt], LossWeights(num_points=0))
    assert n == 1 and bce.item() < 1e-6 and dice.item() < 1e-3
    bce_w, dice_w, _ = mask_losses([-perfect.detach()], [gt], LossWeights(num_points=0))
    assert bce_w.item() > 5 and dice_w.item() > 0.9
    pred = torch.zeros(1, 32, 32, requires_grad=True)
    b, d, _ = mask_losses([pred], [gt], LossWeights(num_points=0))
    (b + d).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_mask_losses_point_sampled():
    w = LossWeights(num_points=1024)
    full, empty = torch.ones(1, 16, 16), torch.zeros(1, 16, 16)
    torch.manual_seed(0)
    bce, dice, n = mask_losses([torch.full((2, 16, 16), 30.0) * torch.cat([full, empty] ) * 2 - 30.0], [torch.cat([full, empty])], w)
    assert n == 2 and bce.item() < 1e-6 and dice.item() < 1e-6  # away from edges, hard logits are exact
    gt = _square(128, 128)  # an edge: bilinear samples there are soft, hence a small positive loss
    bce, dice, _ = mask_losses([(gt * 2 - 1) * 30], [gt], LossWeights(num_points=4096, importance_sample_ratio=0.0))
    assert bce.item() < 0.1 and dice.item() < 0.02
    pred = torch.zeros(1, 128, 128, requires_grad=True)
    b, d, _ = mask_losses([pred], [gt], w)
    assert b.item() == pytest.approx(math.log(2), rel=1e-4)
    (b + d).backward()
    assert pred.grad.abs().sum() > 0


def test_mask_losses_resolution_mismatch_and_count_mismatch():
    gt = _square(64, 64)
    low = ((torch.nn.functional.interpolate(gt[None], size=(16, 16), mode="area")[0] > 0.5).float() * 2 - 1) * 30
    bce, dice, n = mask_losses([low], [gt], LossWeights(num_points=0))
    assert n == 1 and dice.item() < 0.05  # GT area-resized to the logit grid
    two_pred = torch.randn(2, 16, 16, requires_grad=True)
    bce, dice, n = mask_losses([two_pred], [gt], LossWeights(num_points=0))
    assert n == 1 and bce.item() == 0.0 and dice.item() == 0.0  # mismatch: truncated, weighted 0
    (bce + dice).backward()
    assert two_pred.grad is not None


def test_distill_loss_resizes_teacher_and_checks_channels():
    s = torch.randn(4, 8, 8, requires_grad=True)
    assert distill_loss([s], [s.detach()]).item() == pytest.approx(0.0)
    t = torch.ones(4, 16, 16)
    d = distill_loss([s], [t])
    assert d.item() == pytest.approx(((s.detach() - 1) ** 2).mean().item(), rel=1e-5)
    d.backward()
    assert s.grad is not None
    assert distill_loss(None, [t]) is None
    with pytest.raises(ValueError, match="channels"):
        distill_loss([s], [torch.ones(3, 8, 8)])


def test_compute_losses_weights_text_down_when_masks_present():
    labels = torch.tensor([[-100, 2, 3]])
    logits = torch.zeros(1, 3, 5, requires_grad=True)
    gt = _square(8, 8)
    out = SimpleNamespace(logits=logits, mask_logits=[((gt * 2 - 1) * 30)], distill_pixel=None, distill_token=None)
    with_mask = compute_losses(out, labels, [gt], LossWeights(num_points=0))
    assert with_mask.loss.item() == pytest.approx(0.1 * math.log(5), abs=0.02)
    no_mask = compute_losses(SimpleNamespace(logits=logits, mask_logits=[torch.zeros(0, 2, 2)]), labels, [gt[:0]])
    assert no_mask.loss.item() == pytest.approx(math.log(5), rel=1e-5)
    assert no_mask.parts["num_masks"] == 0
    student = torch.zeros(2, 4, 4, requires_grad=True)
    out.distill_pixel = [student]
    d = compute_losses(out, labels, [gt], LossWeights(num_points=0), teacher_pixel=[torch.ones(2, 4, 4)])
    assert d.parts["loss_distill_pixel"] == pytest.approx(1.0)
    assert d.loss.item() == pytest.approx(with_mask.loss.item() + 0.5, abs=1e-4)
    d.loss.backward()
    assert student.grad is not None and logits.grad is not None


def test_aux_attribute_loss_learns_a_trivial_map():
    torch.manual_seed(0)
    feats = torch.randn(1, 6, 8, 8)
    target = (feats[0, :1] > 0).long().repeat(2, 1, 1)  # two attributes, class = sign of channel 0
    probe = AttributeProbe(6, (2, 2))
    opt = torch.optim.SGD(probe.parameters(), lr=1.0)
    first = None
    for _ in range(30):
        loss = aux_attribute_loss(probe, [feats[0]], [target])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_seg_query_attribute_loss_reads_the_target_class_under_its_mask() -> None:
    import torch

    from pixel_sail_ros.training.losses import AttributeProbe, seg_query_attribute_loss

    torch.manual_seed(0)
    probe = AttributeProbe(4, (3,))
    with torch.no_grad():
        probe.heads[0].weight.zero_()
        probe.heads[0].bias.zero_()
        probe.heads[0].weight[1, 0, 0, 0] = 5.0  # class 1 reads dimension 0
        probe.heads[0].weight[2, 1, 0, 0] = 5.0  # class 2 reads dimension 1
    targets = torch.zeros(1, 6, 6, dtype=torch.uint8)
    targets[0, :3] = 1
    targets[0, 3:] = 2
    mask_top = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask_top[0, :2, :2] = True
    right = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    wrong = torch.tensor([[0.0, 3.0, 0.0, 0.0]])
    low = seg_query_attribute_loss(probe, [right], [mask_top], [targets])
    high = seg_query_attribute_loss(probe, [wrong], [mask_top], [targets])
    assert low is not None and high is not None and float(low.detach()) < 0.01 < 5.0 < float(high.detach())
    background_only = torch.zeros(1, 6, 6, dtype=torch.bool)
    assert seg_query_attribute_loss(probe, [right], [background_only], [targets]) is None
    emb = right.clone().requires_grad_(True)
    seg_query_attribute_loss(probe, [emb], [mask_top], [targets * 0 + 2]).backward()
    assert emb.grad is not None and emb.grad[0, 1] < 0  # pushes the query towards class 2's direction


def _seg_query_attribute_loss_reference(probe, seg_embeddings, seg_masks, targets):
    """The definition, one mask and one attribute at a time: mean CE against the mode class under each mask."""
    import torch
    import torch.nn.functional as F

    terms = []
    for emb, masks, t in zip(seg_embeddings, seg_masks, targets):
        for q in range(min(emb.shape[0], masks.shape[0])):
            on = masks[q].bool()
            if not on.any():
                continue
            for a, lg in enumerate(probe(emb[q].float()[None, :, None, None])):
                values = t[a][on].long()
                values = values[(values >= 0) & (values < lg.shape[1])]
                if values.numel() == 0 or int(torch.mode(values).values) == 0:
                    continue
                terms.append(F.cross_entropy(lg.reshape(1, -1), torch.mode(values).values.reshape(1)))
    return torch.stack(terms).mean() if terms else None


def test_seg_query_attribute_loss_equals_its_per_mask_definition_on_random_batches() -> None:
    import torch

    from pixel_sail_ros.training.losses import AttributeProbe, seg_query_attribute_loss

    gen = torch.Generator().manual_seed(3)
    probe = AttributeProbe(8, (4, 7, 3))
    for trial in range(5):
        embs, masks, targets = [], [], []
        for _ in range(3):
            n = int(torch.randint(1, 5, (1,), generator=gen))
            embs.append(torch.randn(n, 8, generator=gen))
            m = torch.rand(n, 9, 11, generator=gen) < 0.3
            m[0] = False if trial % 2 else m[0]  # some queries with an empty mask
            masks.append(m)
            t = torch.stack([torch.randint(0, c, (9, 11), generator=gen) for c in (4, 7, 3)])
            t[1, :4] = 0  # background-heavy rows for one attribute
            targets.append(t)
        got = seg_query_attribute_loss(probe, embs, masks, targets)
        want = _seg_query_attribute_loss_reference(probe, embs, masks, targets)
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _object_attribute_loss_reference(probe, feats, targets, min_share=0.5):
    """The definition, one object at a time: pool the cells it covers (weighted by share) and classify the pool."""
    import torch
    import torch.nn.functional as F

    terms = []
    for f, t in zip(feats, targets):
        ids = t[-1].long()
        for i in range(1, int(ids.max()) + 1):
            on = (ids == i).float()
            share = F.adaptive_avg_pool2d(on[None, None], f.shape[-2:])[0, 0]
            if share.max() == 0:
                continue
            weight = torch.where(share >= min_share * share.max(), share, torch.zeros_like(share))
            pooled = (f * weight).sum((1, 2)) / weight.sum()
            for a, logits in enumerate(probe(pooled[None, :, None, None])):
                cls = t[a][ids == i].long()
                assert bool((cls == cls[0]).all())  # one object, one class per attribute
                terms.append(F.cross_entropy(logits.reshape(1, -1), cls[:1]))
    return torch.stack(terms).mean() if terms else None


def test_object_attribute_loss_equals_its_per_object_definition_on_shapesref_scenes() -> None:
    from pixel_sail_ros.training.data import AUX_NUM_CLASSES, attribute_maps
    from pixel_sail_ros.training.losses import AttributeProbe, object_attribute_loss
    from pixel_sail_ros.training.shapesref import ShapesRefGenerator, hflip_scene

    torch.manual_seed(0)
    gen = ShapesRefGenerator(seed=11)
    probe = AttributeProbe(16, AUX_NUM_CLASSES)
    scenes = [gen.scene(i) for i in range(4)] + [hflip_scene(gen.scene(4))]
    targets = [torch.from_numpy(attribute_maps(s, instances=True)) for s in scenes]
    assert all(t.shape[0] == len(AUX_NUM_CLASSES) + 1 for t in targets)
    assert [int(t[-1].max()) for t in targets] == [len(s.objects) for s in scenes]
    feats = [torch.randn(16, max(1, s.height // 16), max(1, s.width // 16)) for s in scenes]
    got = object_attribute_loss(probe, feats, targets)
    want = _object_attribute_loss_reference(probe, feats, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # maps without the instance map (what the teacher uses) are not for this loss
    assert object_attribute_loss(probe, feats, [t[:-1] for t in targets]) is None


def test_object_attribute_loss_separates_shapes_a_per_cell_probe_cannot() -> None:
    """Two objects whose cells look alike but for one cell of one of them: only the region tells them apart.

    Object 1 covers a 2×2 block of cells, object 2 a 1×4 row. Every cell of both reads the same feature but
    one cell of the row, so a per-cell probe must give the same class to seven cells of two classes, while
    a probe on each object's pooled cells separates the two (what the loss is for: shape is a property of
    the region, not of its inside).
    """
    from pixel_sail_ros.training.losses import AttributeProbe, aux_attribute_loss, object_attribute_loss

    torch.manual_seed(0)
    t = torch.zeros(2, 8, 8, dtype=torch.long)  # one attribute (2 classes + background) and the instance map
    t[0, 0:4, 0:4], t[1, 0:4, 0:4] = 1, 1  # object 1: class 1, a 2×2 block of 2-pixel cells
    t[0, 6:8, 0:8], t[1, 6:8, 0:8] = 2, 2  # object 2: class 2, a 1×4 row of cells
    feats = torch.zeros(3, 4, 4)
    feats[0, 0:2, 0:2] = 1.0  # every cell of both objects reads (1, 0, 0) ...
    feats[0, 3, 0:4] = 1.0
    feats[1, 3, 3] = 4.0  # ... but for one cell of the row: the region's mean differs, most cells do not
    probe = AttributeProbe(3, (3,))
    opt = torch.optim.Adam(probe.parameters(), lr=0.1)
    for _ in range(200):
        loss = object_attribute_loss(probe, [feats], [t])
        opt.zero_grad()
        loss.backward()
        opt.step()
    pooled_ok = float(loss.detach())
    assert pooled_ok < 0.05  # the pooled regions are separable
    cell_probe = AttributeProbe(3, (3,))
    opt = torch.optim.Adam(cell_probe.parameters(), lr=0.1)
    for _ in range(200):
        cell_loss = aux_attribute_loss(cell_probe, [feats], [t[:1]])
        opt.zero_grad()
        cell_loss.backward()
        opt.step()
    with torch.no_grad():
        pred = cell_probe(feats[None])[0][0].argmax(0)  # (4, 4)
    # the row's three plain cells look exactly like the block's cells, so the per-cell probe errs on them or on
    # the block; the pooled probe did not
    wrong = int((pred[0:2, 0:2] != 1).sum()) + int((pred[3, 0:3] != 2).sum())
    assert wrong >= 3 and pooled_ok < 0.05


def test_object_place_loss_is_the_squared_error_to_each_visible_centre() -> None:
    from pixel_sail_ros.training.data import attribute_maps
    from pixel_sail_ros.training.losses import object_cell_weights, object_place_loss, pool_objects
    from pixel_sail_ros.training.shapesref import ShapesRefGenerator

    torch.manual_seed(0)
    scenes = [ShapesRefGenerator(seed=12).scene(i) for i in range(4)]
    targets = [torch.from_numpy(attribute_maps(s, instances=True)) for s in scenes]
    feats = [torch.randn(16, max(1, s.height // 16), max(1, s.width // 16)) for s in scenes]
    head = torch.nn.Linear(16, 2)
    errors = []
    for s, f in zip(scenes, feats):  # the definition, from the scene's own object masks
        masks = torch.from_numpy(np.stack([o.mask for o in s.objects]))
        weights = object_cell_weights(masks, f.shape[-2:])
        pred = head(pool_objects(f, weights))
        for o, p, wt in zip(s.objects, pred, weights):
            if wt.sum() > 0:
                ys, xs = np.nonzero(o.mask)
                centre = torch.tensor([(xs + 0.5).mean() / s.width - 0.5, (ys + 0.5).mean() / s.height - 0.5])
                errors.append(((p - centre) ** 2).detach())
    want = torch.cat(errors).mean()
    torch.testing.assert_close(object_place_loss(head, feats, targets).detach(), want.float(), rtol=1e-4, atol=1e-6)


def test_object_place_loss_is_learned_from_states_that_know_their_place_only() -> None:
    from pixel_sail_ros.training.data import attribute_maps
    from pixel_sail_ros.training.losses import object_place_loss
    from pixel_sail_ros.training.shapesref import ShapesRefGenerator

    scenes = [ShapesRefGenerator(seed=13, max_side=240).scene(i) for i in range(10)]
    targets = [torch.from_numpy(attribute_maps(s, instances=True)) for s in scenes]

    def fit(with_place: bool) -> float:
        torch.manual_seed(0)
        feats = []
        for s in scenes:
            h, w = max(1, s.height // 16), max(1, s.width // 16)
            f = torch.randn(4, h, w)
            if with_place:  # two channels hold each cell's normalised column and row
                f[0] = ((torch.arange(w) + 0.5) / w)[None].expand(h, w)
                f[1] = ((torch.arange(h) + 0.5) / h)[:, None].expand(h, w)
            feats.append(f)
        head = torch.nn.Linear(4, 2)
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(200):
            loss = object_place_loss(head, feats, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())

    assert fit(True) < 0.002  # about 1/50 of the image: the pooled cells put the centre where it is
    assert fit(False) > 0.02  # noise states: no better than guessing the middle (centres spread ~±0.3)


def test_query_place_loss_is_the_squared_error_to_each_target_mask_centre() -> None:
    from pixel_sail_ros.training.losses import query_place_loss

    torch.manual_seed(0)
    h, w = 30, 40
    masks = torch.zeros(3, h, w)
    masks[0, 2:8, 4:10] = 1  # a block at the top left
    masks[1, 20:30, 30:40] = 1  # one in the bottom-right corner
    # masks[2] is empty (a target wholly hidden): it teaches nothing
    states = torch.randn(3, 8)
    head = torch.nn.Linear(8, 2)
    pred = head(states)
    want_centres = torch.tensor([[7 / w - 0.5, 5 / h - 0.5], [35 / w - 0.5, 25 / h - 0.5]])
    want = ((pred[:2] - want_centres) ** 2).mean()
    got = query_place_loss(head, [states, None, torch.zeros(0, 8)], [masks, None, torch.zeros(0, h, w)])
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-7)
    # more queries than masks (a truncated sequence): the pairs in order, as the mask loss pairs them
    torch.testing.assert_close(query_place_loss(head, [states[:2]], [masks]).detach(), want.detach())
    assert query_place_loss(head, [states[2:]], [masks[2:]]) is None
    assert query_place_loss(head, [states], None) is None


def test_query_place_loss_trains_the_query_through_the_shared_head() -> None:
    """Gradient reaches the [SEG] states and the head; a query that can carry the target's place learns it."""
    from pixel_sail_ros.training.losses import query_place_loss

    torch.manual_seed(0)
    h, w = 24, 24
    masks = torch.zeros(16, h, w)
    centres = torch.randint(3, 21, (16, 2))
    for m, (x, y) in zip(masks, centres.tolist()):
        m[y - 2:y + 3, x - 2:x + 3] = 1
    states = torch.zeros(16, 6, requires_grad=True)  # free per-query states, as the transformer can make them
    head = torch.nn.Linear(6, 2)
    opt = torch.optim.Adam([states, *head.parameters()], lr=0.05)
    first = float(query_place_loss(head, [states], [masks]).detach())
    for _ in range(200):
        loss = query_place_loss(head, [states], [masks])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 0.02 and float(loss.detach()) < 1e-4
