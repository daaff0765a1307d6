"""What every on-disk parser shares: layout checks, root resolution, pid relabelling, stats tables."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TypeVar

from pedlightning.data.records import CaptionedImage, PersonImage
from pedlightning.errors import DatasetLayoutError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetLayoutError",
    "ReIDSource",
    "format_table",
    "relabel_pids",
    "require_dir",
    "require_file",
    "require_files_exist",
    "resolve_root",
]


def require_dir(path: str, what: str, expected_layout: str | None = None) -> str:
    """Return ``path`` if it is a directory, else raise a DatasetLayoutError naming it."""
    if not os.path.isdir(path):
        raise DatasetLayoutError(f"{what}: directory not found: {path}", expected_layout)
    return path


def require_file(path: str, what: str, expected_layout: str | None = None) -> str:
    """Return ``path`` if it is a file, else raise a DatasetLayoutError naming it."""
    if not os.path.isfile(path):
        raise DatasetLayoutError(f"{what}: file not found: {path}", expected_layout)
    return path


def require_files_exist(paths: Iterable[str], what: str, max_listed: int = 20) -> None:
    """Check that every listed file exists; the error lists (up to ``max_listed``) the missing ones."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        listed = "\n  ".join(missing[:max_listed])
        more = f"\n  ... and {len(missing) - max_listed} more" if len(missing) > max_listed else ""
        raise DatasetLayoutError(f"{what}: {len(missing)} referenced image(s) are missing:\n  {listed}{more}")


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """A fixed-width text table, for the per-split statistics parsers print."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    out = ([title] if title else []) + [line, fmt(cells[0]), line] + [fmt(r) for r in cells[1:]] + [line]
    return "\n".join(out)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def resolve_root(root: str, subfolders: Sequence[str], markers: Sequence[str], expected_layout: str) -> str:
    """The dataset directory: ``root`` itself or one of its known ``subfolders``, as an absolute path.

    Users point at the folder they extracted into as often as at the dataset folder, so both are accepted.
    The first candidate that contains one of ``markers`` wins; with none, the first existing sub-folder
    (else ``root``) is returned, so the caller's missing-path error names a path inside the folder the
    user most likely meant.
    """
    root = require_dir(os.path.abspath(os.path.expanduser(root)), "dataset root", expected_layout)
    candidates = [root] + [os.path.join(root, s) for s in subfolders]
    for candidate in candidates:
        if any(os.path.exists(os.path.join(candidate, m)) for m in markers):
            return candidate
    return next((c for c in candidates[1:] if os.path.isdir(c)), root)


R = TypeVar("R", PersonImage, CaptionedImage)


def relabel_pids(records: Sequence[R]) -> list[R]:
    """Map training pids to 0..N-1 in sorted order of the original pid (classifier targets)."""
    mapping = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [replace(r, pid=mapping[r.pid]) for r in records]


class ReIDSource:
    """Train/query/gallery splits of a person reID dataset; subclasses fill them in ``__init__``.

    ``train`` pids are relabelled to 0..N-1; ``query``/``gallery`` keep the dataset's pids; camids are 0-based.
    """

    name: str
    root: str
    train: list[PersonImage]
    query: list[PersonImage]
    gallery: list[PersonImage]

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

    def stats_table(self) -> str:
        rows = [
            (split, len({r.pid for r in recs}), len(recs), len({r.camid for r in recs}))
            for split, recs in (("train", self.train), ("query", self.query), ("gallery", self.gallery))
        ]
        return format_table(("split", "ids", "images", "cameras"), rows, title=f"{self.name} ({self.root})")
