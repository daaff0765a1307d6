"""Progress of long data work (synthetic writing, shard packing, image checks) on stderr.

A tqdm bar on a terminal; elsewhere (logs, CI) only the start and end lines the callers print with
:func:`announce`, so log files do not fill with bar redraws.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def interactive() -> bool:
    """Whether stderr is a terminal (bars are drawn only then)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def announce(line: str) -> None:
    """One status line on stderr, flushed at once (it must appear before the work it announces)."""
    print(line, file=sys.stderr, flush=True)


def progress(items: Iterable[T], total: int | None, desc: str, enabled: bool = True) -> Iterator[T]:
    """``items`` unchanged, with a tqdm bar on a terminal when ``enabled``."""
    if not (enabled and interactive()):
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield from bar
