"""LCR²S distillation: the single-input student inherits the support-set teacher's features and relations.

LCR²S (Yan et al., ACM MM 2023) trains the student with its own matching loss plus two terms computed
against the frozen "richer" teacher on the same batch: feature distillation (each student feature towards
the teacher's enriched feature of the same sample, both modalities) and relation distillation (the
student's in-batch image-text similarity matrix towards the teacher's). The teacher's inputs are
detached here: it is frozen and gets no gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pedlightning.errors import ConfigError

__all__ = ["FeatureDistance", "feature_distillation", "relation_distillation", "similarity_matrix"]

FeatureDistance = Literal["mse", "cosine"]


def feature_distillation(student: Tensor, teacher: Tensor, distance: FeatureDistance = "mse") -> Tensor:
    """Distance between the student's L2-normalised features ``(B, D)`` and the teacher's enriched ones.

    ``mse`` (the paper's MSE): mean over the batch of ``||s_i - t_i||^2``, summed over the feature dimension.
    ``cosine``: mean over the batch of ``1 - cos(s_i, t_i)``.
    Assumption: the teacher's feature is L2-normalised too (its matching losses see only directions, so its
    norm carries no trained meaning); then ``mse = 2 * cosine`` exactly and the choice only rescales the
    weight. Assumption: a sum over dimensions, not ``F.mse_loss``'s mean, which would divide the term by D.
    """
    if student.shape != teacher.shape or student.ndim != 2:
        raise ConfigError(f"feature distillation needs two (B, D) tensors of one shape, got {tuple(student.shape)} "
                          f"and {tuple(teacher.shape)}")
    s, t = F.normalize(student, dim=1), F.normalize(teacher.detach(), dim=1)
    if distance == "mse":
        return (s - t).pow(2).sum(dim=1).mean()
    if distance == "cosine":
        return (1 - (s * t).sum(dim=1)).mean()
    raise ConfigError(f"feature distance must be 'mse' or 'cosine', got {distance!r}")


def similarity_matrix(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """In-batch cosine similarities ``S[i, j] = cos(image_i, text_j)``, ``(B, B)``."""
    return F.normalize(image_feats, dim=1) @ F.normalize(text_feats, dim=1).t()


def relation_distillation(student_image: Tensor, student_text: Tensor, teacher_image: Tensor, teacher_text: Tensor,
                          normalize_by_batch: bool = True) -> Tensor:
    """Frobenius norm ``||S_student - S_teacher||_F`` of the in-batch image-text cosine similarity matrices.

    ``S`` is :func:`similarity_matrix` (the student's from its single features, the teacher's from its
    enriched features). Assumption: with ``normalize_by_batch`` the norm is divided by the batch size B,
    i.e. the root mean square of the B x B differences, so the term's scale does not grow with the batch.
    Assumption: "in-batch" = the per-process batch under DDP (identity batches keep identities whole per
    process).
    """
    s = similarity_matrix(student_image, student_text)
    t = similarity_matrix(teacher_image.detach(), teacher_text.detach())
    norm = torch.linalg.matrix_norm(s - t, "fro")  # gradient 0, not NaN, where the matrices agree
    return norm / len(s) if normalize_by_batch else norm
