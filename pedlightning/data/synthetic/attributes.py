"""Synthetic PA-100K: ``data/000001.jpg ...`` and ``annotation.mat`` with the original keys and cell nesting."""

from __future__ import annotations

import io
import os
import random

import numpy as np

from pedlightning.data.sources.attributes import PA100K_ATTRIBUTES
from pedlightning.data.synthetic._io import Shot, atomic_root, check_size, write_shots
from pedlightning.data.synthetic.identity import derive_seed, make_identity
from pedlightning.errors import ConfigError

__all__ = ["write_pa100k"]

_MAT_HEADER = b"MATLAB 5.0 MAT-file, written by pedlightning.data.synthetic"


def _cell_column(strings: list[str]) -> np.ndarray:
    """An (N, 1) object array of strings: savemat writes it as a MATLAB cell array of char arrays."""
    cells = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cells[i, 0] = s
    return cells


def _savemat_deterministic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``scipy.io.savemat`` with the header's creation time replaced, so the bytes depend on content only."""
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, arrays, format="5", do_compression=False, oned_as="column")
    data = bytearray(buf.getvalue())
    data[:116] = _MAT_HEADER.ljust(116, b" ")  # the 116-byte descriptive text; version/endian bytes follow
    with open(path, "wb") as f:
        f.write(data)


def write_pa100k(
    root: str,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
    num_train: int = 512,
    num_val: int = 64,
    num_test: int = 64,
    num_cameras: int = 16,
    occluded: float = 0.05,
) -> str:
    """PA-100K: ``data/000001.jpg ...`` (consecutive 6-digit names: train, then val, then test) and
    ``annotation.mat`` holding ``attributes`` (26x1 cell of names), ``{train,val,test}_images_name``
    (Nx1 cells of file names) and ``{train,val,test}_label`` (Nx26 uint8, 0/1), so ``loadmat`` gives
    ``mat['attributes'][i][0][0] == 'Female'`` and ``mat['train_images_name'][i][0][0] == '000001.jpg'``.

    Image ``i`` (1-based) shows identity ``make_identity(i, seed)`` (one person per image, as PA-100K
    is not an identity set) on one of ``num_cameras`` scenes; its labels are that identity's attributes
    plus the image's view.
    """
    size = check_size(size)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    if min(counts.values()) < 1 or sum(counts.values()) > 999999:
        raise ConfigError(f"PA-100K split sizes must be >= 1 and total at most 999999 (6-digit names), got {counts}")
    rng = random.Random(derive_seed(seed, 0xA7))
    shots, names, index = [], {}, 1
    for split, n in counts.items():
        names[split] = [f"{i:06d}.jpg" for i in range(index, index + n)]
        for i in range(index, index + n):
            cam = rng.randint(1, num_cameras)
            occ = rng.random() < occluded
            shots.append(Shot(f"data/{i:06d}.jpg", make_identity(i, seed), cam, derive_seed(seed, i), occ))
        index += n
    with atomic_root(root) as tmp:
        attributes = write_shots(tmp, shots, size)
        arrays = {"attributes": _cell_column(list(PA100K_ATTRIBUTES))}
        for split, files in names.items():
            arrays[f"{split}_images_name"] = _cell_column(files)
            labels = [[attributes[f"data/{f}"][a] for a in PA100K_ATTRIBUTES] for f in files]
            arrays[f"{split}_label"] = np.asarray(labels, dtype=np.uint8)
        _savemat_deterministic(os.path.join(tmp, "annotation.mat"), arrays)
    return root
