"""WebDataset shards of person images (LUPerson, LUPerson-TA): writing them, and streaming them correctly under DDP.

Writing: :func:`write_shards` packs image files into ``shard-000000.tar`` ... (original bytes, no re-encoding)
plus a ``shards.json`` manifest with the sample count and byte size of every shard.

Reading (:class:`ShardStream` + :class:`EpochLoader`), with the known pitfalls of webdataset designed out:

- ``split`` mode (default): every epoch all ranks shuffle the shard list with the same seed and epoch,
  then rank ``r`` takes ``shards[r::world]`` (the slicing of ``wds.split_by_node``) and worker ``w`` of it
  ``[w::num_workers]`` (``wds.split_by_worker``). Each sample is read at most once per epoch. Every rank
  yields exactly ``batches_per_rank`` batches: the count that the rank with the smallest possible share of
  shards can fill, so no rank runs dry (uneven batch counts crash gloo and hang NCCL); the samples beyond it
  rotate between epochs with the shard order.
- ``resampled`` mode: each worker draws shards with replacement from its own seeded stream (``resampled=True``
  in WebDataset), and the loader cuts ``samples_per_epoch / (world * batch)`` batches per rank (``with_epoch``).
  For more workers than shards; samples may repeat within an epoch.
- :class:`EpochLoader` has a ``__len__`` (WebDataset's ``with_length``), so Lightning's
  ``estimated_stepping_batches`` and step-based schedules work, and it receives the epoch from Lightning
  through the ``loader.sampler.set_epoch`` protocol, so shard orders change per epoch and resume exactly.
- Rank and world size are captured in ``setup`` (not read in the worker, where the process group of a
  spawned process is invisible). The epoch lives in shared memory, so persistent workers see each new one.

Unreadable shards, images and LUPerson-TA annotations are counted (``ErrorCounter``, shared by all workers of a
rank) and logged with their shard and key; ``on_error="fail"`` raises a :class:`DatasetLayoutError` naming them
instead. ``shards.json`` is checked, not trusted (:func:`read_manifest`, :func:`usable_shards`): its format and
total when read, each shard's byte size at setup (one ``stat``), each shard's sample count when the shard is read.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pedlightning.data.faults import ErrorCounter, OnError, decode_image
from pedlightning.data.progress import progress
from pedlightning.data.records import PersonAnnotation, PersonSample
from pedlightning.data.sources.attributes import PA100K_ATTRIBUTES
from pedlightning.data.sources.base import IMAGE_EXTENSIONS
from pedlightning.data.sources.luperson import parse_annotation
from pedlightning.data.transforms.batched import decode_rgb
from pedlightning.data.transforms.samples import SampleTransform, as_sample_transform
from pedlightning.errors import ConfigError, DatasetLayoutError

log = logging.getLogger(__name__)

ShardSampling = Literal["split", "resampled"]
MANIFEST = "shards.json"
_IMAGE_SUFFIXES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS) + ("webp",)


# ------------------------------------------------------------------------------------------------ writing
@dataclass
class ShardSummary:
    """What :func:`write_shards` wrote: shard paths, per-shard counts and the skipped files with reasons."""

    shards: list[str]
    num_samples: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.num_samples)


def sample_key(path: str, root: str | None, index: int) -> str:
    """A unique, dot-free WebDataset key: the running index, then the path relative to ``root``.

    WebDataset splits a member name at the first dot, so dots and separators become ``_``.
    """
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    stem = os.path.splitext(rel)[0]
    return f"{index:09d}_" + re.sub(r"[^0-9A-Za-z_-]", "_", stem)[-120:]


def _read_checked(args: tuple[str, bool]) -> tuple[str, bytes | None, str]:
    path, verify = args
    try:
        with open(path, "rb") as f:
            data = f.read()
        if verify:
            decode_image(data)
        return path, data, ""
    except Exception as err:  # noqa: BLE001 - any failure makes the file unusable; the caller reports it
        return path, None, f"{type(err).__name__}: {err}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(paths: Sequence[str], out_dir: str, shard_size: int = 10000, root: str | None = None,
                 on_error: OnError = "skip", verify: bool = True, num_workers: int = 0,
                 prefix: str = "shard") -> ShardSummary:
    """Pack image files into WebDataset shards of ``shard_size`` samples: ``<key>.<ext>`` with the original bytes.

    ``verify`` decodes every image first; an unreadable one is skipped and reported (``on_error="skip"``) or
    stops the conversion with an error naming it (``"fail"``). ``num_workers`` processes read and verify in
    parallel; the order of ``paths`` is kept. Writes ``shards.json`` (counts per shard and the skipped files).
    The shards are written into a temporary sibling folder that becomes ``out_dir`` only when all is done, so a
    failed or interrupted conversion leaves nothing behind.
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConfigError(f"refusing to write shards into {out_dir}: it exists and is not an empty folder")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=os.path.dirname(out_dir))
    try:
        summary = _pack(paths, tmp, shard_size, root, ErrorCounter(on_error), verify, num_workers, prefix)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.shards = [os.path.join(out_dir, os.path.basename(s)) for s in summary.shards]
    return summary


