"""Losses: triplet (reID), contrastive (MoCo, CLIP, SDM), weighted BCE (attributes).

The ID loss is `torch.nn.functional.cross_entropy(logits, pids, label_smoothing=eps)`.
"""

from pedlightning.losses.attributes import weighted_bce
from pedlightning.losses.contrastive import clip_contrastive, gather_with_grad, info_nce, sdm_loss
from pedlightning.losses.reid import TripletLoss, TripletOutput, pairwise_euclidean

__all__ = [
    "TripletLoss",
    "TripletOutput",
    "clip_contrastive",
    "gather_with_grad",
    "info_nce",
    "pairwise_euclidean",
    "sdm_loss",
    "weighted_bce",
]
