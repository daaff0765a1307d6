"""Synthetic unlabeled pre-training data: a LUPerson-style JPG tree and WebDataset shards (LUPerson-TA).

Images come from short "videos": each video is one scene (camera) and shows a sequence of people, each
in a short tracklet of 1..``max_repeats`` frames, so identities repeat only a little, as in LUPerson.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile

from pedlightning.data.progress import progress
from pedlightning.data.synthetic._io import (
    Shot,
    atomic_root,
    check_size,
    jpeg_bytes,
    render_shot,
    write_shots,
)
from pedlightning.data.synthetic.captions import describe
from pedlightning.data.synthetic.identity import derive_seed, make_identity
from pedlightning.errors import ConfigError

__all__ = ["write_luperson_folder", "write_luperson_shards"]

_WORLD_PID = 3_000_000  # LUPerson people are nobody else's identities
_VIDEO_CAMERA = 1000  # video v is filmed by camera style 1000 + v


def _luperson_shots(seed: int, num_images: int, num_videos: int, max_repeats: int, occluded: float) -> list[Shot]:
    """Shots named ``<video>/<video>_<frame>_<n>.jpg``; keys (path stem) contain no dots."""
    if num_images < 1 or num_videos < 1 or max_repeats < 1:
        raise ConfigError(
            f"need num_images, num_videos, max_repeats >= 1, got {num_images}, {num_videos}, {max_repeats}"
        )
    rng = random.Random(derive_seed(seed, 0x1E))
    shots, person = [], 0
    for v in range(num_videos):
        video = f"v{v:05d}"
        camera = _VIDEO_CAMERA + v
        quota = num_images // num_videos + (v < num_images % num_videos)
        frame = rng.randint(0, 500)
        while quota > 0:
            ident = make_identity(_WORLD_PID + person, seed)
            person += 1
            for _ in range(min(quota, rng.randint(1, max_repeats))):
                frame += rng.randint(1, 60)
                box = rng.randint(0, 3)
                shots.append(Shot(f"{video}/{video}_{frame:06d}_{box:02d}.jpg", ident, camera,
                                  derive_seed(seed, v, frame, box), rng.random() < occluded))
                quota -= 1
    return shots


def write_luperson_folder(
    root: str,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
    num_images: int = 512,
    num_videos: int = 8,
    max_repeats: int = 3,
    occluded: float = 0.1,
) -> str:
    """LUPerson as a JPG tree: ``v00000/v00000_000123_01.jpg`` ... (one sub-folder per video)."""
    size = check_size(size)
    shots = _luperson_shots(seed, num_images, num_videos, max_repeats, occluded)
    with atomic_root(root) as tmp:
        write_shots(tmp, shots, size)
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def write_luperson_shards(
    root: str,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 64),
    num_images: int = 512,
    shard_size: int = 128,
    with_text: bool = False,
    captions_per_image: int = 2,
    num_videos: int = 8,
    max_repeats: int = 3,
    occluded: float = 0.1,
    missing_captions: float = 0.0,
    missing_attributes: float = 0.0,
) -> str:
    """LUPerson as WebDataset shards: ``shard-000000.tar`` ... of ``shard_size`` samples (and the ``shards.json``
    manifest ``pedlightning make-shards`` writes): ``<key>.jpg`` and, with
    ``with_text`` (LUPerson-TA), ``<key>.json`` = ``{"captions": [...], "attributes": {26 PA-100K
    names: 0|1}}`` (the format of :data:`pedlightning.data.sources.luperson.LUPERSON_TA_LAYOUT`). Keys are
    ``<video>_<frame>_<n>`` (no dots). Tar headers have fixed mtime/owner, so the bytes depend on the arguments only.

    The captions name the colours of the garments, shoes, hair and bags, which none of the 26 attribute flags
    encodes, so the image-text and the attribute objectives learn different things. ``missing_captions`` /
    ``missing_attributes``: the fraction of samples (seeded per sample) written with ``"captions": []`` /
    ``"attributes": null``, as a partly annotated LUPerson-TA would have.
    """
    size = check_size(size)
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    if not (0 <= missing_captions <= 1 and 0 <= missing_attributes <= 1):
        raise ConfigError(f"missing_captions and missing_attributes are fractions in [0, 1], got "
                          f"{missing_captions}, {missing_attributes}")
    shots = sorted(_luperson_shots(seed, num_images, num_videos, max_repeats, occluded), key=lambda s: s.path)
    from pedlightning.data.shards import write_manifest

    with atomic_root(root) as tmp:
        paths: list[str] = []
        tar = None
        try:
            for number, shot in enumerate(progress(shots, len(shots), "synthetic")):
                if number % shard_size == 0:
                    if tar is not None:
                        tar.close()
                    paths.append(os.path.join(tmp, f"shard-{number // shard_size:06d}.tar"))
                    tar = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
                key = os.path.basename(shot.path)[: -len(".jpg")]
                img, attributes = render_shot(shot, size)
                _add(tar, f"{key}.jpg", jpeg_bytes(img))
                if with_text:
                    captions = describe(shot.identity, attributes, shot.seed, captions_per_image)
                    gaps = random.Random(derive_seed(shot.seed, 0x6A))
                    meta = {"captions": [] if gaps.random() < missing_captions else captions,
                            "attributes": None if gaps.random() < missing_attributes else attributes}
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
        finally:
            if tar is not None:
                tar.close()
        write_manifest(tmp, paths, [min(shard_size, len(shots) - i * shard_size) for i in range(len(paths))])
    return root
