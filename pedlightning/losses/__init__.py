"""Losses: triplet and centre (reID), contrastive (MoCo, CLIP, SDM; exact under DDP), weighted BCE (attributes).

The ID loss is `torch.nn.functional.cross_entropy(logits, pids, label_smoothing=eps)`; its local mean is
already exact under DDP's gradient averaging when ranks have equal batches.
"""

from pedlightning.losses.attributes import weighted_bce
from pedlightning.losses.contrastive import clip_contrastive, info_nce, sdm_loss
from pedlightning.losses.distillation import (
    feature_distillation,
    relation_distillation,
    similarity_matrix,
)
from pedlightning.losses.distributed import (
    GlobalBatch,
    all_gather_nograd,
    gather_with_grad,
    gathered_sizes,
    global_batch,
    is_distributed,
)
from pedlightning.losses.reid import CenterLoss, TripletLoss, TripletOutput, pairwise_euclidean

__all__ = [
    "CenterLoss",
    "GlobalBatch",
    "TripletLoss",
    "TripletOutput",
    "all_gather_nograd",
    "clip_contrastive",
    "feature_distillation",
    "gather_with_grad",
    "gathered_sizes",
    "global_batch",
    "info_nce",
    "is_distributed",
    "pairwise_euclidean",
    "relation_distillation",
    "sdm_loss",
    "similarity_matrix",
    "weighted_bce",
]
