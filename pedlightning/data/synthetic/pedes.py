"""Synthetic text-to-image person search sets in the real layouts: CUHK-PEDES, ICFG-PEDES, RSTPReid.

Every identity has several images from different cameras; every image gets captions generated from its
attributes (``captions.describe``), so text and image agree on colours, garments and carried items.
Every writer takes ``mention_prob`` (default 1: each caption names every fact): below 1 each caption names a
seeded random subset of its image's facts (partial captions, for LCR²S's support sets); set it through a text
datamodule's ``synthetic: {mention_prob: 0.5}``.
"""

from __future__ import annotations

import json
import os
import random

from pedlightning.data.synthetic._io import Shot, atomic_root, check_size, write_shots
from pedlightning.data.synthetic.captions import describe, tokenize
from pedlightning.data.synthetic.identity import derive_seed, make_identity
from pedlightning.data.synthetic.reid import market_name, msmt_name
from pedlightning.errors import ConfigError

__all__ = ["CUHK_PEDES_ID_START", "write_cuhk_pedes", "write_icfg_pedes", "write_rstpreid"]

CUHK_PEDES_ID_START = {"train": 1, "val": 11004, "test": 12004}
"""First id of each split in ``caption_all.json`` (the real ranges: train 1-11003, val 11004-12003,
test 12004-13003), which has no ``split`` key: parsers split it by these ranges."""
_CUHK_ID_LIMIT = {"train": 11003, "val": 1000, "test": 1000}
_CUHK_FOLDERS = {
    "train": ("CUHK01", "CUHK03", "Market", "train_query"),
    "val": ("CUHK01", "CUHK03", "Market", "train_query"),
    "test": ("CUHK01", "CUHK03", "Market", "test_query"),
}


def _cameras(rng: random.Random, num_cameras: int, n: int) -> list[int]:
    """``n`` cameras, all distinct while ``num_cameras`` allows."""
    cams = rng.sample(range(1, num_cameras + 1), min(n, num_cameras))
    return [cams[i % len(cams)] for i in range(n)]


