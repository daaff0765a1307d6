"""MSMT17 (Wei et al., CVPR 2018): image folders plus list files that give each image's path and pid."""

from __future__ import annotations

import os
from typing import Literal

from pedlightning.data.records import PersonImage
from pedlightning.data.sources.base import (
    DatasetLayoutError,
    ReIDSource,
    relabel_pids,
    require_dir,
    require_file,
    require_files_exist,
    resolve_root,
)
from pedlightning.errors import ConfigError

IMAGE_FOLDERS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
NUM_CAMS = 15
EXAMPLE_LINE = "0000/0000_000_01_0303morning_0015_0.jpg 0"


class MSMT17(ReIDSource):
    """MSMT17 V1 or V2 (V2 has the same images with faces masked; the two give different numbers).

    List files hold lines ``<path relative to the train or test folder> <pid>``; the camera (01..15) is
    the third ``_`` field of the file name. Every listed image must exist.

    Args:
        root: the dataset folder, or a folder holding ``MSMT17_<version>/`` or ``MSMT17/``.
        version: ``"V1"`` (folders ``train/``, ``test/``) or ``"V2"`` (``mask_train_v2/``, ``mask_test_v2/``).
        train_with_val: train on ``list_train.txt`` + ``list_val.txt`` (32,621 images, 1,041 ids), the
            TransReID recipe that PersonMAE follows; False trains on ``list_train.txt`` only (30,248
            images), the torchreid default. This protocol switch changes reported numbers.
    """

    def __init__(self, root: str, version: Literal["V1", "V2"] = "V1", train_with_val: bool = True):
        if version not in IMAGE_FOLDERS:
            raise ConfigError(f"MSMT17 version must be one of {sorted(IMAGE_FOLDERS)}, got {version!r}")
        self.name = f"MSMT17_{version}"
        self.version = version
        self.train_with_val = train_with_val
        train_folder, test_folder = IMAGE_FOLDERS[version]
        layout = self.expected_layout(version)
        self.root = resolve_root(root, (f"MSMT17_{version}", "MSMT17"), (train_folder,), layout)
        if not os.path.isdir(os.path.join(self.root, train_folder)):
            self._suggest_other_version(root, layout)
        train_dir = require_dir(os.path.join(self.root, train_folder), f"{self.name} train images", layout)
        test_dir = require_dir(os.path.join(self.root, test_folder), f"{self.name} test images", layout)
        list_files = {
            "train": ["list_train.txt", "list_val.txt"] if train_with_val else ["list_train.txt"],
            "query": ["list_query.txt"],
            "gallery": ["list_gallery.txt"],
        }
        list_paths = {
            split: [require_file(os.path.join(self.root, f), f"{self.name} {split} list", layout) for f in files]
            for split, files in list_files.items()
        }
        splits = {
            split: [r for p in paths for r in self._read_list(p, train_dir if split == "train" else test_dir)]
            for split, paths in list_paths.items()
        }
        require_files_exist((r.path for recs in splits.values() for r in recs), f"{self.name} ({self.root})")
        self.train = relabel_pids(splits["train"])
        self.query = splits["query"]
        self.gallery = splits["gallery"]

    @staticmethod
    def expected_layout(version: str) -> str:
        train_folder, test_folder = IMAGE_FOLDERS[version]
        return (
            f"<root>/   (or <root>/MSMT17_{version}/, <root>/MSMT17/)\n"
            f"  {train_folder}/0000/0000_000_01_0303morning_0015_0.jpg ...\n"
            f"  {test_folder}/0000/0000_000_01_0303morning_0008_0.jpg ...\n"
            f"  list_train.txt  list_val.txt      lines '<path under {train_folder}/> <pid>'\n"
            f"  list_query.txt  list_gallery.txt  lines '<path under {test_folder}/> <pid>'"
        )

    def _suggest_other_version(self, root: str, layout: str) -> None:
        """V1 and V2 hold different images: if only the other version is on disk, say which to set."""
        other = "V2" if self.version == "V1" else "V1"
        folder = IMAGE_FOLDERS[other][0]
        found = resolve_root(root, (f"MSMT17_{other}", "MSMT17"), (folder,), layout)
        if os.path.isdir(os.path.join(found, folder)):
            raise DatasetLayoutError(
                f"{self.name}: no {IMAGE_FOLDERS[self.version][0]}/ under {self.root}, but {found} holds "
                f"MSMT17 {other} images ({folder}/): set version={other!r}",
                layout,
            )

    def _read_list(self, list_path: str, image_dir: str) -> list[PersonImage]:
        records = []
        with open(list_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{list_path}, line {lineno}"
                parts = line.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    raise DatasetLayoutError(
                        f"{where}: expected '<image path> <pid>' like {EXAMPLE_LINE!r}, got {line.strip()!r}"
                    )
                fields = os.path.basename(parts[0]).split("_")
                if len(fields) < 3 or not fields[2].isdigit() or not 1 <= int(fields[2]) <= NUM_CAMS:
                    raise DatasetLayoutError(
                        f"{where}: cannot read a camera 01..{NUM_CAMS} from the third '_' field of {parts[0]!r} "
                        f"(expected names like 0000_000_01_0303morning_0015_0.jpg)"
                    )
                records.append(PersonImage(os.path.join(image_dir, parts[0]), int(parts[1]), int(fields[2]) - 1))
        if not records:
            raise DatasetLayoutError(f"{self.name}: list file {list_path} has no entries (empty split)")
        return records
