"""Plain records that dataset parsers produce and torch datasets consume (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PersonImage:
    """One reID image: absolute path, person id and camera id.

    Train pids are relabelled to 0..N-1 by the parsers; query/gallery pids keep the dataset's ids
    (Market-1501: -1 = junk, 0 = distractor).
    """

    path: str
    pid: int
    camid: int


@dataclass(frozen=True)
class AttributeImage:
    """One attribute-recognition image with its binary labels in the dataset's attribute order."""

    path: str
    labels: tuple[int, ...]


@dataclass(frozen=True)
class CaptionedImage:
    """One text-to-image search image: its identity and the captions that describe it."""

    path: str
    pid: int
    captions: tuple[str, ...]
