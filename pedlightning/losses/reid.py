"""Metric-learning losses for person reID. The ID loss is `F.cross_entropy(logits, pids, label_smoothing=eps)`."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CenterLoss", "TripletLoss", "TripletOutput", "pairwise_euclidean"]


class TripletOutput(NamedTuple):
    """The loss and, for logging, the batch means of the mined distances (detached)."""

    loss: Tensor
    dist_ap: Tensor
    dist_an: Tensor


def pairwise_euclidean(x: Tensor) -> Tensor:
    """(N, D) -> (N, N) Euclidean distances; clamped before the square root so gradients stay finite."""
    sq = x.pow(2).sum(dim=1, keepdim=True)
    d2 = sq + sq.t() - 2.0 * x @ x.t()
    return d2.clamp(min=1e-12).sqrt()


class TripletLoss(nn.Module):
    """Batch-hard triplet loss L_BH of Hermans et al. 2017, "In Defense of the Triplet Loss for Person Re-ID", Sec. 2.

    For each anchor a: d_ap = max over its positives, d_an = min over its negatives (Euclidean distance).
    Loss per anchor: `max(0, margin + d_ap - d_an)`, or with `margin=None` the soft margin
    `log(1 + exp(d_ap - d_an))` (Hermans et al. Sec. 2; TransReID's default). Averaged over anchors.

    Args:
        margin: hinge margin; 0.3 follows "Bag of Tricks" (Luo et al. 2019). None = soft margin.
        normalize_features: L2-normalise features first (distances then lie in [0, 2]).

    Assumption: an anchor without a positive (its identity appears once in the batch) or without a negative
    has no triplet and is left out of the mean; a batch with no valid anchor gives a zero loss that keeps the
    graph. `forward(features, pids)` returns a `TripletOutput(loss, dist_ap, dist_an)`.
    """

    def __init__(self, margin: float | None = 0.3, normalize_features: bool = False):
        super().__init__()
        self.margin = margin
        self.normalize_features = normalize_features

    def forward(self, features: Tensor, pids: Tensor) -> TripletOutput:
        features = features.float()
        if self.normalize_features:
            features = F.normalize(features, dim=1)
        dist = pairwise_euclidean(features)
        same = pids.view(-1, 1) == pids.view(1, -1)
        eye = torch.eye(len(pids), dtype=torch.bool, device=pids.device)
        positive, negative = same & ~eye, ~same
        valid = positive.any(dim=1) & negative.any(dim=1)
        if not valid.any():
            zero = features.sum() * 0.0
            return TripletOutput(zero, zero.detach(), zero.detach())
        dist_ap = dist.masked_fill(~positive, float("-inf")).amax(dim=1)[valid]
        dist_an = dist.masked_fill(~negative, float("inf")).amin(dim=1)[valid]
        if self.margin is None:
            losses = F.softplus(dist_ap - dist_an)
        else:
            losses = F.relu(dist_ap - dist_an + self.margin)
        return TripletOutput(losses.mean(), dist_ap.detach().mean(), dist_an.detach().mean())


class CenterLoss(nn.Module):
    """Centre loss of Wen et al. (ECCV 2016) as Bag of Tricks (Luo et al. 2019, Sec. 4.5) uses it.

    One learnable centre per identity (``centers``, ``(num_classes, feat_dim)``, initialised N(0, 1) as Bag of
    Tricks' code); the loss is the batch mean of ``||f_i - c_{y_i}||^2``, each term clamped to [1e-12, 1e12] as
    that code does (Wen et al. write 1/2 of the sum; Bag of Tricks takes the mean without the 1/2). Gradients
    reach both the features and the centres; how the centres are updated is the caller's choice
    (:class:`pedlightning.tasks.ReIDModule` option ``center_lr``).
    """

    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: Tensor, pids: Tensor) -> Tensor:
        diff = features.float() - self.centers[pids].float()
        return diff.pow(2).sum(dim=1).clamp(min=1e-12, max=1e12).mean()
