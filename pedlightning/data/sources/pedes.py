"""Text-to-image person search datasets: CUHK-PEDES, ICFG-PEDES, RSTPReid.

All three are ``imgs/`` plus one JSON list of records ``{"id", "captions", <image path key>, "split"}``;
one parser serves them, a subclass names the JSON files, the path key and the splits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

from pedlightning.data.records import CaptionedImage
from pedlightning.data.sources.base import (
    DatasetLayoutError,
    format_table,
    relabel_pids,
    require_dir,
    require_files_exist,
    resolve_root,
)


@dataclass(frozen=True)
class AnnotationFile:
    """One accepted annotation JSON. Records of a file with ``id_ranges`` carry no ``split``; their identity
    decides it: ``(split, first id, last id)``, inclusive."""

    filename: str
    id_ranges: tuple[tuple[str, int, int], ...] = ()


# The Person-Search protocol (Li et al., CVPR 2017) for the original CUHK-PEDES release, caption_all.json.
PERSON_SEARCH_ID_RANGES = (("train", 1, 11003), ("val", 11004, 12003), ("test", 12004, 13003))


class CaptionSource:
    """Train/val/test lists of CaptionedImage (one record per image, all its captions).

    ``train`` pids are relabelled to 0..N-1; ``val``/``test`` keep the dataset's ids. Every referenced
    image is checked up front and the missing ones are listed (incomplete copies are common).
    """

    name: ClassVar[str]
    subfolders: ClassVar[tuple[str, ...]]
    annotation_files: ClassVar[tuple[AnnotationFile, ...]]  # in order of preference
    path_key: ClassVar[str] = "file_path"
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")

    def __init__(self, root: str):
        layout = self.expected_layout()
        filenames = [a.filename for a in self.annotation_files]
        self.root = resolve_root(root, self.subfolders, filenames, layout)
        image_dir = require_dir(os.path.join(self.root, "imgs"), f"{self.name} images", layout)
        found = [a for a in self.annotation_files if os.path.isfile(os.path.join(self.root, a.filename))]
        if not found:
            raise DatasetLayoutError(
                f"{self.name}: no annotation file in {self.root}; expected one of {filenames}", layout
            )
        self.annotation_path = os.path.join(self.root, found[0].filename)
        splits = self._read(found[0], image_dir)
        paths = (r.path for recs in splits.values() for r in recs)
        require_files_exist(paths, f"{self.name} ({self.annotation_path})")
        self.train = relabel_pids(splits["train"])
        self.val = splits.get("val", [])
        self.test = splits["test"]

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @classmethod
    def expected_layout(cls) -> str:
        variants = ", ".join(f"<root>/{s}/" for s in cls.subfolders)
        lines = [f"<root>/   (or {variants})", f"  imgs/<{cls.path_key}> ..."]
        for a in cls.annotation_files:
            if a.id_ranges:
                ranges = ", ".join(f"{s} {lo}-{hi}" for s, lo, hi in a.id_ranges)
                lines.append(f"  {a.filename}   records without 'split': split by id ({ranges})")
            else:
                keys = f"'id', 'captions', '{cls.path_key}', 'split': {'|'.join(cls.splits)}"
                lines.append(f"  {a.filename}   [{{{keys}}}, ...]")
        return "\n".join(lines)

    def _read(self, annotation: AnnotationFile, image_dir: str) -> dict[str, list[CaptionedImage]]:
        path = self.annotation_path
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetLayoutError(f"cannot parse {path} as JSON: {err}") from err
        if not isinstance(data, list):
            raise DatasetLayoutError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        required = ("id", "captions", self.path_key) + (() if annotation.id_ranges else ("split",))
        splits: dict[str, list[CaptionedImage]] = {s: [] for s in self.splits}
        for index, record in enumerate(data):
            where = f"{path}: record {index}"
            if not isinstance(record, dict):
                raise DatasetLayoutError(f"{where} is not a JSON object")
            missing = [k for k in required if k not in record]
            if missing:
                raise DatasetLayoutError(f"{where} has no key {', '.join(map(repr, missing))}")
            pid, captions, image = record["id"], record["captions"], record[self.path_key]
            if isinstance(pid, bool) or not isinstance(pid, int):
                raise DatasetLayoutError(f"{where}: 'id' must be an integer, got {pid!r}")
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
                raise DatasetLayoutError(
                    f"{where}: 'captions' must be a non-empty list of strings, got {captions!r}"
                )
            if not isinstance(image, str):
                raise DatasetLayoutError(f"{where}: {self.path_key!r} must be a string, got {image!r}")
            split = _split_by_id(pid, annotation.id_ranges, where) if annotation.id_ranges else record["split"]
            if split not in splits:
                raise DatasetLayoutError(f"{where}: split {split!r} is not one of {list(self.splits)}")
            splits[split].append(CaptionedImage(os.path.join(image_dir, image), pid, tuple(captions)))
        for split, records in splits.items():
            if not records:
                raise DatasetLayoutError(f"{path}: no records in split {split!r} (empty split)")
        return splits

    def stats_table(self) -> str:
        rows = [
            (split, len({r.pid for r in recs}), len(recs), sum(len(r.captions) for r in recs))
            for split, recs in (("train", self.train), ("val", self.val), ("test", self.test))
        ]
        title = f"{self.name} ({self.annotation_path})"
        return format_table(("split", "ids", "images", "captions"), rows, title=title)


def _split_by_id(pid: int, id_ranges: tuple[tuple[str, int, int], ...], where: str) -> str:
    for split, lo, hi in id_ranges:
        if lo <= pid <= hi:
            return split
    ranges = ", ".join(f"{s} {lo}-{hi}" for s, lo, hi in id_ranges)
    raise DatasetLayoutError(f"{where}: id {pid} is outside the identity ranges of the protocol ({ranges})")


class CUHKPEDES(CaptionSource):
    """CUHK-PEDES (Li et al., CVPR 2017): 13,003 ids, 40,206 images, 80,440 captions.

    Reads ``reid_raw.json`` (records with ``split``; train 34,054 / val 3,078 / test 3,074 images) or,
    when that is absent, the original release's ``caption_all.json`` (no ``split``), split by the
    Person-Search protocol's identity ranges: train 1-11003, val 11004-12003, test 12004-13003.
    """

    name = "CUHK-PEDES"
    subfolders = ("CUHK-PEDES",)
    annotation_files = (
        AnnotationFile("reid_raw.json"),
        AnnotationFile("caption_all.json", PERSON_SEARCH_ID_RANGES),
    )


class ICFGPEDES(CaptionSource):
    """ICFG-PEDES (Ding et al., 2021): 4,102 ids, 54,522 images with one caption each.

    The release has only train and test splits, so ``val`` is an empty list (select models on a held-out
    part of train, or on test knowingly). Reads ``ICFG-PEDES.json`` or ``ICFG_PEDES.json``.
    """

    name = "ICFG-PEDES"
    subfolders = ("ICFG-PEDES", "ICFG_PEDES")
    annotation_files = (AnnotationFile("ICFG-PEDES.json"), AnnotationFile("ICFG_PEDES.json"))
    splits = ("train", "test")


class RSTPReid(CaptionSource):
    """RSTPReid (Zhu et al., ACM MM 2021): 4,101 ids, 20,505 images, 2 captions each; ``img_path`` key."""

    name = "RSTPReid"
    subfolders = ("RSTPReid",)
    annotation_files = (AnnotationFile("data_captions.json"),)
    path_key = "img_path"
