"""LUPerson (Fu et al., CVPR 2021): unlabeled person images as a folder tree, an image list, or tar shards.

LUPerson is released as JPG files grouped in sub-folders (one per video); any tree of images works.
For millions of images, a list file (one path per line) avoids walking the tree, and WebDataset shards
(``pedlightning make-shards``) avoid millions of small files altogether. Pure Python, no torch.
"""

from __future__ import annotations

import glob
import os
from typing import Literal

from pedlightning.data.sources.base import IMAGE_EXTENSIONS, DatasetLayoutError, require_files_exist

SourceKind = Literal["auto", "folder", "list", "shards"]

LUPERSON_LAYOUT = """\
either a folder tree of images:   <root>/<any sub-folders>/<name>.jpg (.jpeg, .png, .bmp)
or a list file:                   <root> = images.txt, one image path per line (relative to the list's
                                  folder or to image_root); blank lines and lines starting with '#' skipped
or WebDataset shards:             <root>/shard-000000.tar, shard-000001.tar, ... (pedlightning make-shards)"""


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
