"""LUPerson (Fu et al., CVPR 2021): unlabeled person images as a folder tree, an image list, or tar shards;
LUPerson-TA (VAL-PAT): the same shards with a text + attribute annotation per image.

LUPerson is released as JPG files grouped in sub-folders (one per video); any tree of images works.
For millions of images, a list file (one path per line) avoids walking the tree, and WebDataset shards
(``pedlightning make-shards``) avoid millions of small files altogether. Pure Python, no torch.

LUPerson-TA's own format is not public; ours (:data:`LUPERSON_TA_LAYOUT`) puts a ``<key>.json`` member next to
each ``<key>.jpg``: ``{"captions": [...], "attributes": {name: 0 | 1, ...}}``. A sample may lack either part
(empty list / ``null`` / key absent): it is kept and says so (:class:`~pedlightning.data.records.PersonAnnotation`),
so objectives that need the part mask it out instead of the loader dropping the image.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pedlightning.data.faults import ErrorCounter
from pedlightning.data.records import PersonAnnotation
from pedlightning.data.sources.attributes import PA100K_ATTRIBUTES, attribute_vector
from pedlightning.data.sources.base import (
    IMAGE_EXTENSIONS,
    DatasetLayoutError,
    require_files_exist,
)

SourceKind = Literal["auto", "folder", "list", "shards"]

LUPERSON_LAYOUT = """\
either a folder tree of images:   <root>/<any sub-folders>/<name>.jpg (.jpeg, .png, .bmp)
or a list file:                   <root> = images.txt, one image path per line (relative to the list's
                                  folder or to image_root); blank lines and lines starting with '#' skipped
or WebDataset shards:             <root>/shard-000000.tar, shard-000001.tar, ... (pedlightning make-shards)"""

LUPERSON_TA_LAYOUT = """\
WebDataset shards <root>/shard-000000.tar, ... holding per sample <key>.jpg and <key>.json, the json being
  {"captions": ["A man wearing ...", ...],            (a list of strings; [] or absent: no caption)
   "attributes": {"Female": 0, "AgeOver60": 0, ...}}  (every attribute name -> 0 or 1; null or absent: unlabelled)"""

ANNOTATION_STATS = "annotation_stats.json"
"""The cache of :func:`annotation_stats` in the shard folder (per shard, keyed by its size and mtime)."""
_STATS_VERSION = 1


def scan_image_folder(root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """Every image under ``root`` (recursively), sorted, as absolute paths; hidden folders are skipped."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"LUPerson images: folder not found: {root}", LUPERSON_LAYOUT)
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(extensions)]
    if not paths:
        raise DatasetLayoutError(f"LUPerson images: no image ({', '.join(extensions)}) found under {root}",
                                 LUPERSON_LAYOUT)
    return paths


def read_image_list(list_file: str, image_root: str | None = None, check_exists: bool = True) -> list[str]:
    """Image paths listed in ``list_file``, made absolute against ``image_root`` (default: the list's folder)."""
    if not os.path.isfile(list_file):
        raise DatasetLayoutError(f"LUPerson image list: file not found: {list_file}", LUPERSON_LAYOUT)
    base = os.path.abspath(image_root or os.path.dirname(os.path.abspath(list_file)))
    paths = []
    with open(list_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not line.lower().endswith(IMAGE_EXTENSIONS):
                raise DatasetLayoutError(f"LUPerson image list {list_file}, line {number}: {line!r} is not an "
                                         f"image path (expected one of {', '.join(IMAGE_EXTENSIONS)})",
                                         LUPERSON_LAYOUT)
            paths.append(os.path.join(base, line))
    if not paths:
        raise DatasetLayoutError(f"LUPerson image list {list_file} lists no image", LUPERSON_LAYOUT)
    if check_exists:
        require_files_exist(paths, f"LUPerson image list {list_file}")
    return paths


def find_shards(root: str) -> list[str]:
    """The ``*.tar`` files directly in ``root``, sorted."""
    shards = sorted(glob.glob(os.path.join(glob.escape(os.path.abspath(root)), "*.tar")))
    if not shards:
        raise DatasetLayoutError(f"LUPerson shards: no .tar file in {root}", LUPERSON_LAYOUT)
    return shards


def detect_kind(root: str) -> Literal["folder", "list", "shards"]:
    """``list`` for a file, ``shards`` for a folder holding ``.tar`` files, ``folder`` for any other folder."""
    if os.path.isfile(root):
        return "list"
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"LUPerson data: {root} does not exist", LUPERSON_LAYOUT)
    with os.scandir(root) as entries:
        has_tar = any(e.name.endswith(".tar") and e.is_file() for e in entries)
    return "shards" if has_tar else "folder"


