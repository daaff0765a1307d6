"""Contrastive losses: MoCo InfoNCE, CLIP image-text InfoNCE, IRRA's similarity-distribution matching."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["clip_contrastive", "gather_with_grad", "info_nce", "sdm_loss"]


def info_nce(query: Tensor, key: Tensor, queue: Tensor | None = None, temperature: float = 0.07) -> Tensor:
    """InfoNCE of MoCo (He et al. 2020, Eq. 1; MoCo v2 defaults T=0.07).

    `L = -log exp(q.k+ / T) / (exp(q.k+ / T) + sum_{k- in queue} exp(q.k- / T))`, averaged over queries.
    `query`, `key`: (N, D), row i of `key` is the positive of query i; `queue`: (K, D) negatives. Without a
    queue the other keys of the batch are the negatives (logits q @ k^T, targets on the diagonal).
    Inputs are L2-normalised here. The caller detaches `key` and `queue` (they come from the momentum encoder).
    """
    query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    if queue is None:
        logits = query @ key.t()
        targets = torch.arange(len(query), device=query.device)
    else:
        positive = (query * key).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, query @ F.normalize(queue, dim=1).t()], dim=1)
        targets = torch.zeros(len(query), dtype=torch.long, device=query.device)
    return F.cross_entropy(logits / temperature, targets)


def clip_contrastive(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric image-text InfoNCE of CLIP (Radford et al. 2021, Fig. 3), the ITC loss.

    Pair i (image i, text i) is the positive; `logit_scale` multiplies the cosine similarities (CLIP learns
    its log; pass `log_scale.exp()`). Loss = (CE(image -> text) + CE(text -> image)) / 2.
    """
    image_emb, text_emb = F.normalize(image_emb, dim=1), F.normalize(text_emb, dim=1)
    logits = logit_scale * image_emb @ text_emb.t()
    targets = torch.arange(len(image_emb), device=image_emb.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def sdm_loss(
    image_emb: Tensor, text_emb: Tensor, pids: Tensor, logit_scale: float = 50.0, eps: float = 1e-8
) -> Tensor:
    """Similarity-distribution matching (SDM) of IRRA (Jiang & Ye, CVPR 2023, Sec. 3.3).

    p_i = softmax over the batch of `logit_scale * cos(image_i, text_j)`; q_i = the true matching distribution,
    uniform over the batch items with image i's identity. L_i2t = mean_i KL(p_i || q_i) (q smoothed by `eps`),
    L_t2i likewise from the texts; SDM = L_i2t + L_t2i. `logit_scale` 50 = IRRA's fixed 1/0.02.
    """
    image_emb, text_emb = F.normalize(image_emb, dim=1), F.normalize(text_emb, dim=1)
    pids = pids.view(-1, 1)
    labels = (pids == pids.t()).float()
    log_target = torch.log(labels / labels.sum(dim=1, keepdim=True) + eps)
    similarity = logit_scale * image_emb @ text_emb.t()

    def kl(logits: Tensor) -> Tensor:
        log_p = F.log_softmax(logits, dim=1)
        return (log_p.exp() * (log_p - log_target)).sum(dim=1).mean()

    return kl(similarity) + kl(similarity.t())


def gather_with_grad(t: Tensor) -> Tensor:
    """All-gather `t` along dim 0 from every rank, keeping gradients (identity without distributed training).

    Uses `torch.distributed.nn.functional.all_gather`, whose backward sends each rank the gradient of its own
    slice, so contrastive losses see negatives from the whole global batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)
