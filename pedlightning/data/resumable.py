"""Training batches that a run resumed mid-epoch continues exactly where the interrupted run stopped.

Lightning restores the loop counters of a mid-epoch checkpoint but restarts a plain DataLoader at its first batch
(it warns "your dataloader is not resumable"), so the resumed epoch would repeat the batches already trained on
and never show the rest. :class:`ResumableBatches` wraps a batch sampler whose batches depend only on the epoch
(:class:`~pedlightning.data.samplers.IdentityBatchSampler`, a ``BatchSampler`` over a ``DistributedSampler``);
:class:`~pedlightning.callbacks.RunCheckpoint` tells it, on a mid-epoch resume, how many batches of the epoch were
completed, and the next pass skips them without loading their images.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import Sampler

from pedlightning.errors import ConfigError

__all__ = ["ResumableBatches", "resumable_batches"]


class ResumableBatches(Sampler[list[int]]):
    """A batch sampler whose next pass can start at batch ``n``; otherwise it is ``batches`` unchanged.

    Lightning calls ``set_epoch`` on ``loader.sampler`` and on ``loader.batch_sampler.sampler``, never on
    ``loader.batch_sampler`` itself, so the wrapped batch sampler is exposed as :attr:`sampler`: without that, an
    epoch-seeded batch sampler passed as ``batch_sampler=`` keeps the order of epoch 0 in every epoch.
    """

    def __init__(self, batches: Iterable[list[int]]):
        self.sampler = batches
        self._skip = 0

    def skip_next(self, num_batches: int) -> None:
        """The next pass (only) starts at batch ``num_batches`` of the epoch."""
        if num_batches < 0:
            raise ConfigError(f"cannot skip a negative number of batches ({num_batches})")
        self._skip = num_batches

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        return itertools.islice(iter(self.sampler), skip, None)


def resumable_batches(loader: Any) -> ResumableBatches | None:
    """The :class:`ResumableBatches` a DataLoader draws its batches from, or None."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    return batch_sampler if isinstance(batch_sampler, ResumableBatches) else None
