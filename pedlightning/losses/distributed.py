"""Cross-rank gathers for contrastive losses under DDP, and where this rank's rows sit in the global batch.

A contrastive loss compares every row with every column of a batch. Under DDP each rank holds only its own
rows, so without a gather every added process shrinks the set of negatives. The helpers here let a loss put
its local rows against the columns of every rank and scale its local sum so that DDP's gradient averaging
(the mean over ranks) reproduces the gradient of the single-process loss on the concatenated global batch.
Without torch.distributed, or with one process, every helper is the identity.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GlobalBatch", "all_gather_nograd", "gather_with_grad", "gathered_sizes", "global_batch", "is_distributed"]


def is_distributed() -> bool:
    """True under an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gathered_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's first dimension `n`, in rank order (`[n]` without distributed training).

    `device` must be one the backend communicates on (CPU for gloo, the rank's GPU for NCCL).
    """
    if not is_distributed():
        return [n]
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in torch.cat(sizes).tolist()]


def _padded(t: Tensor, rows: int) -> Tensor:
    """`t` with zero rows appended up to `rows` (collectives need one shape on every rank)."""
    return F.pad(t, (0, 0) * (t.dim() - 1) + (0, rows - len(t))) if len(t) < rows else t


def all_gather_nograd(t: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate `t` of every rank along dim 0 in rank order, without gradients (identity without DDP).

    For labels (identity ids) and for a MoCo queue enqueue, which must see every rank's keys. The first
    dimension may differ between ranks; `sizes` (from :func:`gathered_sizes`) saves the collective that
    finds them when the caller already has them.
    """
    if not is_distributed():
        return t
    sizes = sizes or gathered_sizes(len(t), t.device)
    parts = [torch.empty_like(_padded(t, max(sizes))) for _ in sizes]
    dist.all_gather(parts, _padded(t.detach(), max(sizes)).contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def gather_with_grad(t: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate `t` of every rank along dim 0 in rank order, keeping gradients (identity without DDP).

    `torch.distributed.nn.functional.all_gather` backpropagates the gradient of every rank's copy of a slice
    into the rank that owns it, summed (reduce-scatter on NCCL, all-to-all + sum on gloo; pinned by
    tests/test_losses.py). The first dimension may differ between ranks (padded for the collective and cut
    back, so padding gets no gradient); `sizes` as in :func:`all_gather_nograd`.
    """
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    sizes = sizes or gathered_sizes(len(t), t.device)
    with warnings.catch_warnings():
        # torch 2.x marks it deprecated in favour of the private `_functional_collectives`; it is still the
        # public autograd-aware gather.
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(_padded(t, max(sizes)))
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


@dataclass(frozen=True)
class GlobalBatch:
    """Where this rank's `rows` sit in the global batch (all ranks' rows concatenated in rank order).

    Attributes:
        world_size: ranks sharing the batch (1 without distributed training or without gathering).
        offset: global index of this rank's first row (the targets of in-batch positives start there).
        sizes: every rank's rows, in rank order.
    """

    world_size: int
    offset: int
    sizes: tuple[int, ...]

    @property
    def rows(self) -> int:
        """Rows of the global batch."""
        return sum(self.sizes)

    @property
    def row_weight(self) -> float:
        """Weight of one local row's loss: `world_size / global rows`.

        DDP averages gradients over ranks, so local sums weighted by it add up to the global row mean:
        `mean_r(sum_{i in r} l_i * W / N) = sum_i l_i / N`. With equal batches it is the local mean's `1 / n`.
        """
        return self.world_size / self.rows

    def mean(self, per_row: Tensor) -> Tensor:
        """This rank's share of the global row mean of `per_row` (the plain mean on one process)."""
        if self.world_size == 1:
            return per_row.mean()
        return per_row.sum() * self.row_weight

    def cross_entropy(self, logits: Tensor, targets: Tensor) -> Tensor:
        """This rank's share of the global row-mean cross-entropy (plain `F.cross_entropy` on one process)."""
        if self.world_size == 1:
            return F.cross_entropy(logits, targets)
        return F.cross_entropy(logits, targets, reduction="sum") * self.row_weight


def global_batch(rows: Tensor, gather: bool = True) -> GlobalBatch:
    """The :class:`GlobalBatch` of this rank's `rows` (one collective under DDP; none with `gather=False`).

    With `gather=False`, or without distributed training, the local batch is the whole batch.
    """
    if not (gather and is_distributed()):
        return GlobalBatch(1, 0, (len(rows),))
    sizes = gathered_sizes(len(rows), rows.device)
    rank = dist.get_rank()
    return GlobalBatch(len(sizes), sum(sizes[:rank]), tuple(sizes))
