"""Progress of long work (synthetic writing, shard packing, image checks, re-ranking) on stderr.

A tqdm bar on a terminal; elsewhere (logs, CI) only the start and end lines the callers print with
:func:`announce`, so log files do not fill with bar redraws. Under a live display that captures stderr (rich's,
as Lightning's ``RichProgressBar`` draws it) no bar is drawn either: each redraw would become a line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def interactive() -> bool:
    """Whether stderr is a terminal of its own (bars are drawn only then)."""
    proxy = sys.modules.get("rich.file_proxy")
    if proxy is not None and isinstance(sys.stderr, proxy.FileProxy):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def is_rank_zero() -> bool:
    """Whether this process is the first of its job: rank 0 of an initialised ``torch.distributed`` group, else
    of the launcher's ``RANK`` variable (0 without one). Work every rank repeats reports only there."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def announce(line: str) -> None:
    """One status line on stderr, flushed at once (it must appear before the work it announces)."""
    print(line, file=sys.stderr, flush=True)


class Bar:
    """A tqdm bar on a terminal when ``enabled`` (``update(n)`` per chunk of work, ``close()``); nothing otherwise."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "img"):
        self._bar = None
        if enabled and interactive():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress(items: Iterable[T], total: int | None, desc: str, enabled: bool = True) -> Iterator[T]:
    """``items`` unchanged, with a tqdm bar on a terminal when ``enabled``."""
    if not (enabled and interactive()):
        yield from items
        return
    bar = Bar(total, desc)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
