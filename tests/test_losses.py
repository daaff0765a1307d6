"""Losses against hand computations on tiny batches (explicit loops and formulas, independent of the code)."""

from __future__ import annotations

import math

import pytest
import torch

from pedlightning.errors import ConfigError
from pedlightning.losses import (
    CenterLoss,
    GlobalBatch,
    TripletLoss,
    all_gather_nograd,
    clip_contrastive,
    gather_with_grad,
    gathered_sizes,
    global_batch,
    info_nce,
    sdm_loss,
    weighted_bce,
)


def _norm(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v))


def _ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(z) for z in logits))


# ----------------------------------------------------------------------------------------------------- triplet

POINTS = [[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [1.0, 2.0]]
PIDS = [0, 0, 1, 1]


def _batch_hard(points, pids, loss_of):
    """Reference: loop over anchors, hardest positive / negative by math.dist."""
    losses, aps, ans = [], [], []
    for a, (pa, ida) in enumerate(zip(points, pids)):
        pos = [math.dist(pa, p) for j, (p, i) in enumerate(zip(points, pids)) if i == ida and j != a]
        neg = [math.dist(pa, p) for p, i in zip(points, pids) if i != ida]
        if pos and neg:
            aps.append(max(pos))
            ans.append(min(neg))
            losses.append(loss_of(max(pos), min(neg)))
    return sum(losses) / len(losses), sum(aps) / len(aps), sum(ans) / len(ans)


def test_triplet_hard_margin_by_hand():
    out = TripletLoss(margin=0.3)(torch.tensor(POINTS), torch.tensor(PIDS))
    # Anchors: d_ap = 5, 5, 2, 2; d_an = 1, sqrt(8), 1, sqrt(5); loss = mean(d_ap - d_an + 0.3, 0 floor).
    by_hand = (4.3 + (5 - math.sqrt(8) + 0.3) + 1.3 + (2 - math.sqrt(5) + 0.3)) / 4
    assert out.loss.item() == pytest.approx(by_hand, abs=1e-5)
    assert out.dist_ap.item() == pytest.approx(3.5, abs=1e-5)
    assert out.dist_an.item() == pytest.approx((2 + math.sqrt(8) + math.sqrt(5)) / 4, abs=1e-5)


@pytest.mark.parametrize("margin", [None, 0.3, 10.0])
@pytest.mark.parametrize("normalize", [False, True])
def test_triplet_matches_loops(margin, normalize):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(9, 5, generator=g)
    pids = [0, 0, 0, 1, 1, 2, 2, 2, 3]  # pid 3 has no positive: left out
    points = [_norm(f) if normalize else f for f in feats.tolist()]
    if margin is None:
        loss_of = lambda ap, an: math.log(1 + math.exp(ap - an))
    else:
        loss_of = lambda ap, an: max(0.0, ap - an + margin)
    expected = _batch_hard(points, pids, loss_of)
    out = TripletLoss(margin=margin, normalize_features=normalize)(feats, torch.tensor(pids))
    assert [out.loss.item(), out.dist_ap.item(), out.dist_an.item()] == pytest.approx(expected, abs=1e-5)


def test_soft_margin_triplet_decreases_when_positives_move_closer():
    loss = TripletLoss(margin=None)
    feats = torch.tensor(POINTS)
    pids = torch.tensor(PIDS)
    before = loss(feats, pids).loss.item()
    closer = feats.clone()
    closer[1] = feats[0] + 0.5 * (feats[1] - feats[0])  # the positive of identity 0 halfway to its anchor
    closer[3] = feats[2] + 0.5 * (feats[3] - feats[2])
    assert loss(closer, pids).loss.item() < before
    # A gradient step lowers it too, and gradients are finite even for coincident points.
    x = feats.clone().requires_grad_(True)
    loss(x, pids).loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert loss(feats - 0.1 * x.grad, pids).loss.item() < before
    same = torch.zeros(4, 2, requires_grad=True)
    loss(same, pids).loss.backward()
    assert torch.isfinite(same.grad).all()


def test_triplet_without_any_valid_anchor_is_zero():
    feats = torch.randn(3, 4, requires_grad=True)
    out = TripletLoss()(feats, torch.tensor([0, 1, 2]))
    assert out.loss.item() == 0.0
    out.loss.backward()  # keeps the graph
    assert torch.all(feats.grad == 0)


def test_center_loss_and_its_centre_gradient_by_hand():
    """Bag of Tricks' centre loss: batch mean of ||f_i - c_{y_i}||^2; d/dc_y = -2/B sum_{y_i = y} (f_i - c_y)."""
    loss_fn = CenterLoss(num_classes=3, feat_dim=2)
    with torch.no_grad():
        loss_fn.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    feats = torch.tensor(POINTS, requires_grad=True)
    pids = torch.tensor([0, 0, 1, 1])
    loss = loss_fn(feats, pids)
    by_hand = (0.0 + 25.0 + (0.0 + 1.0) + (0.0 + 1.0)) / 4  # |(0,0)-(0,0)|^2, |(3,4)|^2, |(0,-1)|^2, |(0,1)|^2
    assert loss.item() == pytest.approx(by_hand)
    loss.backward()
    expected = torch.tensor([[-2 / 4 * (0.0 + 3.0), -2 / 4 * (0.0 + 4.0)],
                             [-2 / 4 * (0.0 + 0.0), -2 / 4 * (-1.0 + 1.0)],
                             [0.0, 0.0]])  # identity 2 is not in the batch: its centre gets no gradient
    torch.testing.assert_close(loss_fn.centers.grad, expected)
    torch.testing.assert_close(feats.grad[1], torch.tensor([2 / 4 * 3.0, 2 / 4 * 4.0]))


# ------------------------------------------------------------------------------------------------ contrastive


def test_info_nce_with_queue_by_hand():
    g = torch.Generator().manual_seed(2)
    q, k, queue = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    t = 0.2
    total = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        qi, ki = _norm(qi), _norm(ki)
        logits = [_dot(qi, ki) / t] + [_dot(qi, _norm(n)) / t for n in queue.tolist()]
        total += _ce(logits, 0)
    assert info_nce(q, k, queue, temperature=t).item() == pytest.approx(total / 3, abs=1e-5)


def test_info_nce_in_batch_by_hand():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    keys = [_norm(v) for v in k.tolist()]
    total = sum(_ce([_dot(_norm(qi), kj) / 0.07 for kj in keys], i) for i, qi in enumerate(q.tolist()))
    assert info_nce(q, k).item() == pytest.approx(total / 4, rel=1e-5)


def test_clip_contrastive_by_hand():
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    scale = 10.0
    imgs, txts = [_norm(v) for v in img.tolist()], [_norm(v) for v in txt.tolist()]
    i2t = sum(_ce([scale * _dot(imgs[i], txts[j]) for j in range(3)], i) for i in range(3)) / 3
    t2i = sum(_ce([scale * _dot(txts[i], imgs[j]) for j in range(3)], i) for i in range(3)) / 3
    assert clip_contrastive(img, txt, scale).item() == pytest.approx((i2t + t2i) / 2, abs=1e-5)
    assert clip_contrastive(img, txt, torch.tensor(scale)).item() == pytest.approx((i2t + t2i) / 2, abs=1e-5)


def test_sdm_by_hand():
    g = torch.Generator().manual_seed(5)
    img, txt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    pids = [7, 7, 3, 9, 3]
    scale, eps = 50.0, 1e-8
    imgs, txts = [_norm(v) for v in img.tolist()], [_norm(v) for v in txt.tolist()]

    def direction(a, b):
        total = 0.0
        for i in range(5):
            logits = [scale * _dot(a[i], b[j]) for j in range(5)]
            log_z = math.log(sum(math.exp(z - max(logits)) for z in logits)) + max(logits)
            same = sum(1 for p in pids if p == pids[i])
            for j in range(5):
                p_ij = math.exp(logits[j] - log_z)
                q_ij = (1.0 / same if pids[j] == pids[i] else 0.0) + eps
                total += p_ij * ((logits[j] - log_z) - math.log(q_ij))
        return total / 5

    expected = direction(imgs, txts) + direction(txts, imgs)
    assert sdm_loss(img, txt, torch.tensor(pids), scale, eps).item() == pytest.approx(expected, rel=1e-4)


def test_sdm_is_smallest_for_matching_embeddings():
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(4, 8, generator=g) * 10
    pids = torch.arange(4)
    assert sdm_loss(emb, emb, pids) < sdm_loss(emb, torch.randn(4, 8, generator=g), pids)


# A 3 x 3 batch with known cosines (inputs unnormalised on purpose): images e1, e2, e3; texts e1, e2,
# (e1 + e3) / sqrt(2). Cosine image i / text j: S = [[1, 0, r], [0, 1, 0], [0, 0, r]], r = 1 / sqrt(2).
IMAGES3 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.5]])
TEXTS3 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 4.0, 0.0], [1.0, 0.0, 1.0]])
R = 1 / math.sqrt(2)


