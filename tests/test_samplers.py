"""IdentityBatchSampler: P x K structure, DDP coverage without overlap, epoch determinism."""

import random
from collections import Counter, defaultdict

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


# ---------------------------------------------------------------- caption datasets: K distinct images
def _captioned_items(seed=0, num_ids=30):
    """(pids, image_ids) of a caption dataset: 1-5 images per identity, 1-3 captions per image, in record order."""
    rng = random.Random(seed)
    pids, images, image = [], [], 0
    for pid in range(num_ids):
        for _ in range(rng.randint(1, 5)):
            for _ in range(rng.randint(1, 3)):
                pids.append(pid)
                images.append(image)
            image += 1
    return pids, images


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_caption_batches_hold_k_distinct_images_per_identity(world_size):
    pids, images = _captioned_items()
    per_image = Counter(images)
    images_of = {p: {i for q, i in zip(pids, images) if q == p} for p in set(pids)}
    eligible = {p for p, v in images_of.items() if len(v) >= 2}
    samplers = [IdentityBatchSampler(pids, 8, 2, seed=4, num_replicas=world_size, rank=r, image_ids=images)
                for r in range(world_size)]
    assert samplers[0].excluded_pids == sorted(set(pids) - eligible)
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0]) > 0
    for batches in per_rank:
        for batch in batches:
            by_pid = {}
            for i in batch:
                by_pid.setdefault(pids[i], []).append(images[i])
            assert len(batch) == 8 and len(by_pid) == 4 and set(by_pid) <= eligible
            assert all(len(v) == len(set(v)) == 2 for v in by_pid.values())  # K distinct images, no repeated one
    # Every image at most once per epoch over all ranks (so ranks are disjoint), and at most one of its captions.
    drawn = [images[i] for batches in per_rank for b in batches for i in b]
    assert len(drawn) == len(set(drawn))
    assert len(drawn) == len(per_rank[0]) * world_size * 8
    assert any(per_image[images[i]] > 1 for b in per_rank[0] for i in b)  # multi-caption images are in play


def test_caption_choice_is_seeded_per_epoch():
    pids, images = _captioned_items(seed=1)
    a = IdentityBatchSampler(pids, 8, 2, seed=2, image_ids=images)
    b = IdentityBatchSampler(pids, 8, 2, seed=2, image_ids=images)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b)  # a resumed run replays the epoch, captions included
    chosen = defaultdict(set)
    for epoch in range(6):
        a.set_epoch(epoch)
        for i in (i for batch in a for i in batch):
            chosen[images[i]].add(i)
    assert max(len(v) for v in chosen.values()) > 1  # an image shows different captions in different epochs


def test_text_datamodule_identity_batches(tmp_path):
    from types import SimpleNamespace

    from pedlightning.data.datamodules import TextReIDDataModule
    from pedlightning.data.synthetic import write_cuhk_pedes

    root = write_cuhk_pedes(str(tmp_path / "c"), size=(64, 32), num_train_ids=6, num_val_ids=1, num_test_ids=1,
                            images_per_id=3)
    per_rank = []
    for rank in range(2):
        data = TextReIDDataModule("cuhk_pedes", root, img_size=(64, 32), batch_size=4, num_instances=2,
                                  num_workers=0, tokenizer="clip_tiny_test")
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank,
                                       _accelerator_connector=SimpleNamespace(use_distributed_sampler=False))
        loader = data.train_dataloader()
        dataset = loader.dataset
        paths = [[dataset.records[dataset.image_indices[i]].path for i in batch] for batch in loader.batch_sampler]
        pids = [[dataset.pids[i] for i in batch] for batch in loader.batch_sampler]
        per_rank.append(paths)
        # 6 ids x 3 images = 6 groups of K = 2 per epoch (one image per id left over), 2 ids per batch, 2 ranks.
        assert len(paths) == len(loader) == 6 // 2 // 2
        for batch_paths, batch_pids in zip(paths, pids):
            assert sorted(Counter(batch_pids).values()) == [2, 2] and len(set(batch_paths)) == 4
    flat = [p for rank in per_rank for batch in rank for p in batch]
    assert len(flat) == len(set(flat)) == 2 * 4  # disjoint across ranks


def test_caption_sampler_errors():
    with pytest.raises(ConfigError, match="only 1 with at least 2 images"):
        IdentityBatchSampler([0, 0, 0, 1, 1], 4, 2, image_ids=[0, 1, 1, 2, 2])
    with pytest.raises(ConfigError, match="one per item"):
        IdentityBatchSampler([0, 0], 4, 2, image_ids=[0])
    with pytest.raises(ConfigError, match="two identities"):
        IdentityBatchSampler([0, 1], 4, 2, image_ids=[0, 0])
