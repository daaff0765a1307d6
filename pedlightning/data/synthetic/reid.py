"""Synthetic reID sets in the real on-disk layouts: Market-1501, DukeMTMC-reID, Occluded-Duke, MSMT17.

Train and test identities are disjoint. Every query identity has gallery images in at least one other
camera and at least one gallery image in the query's own camera (which evaluation must drop).
"""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Callable
from typing import Any

from pedlightning.data.synthetic._io import Shot, atomic_root, check_size, write_shots
from pedlightning.data.synthetic.identity import derive_seed, make_identity
from pedlightning.errors import ConfigError

__all__ = ["write_dukemtmc", "write_market1501", "write_msmt17", "write_occluded_duke"]

_TRAIN, _QUERY, _GALLERY, _JUNK, _DISTRACTOR = range(5)
_EXTRA_PID = 1_000_000  # identities of junk/distractor images live above every real pid
_MSMT_TEST_PID = 500_000  # MSMT17 test pids restart at 0: their identities live at this offset

Namer = Callable[[int, int, random.Random], str]


def market_name(pid: int, cam: int, rng: random.Random) -> str:
    """``0002_c1s1_000451_03.jpg``: pid (``-1`` for junk), camera, sequence, frame, box index."""
    head = "-1" if pid == -1 else f"{pid:04d}"
    return f"{head}_c{cam}s{rng.randint(1, 6)}_{rng.randint(0, 999999):06d}_{rng.randint(0, 8):02d}.jpg"


def _duke_name(pid: int, cam: int, rng: random.Random) -> str:
    return f"{pid:04d}_c{cam}_f{rng.randint(0, 9999999):07d}.jpg"


def _check_counts(num_cameras: int, queries_per_id: int, gallery_per_id: int, images_per_id: int) -> None:
    if num_cameras < 2:
        raise ConfigError(f"num_cameras must be >= 2 (cross-camera matching), got {num_cameras}")
    if queries_per_id < 1 or queries_per_id + 1 > min(num_cameras, gallery_per_id):
        raise ConfigError(
            f"need 1 <= queries_per_id < min(num_cameras, gallery_per_id) so every query camera has a same-camera "
            f"and another camera has a cross-camera gallery image; got queries_per_id={queries_per_id}, "
            f"num_cameras={num_cameras}, gallery_per_id={gallery_per_id}"
        )
    if images_per_id < 2:
        raise ConfigError(f"images_per_id must be >= 2, got {images_per_id}")


def _train_cameras(rng: random.Random, num_cameras: int, n: int) -> list[int]:
    """``n`` cameras (1-based) over 2-4 distinct cameras, round-robin."""
    cams = rng.sample(range(1, num_cameras + 1), min(num_cameras, rng.randint(2, 4)))
    return [cams[i % len(cams)] for i in range(n)]


def _test_cameras(rng: random.Random, num_cameras: int, queries: int, gallery: int) -> tuple[list[int], list[int]]:
    """Query cameras (distinct) and gallery cameras covering every query camera plus at least one other."""
    m = min(num_cameras, gallery, max(queries + 1, rng.randint(2, 4)))
    cams = rng.sample(range(1, num_cameras + 1), m)
    return cams[:queries], [cams[i % m] for i in range(gallery)]


class _Names:
    """Unique file names per folder (re-draws the random parts of a name on a clash)."""

    def __init__(self, namer: Namer, rng: random.Random):
        self.namer, self.rng, self.used = namer, rng, set()

    def __call__(self, folder: str, pid: int, cam: int) -> str:
        while True:
            path = f"{folder}/{self.namer(pid, cam, self.rng)}"
            if path not in self.used:
                self.used.add(path)
                return path


