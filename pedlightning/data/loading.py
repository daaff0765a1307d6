"""The DataLoader every pedlightning datamodule returns: clean worker errors, unreadable files reported per pass."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader

from pedlightning.data.faults import ErrorCounter, worker_message
from pedlightning.errors import PedLightningError

log = logging.getLogger(__name__)


def pin_memory(trainer: L.Trainer | None) -> bool:
    """Pinned host memory only helps copies to a CUDA device: on for a trainer on CUDA, off otherwise (also on
    a CUDA machine training on CPU, where pinning only costs page-locked memory)."""
    return isinstance(getattr(trainer, "accelerator", None), CUDAAccelerator)


class ReportingLoader(DataLoader):
    """A DataLoader that (1) re-raises a pedlightning error of a loader worker with its own message, so the CLI
    prints one line naming the file, not the worker's traceback, and (2) after each pass over the data logs how
    many unreadable samples ``faults`` counted in it (each file is named in a warning when first found).

    Args:
        faults: the counters of the datasets this loader reads.
        name: how the report names the data (e.g. ``market1501 train``).
    """

    def __init__(self, *args: Any, faults: Sequence[ErrorCounter] = (), name: str = "data", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.faults = list(faults)
        self.name = name

    def skipped(self) -> int:
        return sum(f.count for f in self.faults)

    def __iter__(self) -> Iterator[Any]:
        before = self.skipped()
        try:
            yield from super().__iter__()
        except PedLightningError as err:
            message = worker_message(err)
            if message == str(err):
                raise
            raise type(err)(message) from None
        finally:
            now = self.skipped()
            if now > before:
                log.warning("%s: %d unreadable sample(s) newly counted in this pass, %d in total (each named in a "
                            "warning when first found, then skipped)", self.name, now - before, now)