def _pack(paths: Sequence[str], folder: str, shard_size: int, root: str | None, errors: ErrorCounter, verify: bool,
          num_workers: int, prefix: str) -> ShardSummary:
    summary = ShardSummary([], [])
    jobs = ((p, verify) for p in paths)
    pool = multiprocessing.get_context().Pool(num_workers) if num_workers > 0 else None
    results = pool.imap(_read_checked, jobs, chunksize=32) if pool else map(_read_checked, jobs)
    tar, index = None, 0
    try:
        for path, data, error in progress(results, len(paths), "make-shards"):
            if data is None:
                errors.record(f"image {path}", error)
                summary.skipped.append((path, error))
                continue
            if tar is None or summary.num_samples[-1] == shard_size:
                if tar is not None:
                    tar.close()
                summary.shards.append(os.path.join(folder, f"{prefix}-{len(summary.shards):06d}.tar"))
                summary.num_samples.append(0)
                tar = tarfile.open(summary.shards[-1], "w", format=tarfile.USTAR_FORMAT)
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            _add_member(tar, f"{sample_key(path, root, index)}.{'jpg' if ext == 'jpeg' else ext}", data)
            summary.num_samples[-1] += 1
            index += 1
    finally:
        if tar is not None:
            tar.close()
        if pool is not None:
            pool.terminate()
    if not summary.shards:
        raise DatasetLayoutError(f"no readable image among the {len(paths)} given; nothing was written")
    write_manifest(folder, summary.shards, summary.num_samples, summary.skipped)
    return summary


def write_manifest(folder: str, shards: Sequence[str], num_samples: Sequence[int],
                   skipped: Sequence[tuple[str, str]] = ()) -> str:
    """Write ``<folder>/shards.json``: per shard its name, sample count and byte size (checked when read), the
    total, and the files left out with their reasons."""
    manifest = {"shards": [{"name": os.path.basename(s), "num_samples": int(n), "bytes": os.path.getsize(s)}
                           for s, n in zip(shards, num_samples)],
                "num_samples": int(sum(num_samples)), "skipped": [{"path": p, "error": e} for p, e in skipped]}
    path = os.path.join(folder, MANIFEST)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return path


# ------------------------------------------------------------------------------------------------ reading
def count_samples(shard: str) -> int:
    """Samples (distinct keys with an image member) in one tar file, from its headers."""
    keys = set()
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                base, _, ext = os.path.basename(member.name).partition(".")
                if member.isfile() and ext.lower() in _IMAGE_SUFFIXES:
                    keys.add(os.path.join(os.path.dirname(member.name), base))
    except (OSError, tarfile.TarError) as err:
        raise DatasetLayoutError(f"cannot read shard {shard}: {err}") from err
    return len(keys)


