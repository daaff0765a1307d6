"""IdentityBatchSampler: P x K structure, DDP coverage without overlap, epoch determinism."""

import random
from collections import Counter

import pytest

from pedlightning.data.samplers import IdentityBatchSampler
from pedlightning.errors import ConfigError


def _pids(seed=0, num_ids=40):
    rng = random.Random(seed)
    return [p for p in range(num_ids) for _ in range(rng.choice([1, 2, 4, 5, 8, 13]))]


def test_batches_are_p_identities_times_k_images():
    pids = _pids()
    sampler = IdentityBatchSampler(pids, batch_size=16, num_instances=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        counts = Counter(pids[i] for i in batch)
        assert len(batch) == 16 and len(counts) == 4 and set(counts.values()) == {4}


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_counts_and_disjoint_identities(world_size):
    pids = _pids(seed=1, num_ids=60)
    samplers = [IdentityBatchSampler(pids, 8, 2, seed=5, num_replicas=world_size, rank=r) for r in range(world_size)]
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    # Ranks take disjoint slices of one global batch list: identities with >= K images are drawn without
    # replacement, so no image appears twice in an epoch across all ranks.
    drawn = [i for batches in per_rank for b in batches for i in b if pids.count(pids[i]) >= 2]
    assert len(drawn) == len(set(drawn))
    single = IdentityBatchSampler(pids, 8, 2, seed=5, num_replicas=1, rank=0)
    global_batches = list(single)[: len(per_rank[0]) * world_size]
    interleaved = [per_rank[r][s] for s in range(len(per_rank[0])) for r in range(world_size)]
    assert interleaved == global_batches


def test_epoch_coverage_of_images():
    pids = [p for p in range(30) for _ in range(4)]  # 4 images each, K = 4: an epoch is every image once
    sampler = IdentityBatchSampler(pids, batch_size=12, num_instances=4, seed=0)
    seen = [i for b in sampler for i in b]
    assert len(seen) == len(set(seen)) == 30 * 4 // 12 * 12


def test_same_epoch_same_order_and_epochs_differ():
    pids = _pids(seed=2)
    a, b = IdentityBatchSampler(pids, 16, 4, seed=9), IdentityBatchSampler(pids, 16, 4, seed=9)
    a.set_epoch(4), b.set_epoch(4)
    assert list(a) == list(b)  # a resumed run replays the epoch it continues
    b.set_epoch(5)
    assert list(a) != list(b)


def test_clear_errors():
    with pytest.raises(ConfigError, match="multiple of num_instances"):
        IdentityBatchSampler([0, 1], 10, 4)
    with pytest.raises(ConfigError, match="only 2"):
        IdentityBatchSampler([0, 0, 1, 1], 16, 4)
