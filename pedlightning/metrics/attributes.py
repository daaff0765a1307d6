"""Pedestrian attribute recognition metrics under the PA-100K protocol (label-based mA, instance-based metrics)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from pedlightning.errors import EvaluationError
from pedlightning.metrics.ranking import SampleMetric


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den is 0 (the strong-baseline code's `num / (den + eps)`, without the eps bias)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


UnlabelledPredictions = Literal["ignore", "false_positive"]


def attribute_metrics(probs: Any, targets: Any, threshold: float = 0.5,
                      unlabelled_predictions: UnlabelledPredictions = "ignore") -> dict[str, Any]:
    """Label-based and instance-based metrics of multi-label attribute predictions.

    The protocol of PA-100K (Liu et al., ICCV 2017) as computed by the strong baseline (Jia et al., "Rethinking of
    Pedestrian Attribute Recognition", 2021): an attribute is predicted when its probability exceeds `threshold`.

    - `mA`: mean over attributes of (TPR + TNR) / 2.
    - `accuracy`, `precision`, `recall`: per image |P & T| / |P | T|, |P & T| / |P|, |P & T| / |T|, averaged.
    - `f1`: 2 P R / (P + R) from the mean precision and recall.
    - `per_attribute`: dict of (num_attributes,) float64 tensors `mA`, `pos_recall` (TPR), `neg_recall` (TNR).
    - `num_unlabelled`: how many (image, attribute) targets are -1.

    Unlabelled targets (-1, as datasets annotated by several sources use for "not annotated") are left out of their
    attribute's TP/FN/TN/FP counts, hence of mA; T never contains them. `unlabelled_predictions` says what a
    positive prediction on an unlabelled target does to the instance metrics: "ignore" leaves it out of P too (the
    image is scored on its labelled attributes only); "false_positive" keeps it in P, so it lowers that image's
    precision and accuracy, which is what the strong baseline's code does (its P counts every predicted attribute).

    Assumption (as the strong baseline's eps-guarded divisions): a ratio with an empty denominator is 0, never NaN:
    an image with no predicted attribute has precision 0; an attribute with no positive (negative) target has
    positive (negative) recall 0, so its mA is at most 0.5; an image with empty P | T has accuracy 0. On PA-100K
    every image has an age-group label, so T is never empty.

    Args:
        probs: (N, A) probabilities in [0, 1] (apply the sigmoid first; logits are rejected), or hard 0/1
            predictions (integer or bool), which any threshold in [0, 1) reads as given.
        targets: (N, A) labels: 1 positive, 0 negative, -1 unlabelled.
        threshold: decision threshold on the probabilities.
        unlabelled_predictions: "ignore" or "false_positive", see above.
    """
    p, t = torch.as_tensor(probs).detach(), torch.as_tensor(targets).detach()
    if p.ndim != 2 or p.shape != t.shape or p.numel() == 0:
        raise EvaluationError(f"probs and targets must be non-empty (num_images, num_attributes) arrays of the same "
                              f"shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    if unlabelled_predictions not in ("ignore", "false_positive"):
        raise EvaluationError(f"unlabelled_predictions must be 'ignore' or 'false_positive', "
                              f"got {unlabelled_predictions!r}")
    if not 0.0 <= threshold < 1.0:
        raise EvaluationError(f"threshold must lie in [0, 1), got {threshold!r}")
    if p.is_complex() or not (p.is_floating_point() or p.dtype == torch.bool or ((p == 0) | (p == 1)).all()):
        raise EvaluationError(f"probs must be probabilities in [0, 1] or hard 0/1 predictions, got dtype {p.dtype} "
                              f"with values outside {{0, 1}}")
    p = p.double()
    if not torch.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise EvaluationError("probs must be finite probabilities in [0, 1]; apply torch.sigmoid to logits first")
    if t.is_complex() or not ((t == 0) | (t == 1) | (t == -1)).all():
        raise EvaluationError("targets must be attribute labels 1 (positive), 0 (negative) or -1 (unlabelled)")
    t = t.to(p.device)
    pred, gt, labelled = p > threshold, t == 1, t != -1
    neg = labelled & ~gt
    tp, tn = (pred & gt).double(), (~pred & neg).double()
    pos_recall = _ratio(tp.sum(0), gt.sum(0).double())
    neg_recall = _ratio(tn.sum(0), neg.sum(0).double())
    label_ma = (pos_recall + neg_recall) / 2
    if unlabelled_predictions == "ignore":
        pred = pred & labelled
    inter = tp.sum(1)
    precision = _ratio(inter, pred.sum(1).double()).mean()
    recall = _ratio(inter, gt.sum(1).double()).mean()
    accuracy = _ratio(inter, (pred | gt).sum(1).double()).mean()
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "mA": float(label_ma.mean()),
        "accuracy": float(accuracy),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "num_unlabelled": int((~labelled).sum()),
        "per_attribute": {"mA": label_ma.cpu(), "pos_recall": pos_recall.cpu(), "neg_recall": neg_recall.cpu()},
    }


class AttributeMetric(SampleMetric):
    """`attribute_metrics` over a whole evaluation set, exact under DDP.

    `update(probs, targets, indices)` collects samples (targets 1/0, -1 for unlabelled); `indices` (dataset indices)
    drop the duplicates that DistributedSampler padding adds. Sum states would count them twice.
    """

    def __init__(self, threshold: float = 0.5, unlabelled_predictions: UnlabelledPredictions = "ignore",
                 **kwargs: Any):
        super().__init__(("probs", "targets"), **kwargs)
        self.threshold, self.unlabelled_predictions = threshold, unlabelled_predictions

    def update(self, probs: Tensor, targets: Tensor, indices: Tensor) -> None:
        probs, targets = torch.as_tensor(probs), torch.as_tensor(targets, device=self.device)
        if probs.ndim != 2 or probs.shape != targets.shape:
            raise EvaluationError(f"AttributeMetric.update: probs and targets must be (batch, num_attributes) of "
                                  f"the same shape, got {tuple(probs.shape)} and {tuple(targets.shape)}")
        self._append(indices, len(probs), probs=probs, targets=targets.to(torch.int8))  # -1 = unlabelled

    def compute(self) -> dict[str, Any]:
        s = self.samples(check=("targets",))
        return attribute_metrics(s["probs"], s["targets"], self.threshold, self.unlabelled_predictions)