def test_clip_contrastive_3x3_closed_form():
    s = 5.0
    image_to_text = ((math.log(math.exp(s) + 1 + math.exp(s * R)) - s) + (math.log(math.exp(s) + 2) - s)
                     + (math.log(2 + math.exp(s * R)) - s * R)) / 3
    # Columns of S: [1, 0, 0], [0, 1, 0], [r, 0, r].
    text_to_image = (2 * (math.log(math.exp(s) + 2) - s) + (math.log(2 * math.exp(s * R) + 1) - s * R)) / 3
    loss = clip_contrastive(IMAGES3, TEXTS3, s, gather=False)
    assert loss.item() == pytest.approx((image_to_text + text_to_image) / 2, abs=1e-6)
    assert clip_contrastive(IMAGES3, TEXTS3, s).item() == loss.item()  # gather is a no-op on one process


def test_info_nce_3x3_closed_form():
    t = 0.5
    in_batch = ((math.log(math.exp(1 / t) + 1 + math.exp(R / t)) - 1 / t) + (math.log(math.exp(1 / t) + 2) - 1 / t)
                + (math.log(2 + math.exp(R / t)) - R / t)) / 3
    assert info_nce(IMAGES3, TEXTS3, temperature=t).item() == pytest.approx(in_batch, abs=1e-6)
    # Queue e1, -e2: logits of query i = [q.k_i, q.e1, -q.e2] / t = [1, 1, 0], [1, 0, -1], [r, 0, 0] / t.
    queue = torch.tensor([[3.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    with_queue = ((math.log(2 * math.exp(1 / t) + 1) - 1 / t)
                  + (math.log(math.exp(1 / t) + 1 + math.exp(-1 / t)) - 1 / t)
                  + (math.log(math.exp(R / t) + 2) - R / t)) / 3
    assert info_nce(IMAGES3, TEXTS3, queue, temperature=t).item() == pytest.approx(with_queue, abs=1e-6)


def test_sdm_3x3_closed_form():
    s, eps = 4.0, 1e-8
    similarity = [[1.0, 0.0, R], [0.0, 1.0, 0.0], [0.0, 0.0, R]]
    # pids 5, 5, 6: images 0 and 1 match texts 0 and 1 (q = 1/2 each), image 2 matches text 2 only.
    q = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]

    def kl(rows: list[list[float]]) -> float:
        total = 0.0
        for i, row in enumerate(rows):
            z = sum(math.exp(s * c) for c in row)
            total += sum(math.exp(s * c) / z * (s * c - math.log(z) - math.log(q[i][j] + eps))
                         for j, c in enumerate(row))
        return total / 3

    columns = [list(col) for col in zip(*similarity)]
    expected = kl(similarity) + kl(columns)
    assert sdm_loss(IMAGES3, TEXTS3, torch.tensor([5, 5, 6]), s, eps).item() == pytest.approx(expected, rel=1e-5)


def test_global_batch_row_weights_by_hand():
    # Rank 1 of 2 holds rows 3..7 of 8: DDP's mean over ranks of (local sum * 2 / 8) is the global row mean.
    batch = GlobalBatch(world_size=2, offset=3, sizes=(3, 5))
    assert batch.rows == 8 and batch.row_weight == 0.25
    assert batch.mean(torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])).item() == 4.0
    logits, targets = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])
    ce = (math.log(2) + math.log(math.e + 1)) / 2  # rows: log(1 + 1) and log(e + 1) - 0
    assert batch.cross_entropy(logits, targets).item() == pytest.approx(ce * 2 * 0.25, abs=1e-6)
    single = GlobalBatch(world_size=1, offset=0, sizes=(2,))
    assert single.cross_entropy(logits, targets).item() == pytest.approx(ce, abs=1e-6)
    assert single.mean(torch.tensor([1.0, 2.0])).item() == 1.5