def _write_json(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(records, f)


def _captioned(tmp: str, shots: list[Shot], size: tuple[int, int], num: int,
               mention_prob: float) -> dict[str, list[str]]:
    """Write the shots' images; return image path -> ``num`` captions of that image (``describe``'s
    ``mention_prob``: 1 = full captions, less = partial captions)."""
    attributes = write_shots(tmp, shots, size)
    return {s.path: describe(s.identity, attributes[s.path], s.seed, num, mention_prob) for s in shots}


def _check_ids(counts: dict[str, int], minimum: int = 1) -> None:
    bad = {k: v for k, v in counts.items() if v < minimum}
    if bad:
        raise ConfigError(f"every split needs at least {minimum} identity, got {bad}")


def write_cuhk_pedes(
    root: str,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
    json_name: str = "reid_raw.json",
    num_train_ids: int = 64,
    num_val_ids: int = 16,
    num_test_ids: int = 16,
    images_per_id: int = 3,
    num_cameras: int = 6,
    mention_prob: float = 1.0,
) -> str:
    """CUHK-PEDES: ``imgs/{CUHK01,CUHK03,Market,train_query,test_query}/...`` and a json list of
    ``{"split", "captions" (two), "file_path", "processed_tokens", "id"}`` records.

    Names follow each source: ``CUHK01/0363004.png``, ``CUHK03/299_4.jpg``,
    ``Market/0001_c1s1_001051_00.jpg``, ``train_query/p244_s466.jpg`` / ``test_query/p6955_s9221.jpg``.
    ``json_name="reid_raw.json"``: ids 1..N contiguous (train, then val, then test), with ``split``.
    ``json_name="caption_all.json"`` (the original release): the same records without ``split``, ids
    starting at ``CUHK_PEDES_ID_START`` (train 1, val 11004, test 12004) so the real id ranges give
    the splits.
    """
    if json_name not in ("reid_raw.json", "caption_all.json"):
        raise ConfigError(f"CUHK-PEDES json_name must be 'reid_raw.json' or 'caption_all.json', got {json_name!r}")
    size = check_size(size)
    counts = {"train": num_train_ids, "val": num_val_ids, "test": num_test_ids}
    _check_ids(counts)
    with_split = json_name == "reid_raw.json"
    if not with_split and any(counts[k] > _CUHK_ID_LIMIT[k] for k in counts):
        raise ConfigError(
            f"caption_all.json id ranges hold at most {_CUHK_ID_LIMIT} identities per split, got {counts}"
        )
    rng = random.Random(derive_seed(seed, 0xC0))
    folder_next = {"CUHK01": 1, "CUHK03": 1, "Market": 1, "train_query": 1, "test_query": 1}
    sample = 0
    shots, owners, used, next_id = [], [], set(), 1
    for split, n in counts.items():
        first = next_id if with_split else CUHK_PEDES_ID_START[split]
        for pid in range(first, first + n):
            ident = make_identity(pid, seed)
            folder = rng.choice(_CUHK_FOLDERS[split])
            person = folder_next[folder]
            folder_next[folder] += rng.randint(1, 3)
            for k, cam in enumerate(_cameras(rng, num_cameras, images_per_id), start=1):
                if folder == "CUHK01":
                    name = f"{person:04d}{k:03d}.png"
                elif folder == "CUHK03":
                    name = f"{person}_{k}.jpg"
                elif folder == "Market":
                    name = market_name(person, cam, rng)
                    while f"imgs/Market/{name}" in used:
                        name = market_name(person, cam, rng)
                else:
                    sample += rng.randint(1, 5)
                    name = f"p{person}_s{sample}.jpg"
                shots.append(Shot(f"imgs/{folder}/{name}", ident, cam, derive_seed(seed, pid, k)))
                used.add(shots[-1].path)
                owners.append((split, pid))
        next_id += n
    with atomic_root(root) as tmp:
        captions = _captioned(tmp, shots, size, 2, mention_prob)
        records = []
        for shot, (split, pid) in sorted(zip(shots, owners), key=lambda so: (so[1][1], so[0].path)):
            caps = captions[shot.path]
            record = {"split": split} if with_split else {}
            record.update(captions=caps, file_path=shot.path[len("imgs/") :],
                          processed_tokens=[tokenize(c) for c in caps], id=pid)
            records.append(record)
        _write_json(os.path.join(tmp, json_name), records)
    return root


def write_icfg_pedes(
    root: str,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
    json_name: str = "ICFG-PEDES.json",
    num_train_ids: int = 48,
    num_test_ids: int = 16,
    images_per_id: int = 4,
    num_cameras: int = 15,
    mention_prob: float = 1.0,
) -> str:
    """ICFG-PEDES: ``imgs/train/<pid>/<MSMT17 name>_ex.jpg``, ``imgs/test/...`` and a json list of
    ``{"id", "file_path" ("test/0027/0027_010_05_0303afternoon_1591_0_ex.jpg"), "captions" (one),
    "processed_tokens", "split" ("train" | "test")}``. Json ids are 0-based and contiguous (train,
    then test); folder pids restart at 0000 in ``test/`` as in MSMT17, which ICFG-PEDES is built from.
    """
    if json_name not in ("ICFG-PEDES.json", "ICFG_PEDES.json"):
        raise ConfigError(f"ICFG-PEDES json_name must be 'ICFG-PEDES.json' or 'ICFG_PEDES.json', got {json_name!r}")
    size = check_size(size)
    counts = {"train": num_train_ids, "test": num_test_ids}
    _check_ids(counts)
    if max(counts.values()) > 9999 or num_cameras > 99:
        raise ConfigError("ICFG-PEDES names need at most 9999 ids per split and 99 cameras")
    rng = random.Random(derive_seed(seed, 0x1C))
    shots, owners, next_id = [], [], 0
    for split, n in counts.items():
        for folder_pid in range(n):
            pid = next_id + folder_pid
            ident = make_identity(pid, seed)
            for index, cam in enumerate(_cameras(rng, num_cameras, images_per_id)):
                name = msmt_name(folder_pid, index, cam, rng)[: -len(".jpg")] + "_ex.jpg"
                shots.append(Shot(f"imgs/{split}/{folder_pid:04d}/{name}", ident, cam, derive_seed(seed, pid, index)))
                owners.append((split, pid))
        next_id += n
    with atomic_root(root) as tmp:
        captions = _captioned(tmp, shots, size, 1, mention_prob)
        records = [
            {"id": pid, "file_path": shot.path[len("imgs/") :], "captions": captions[shot.path],
             "processed_tokens": [tokenize(c) for c in captions[shot.path]], "split": split}
            for shot, (split, pid) in zip(shots, owners)
        ]
        _write_json(os.path.join(tmp, json_name), records)
    return root


def write_rstpreid(
    root: str,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
    num_train_ids: int = 48,
    num_val_ids: int = 16,
    num_test_ids: int = 16,
    images_per_id: int = 5,
    num_cameras: int = 15,
    mention_prob: float = 1.0,
) -> str:
    """RSTPReid: ``imgs/<pid>_c<cam>_<n>.jpg`` (e.g. ``3903_c14_0007.jpg``) and ``data_captions.json``,
    a list of ``{"id", "img_path", "captions" (two), "split" ("train" | "val" | "test")}``. Ids are
    0-based and contiguous (train, val, test); each identity has ``images_per_id`` images (5 in the
    real set) from distinct cameras.
    """
    size = check_size(size)
    counts = {"train": num_train_ids, "val": num_val_ids, "test": num_test_ids}
    _check_ids(counts)
    if sum(counts.values()) > 9999:
        raise ConfigError(f"RSTPReid names need at most 9999 ids in all, got {sum(counts.values())}")
    rng = random.Random(derive_seed(seed, 0x25))
    shots, owners, pid = [], [], 0
    for split, n in counts.items():
        for _ in range(n):
            ident = make_identity(pid, seed)
            frames = sorted(rng.sample(range(10000), images_per_id))
            for k, (cam, frame) in enumerate(zip(_cameras(rng, num_cameras, images_per_id), frames)):
                shots.append(Shot(f"imgs/{pid:04d}_c{cam}_{frame:04d}.jpg", ident, cam, derive_seed(seed, pid, k)))
                owners.append((split, pid))
            pid += 1
    with atomic_root(root) as tmp:
        captions = _captioned(tmp, shots, size, 2, mention_prob)
        records = [
            {"id": pid, "img_path": shot.path[len("imgs/") :], "captions": captions[shot.path], "split": split}
            for shot, (split, pid) in zip(shots, owners)
        ]
        _write_json(os.path.join(tmp, "data_captions.json"), records)
    return root
