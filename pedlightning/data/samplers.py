"""Identity (P x K) batch sampling that stays correct under DDP."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist

from pedlightning.errors import ConfigError


class IdentityBatchSampler:
    """Batches of ``batch_size // num_instances`` identities x ``num_instances`` images each (the PK sampler).

    Every epoch, all ranks draw the same global identity permutation from ``seed + epoch``, split it into
    batches, and each rank takes every ``num_replicas``-th batch starting at its rank, so ranks hold whole
    identities, never overlap within an epoch, and all get the same number of batches. An identity with fewer
    than K images is sampled with replacement (as torchreid/fast-reid do); one with more contributes
    ``len // K`` groups of K distinct images per epoch, so every image is seen about once per epoch.
    Set ``use_distributed_sampler=False`` on the Trainer: Lightning's automatic DistributedSampler would
    split these batches again. Lightning calls :meth:`set_epoch` each epoch; the same epoch always
    yields the same batches, so a resumed run replays the data order of the run it continues.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None):
        if num_instances < 1 or batch_size % num_instances:
            raise ConfigError(f"batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances})")
        self.pids = list(pids)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.ids_per_batch = batch_size // num_instances
        self.seed = seed
        self.epoch = 0
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.num_replicas, self.rank = num_replicas, rank
        self.index_by_pid: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(self.pids):
            self.index_by_pid[pid].append(i)
        if len(self.index_by_pid) < self.ids_per_batch:
            raise ConfigError(f"a batch needs {self.ids_per_batch} identities (batch_size / num_instances) but the "
                              f"training set has only {len(self.index_by_pid)}")
        groups = sum(max(1, len(v) // num_instances) for v in self.index_by_pid.values())
        self._num_batches = (groups // self.ids_per_batch) // num_replicas
        if self._num_batches == 0:
            raise ConfigError(f"too few identities for {num_replicas} process(es) with {self.ids_per_batch} identities "
                              "per batch: every rank would get no batch")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def _groups(self, rng: np.random.Generator) -> list[list[int]]:
        """Groups of K images, grouped per identity, identities in random order."""
        per_pid = []
        for pid in sorted(self.index_by_pid):
            idx = np.asarray(self.index_by_pid[pid])
            if len(idx) < self.num_instances:
                idx = rng.choice(idx, self.num_instances, replace=True)
            else:
                idx = rng.permutation(idx)
            n = len(idx) // self.num_instances
            per_pid.append([idx[j * self.num_instances:(j + 1) * self.num_instances].tolist() for j in range(n)])
        return per_pid

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        per_pid = self._groups(rng)
        needed = self._num_batches * self.num_replicas
        # Each round takes one group from as many distinct identities as fill whole batches; identities left
        # over in a round keep their group for the next round.
        batches: list[list[int]] = []
        while len(batches) < needed:
            alive = [i for i, g in enumerate(per_pid) if g]
            if len(alive) < self.ids_per_batch:
                break
            order = rng.permutation(alive)
            for start in range(0, len(order) - self.ids_per_batch + 1, self.ids_per_batch):
                batches.append([j for i in order[start:start + self.ids_per_batch] for j in per_pid[i].pop()])
        # Identities with many more images than others can leave too few distinct identities for the last
        # batches; top up with fresh random P x K batches so every rank gets exactly len(self) batches.
        pools = [self.index_by_pid[pid] for pid in sorted(self.index_by_pid)]
        while len(batches) < needed:
            ids = rng.choice(len(pools), self.ids_per_batch, replace=False)
            batches.append([int(j) for i in ids for j in rng.choice(
                pools[i], self.num_instances, replace=len(pools[i]) < self.num_instances)])
        yield from batches[self.rank:needed:self.num_replicas]
