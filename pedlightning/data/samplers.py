"""Identity (P x K) batch sampling that stays correct under DDP."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist

from pedlightning.errors import ConfigError

log = logging.getLogger(__name__)


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

    **Caption datasets** (``image_ids``: the image each item shows, e.g. ``ImageCaptionDataset.image_indices``,
    where an image with two captions is two items): K counts distinct *images*, so a batch holds P identities
    x K distinct images (the support sets of LCR²S need K different views, not one image's two captions).
    Each slot takes one caption of its image, drawn from ``(seed, epoch)``, so an epoch shows every image about
    once with one of its captions. Identities with fewer than K images cannot fill K distinct slots and are left
    out (counted in :attr:`excluded_pids`, logged); repeating an image would break the guarantee.

    Args:
        pids: the identity of every dataset item.
        batch_size, num_instances: P x K with ``P = batch_size / num_instances``.
        seed: shared by all ranks.
        num_replicas, rank: the process group (default: from ``torch.distributed``).
        image_ids: optional, the image of every item (caption datasets); ``None`` = every item is its own image.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, image_ids: Sequence[int] | None = None):
        if num_instances < 1 or batch_size % num_instances:
            raise ConfigError(f"batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances})")
        self.pids = list(pids)
        if image_ids is not None and len(image_ids) != len(self.pids):
            raise ConfigError(f"image_ids has {len(image_ids)} entries but pids has {len(self.pids)}: one per item")
        self.distinct_images = image_ids is not None
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
        # Units are what K counts: items (reID) or images (caption datasets); ``unit_items`` lists each unit's items.
        images = list(range(len(self.pids))) if image_ids is None else [int(i) for i in image_ids]
        unit_of_image: dict[int, int] = {}
        self.unit_items: list[list[int]] = []
        self.index_by_pid: dict[int, list[int]] = defaultdict(list)
        for i, (pid, image) in enumerate(zip(self.pids, images)):
            if image not in unit_of_image:
                unit_of_image[image] = len(self.unit_items)
                self.unit_items.append([])
                self.index_by_pid[pid].append(unit_of_image[image])
            unit = self.unit_items[unit_of_image[image]]
            if self.pids[unit[0] if unit else i] != pid:
                raise ConfigError(f"image {image} is shown by items of two identities ({self.pids[unit[0]]} and {pid})")
            unit.append(i)
        self.excluded_pids: list[int] = []
        if self.distinct_images:
            self.excluded_pids = sorted(p for p, u in self.index_by_pid.items() if len(u) < num_instances)
            for pid in self.excluded_pids:
                del self.index_by_pid[pid]
            if self.excluded_pids:
                log.warning("identity batches of %d distinct images: %d identities with fewer images are left out",
                            num_instances, len(self.excluded_pids))
        if len(self.index_by_pid) < self.ids_per_batch:
            kept = f" with at least {num_instances} images" if self.distinct_images else ""
            raise ConfigError(f"a batch needs {self.ids_per_batch} identities (batch_size / num_instances) but the "
                              f"training set has only {len(self.index_by_pid)}{kept}")
        groups = sum(max(1, len(v) // num_instances) for v in self.index_by_pid.values())
        self._num_batches = (groups // self.ids_per_batch) // num_replicas
        if self._num_batches == 0:
            raise ConfigError(f"too few identities for {num_replicas} process(es) with {self.ids_per_batch} identities "
                              "per batch: every rank would get no batch")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def _groups(self, rng: np.random.Generator) -> list[list[list[int]]]:
        """Per identity (sorted), its groups of K units (a unit: an item, or an image of a caption dataset)."""
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

    def _unit_batches(self) -> list[list[int]]:
        """All ranks' batches of this epoch, as units."""
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
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._unit_batches()
        if self.distinct_images:  # one caption per image slot, from its own stream (the unit draws stay the same)
            pick = np.random.default_rng([self.seed, self.epoch, 1])
            batches = [[int(pick.choice(self.unit_items[u])) for u in b] for b in batches]
        yield from batches[self.rank:self._num_batches * self.num_replicas:self.num_replicas]