def read_manifest(folder: str) -> dict[str, dict[str, int]] | None:
    """The entries of ``<folder>/shards.json`` by shard name (``num_samples``, and ``bytes`` when recorded), or
    ``None`` without one. A malformed manifest, or one whose total is not the sum of its shards, raises a
    DatasetLayoutError naming the file and the entry."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise DatasetLayoutError(f"shard manifest {path}: not readable JSON ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DatasetLayoutError(f"shard manifest {path}: expected an object with a 'shards' list "
                                 f"(written by pedlightning make-shards)")
    entries: dict[str, dict[str, int]] = {}
    for number, entry in enumerate(manifest["shards"]):
        fields = entry if isinstance(entry, dict) else {}
        name, count, size = fields.get("name"), fields.get("num_samples"), fields.get("bytes")
        if (not isinstance(name, str) or not _is_count(count) or (size is not None and not _is_count(size))
                or os.path.basename(name) != name):
            raise DatasetLayoutError(f"shard manifest {path}: shards[{number}] must be {{\"name\": <file name>, "
                                     f"\"num_samples\": <int >= 0>[, \"bytes\": <int >= 0>]}}, got {entry!r:.200}")
        if name in entries:
            raise DatasetLayoutError(f"shard manifest {path}: shard {name} is listed twice")
        entries[name] = {"num_samples": count} if size is None else {"num_samples": count, "bytes": size}
    declared = sum(e["num_samples"] for e in entries.values())
    total = manifest.get("num_samples", declared)
    if total != declared:
        raise DatasetLayoutError(f"shard manifest {path}: num_samples says {total} but its shards add up to "
                                 f"{declared}; the manifest was edited or belongs to other shards")
    return entries


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def usable_shards(shards: Sequence[str], errors: ErrorCounter | None = None) -> tuple[list[str], list[int]]:
    """The shards that can be planned with, and their sample counts.

    Counts come from the ``shards.json`` next to the shards (cheap: one ``stat`` per shard checks its recorded
    byte size) or, for shards it does not list, from the tar headers. A shard whose size differs from the
    manifest's (truncated, or rewritten without its manifest), whose headers cannot be read, or that the
    manifest lists but is missing, is an error under ``errors``' policy: raised naming it (``fail``, the default
    without ``errors``), or counted, named in a warning and left out (``skip``).
    """
    errors = errors or ErrorCounter("fail")
    manifests: dict[str, dict[str, dict[str, int]] | None] = {}
    kept, sizes = [], []
    for shard in shards:
        folder, name = os.path.split(shard)
        if folder not in manifests:
            manifests[folder] = read_manifest(folder)
        entry = (manifests[folder] or {}).get(name)
        if entry is None:
            try:
                sizes.append(count_samples(shard))
            except DatasetLayoutError as err:
                errors.record(f"shard {shard}", str(err).removeprefix(f"cannot read shard {shard}: "))
                continue
        else:
            actual = os.path.getsize(shard) if os.path.isfile(shard) else None
            if "bytes" in entry and actual != entry["bytes"]:
                found = "missing" if actual is None else f"{actual} bytes"
                errors.record(f"shard {shard}", f"{found}, but {os.path.join(folder, MANIFEST)} records "
                                                f"{entry['bytes']} (truncated, or rewritten without its manifest)")
                continue
            sizes.append(entry["num_samples"])
        kept.append(shard)
    for folder, entries in manifests.items():
        for name in sorted(entries or {}):
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                errors.record(f"shard {path}", f"listed in {os.path.join(folder, MANIFEST)} but missing")
    if not kept:
        raise DatasetLayoutError(f"none of the {len(shards)} shards is usable (see the warnings above)")
    return kept, sizes


def shard_sizes(shards: Sequence[str]) -> list[int]:
    """Samples per shard (see :func:`usable_shards`); any unusable shard raises an error naming it."""
    return usable_shards(shards)[1]


def batches_per_rank(sizes: Sequence[int], world_size: int, batch_size: int, mode: ShardSampling = "split",
                     samples_per_epoch: int | None = None) -> int:
    """Batches every rank yields per epoch (the same on all ranks).

    ``split``: whatever the shard order, a rank holds at least ``S // world`` shards, so at least the samples
    of the ``S // world`` smallest shards; with per-worker partial batches it never yields fewer batches than
    that many samples fill. ``resampled``: ``samples_per_epoch`` (default: one pass) over all ranks' batches.
    """
    if mode == "resampled":
        total = samples_per_epoch or sum(sizes)
        n = total // (world_size * batch_size)
    elif mode == "split":
        per_rank = len(sizes) // world_size
        if per_rank == 0:
            raise ConfigError(f"{len(sizes)} shard(s) cannot feed {world_size} processes in split mode: write at "
                              f"least one shard per process (make-shards --shard-size), or use shard_sampling: "
                              f"resampled")
        n = sum(sorted(sizes)[:per_rank]) // batch_size
    else:
        raise ConfigError(f"shard_sampling must be 'split' or 'resampled', got {mode!r}")
    if n < 1:
        raise ConfigError(f"shards of {sum(sizes)} samples give no full batch of {batch_size} per process "
                          f"({world_size} processes, {mode} mode); lower the batch size or add data")
    return n


def _seed(*parts: object) -> str:
    return "-".join(map(str, parts))


class ShardStream(IterableDataset):
    """Samples of WebDataset shards, decoded and transformed: ``transform(sample)`` (a dict) plus ``key``.

    Each sample reaches the transform as a :class:`~pedlightning.data.records.PersonSample`: the image, the key,
    the epoch and, for a transform that ``uses_annotations``, the LUPerson-TA annotation parsed from the
    ``<key>.json`` member (an empty annotation when the sample has none). An unreadable annotation is counted
    like an unreadable image.

    Args:
        shards: tar files (local paths or URLs WebDataset can open).
        transform: a :class:`~pedlightning.data.transforms.samples.SampleTransform`, or a PIL image -> dict function.
        mode: ``split`` (each sample once per epoch) or ``resampled`` (shards drawn with replacement).
        shuffle_buffer: samples shuffled in a buffer of this size within each worker (1 = no shuffling).
        seed: shared by all ranks; the shard order depends on (seed, epoch), sample shuffling also on rank/worker.
        rank, world_size: this process's place in the job (from the trainer, at setup time).
        errors: counter and policy for unreadable shards and images.
        attribute_names: the order of the annotation's attribute vector (PA-100K's by default).
        num_samples: the planned sample count of every shard (:func:`usable_shards`); a shard that turns out to
            hold another number (the manifest was wrong, or the shard is truncated mid-way, which tar readers
            see as a clean end) is an error under ``errors``' policy, named when the shard has been read.
    """

    def __init__(self, shards: Sequence[str], transform: SampleTransform | Callable[[Image.Image], dict[str, Any]],
                 mode: ShardSampling = "split", shuffle_buffer: int = 1000, seed: int = 0, rank: int = 0,
                 world_size: int = 1, errors: ErrorCounter | None = None,
                 attribute_names: Sequence[str] = PA100K_ATTRIBUTES, num_samples: Sequence[int] | None = None):
        if mode not in ("split", "resampled"):
            raise ConfigError(f"shard_sampling must be 'split' or 'resampled', got {mode!r}")
        if num_samples is not None and len(num_samples) != len(shards):
            raise ConfigError(f"num_samples has {len(num_samples)} counts for {len(shards)} shards")
        self.shards = list(shards)
        self.planned = dict(zip(self.shards, num_samples)) if num_samples is not None else {}
        self.transform = as_sample_transform(transform)
        self._decode = decode_rgb if getattr(self.transform, "reads_tensors", False) else decode_image
        self.attribute_names = tuple(attribute_names)
        self.mode = mode
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.errors = errors or ErrorCounter("skip")
        self._epoch = multiprocessing.get_context().Value("q", 0)  # shared: persistent workers see updates

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    def worker_shards(self) -> Iterator[str]:
        """This worker's shards for the current epoch."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.mode == "resampled":
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker))
            return (rng.choice(self.shards) for _ in itertools.count())
        order = list(self.shards)
        random.Random(_seed(self.seed, self.epoch)).shuffle(order)
        return iter(order[self.rank::self.world_size][worker::num_workers])

    def _shard_samples(self, url: str) -> Iterator[dict[str, Any]]:
        """The raw samples of one shard; then its count is checked against the plan, unless it was unreadable."""
        failed = []

        def handler(err: Exception) -> bool:  # WebDataset's handler protocol: count (or raise) and go on
            failed.append(err)
            self.errors.record(f"shard {url}", err.args[0] if err.args else repr(err))
            return True

        count = 0
        for sample in wds.tarfile_samples(iter([{"url": url}]), handler=handler):
            count += any(e in sample for e in _IMAGE_SUFFIXES)
            yield sample
        planned = self.planned.get(url)
        if planned is not None and count != planned and not failed:
            self.errors.record(f"shard {url}", f"holds {count} images but {planned} were planned (from "
                                               f"{MANIFEST} or its tar headers); its epoch share is off")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info else 0
        samples = itertools.chain.from_iterable(map(self._shard_samples, self.worker_shards()))
        if self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, "samples"))
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        for sample in samples:
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            ext = next((e for e in _IMAGE_SUFFIXES if e in sample), None)
            if ext is None:
                self.errors.record(f"sample {key} in {url}", f"no image member (.{', .'.join(_IMAGE_SUFFIXES)})")
                continue
            try:
                image = self._decode(sample[ext])
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
                self.errors.record(f"image {key}.{ext} in {url}", f"{type(err).__name__}: {err}")
                continue
            annotation = PersonAnnotation()
            if self.transform.uses_annotations and "json" in sample:
                try:
                    annotation = parse_annotation(sample["json"], self.attribute_names, f"{url}: {key}.json")
                except DatasetLayoutError as err:
                    where = f"{url}: {key}.json: "
                    self.errors.record(f"annotation {where[:-2]}", str(err).splitlines()[0].removeprefix(where))
                    continue
            yield {**self.transform(PersonSample(image, key, annotation, self.epoch)), "key": key}