def test_gathers_are_identities_without_ddp():
    t = torch.randn(2, 3)
    assert gather_with_grad(t) is t and all_gather_nograd(t) is t
    assert gathered_sizes(5) == [5]
    assert global_batch(t) == GlobalBatch(1, 0, (2,)) == global_batch(t, gather=False)


# ------------------------------------------------------------------------------------------------- attributes


LOGITS = [[2.0, -1.0, 0.5], [-0.3, 0.0, 1.5]]
TARGETS = [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]


def _bce(x: float, y: float) -> float:
    s = 1 / (1 + math.exp(-x))
    return -(y * math.log(s) + (1 - y) * math.log(1 - s))


def test_weighted_bce_by_hand():
    ratio = [0.1, 0.5, 0.8]
    total = 0.0
    for row_x, row_y in zip(LOGITS, TARGETS):
        for j, (x, y) in enumerate(zip(row_x, row_y)):
            w = math.exp(1 - ratio[j]) if y == 1 else math.exp(ratio[j])
            total += w * _bce(x, y)
    loss = weighted_bce(torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(ratio))
    assert loss.item() == pytest.approx(total / 2, abs=1e-6)  # sum over attributes, mean over images
    mean = weighted_bce(torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(ratio), reduction="mean")
    assert mean.item() == pytest.approx(total / 6, abs=1e-6)


def test_plain_bce_by_hand():
    total = sum(_bce(x, y) for rx, ry in zip(LOGITS, TARGETS) for x, y in zip(rx, ry))
    assert weighted_bce(torch.tensor(LOGITS), torch.tensor(TARGETS)).item() == pytest.approx(total / 2, abs=1e-6)


def test_weighted_bce_errors():
    with pytest.raises(ConfigError, match="one ratio per attribute"):
        weighted_bce(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, 0.5]))
    with pytest.raises(ConfigError, match="differ"):
        weighted_bce(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="reduction"):
        weighted_bce(torch.zeros(2, 3), torch.zeros(2, 3), reduction="sum")
