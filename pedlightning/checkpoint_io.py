"""Writing and reading Lightning checkpoint files safely.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target directory and renames it
  over the target only once it is complete and on disk, so a full disk or a kill during a write never leaves a
  half-written ``last.ckpt``: the previous one survives.
* :func:`read_checkpoint` opens a ``--ckpt_path`` file with ``torch.load(weights_only=True, mmap=True)`` (tensors
  stay on disk: no second in-memory copy next to the one Lightning loads) and turns every way a file can be
  unusable (missing, not a checkpoint, truncated, holding pickled Python objects) into one
  :class:`~pedlightning.errors.CheckpointError` that names the file. It never advises unsafe loading.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from pedlightning.errors import CheckpointError

__all__ = ["AtomicCheckpointIO", "read_checkpoint"]

_ZIP_MAGIC = b"PK\x03\x04"
# The first bytes of a pickle of protocol 2+ (torch.save's legacy, non-zip format starts with one).
_PICKLE_MAGIC = b"\x80"


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes are atomic: temp file in the same directory, flush + fsync, rename.

    ``os.replace`` within one directory is atomic on POSIX and Windows, so a reader (or a resumed run) sees either
    the previous checkpoint or the new one, never a partial file. The directory is fsynced after the rename so the
    new name survives a power cut. The checkpoint is streamed to the file (Lightning's own save first serialises it
    to an in-memory buffer: twice the memory). Remote paths (``s3://`` ...) keep Lightning's behaviour. A failed
    write raises :class:`CheckpointError` naming the file and saying the previous checkpoint was kept.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        # A dot name that does not match ``last*.ckpt`` / ``*.ckpt``: never taken for a checkpoint by a resume.
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(err, OSError):
                kept = "the previous file is unchanged" if os.path.exists(path) else "no file was written"
                raise CheckpointError(f"Could not write checkpoint {path}: {err} ({kept})") from err
            raise
        _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(path: str | Path, what: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint dict of a Lightning ``.ckpt`` file, read without running pickled code.

    Tensors are memory-mapped (zip format), so reading the hyper-parameters costs no copy of the weights.
    ``what`` names the option the path came from, for the message. Raises :class:`CheckpointError` for a missing
    file, a file that is not a checkpoint, a truncated one, one that needs unpickling of Python objects (named),
    and a PyTorch file that is not a Lightning checkpoint (a plain state dict: no ``state_dict`` key).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: checkpoint file not found: {path}"
                              + (" (it is a directory)" if path.is_dir() else ""))
    with open(path, "rb") as file:
        head = file.read(4)
    if head == _ZIP_MAGIC and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{what}: {path} is a truncated checkpoint (a zip archive without its central "
                              f"directory, {path.stat().st_size} bytes): the write that produced it was interrupted")
    if head != _ZIP_MAGIC and not head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{what}: {path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                              f"legacy pickle; it starts with bytes {head!r})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=head == _ZIP_MAGIC)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"{what}: {_reason(path, err)}") from None
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{what}: {path} is not a Lightning checkpoint (no 'state_dict' entry; found {found}). "
                              "To start a model from plain weights, set its encoder's `pretrained:` to the file")
    return dict(checkpoint)


def _reason(path: Path, err: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused ``path``, without PyTorch's advice to load it
    unsafely."""
    text = str(err)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return (f"{path} needs unpickling of {unsafe.group(1)}, refused for safety (a checkpoint holds tensors and "
                "plain Python values only; re-save it without that object)")
    if "central directory" in text or "EOF" in text or isinstance(err, EOFError):
        return f"{path} is a truncated or corrupted checkpoint ({text.strip().splitlines()[0]})"
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    first = detail.group(1) if detail else (text.strip().splitlines() or [type(err).__name__])[0]
    return f"{path} cannot be read as a PyTorch checkpoint: {first}"