def luperson_images(root: str, kind: SourceKind = "auto", image_root: str | None = None) -> list[str]:
    """Image paths of a folder tree (``kind="folder"``) or list file (``"list"``); ``auto`` picks by ``root``."""
    kind = detect_kind(root) if kind == "auto" else kind
    if kind == "folder":
        return scan_image_folder(root)
    if kind == "list":
        return read_image_list(root, image_root)
    raise DatasetLayoutError(f"LUPerson data at {root} is {kind!r}, not an image folder or list", LUPERSON_LAYOUT)


def parse_annotation(data: bytes | str, attribute_names: Sequence[str] = PA100K_ATTRIBUTES,
                     where: str = "annotation") -> PersonAnnotation:
    """A LUPerson-TA ``.json`` member as a :class:`PersonAnnotation` (see :data:`LUPERSON_TA_LAYOUT`).

    A json that is not valid, or whose ``captions`` / ``attributes`` have another shape, raises a
    DatasetLayoutError naming ``where`` (shard and key) and the offending field.
    """
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetLayoutError(f"{where}: not valid json ({err})", LUPERSON_TA_LAYOUT) from err
    if not isinstance(meta, dict):
        raise DatasetLayoutError(f"{where}: expected a json object, got {type(meta).__name__}", LUPERSON_TA_LAYOUT)
    captions = meta.get("captions") or []
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DatasetLayoutError(f"{where}: 'captions' must be a list of strings, got {captions!r:.200}",
                                 LUPERSON_TA_LAYOUT)
    flags = meta.get("attributes")
    if flags is not None and not isinstance(flags, dict):
        raise DatasetLayoutError(f"{where}: 'attributes' must be an object name -> 0/1 or null, got {flags!r:.200}",
                                 LUPERSON_TA_LAYOUT)
    attributes = None if flags is None else attribute_vector(flags, attribute_names, where)
    return PersonAnnotation(tuple(c for c in captions if c.strip()), attributes)


@dataclass
class AnnotationStats:
    """Counts over LUPerson-TA shards: samples, how many have captions / attributes, positives per attribute.

    ``positive_ratio`` divides by the samples *with* attributes (the ones the attribute loss sees), so
    unlabelled samples do not read as negatives. ``invalid`` lists ``(shard, key, reason)`` of unreadable
    annotations (their samples count as having neither part).
    """

    attribute_names: tuple[str, ...]
    num_samples: int = 0
    with_captions: int = 0
    with_attributes: int = 0
    positives: list[int] = field(default_factory=list)
    invalid: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def positive_ratio(self) -> tuple[float, ...]:
        if self.with_attributes == 0:
            raise DatasetLayoutError(f"LUPerson-TA: none of the {self.num_samples} samples has attributes, so the "
                                     "attribute positive ratios are undefined", LUPERSON_TA_LAYOUT)
        return tuple(p / self.with_attributes for p in self.positives)

    def add(self, other: AnnotationStats) -> None:
        self.num_samples += other.num_samples
        self.with_captions += other.with_captions
        self.with_attributes += other.with_attributes
        self.positives = [a + b for a, b in zip(self.positives, other.positives)]
        self.invalid += other.invalid


