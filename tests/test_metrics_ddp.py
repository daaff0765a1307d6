"""The metric classes give exactly the single-process numbers on 2 processes (gloo, CPU).

Shards mimic DistributedSampler: a shuffled permutation padded with repeated samples up to a multiple of the world
size, then every rank takes a stride; the gallery is additionally split unevenly. Processes are started with
torch.multiprocessing (strategy="ddp" would re-execute pytest); "fork" saves each child the seconds of importing
torch and torchmetrics again, and the children use one thread each.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pedlightning.metrics import AttributeMetric, ReIDMetric, RetrievalMetric

WORLD = 2


def sampler_shard(n: int, rank: int, seed: int) -> np.ndarray:
    """The indices DistributedSampler(shuffle=True) gives `rank`: padded with repeats, then strided."""
    order = np.random.default_rng(seed).permutation(n)
    order = np.r_[order, order[: math.ceil(n / WORLD) * WORLD - n]]
    return order[rank::WORLD]


def uneven_shard(n: int, rank: int) -> np.ndarray:
    """60/40 split, with three samples of rank 0 repeated on rank 1."""
    cut = int(0.6 * n)
    return np.arange(cut) if rank == 0 else np.r_[np.arange(cut, n), [0, 1, 2]]


def make_data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, 16))
    q_pids, g_pids = rng.integers(0, 30, 61), rng.integers(0, 30, 203)
    return {
        "qf": (centres[q_pids] + rng.normal(size=(61, 16))).astype(np.float32),
        "gf": (centres[g_pids] + rng.normal(size=(203, 16))).astype(np.float32),
        "q_pids": q_pids, "g_pids": g_pids, "q_cams": rng.integers(0, 3, 61), "g_cams": rng.integers(0, 3, 203),
        "probs": rng.random((97, 26)).astype(np.float32), "targets": (rng.random((97, 26)) < 0.3).astype(np.int64),
    }


def run_metrics(data: dict[str, np.ndarray], rank: int | None) -> dict[str, dict]:
    """Feed the metrics; rank None = one process with every sample once."""
    def shard(n, seed, uneven=False):
        if rank is None:
            return np.arange(n)
        return uneven_shard(n, rank) if uneven else sampler_shard(n, rank, seed)

    t = {k: torch.from_numpy(v) for k, v in data.items()}
    reid, rerank = ReIDMetric(), ReIDMetric(metric="euclidean", rerank=True, k1=8, k2=3)
    retrieval, attributes = RetrievalMetric(image_to_text=True), AttributeMetric()
    q, g = shard(61, 1), shard(203, 2, uneven=True)
    for idx in np.array_split(q, 3):  # few query batches...
        for m in (reid, rerank):
            m.update(t["qf"][idx], t["q_pids"][idx], t["q_cams"][idx], True, torch.from_numpy(idx))
        retrieval.update(t["qf"][idx], t["q_pids"][idx], True, torch.from_numpy(idx))
    for idx in np.array_split(g, 5 if rank == 0 else 2):  # ...and a different number of gallery batches per rank
        for m in (reid, rerank):
            m.update(t["gf"][idx], t["g_pids"][idx], t["g_cams"][idx], False, torch.from_numpy(idx))
        retrieval.update(t["gf"][idx], t["g_pids"][idx], False, torch.from_numpy(idx))
    for idx in np.array_split(shard(97, 3), 4):
        attributes.update(t["probs"][idx], t["targets"][idx], torch.from_numpy(idx))
    return {"reid": reid.compute(), "rerank": rerank.compute(), "retrieval": retrieval.compute(),
            "attributes": attributes.compute()}


def _worker(rank: int, init_file: str, out_dir: str, data: dict[str, np.ndarray]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.save(run_metrics(data, rank), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    data = make_data()
    mp.start_processes(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), data), nprocs=WORLD,
                       start_method="fork")
    expected = run_metrics(data, rank=None)
    assert 0.1 < expected["reid"]["mAP"] < 0.9 and expected["reid"]["mAP"] != expected["rerank"]["mAP"]
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in ("reid", "rerank", "retrieval"):
            assert got[name] == expected[name], (rank, name)
        per, per_expected = got["attributes"].pop("per_attribute"), expected["attributes"].pop("per_attribute")
        assert got["attributes"] == expected["attributes"]
        assert all(torch.equal(per[k], per_expected[k]) for k in per_expected)
        expected["attributes"]["per_attribute"] = per_expected
