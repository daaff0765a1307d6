"""MoCo's pieces (He et al. 2020, "Momentum Contrast"; Chen et al. 2020, "MoCo v2"): the key queue, the
projection MLP and shuffled BatchNorm, as VAL-PAT's self-supervised term uses them.

The momentum key encoder itself is :class:`pedlightning.models.momentum.MomentumEncoder`; the loss is
:func:`pedlightning.losses.info_nce`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pedlightning.errors import ConfigError
from pedlightning.losses import all_gather_nograd, is_distributed

__all__ = ["EncoderWithProjection", "MoCoQueue", "ProjectionMLP", "grouped_forward", "has_batchnorm",
           "seeded_permutation", "shuffled_forward"]


class ProjectionMLP(nn.Module):
    """MoCo v2's projection head (Chen et al. 2020, Sec. 2): ``Linear(in, hidden) -> ReLU -> Linear(hidden, out)``.

    Args:
        in_dim: the encoder's feature width (2048 for ResNet-50, 768 for ViT-B).
        hidden_dim: hidden width; None = ``in_dim`` (MoCo v2: 2048 -> 2048 -> 128).
        out_dim: the contrastive embedding width (MoCo: 128).
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class EncoderWithProjection(nn.Module):
    """``projection(encoder(x))``: MoCo's query tower; a momentum copy of it is the key tower.

    Holds references only: building one around a task's ``encoder`` and ``projection`` adds no parameters
    (its parameter names are ``encoder.*`` and ``projection.*``, those of the momentum copy).
    """

    def __init__(self, encoder: nn.Module, projection: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projection = projection

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.encoder(x))


class MoCoQueue(nn.Module):
    """MoCo's dictionary (He et al. 2020, Sec. 3.2): a FIFO queue of the ``size`` most recent keys.

    Buffers (saved in every checkpoint, so a resumed run continues with the same negatives): ``queue``
    ``(size, dim)``, L2-normalised rows, initialised with normalised Gaussian noise as MoCo's code does (seeded, so
    every rank starts from the same queue); ``ptr`` ``(1,)``, the row the next key is written to.

    :meth:`enqueue` writes the keys of *every* rank (gathered in rank order), so all ranks hold the same queue.
    Unlike MoCo's code, the global batch need not divide ``size``: writes wrap around the end.

    Args:
        dim: key width (the projection's ``out_dim``).
        size: number of keys K (MoCo: 65,536).
        seed: seed of the initial noise.
    """

    queue: Tensor
    ptr: Tensor

    def __init__(self, dim: int = 128, size: int = 65536, seed: int = 0):
        super().__init__()
        if size < 1 or dim < 1:
            raise ConfigError(f"MoCo queue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        noise = torch.randn(size, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", F.normalize(noise, dim=1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def negatives(self) -> Tensor:
        """A detached copy of the queue (the loss must not see the in-place enqueue that follows it)."""
        return self.queue.detach().clone()

    @torch.no_grad()
    def enqueue(self, keys: Tensor, gather: bool = True) -> None:
        """Write ``keys`` ``(n, dim)`` (of every rank, in rank order, with ``gather``) at ``ptr``; advance ``ptr``."""
        if gather:
            keys = all_gather_nograd(keys)
        n = len(keys)
        if n > self.size:
            raise ConfigError(f"the global batch ({n} keys) is larger than the MoCo queue ({self.size}): "
                              f"raise queue_size")
        rows = (int(self.ptr) + torch.arange(n, device=self.queue.device)) % self.size
        self.queue[rows] = F.normalize(keys.detach().to(self.queue.dtype), dim=1)
        self.ptr[0] = (int(self.ptr) + n) % self.size


def has_batchnorm(module: nn.Module) -> bool:
    """True when ``module`` holds a BatchNorm layer (shuffling matters only then; ViTs use LayerNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def seeded_permutation(n: int, seed: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """A permutation of ``range(n)`` that depends on ``seed`` only: every rank draws the same one, no broadcast."""
    digest = hashlib.sha256(repr(tuple(int(s) for s in seed)).encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randperm(n, generator=generator).to(device)


def grouped_forward(module: nn.Module, x: Tensor, group_size: int | None) -> Tensor:
    """``module`` run on consecutive groups of ``group_size`` rows: BatchNorm statistics over each group only.

    ``None`` (or a group as large as the batch) is one plain forward.
    """
    if group_size is None or group_size >= len(x):
        return module(x)
    if len(x) % group_size:
        raise ConfigError(f"the batch of {len(x)} samples per process does not split into BatchNorm groups of "
                          f"{group_size} (model.init_args.bn_group_size); use a batch size divisible by it")
    return torch.cat([module(chunk) for chunk in x.split(group_size)], dim=0)


@torch.no_grad()
def shuffled_forward(module: nn.Module, x: Tensor, group_size: int | None, seed: Sequence[int]) -> Tensor:
    """Shuffling BN (He et al. 2020, Sec. 3.3) for the key encoder: ``module(x)`` with BatchNorm statistics
    computed over a random group of samples, returned in ``x``'s order.

    Under DDP: MoCo's batch shuffle across ranks. Every rank's ``x`` is gathered, permuted (the same permutation
    on every rank, drawn from ``seed``), each rank encodes its slice of the permuted global batch (in groups of
    ``group_size``), the outputs are gathered and un-permuted, and each rank keeps its own rows.
    On one process the same code simulates ``len(x) / group_size`` GPUs: the batch is permuted, encoded in
    groups and un-permuted. Together with :func:`grouped_forward` for the queries (consecutive groups) the
    query and its positive key see different BN statistics, so BN cannot tell the positive from the queue's
    negatives; with one group the shuffle cannot help (a warning is the caller's job).
    Ranks need equal batches (MoCo's requirement too).
    """
    world = dist.get_world_size() if is_distributed() else 1
    rank = dist.get_rank() if world > 1 else 0
    local = len(x)
    everything = all_gather_nograd(x) if world > 1 else x
    if len(everything) != world * local:
        raise ConfigError(f"shuffled BN needs equal batches on every rank, got {len(everything)} samples over "
                          f"{world} ranks with {local} here")
    perm = seeded_permutation(len(everything), seed, x.device)
    mine = perm[rank * local:(rank + 1) * local]
    out = grouped_forward(module, everything[mine], group_size)
    out_all = all_gather_nograd(out) if world > 1 else out
    unshuffled = torch.empty_like(out_all)
    unshuffled[perm] = out_all
    return unshuffled[rank * local:(rank + 1) * local]