def _reid_shots(
    *, seed: int, namer: Namer, num_train_ids: int, num_test_ids: int, num_cameras: int, images_per_id: int,
    queries_per_id: int, gallery_per_id: int, num_gallery_only_ids: int, num_junk: int, num_distractors: int,
    train_occluded: float, query_occluded: float, gallery_occluded: float,
) -> list[Shot]:
    """The Market/Duke-style plan: folders bounding_box_train, query, bounding_box_test."""
    _check_counts(num_cameras, queries_per_id, gallery_per_id, images_per_id)
    total = num_train_ids + num_test_ids + num_gallery_only_ids
    if total > 9999 or min(num_train_ids, num_test_ids) < 1:
        raise ConfigError(f"need 1 <= train/test ids and at most 9999 ids in all (4-digit names), got {total}")
    rng = random.Random(derive_seed(seed, 0x5EED))
    pool = rng.sample(range(1, min(9999, max(1501, 2 * total)) + 1), total)  # sparse, like the real pids
    train = sorted(pool[:num_train_ids])
    test = sorted(pool[num_train_ids : num_train_ids + num_test_ids])
    gallery_only = sorted(pool[num_train_ids + num_test_ids :])
    names = _Names(namer, rng)
    shots = []
    for pid in train:
        ident = make_identity(pid, seed)
        for k, cam in enumerate(_train_cameras(rng, num_cameras, images_per_id)):
            shots.append(Shot(names("bounding_box_train", pid, cam), ident, cam, derive_seed(seed, _TRAIN, pid, k),
                              rng.random() < train_occluded))
    for pid in test:
        ident = make_identity(pid, seed)
        query_cams, gallery_cams = _test_cameras(rng, num_cameras, queries_per_id, gallery_per_id)
        for k, cam in enumerate(query_cams):
            shots.append(Shot(names("query", pid, cam), ident, cam, derive_seed(seed, _QUERY, pid, k),
                              rng.random() < query_occluded))
        for k, cam in enumerate(gallery_cams):
            shots.append(Shot(names("bounding_box_test", pid, cam), ident, cam, derive_seed(seed, _GALLERY, pid, k),
                              rng.random() < gallery_occluded))
    for pid in gallery_only:  # people seen by one camera only (DukeMTMC-reID's gallery distractor ids)
        ident, cam = make_identity(pid, seed), rng.randint(1, num_cameras)
        for k in range(rng.randint(1, 2)):
            shots.append(Shot(names("bounding_box_test", pid, cam), ident, cam, derive_seed(seed, _GALLERY, pid, k),
                              rng.random() < gallery_occluded))
    for j in range(num_junk):  # pid -1: bad detections, only part of a person
        cam = rng.randint(1, num_cameras)
        ident = make_identity(_EXTRA_PID + j, seed)
        shots.append(Shot(names("bounding_box_test", -1, cam), ident, cam, derive_seed(seed, _JUNK, j), partial=True))
    for j in range(num_distractors):  # pid 0: false detections (empty scene) or people outside the query set
        cam = rng.randint(1, num_cameras)
        ident = make_identity(2 * _EXTRA_PID + j, seed) if j % 2 else None
        shots.append(Shot(names("bounding_box_test", 0, cam), ident, cam, derive_seed(seed, _DISTRACTOR, j)))
    return shots


