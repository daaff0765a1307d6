"""One evaluation loader over the parts of a retrieval split (queries, gallery), so an evaluation is one run.

Retrieval evaluation reads two sets (reID queries and gallery images; text search captions and images). As two
Lightning dataloaders they become two "dataloaders" in every results table, with the same metrics printed under
each. Here they are one loader whose batches never mix parts: each item carries ``part`` (its position in
``parts``), and under DDP each part is padded and sliced per rank as DistributedSampler does, so every rank sees the
same number of batches and the metrics drop the padding duplicates by ``index``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset, Sampler

from pedlightning.data.faults import ErrorCounter
from pedlightning.data.loading import ReportingLoader


class PartsDataset(Dataset):
    """The concatenation of ``parts``; item ``i`` is its part's item with ``part`` added."""

    def __init__(self, parts: Sequence[Dataset]):
        self.parts = list(parts)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        for part, end in enumerate(self.offsets[1:]):
            if index < end:
                return part, index - self.offsets[part]
        raise IndexError(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        part, local = self.locate(index)
        return {**self.parts[part][local], "part": part}


class PartBatchSampler(Sampler[list[int]]):
    """In-order batches within each part, the parts taken in turn; with ``num_replicas > 1`` each rank gets a padded, strided slice."""

    def __init__(self, sizes: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0):
        self.sizes, self.batch_size = list(sizes), batch_size
        self.num_replicas, self.rank = num_replicas, rank

    def _part_indices(self, size: int) -> list[int]:
        if size == 0:
            return []
        per_rank = math.ceil(size / self.num_replicas)
        indices = list(range(size))
        indices += indices[: per_rank * self.num_replicas - size]
        return indices[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        """Round robin over the parts (query batch, gallery batch, ...), so that a partial evaluation
        (``limit_val_batches``) still sees every part."""
        offsets = [sum(self.sizes[:p]) for p in range(len(self.sizes))]
        batches = []
        for offset, size in zip(offsets, self.sizes):
            indices = [offset + i for i in self._part_indices(size)]
            batches.append([indices[s:s + self.batch_size] for s in range(0, len(indices), self.batch_size)])
        for round_ in range(max(map(len, batches), default=0)):
            for part in batches:
                if round_ < len(part):
                    yield part[round_]

    def __len__(self) -> int:
        return sum(math.ceil(len(self._part_indices(s)) / self.batch_size) for s in self.sizes)


def parts_loader(parts: Sequence[Dataset], batch_size: int, num_workers: int, num_replicas: int = 1, rank: int = 0,
                 pin_memory: bool = False, faults: Sequence[ErrorCounter] = (), name: str = "evaluation") -> DataLoader:
    """A single in-order evaluation loader over ``parts`` (see the module docstring)."""
    dataset = PartsDataset(parts)
    sampler = PartBatchSampler([len(p) for p in parts], batch_size, num_replicas, rank)
    return ReportingLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                           persistent_workers=num_workers > 0, faults=faults, name=name)
