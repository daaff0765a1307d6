"""Unreadable data under an ``on_error`` policy: counted across loader workers, named once, skipped or raised.

Every datamodule reads with the same rules: under ``skip`` an unreadable image (or shard, or annotation) is
named in one warning when it is first found, counted, and left out; under ``fail`` the first one stops the run
with a :class:`~pedlightning.errors.DatasetLayoutError` that names it. Loader workers are separate processes,
so the counts (and, for map-style datasets, which items are known to be bad) live in shared memory.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import re
import time
from collections.abc import Iterator, Sequence
from typing import Literal

from PIL import Image

from pedlightning.data.progress import announce, progress
from pedlightning.errors import ConfigError, DatasetLayoutError

log = logging.getLogger(__name__)

OnError = Literal["skip", "fail"]
_SKIP_HINT = "(set on_error: skip to count and skip unreadable samples)"


class ErrorCounter:
    """A count shared between the main process and loader workers (fork or spawn), plus a policy.

    Each process names a given item in one warning only, however often it is met again (later epochs).
    """

    def __init__(self, policy: OnError = "skip"):
        if policy not in ("skip", "fail"):
            raise ConfigError(f"on_error must be 'skip' or 'fail', got {policy!r}")
        self.policy = policy
        self._value = multiprocessing.get_context().Value("q", 0)
        self._named: set[str] = set()

    @property
    def count(self) -> int:
        return int(self._value.value)

    def reset(self) -> None:
        with self._value.get_lock():
            self._value.value = 0

    def record(self, what: str, err: BaseException | str) -> None:
        """Count and log one unreadable item, or raise under the ``fail`` policy."""
        message = f"{what}: {err}"
        if self.policy == "fail":
            raise DatasetLayoutError(f"{message}\n{_SKIP_HINT}")
        with self._value.get_lock():
            self._value.value += 1
        if what not in self._named:
            self._named.add(what)
            log.warning("skipping unreadable sample, %s", message)


class ImageFaults(ErrorCounter):
    """The unreadable image files of one map-style dataset, by item position, shared by its loader workers.

    :attr:`count` is the number of distinct bad files (a file met again is not counted twice, in any worker);
    :meth:`is_bad` lets a dataset skip a known-bad file without decoding it again.
    """

    def __init__(self, num_items: int, policy: OnError = "skip"):
        super().__init__(policy)
        self._bad = multiprocessing.get_context().RawArray("b", max(int(num_items), 1))
        self.num_items = int(num_items)

    def is_bad(self, index: int) -> bool:
        return bool(self._bad[index])

    def record_file(self, index: int, path: str, err: BaseException | str) -> None:
        """Mark item ``index`` (file ``path``) unreadable: named in a warning the first time; raised under ``fail``."""
        if self.policy == "fail":
            raise DatasetLayoutError(f"cannot read image {path}: {err}\n{_SKIP_HINT}")
        with self._value.get_lock():
            if self._bad[index]:
                return
            self._bad[index] = 1
            self._value.value += 1
        log.warning("skipping unreadable image %s (%s); later reads of it are replaced silently", path, err)

    def bad_indices(self) -> list[int]:
        return [i for i in range(self.num_items) if self._bad[i]]


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes to RGB (``Image.open`` alone would not notice a truncated JPEG)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def check_image_file(path: str) -> str:
    """``""`` when ``path`` decodes as an image, else the reason it does not."""
    try:
        with Image.open(path) as img:
            img.convert("RGB")
        return ""
    except Exception as err:  # noqa: BLE001 - any failure makes the file unusable; the caller reports it
        return f"{type(err).__name__}: {err}"


def find_unreadable(paths: Sequence[str], num_workers: int = 0, what: str = "images",
                    show: bool = True) -> list[tuple[int, str]]:
    """Decode every file of ``paths`` (``num_workers`` processes); return ``(position, reason)`` of the bad ones.

    Prints a start and an end line (and a progress bar on a terminal) when ``show``.
    """
    if show:
        announce(f"checking that the {len(paths)} {what} decode (verify_images: true)")
    start = time.monotonic()
    pool = multiprocessing.get_context().Pool(num_workers) if num_workers > 0 and len(paths) > 1 else None
    try:
        results: Iterator[str] = (pool.imap(check_image_file, paths, chunksize=64) if pool
                                  else map(check_image_file, paths))
        bad = [(i, reason) for i, reason in enumerate(progress(results, len(paths), "verify", show)) if reason]
    finally:
        if pool is not None:
            pool.terminate()
    if show:
        announce(f"checked {len(paths)} {what} in {time.monotonic() - start:.1f} s: {len(bad)} unreadable")
    return bad


_WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def worker_message(err: BaseException) -> str:
    """The original message of an error a DataLoader worker raised (PyTorch re-raises it with the worker's
    whole traceback as its text); any other error's message unchanged."""
    text = str(err)
    match = _WORKER_ERROR.match(text)
    if match is None:
        return text
    marker = f"{type(err).__module__}.{type(err).__qualname__}: "
    position = text.rfind(marker)
    return text[position + len(marker):].rstrip() if position >= 0 else text
