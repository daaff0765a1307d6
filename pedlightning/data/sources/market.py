"""Market-1501, DukeMTMC-reID and Occluded-Duke: image folders whose file names carry pid and camera.

One parser serves all three; a subclass only names the folder variants, the file-name pattern and the
number of cameras.
"""

from __future__ import annotations

import os
import re
from typing import ClassVar

from pedlightning.data.records import PersonImage
from pedlightning.data.sources.base import (
    IMAGE_EXTENSIONS,
    DatasetLayoutError,
    ReIDSource,
    relabel_pids,
    require_dir,
    resolve_root,
)

SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
JUNK_PID = -1


class ReIDFolderSource(ReIDSource):
    """A reID dataset laid out as ``bounding_box_train/``, ``query/``, ``bounding_box_test/``.

    pid and camera come from the file NAME only (the user's path may contain any digits). Images with
    pid -1 (junk) are dropped from every split at parse time, as torchreid does; pid 0 (Market-1501
    distractors) is kept. Files without an image extension (``Thumbs.db``) are ignored; an image whose
    name does not match the dataset's pattern, or whose camera is out of range, is an error naming it.
    """

    name: ClassVar[str]
    subfolders: ClassVar[tuple[str, ...]]
    pattern: ClassVar[re.Pattern[str]]  # matches the file stem; groups ``pid`` and ``cam`` (1-based)
    example: ClassVar[str]
    num_cams: ClassVar[int]

    def __init__(self, root: str):
        layout = self.expected_layout()
        self.root = resolve_root(root, self.subfolders, list(SPLIT_FOLDERS.values()), layout)
        folders = {
            split: require_dir(os.path.join(self.root, folder), f"{self.name} {split} split", layout)
            for split, folder in SPLIT_FOLDERS.items()
        }
        self.train = relabel_pids(self._parse_folder(folders["train"], layout))
        self.query = self._parse_folder(folders["query"], layout)
        self.gallery = self._parse_folder(folders["gallery"], layout)

    @classmethod
    def expected_layout(cls) -> str:
        variants = ", ".join(f"<root>/{s}/" for s in cls.subfolders)
        return (
            f"<root>/   (or {variants})\n"
            f"  bounding_box_train/   {cls.example} ...\n"
            f"  query/                {cls.example} ...\n"
            f"  bounding_box_test/    {cls.example} ...\n"
            f"file names: <pid>_c<camera 1..{cls.num_cams}>..., pid -1 = junk (dropped), 0 = distractor"
        )

    def _parse_folder(self, folder: str, layout: str) -> list[PersonImage]:
        records = []
        names = sorted(e.name for e in os.scandir(folder) if e.is_file())
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(folder, name)
            match = self.pattern.fullmatch(stem)
            if match is None:
                raise DatasetLayoutError(
                    f"{self.name}: unexpected image name {path}; expected names like {self.example}"
                )
            pid, cam = int(match["pid"]), int(match["cam"])
            if not 1 <= cam <= self.num_cams:
                raise DatasetLayoutError(f"{self.name}: camera c{cam} out of range 1..{self.num_cams} in {path}")
            if pid != JUNK_PID:
                records.append(PersonImage(path, pid, cam - 1))
        if not records:
            raise DatasetLayoutError(
                f"{self.name}: split folder {folder} contains no images (junk pid -1 not counted)", layout
            )
        return records


class Market1501(ReIDFolderSource):
    """Market-1501 (Zheng et al., ICCV 2015): 6 cameras, names like ``0002_c1s1_000451_03.jpg``.

    Standard protocol (torchreid counts): train 751 ids / 12,936 images, query 3,368, gallery 15,913 once
    junk is dropped (the distractors, pid 0, stay in the gallery).
    """

    name = "Market-1501"
    subfolders = ("Market-1501-v15.09.15", "Market1501")
    pattern = re.compile(r"(?P<pid>-1|\d+)_c(?P<cam>\d+)s\d+_\d+_\d+")
    example = "0002_c1s1_000451_03.jpg"
    num_cams = 6


class DukeMTMC(ReIDFolderSource):
    """DukeMTMC-reID (Zheng et al., ICCV 2017): 8 cameras, names like ``0001_c2_f0046182.jpg``.

    Standard protocol: train 702 ids / 16,522 images, query 2,228, gallery 17,661.
    """

    name = "DukeMTMC-reID"
    subfolders = ("DukeMTMC-reID",)
    pattern = re.compile(r"(?P<pid>-1|\d+)_c(?P<cam>\d+)_f\d+")
    example = "0001_c2_f0046182.jpg"
    num_cams = 8


class OccludedDuke(DukeMTMC):
    """Occluded-Duke (Miao et al., ICCV 2019): DukeMTMC-reID images re-split so that queries are occluded.

    Standard protocol: train 702 ids / 15,618 images, query 2,210, gallery 17,661.
    """

    name = "Occluded-Duke"
    subfolders = ("Occluded_Duke",)
