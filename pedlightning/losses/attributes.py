"""Multi-label loss for pedestrian attribute recognition."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pedlightning.errors import ConfigError

__all__ = ["weighted_bce"]


def weighted_bce(
    logits: Tensor,
    targets: Tensor,
    positive_ratio: Tensor | None = None,
    reduction: Literal["batch_mean", "mean"] = "batch_mean",
) -> Tensor:
    """Binary cross-entropy over attributes, optionally weighted against label imbalance.

    With `positive_ratio` (r_j: fraction of training images with attribute j) this is the weighted
    cross-entropy of the strong baseline of Jia et al., "Rethinking of Pedestrian Attribute Recognition:
    Realistic Datasets and A Strong Baseline" (arXiv 2005.11909; extended 2021):
    `L = -1/N sum_i sum_j w_ij (y_ij log s(x_ij) + (1 - y_ij) log(1 - s(x_ij)))` with
    `w_ij = exp(1 - r_j)` if y_ij = 1 else `exp(r_j)`, so rare positives weigh more. None = plain BCE.

    Unlabelled targets (-1, "not annotated", as datasets merged from several sources use) contribute nothing:
    their weight is 0, as the paper's code zeroes the weight of RAP's unlabelled value (2) in its weighted loss.
    They are not negatives.
    `reduction`: "batch_mean" sums over attributes and averages over images (every image of the batch counts,
    however many of its attributes are labelled: the paper's equation and its code, `size_sum=True`); "mean"
    averages over the labelled elements (PyTorch's default when every element is labelled; 0 when none is).
    `logits`, `targets`: (N, A); targets in {1, 0, -1}. `positive_ratio` (A,): from the labelled targets only.
    """
    if logits.shape != targets.shape:
        raise ConfigError(f"weighted_bce: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    labelled = targets != -1
    targets = torch.where(labelled, targets, 0).to(logits.dtype)
    weight = labelled.to(logits.dtype)
    if positive_ratio is not None:
        ratio = torch.as_tensor(positive_ratio, dtype=logits.dtype, device=logits.device)
        if ratio.shape != logits.shape[1:]:
            raise ConfigError(
                f"weighted_bce: positive_ratio has shape {tuple(ratio.shape)}, expected one ratio per attribute "
                f"({logits.shape[1]})"
            )
        weight = weight * torch.exp(targets * (1 - ratio) + (1 - targets) * ratio)
    loss = F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction="none")
    if reduction == "batch_mean":
        return loss.sum(dim=1).mean()
    if reduction == "mean":
        return loss.sum() / labelled.sum().clamp(min=1)
    raise ConfigError(f"weighted_bce: unknown reduction {reduction!r}; expected 'batch_mean' or 'mean'")