def _write_reid(root: str, size: tuple[int, int], shots: list[Shot], folders: tuple[str, ...],
                lists: dict[str, list[str]] | None = None) -> str:
    size = check_size(size)
    with atomic_root(root) as tmp:
        for folder in folders:
            os.makedirs(os.path.join(tmp, folder), exist_ok=True)
        write_shots(tmp, shots, size)
        for name, lines in (lists or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8", newline="\n") as f:
                f.writelines(line + "\n" for line in lines)
    return root


_MARKET_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")


def write_market1501(
    root: str,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
    num_train_ids: int = 32,
    num_test_ids: int = 32,
    num_cameras: int = 6,
    images_per_id: int = 6,
    queries_per_id: int = 2,
    gallery_per_id: int = 6,
    num_junk: int = 16,
    num_distractors: int = 16,
    train_occluded: float = 0.05,
    query_occluded: float = 0.05,
    gallery_occluded: float = 0.05,
) -> str:
    """Market-1501: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` with names like
    ``0002_c1s1_000451_03.jpg`` (pid, camera 1..num_cameras, sequence, frame, box). Pids are sparse
    4-digit numbers (train and test interleaved, as in the real set). ``bounding_box_test`` also holds
    ``num_junk`` junk images (pid ``-1``, part of a person) and ``num_distractors`` distractors (pid
    ``0000``: empty scenes and people outside the query set). The ``*_occluded`` arguments are the
    fractions of images with an occluder.
    """
    shots = _reid_shots(
        seed=seed, namer=market_name, num_train_ids=num_train_ids, num_test_ids=num_test_ids,
        num_cameras=num_cameras, images_per_id=images_per_id, queries_per_id=queries_per_id,
        gallery_per_id=gallery_per_id, num_gallery_only_ids=0, num_junk=num_junk, num_distractors=num_distractors,
        train_occluded=train_occluded, query_occluded=query_occluded, gallery_occluded=gallery_occluded,
    )
    return _write_reid(root, size, shots, _MARKET_FOLDERS)


def write_dukemtmc(
    root: str,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
    num_train_ids: int = 32,
    num_test_ids: int = 32,
    num_cameras: int = 8,
    images_per_id: int = 6,
    queries_per_id: int = 2,
    gallery_per_id: int = 6,
    num_gallery_only_ids: int = 8,
    train_occluded: float = 0.05,
    query_occluded: float = 0.05,
    gallery_occluded: float = 0.05,
) -> str:
    """DukeMTMC-reID: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` with names like
    ``0001_c2_f0046182.jpg`` (pid, camera 1..8, frame); no junk. ``num_gallery_only_ids`` identities
    appear in the gallery only, in one camera (as Duke's 408 distractor identities).
    """
    shots = _reid_shots(
        seed=seed, namer=_duke_name, num_train_ids=num_train_ids, num_test_ids=num_test_ids,
        num_cameras=num_cameras, images_per_id=images_per_id, queries_per_id=queries_per_id,
        gallery_per_id=gallery_per_id, num_gallery_only_ids=num_gallery_only_ids, num_junk=0, num_distractors=0,
        train_occluded=train_occluded, query_occluded=query_occluded, gallery_occluded=gallery_occluded,
    )
    return _write_reid(root, size, shots, _MARKET_FOLDERS)


def _with_defaults(writer: Callable[..., str], name: str, doc: str, **defaults: Any) -> Callable[..., str]:
    """``writer`` under ``name`` with other ``defaults``: its signature (which ``pedlightning synth`` turns into
    options) lists the same keyword arguments, each still settable."""
    signature = inspect.signature(writer)
    unknown = sorted(set(defaults) - set(signature.parameters))
    if unknown:
        raise TypeError(f"{writer.__name__} has no arguments {unknown}")

    def preset(root: str, **kwargs: Any) -> str:
        return writer(root, **{**defaults, **kwargs})

    params = [p.replace(default=defaults.get(p.name, p.default)) for p in signature.parameters.values()]
    preset.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    preset.__name__ = preset.__qualname__ = name
    preset.__doc__, preset.__module__ = doc, writer.__module__
    return preset


write_occluded_duke = _with_defaults(
    write_dukemtmc, "write_occluded_duke",
    """Occluded-Duke: DukeMTMC-reID's folders and names; every query occluded, the gallery mostly
    holistic (10% occluded) and 10% of the training images occluded.
    """,
    train_occluded=0.1, query_occluded=1.0, gallery_occluded=0.1,
)


_MSMT_FOLDERS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
_MSMT_DAYS = ("0113", "0114", "0302", "0303")
_MSMT_TIMES = ("morning", "noon", "afternoon")


def msmt_name(pid: int, index: int, cam: int, rng: random.Random) -> str:
    """``0000_000_01_0303morning_0015_0.jpg``: pid, per-pid index, camera, day + time of day, frame, suffix."""
    when = rng.choice(_MSMT_DAYS) + rng.choice(_MSMT_TIMES)
    return f"{pid:04d}_{index:03d}_{cam:02d}_{when}_{rng.randint(0, 9999):04d}_{int(rng.random() < 0.1)}.jpg"


def write_msmt17(
    root: str,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
    version: str = "V1",
    num_train_ids: int = 32,
    num_test_ids: int = 32,
    num_cameras: int = 15,
    images_per_id: int = 6,
    val_per_id: int = 1,
    queries_per_id: int = 2,
    gallery_per_id: int = 6,
    train_occluded: float = 0.05,
    query_occluded: float = 0.05,
    gallery_occluded: float = 0.05,
) -> str:
    """MSMT17: per-pid folders ``train/0000/0000_000_01_0303morning_0015_0.jpg`` (pid, per-pid index,
    camera 01..15, day + time of day, frame, suffix) and ``test/`` with pids restarting at 0000, plus
    ``list_train.txt``, ``list_val.txt`` (paths relative to the train folder) and ``list_query.txt``,
    ``list_gallery.txt`` (relative to the test folder), each line ``<path> <pid>``. ``val_per_id``
    extra images of every train identity form the val list (as in MSMT17). ``version="V2"`` names the
    folders ``mask_train_v2/`` and ``mask_test_v2/``.
    """
    if version not in _MSMT_FOLDERS:
        raise ConfigError(f"MSMT17 version must be 'V1' or 'V2', got {version!r}")
    _check_counts(num_cameras, queries_per_id, gallery_per_id, images_per_id)
    ids = (num_train_ids, num_test_ids)
    if num_cameras > 99 or val_per_id < 0 or max(ids) > 9999 or min(ids) < 1:
        raise ConfigError("MSMT17 names need 1..9999 train/test ids, at most 99 cameras and val_per_id >= 0")
    train_dir, test_dir = _MSMT_FOLDERS[version]
    rng = random.Random(derive_seed(seed, 0x4D53))
    shots, lists = [], {"list_train.txt": [], "list_val.txt": [], "list_query.txt": [], "list_gallery.txt": []}
    for pid in range(num_train_ids):
        ident = make_identity(pid, seed)
        n = images_per_id + val_per_id
        val = set(rng.sample(range(n), val_per_id))
        for index, cam in enumerate(_train_cameras(rng, num_cameras, n)):
            rel = f"{pid:04d}/{msmt_name(pid, index, cam, rng)}"
            shots.append(Shot(f"{train_dir}/{rel}", ident, cam, derive_seed(seed, _TRAIN, pid, index),
                              rng.random() < train_occluded))
            lists["list_val.txt" if index in val else "list_train.txt"].append(f"{rel} {pid}")
    for pid in range(num_test_ids):  # test pids restart at 0; identities are distinct from train ones
        ident = make_identity(_MSMT_TEST_PID + pid, seed)
        query_cams, gallery_cams = _test_cameras(rng, num_cameras, queries_per_id, gallery_per_id)
        roles = [("list_query.txt", cam, query_occluded) for cam in query_cams]
        roles += [("list_gallery.txt", cam, gallery_occluded) for cam in gallery_cams]
        order = rng.sample(range(len(roles)), len(roles))  # per-pid indices interleave query and gallery
        for index, (listname, cam, occluded) in sorted(zip(order, roles)):
            rel = f"{pid:04d}/{msmt_name(pid, index, cam, rng)}"
            shots.append(Shot(f"{test_dir}/{rel}", ident, cam, derive_seed(seed, _GALLERY, ident.pid, index),
                              rng.random() < occluded))
            lists[listname].append(f"{rel} {pid}")
    return _write_reid(root, size, shots, (train_dir, test_dir), lists)
