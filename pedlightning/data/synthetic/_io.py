"""What every writer shares: the images to draw (shots), atomic publication, deterministic image files."""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from pedlightning.data.progress import progress
from pedlightning.data.sources.attributes import PA100K_ATTRIBUTES
from pedlightning.data.synthetic.identity import Identity, derive_seed
from pedlightning.data.synthetic.render import render_background, render_person
from pedlightning.errors import ConfigError

__all__ = [
    "JPEG_QUALITY", "Shot", "atomic_root", "check_size", "jpeg_bytes", "render_shot", "save_image", "write_shots",
]

JPEG_QUALITY = 90


def check_size(size: tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) as ints, each at least 16 pixels."""
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 16:
        raise ConfigError(f"synthetic image size must be (height, width) with both >= 16, got {size!r}")
    return int(size[0]), int(size[1])


def jpeg_bytes(img: Image.Image) -> bytes:
    """JPEG at a fixed quality without metadata: the same image always gives the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def save_image(img: Image.Image, path: str) -> None:
    """Save as JPEG or, for a ``.png`` path, PNG; creates the parent folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".png"):
        img.save(path, format="PNG")
    else:
        with open(path, "wb") as f:
            f.write(jpeg_bytes(img))


@contextlib.contextmanager
def atomic_root(root: str) -> Iterator[str]:
    """Yield a sibling temp folder to write into; on success rename it to ``root`` in one step.

    Refuses an existing non-empty ``root`` (nothing is ever overwritten). If the block fails, the temp
    folder is removed and ``root`` is untouched. If ``root`` was filled by someone else meanwhile (another
    DDP rank writing the same deterministic set), the temp folder is dropped and theirs is kept.
    """
    root = os.path.abspath(root)
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise ConfigError(f"refusing to write synthetic data into {root}: it exists and is not an empty folder")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        os.replace(tmp, root)  # POSIX rename: atomic, and replaces an empty folder but never a non-empty one
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(root) and os.listdir(root):
            return
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class Shot:
    """One image a writer will produce: where it goes and what it shows.

    ``identity`` None draws an empty scene (a false detection); ``partial`` draws a random part of the
    person only (a bad detection, Market-1501's junk).
    """

    path: str
    identity: Identity | None
    camera: int
    seed: int
    occluded: bool = False
    partial: bool = False


def render_shot(shot: Shot, size: tuple[int, int]) -> tuple[Image.Image, dict[str, int]]:
    """The image of ``shot`` and its 26 attributes (all 0 for an empty scene)."""
    if shot.identity is None:
        return render_background(shot.camera, shot.seed, size), dict.fromkeys(PA100K_ATTRIBUTES, 0)
    ident, occluded = shot.identity, shot.occluded
    img, attributes = render_person(ident, camera=shot.camera, seed=shot.seed, size=size, occluded=occluded)
    if shot.partial:
        rng = random.Random(derive_seed(shot.seed, 0x7A))
        h, w = size
        ch, cw = int(h * rng.uniform(0.3, 0.6)), int(w * rng.uniform(0.5, 1.0))
        y0, x0 = rng.randint(0, h - ch), rng.randint(0, w - cw)
        img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    return img, attributes


def write_shots(root: str, shots: Sequence[Shot], size: tuple[int, int]) -> dict[str, dict[str, int]]:
    """Render and save every shot under ``root`` (in path order); return path -> attributes."""
    paths = [s.path for s in shots]
    if len(set(paths)) != len(paths):
        raise AssertionError("synthetic writer produced duplicate file names")
    attributes = {}
    for shot in progress(sorted(shots, key=lambda s: s.path), len(shots), "synthetic"):
        img, attributes[shot.path] = render_shot(shot, size)
        save_image(img, os.path.join(root, shot.path))
    return attributes
