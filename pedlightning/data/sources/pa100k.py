"""PA-100K (Liu et al., ICCV 2017): 26 binary pedestrian attributes, images in ``data/``, labels in a .mat."""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import scipy.io

from pedlightning.data.records import AttributeImage
from pedlightning.data.sources.base import (
    DatasetLayoutError,
    format_table,
    require_dir,
    require_file,
    require_files_exist,
    resolve_root,
)
from pedlightning.errors import ConfigError

SPLITS = ("train", "val", "test")
EXPECTED_LAYOUT = """<root>/   (or <root>/PA-100K/, <root>/PA100k/)
  data/000001.jpg ...
  annotation.mat   keys: attributes (26x1 cell of names),
                         {train,val,test}_images_name (Nx1 cell of '000001.jpg'),
                         {train,val,test}_label (Nx26, 0/1)"""


class PA100K:
    """PA-100K splits as AttributeImage records, labels in the .mat file's attribute order.

    Args:
        root: the dataset folder, or a folder holding ``PA-100K/`` or ``PA100k/``.
        train_split: ``"train"`` (80,000 images; default) keeps ``val`` clean for model selection;
            ``"trainval"`` (90,000 images) is the strong-baseline protocol of Jia et al. ("Rethinking of
            pedestrian attribute recognition", 2021), which reports ``test``. The switch changes numbers.

    ``positive_ratio`` is each attribute's fraction of positives over ``train`` (the chosen training
    split), the statistic weighted BCE uses. ``val`` is always the val split, also under ``"trainval"``.
    """

    name = "PA-100K"

    def __init__(self, root: str, train_split: Literal["train", "trainval"] = "train"):
        if train_split not in ("train", "trainval"):
            raise ConfigError(f"PA100K train_split must be 'train' or 'trainval', got {train_split!r}")
        self.train_split = train_split
        self.root = resolve_root(root, ("PA-100K", "PA100k"), ("annotation.mat",), EXPECTED_LAYOUT)
        mat_path = require_file(os.path.join(self.root, "annotation.mat"), "PA-100K annotations", EXPECTED_LAYOUT)
        image_dir = require_dir(os.path.join(self.root, "data"), "PA-100K images", EXPECTED_LAYOUT)
        try:
            mat = scipy.io.loadmat(mat_path)
        except (ValueError, TypeError, NotImplementedError, OSError) as err:
            raise DatasetLayoutError(f"cannot read {mat_path} as a MATLAB v5 .mat file: {err}") from err

        self.attribute_names = tuple(_cell_strings(mat, "attributes", mat_path))
        splits = {split: self._read_split(mat, mat_path, split, image_dir) for split in SPLITS}
        require_files_exist((r.path for recs in splits.values() for r in recs), f"PA-100K ({mat_path})")
        self.train = splits["train"] + (splits["val"] if train_split == "trainval" else [])
        self.val = splits["val"]
        self.test = splits["test"]
        counts = np.asarray([r.labels for r in self.train], dtype=np.int64).sum(axis=0)
        self.positive_ratio = tuple(float(c) / len(self.train) for c in counts)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    def _read_split(self, mat: dict, mat_path: str, split: str, image_dir: str) -> list[AttributeImage]:
        names = _cell_strings(mat, f"{split}_images_name", mat_path)
        if not names:
            raise DatasetLayoutError(f"{mat_path}: {split}_images_name is empty (empty split)")
        labels = np.asarray(_get(mat, f"{split}_label", mat_path))
        key = f"{split}_label"
        if labels.ndim != 2 or labels.shape[1] != self.num_attributes:
            raise DatasetLayoutError(
                f"{mat_path}: {key} has shape {labels.shape}, expected (N, {self.num_attributes}) "
                f"for the {self.num_attributes} names in 'attributes'"
            )
        if labels.shape[0] != len(names):
            raise DatasetLayoutError(
                f"{mat_path}: {key} has {labels.shape[0]} rows but {split}_images_name has {len(names)} names"
            )
        if not np.isin(labels, (0, 1)).all():
            raise DatasetLayoutError(f"{mat_path}: {key} holds values other than 0 and 1")
        rows = labels.astype(np.int64).tolist()
        return [AttributeImage(os.path.join(image_dir, n), tuple(r)) for n, r in zip(names, rows)]

    def stats_table(self) -> str:
        rows = [
            (split, len(recs), f"{np.mean([sum(r.labels) for r in recs]):.2f}")
            for split, recs in (("train", self.train), ("val", self.val), ("test", self.test))
        ]
        title = f"{self.name} ({self.root}), {self.num_attributes} attributes, train_split={self.train_split}"
        return format_table(("split", "images", "positives/image"), rows, title=title)


def _get(mat: dict, key: str, mat_path: str):
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetLayoutError(f"{mat_path}: key {key!r} not found (found: {found})", EXPECTED_LAYOUT)
    return mat[key]


def _cell_strings(mat: dict, key: str, mat_path: str) -> list[str]:
    """The strings of a MATLAB cell array as loadmat returns it: ``mat[key][i][0][0]``."""
    out = []
    for i, item in enumerate(np.asarray(_get(mat, key, mat_path), dtype=object).ravel()):
        value = np.asarray(item).ravel()
        if value.size != 1 or not isinstance(value[0], str):
            raise DatasetLayoutError(f"{mat_path}: {key}[{i}] is not a string cell (got {item!r})")
        out.append(str(value[0]))
    return out
