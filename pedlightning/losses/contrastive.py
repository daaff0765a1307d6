"""Contrastive losses: MoCo InfoNCE, CLIP image-text InfoNCE, IRRA's similarity-distribution matching.

Under DDP (`gather=True`, the default) each rank's loss puts its local rows against the columns of every rank
(features gathered with gradients, labels without) and weights its local sum by `world_size / global rows`
(:class:`pedlightning.losses.distributed.GlobalBatch`), so DDP's gradient averaging reproduces the gradient of
the single-process loss on the concatenated global batch, also for unequal per-rank batches. The towers must
run without dropout / drop-path for the equality to be exact (their masks differ per rank). `gather=False`
keeps the per-rank loss (negatives from the local batch only, local mean). On one process both are the
same and the numbers are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pedlightning.losses.distributed import (
    GlobalBatch,
    all_gather_nograd,
    gather_with_grad,
    global_batch,
)

__all__ = ["clip_contrastive", "info_nce", "sdm_loss"]


def _similarities(a: Tensor, b: Tensor, scale: Tensor | float, batch: GlobalBatch) -> tuple[Tensor, Tensor]:
    """`scale * cos` of local `a` rows vs every rank's `b`, and of local `b` rows vs every rank's `a`.

    Inputs are L2-normalised. On one process the second matrix is the transpose of the first.
    """
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    if batch.world_size == 1:
        a2b = scale * a @ b.t()
        return a2b, a2b.t()
    a_all, b_all = gather_with_grad(a, list(batch.sizes)), gather_with_grad(b, list(batch.sizes))
    return scale * a @ b_all.t(), scale * b @ a_all.t()


def info_nce(query: Tensor, key: Tensor, queue: Tensor | None = None, temperature: float = 0.07,
             gather: bool = True) -> Tensor:
    """InfoNCE of MoCo (He et al. 2020, Eq. 1; default T=0.07 as MoCo v1, MoCo v2 uses 0.2).

    `L = -log exp(q.k+ / T) / (exp(q.k+ / T) + sum_{k- in queue} exp(q.k- / T))`, averaged over queries.
    `query`, `key`: (N, D), row i of `key` is the positive of query i; `queue`: (K, D) negatives. Without a
    queue the other keys of the batch are the negatives (logits q @ k^T, targets on the diagonal); under DDP
    with `gather` these are the keys of every rank. A queue is already global (enqueue the keys of every rank,
    :func:`pedlightning.losses.distributed.all_gather_nograd`), so with one nothing is gathered and `gather`
    only weights the local rows for the global mean. Inputs are L2-normalised here. The caller detaches `key`
    and `queue` when they come from the momentum encoder.
    """
    query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    batch = global_batch(query, gather)
    if queue is None:
        keys = key if batch.world_size == 1 else gather_with_grad(key, list(batch.sizes))
        logits = query @ keys.t()
        targets = batch.offset + torch.arange(len(query), device=query.device)
    else:
        positive = (query * key).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, query @ F.normalize(queue, dim=1).t()], dim=1)
        targets = torch.zeros(len(query), dtype=torch.long, device=query.device)
    return batch.cross_entropy(logits / temperature, targets)


def clip_contrastive(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float,
                     gather: bool = True) -> Tensor:
    """Symmetric image-text InfoNCE of CLIP (Radford et al. 2021, Fig. 3), the ITC loss.

    Pair i (image i, text i) is the positive; `logit_scale` multiplies the cosine similarities (CLIP learns
    its log; pass `log_scale.exp()`). Loss = (CE(image -> text) + CE(text -> image)) / 2. Under DDP with
    `gather`, image -> text puts the local images against every rank's texts, text -> image the local texts
    against every rank's images.
    """
    batch = global_batch(image_emb, gather)
    image_to_text, text_to_image = _similarities(image_emb, text_emb, logit_scale, batch)
    targets = batch.offset + torch.arange(len(image_emb), device=image_emb.device)
    return (batch.cross_entropy(image_to_text, targets) + batch.cross_entropy(text_to_image, targets)) / 2


def sdm_loss(image_emb: Tensor, text_emb: Tensor, pids: Tensor, logit_scale: float = 50.0, eps: float = 1e-8,
             gather: bool = True) -> Tensor:
    """Similarity-distribution matching (SDM) of IRRA (Jiang & Ye, CVPR 2023, Sec. 3.3, Eq. 4-6).

    p_i = softmax over the batch of `logit_scale * cos(image_i, text_j)`; q_i = the true matching distribution,
    uniform over the batch items with image i's identity. L_i2t = mean_i KL(p_i || q_i) (q smoothed by `eps`),
    L_t2i likewise from the texts; SDM = L_i2t + L_t2i. `logit_scale` 50 = IRRA's fixed 1/0.02. Under DDP with
    `gather` the batch is the global one: local images against every rank's texts and local texts against
    every rank's images, q_i over every rank's identities.
    """
    batch = global_batch(image_emb, gather)
    image_to_text, text_to_image = _similarities(image_emb, text_emb, logit_scale, batch)
    pids = pids.view(-1, 1)
    columns = pids if batch.world_size == 1 else all_gather_nograd(pids, list(batch.sizes))
    labels = (pids == columns.t()).float()
    log_target = torch.log(labels / labels.sum(dim=1, keepdim=True) + eps)

    def kl(logits: Tensor) -> Tensor:
        log_p = F.log_softmax(logits, dim=1)
        return batch.mean((log_p.exp() * (log_p - log_target)).sum(dim=1))

    return kl(image_to_text) + kl(text_to_image)