def _shard_stats(shard: str, names: tuple[str, ...]) -> AnnotationStats:
    """One shard's counts from its json members only: tarfile seeks past the image bytes, nothing is decoded."""
    stats = AnnotationStats(names, positives=[0] * len(names))
    keys: set[str] = set()
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                base, _, ext = os.path.basename(member.name).partition(".")
                key = os.path.join(os.path.dirname(member.name), base)
                if not member.isfile():
                    continue
                if ext.lower() in ("jpg", "jpeg", "png", "bmp", "webp"):
                    keys.add(key)
                elif ext.lower() == "json":
                    try:
                        ann = parse_annotation(tar.extractfile(member).read(), names, f"{shard}: {key}.json")
                    except DatasetLayoutError as err:
                        stats.invalid.append((shard, key, str(err).splitlines()[0]))
                        continue
                    stats.with_captions += ann.has_captions
                    if ann.attributes is not None:
                        stats.with_attributes += 1
                        stats.positives = [p + a for p, a in zip(stats.positives, ann.attributes)]
    except (OSError, tarfile.TarError) as err:
        raise DatasetLayoutError(f"cannot read shard {shard}: {err}") from err
    stats.num_samples = len(keys)
    return stats


def annotation_stats(shards: Sequence[str], attribute_names: Sequence[str] = PA100K_ATTRIBUTES,
                     cache: bool = True, errors: ErrorCounter | None = None) -> AnnotationStats:
    """Caption / attribute counts and attribute positives over LUPerson-TA ``shards`` (the weighted-BCE ratios).

    Only the json members are read (no image decoding): about the cost of listing the tar headers. With
    ``cache``, per-shard results are kept in ``annotation_stats.json`` next to the shards, keyed by each shard's
    size and modification time, so a later run (or another rank) reads them back and only new or changed shards
    are scanned; a read-only folder just means no cache. A shard that cannot be read raises an error naming it,
    or with ``errors`` follows its policy (under ``skip``: counted, named, and left out of the counts).
    """
    names = tuple(attribute_names)
    folders = {os.path.dirname(os.path.abspath(s)) for s in shards}
    cache = cache and len(folders) == 1
    path = os.path.join(folders.pop(), ANNOTATION_STATS) if cache else ""
    entries: dict = {}
    if cache and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
            if stored.get("version") == _STATS_VERSION and tuple(stored.get("attribute_names", ())) == names:
                entries = stored.get("shards", {})
        except (OSError, ValueError):
            entries = {}
    total = AnnotationStats(names, positives=[0] * len(names))
    changed = False
    for shard in shards:
        st = os.stat(shard)
        name, stamp = os.path.basename(shard), [st.st_size, st.st_mtime_ns]
        entry = entries.get(name)
        if entry is None or entry.get("stamp") != stamp:
            try:
                one = _shard_stats(shard, names)
            except DatasetLayoutError as err:
                if errors is None:
                    raise
                errors.record(f"shard {shard}", str(err).removeprefix(f"cannot read shard {shard}: "))
                continue
            entry = {"stamp": stamp, "num_samples": one.num_samples, "with_captions": one.with_captions,
                     "with_attributes": one.with_attributes, "positives": one.positives,
                     "invalid": [list(i) for i in one.invalid]}
            entries[name], changed = entry, True
        total.add(AnnotationStats(names, entry["num_samples"], entry["with_captions"], entry["with_attributes"],
                                  list(entry["positives"]), [tuple(i) for i in entry["invalid"]]))
    if cache and changed:
        _write_json_atomic(path, {"version": _STATS_VERSION, "attribute_names": list(names), "shards": entries})
    return total


def _write_json_atomic(path: str, content: dict) -> None:
    """Write ``path`` through a temporary file + rename (concurrent ranks never see a partial file); a
    folder that is not writable is left alone."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".annotation_stats-", dir=os.path.dirname(path))
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(content, f)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