class _EpochToDataset:
    """Lightning calls ``loader.sampler.set_epoch(epoch)`` every epoch (also after a resume); pass it on."""

    def __init__(self, dataset: ShardStream):
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class EpochLoader:
    """Exactly ``num_batches`` batches per epoch from a :class:`ShardStream` loader, with a ``__len__``.

    If the stream runs dry first (possible only when unreadable samples were skipped, or in ``resampled``
    mode never), the next pass starts over so that every rank still yields ``num_batches`` batches.
    """

    def __init__(self, loader: DataLoader, num_batches: int):
        if not isinstance(loader.dataset, ShardStream):
            raise TypeError("EpochLoader wraps a DataLoader over a ShardStream")
        self.loader = loader
        self.num_batches = num_batches
        self.sampler = _EpochToDataset(loader.dataset)

    def __len__(self) -> int:
        return self.num_batches

    def _passes(self) -> Iterator[Any]:
        for number in itertools.count():
            yielded = 0
            for batch in self.loader:
                yielded += 1
                yield batch
            if yielded == 0:
                raise DatasetLayoutError(f"no readable sample in the shards of this process "
                                         f"({len(self.loader.dataset.shards)} shards)")
            log.warning("the shard stream of this process ran dry after %d batches (pass %d, %d unreadable "
                        "samples skipped); starting another pass to fill the epoch", yielded, number,
                        self.loader.dataset.errors.count)

    def __iter__(self) -> Iterator[Any]:
        errors = self.loader.dataset.errors
        before = errors.count
        yield from itertools.islice(self._passes(), self.num_batches)
        if errors.count > before:
            log.warning("epoch %d: %d unreadable sample(s) skipped by this process (%d in total)",
                        self.loader.dataset.epoch, errors.count - before, errors.count)
