"""``pedlightning extract``: features of a trained checkpoint for a folder or list of images, and for captions.

    pedlightning extract --ckpt runs/market1501_vitb/checkpoints/last.ckpt --images my_crops/ --out feats.pt
    pedlightning extract --ckpt runs/cuhk_pedes_clip/checkpoints/last.ckpt --images gallery.txt \\
        --captions queries.txt --out search.pt

The output file (``torch.load(..., weights_only=True)``) holds ``path`` (the images, in order) and ``features``
(reID, text search, pre-training checkpoints) or ``probs`` and ``attribute_names`` (attribute checkpoints); with
``--captions`` (text search), ``captions`` and ``text_features``; and ``preprocessing`` (input size, mean, std).
The checkpoint's own preprocessing and evaluation options are used (see :mod:`pedlightning.inference`), so the
numbers are those ``pedlightning predict`` writes for the same images.
"""

from __future__ import annotations

import argparse
import os

import torch

from pedlightning.errors import ConfigError
from pedlightning.inference import FeatureExtractor, list_images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pedlightning extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint of a pedlightning task")
    parser.add_argument("--images", help="a folder of images (searched recursively) or a text file with one image "
                                         "path per line (relative paths: from the list file's folder)")
    parser.add_argument("--captions", help="text file with one caption per line (text-search checkpoints)")
    parser.add_argument("--out", required=True, help="file to write (torch.save of a dict)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1 (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images or captions per forward pass")
    parser.add_argument("--task", default=None,
                        help="task class for checkpoints that do not record it (written by a plain Trainer), e.g. "
                             "pedlightning.tasks.ReIDModule")
    parser.add_argument("--mean", type=float, nargs=3, default=None,
                        help="normalisation mean (RGB); only for checkpoints that do not record theirs")
    parser.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (RGB), as --mean")
    return parser


def read_captions(path: str) -> list[str]:
    """Non-empty lines of a text file."""
    if not os.path.isfile(path):
        raise ConfigError(f"--captions {path}: file not found")
    with open(path, encoding="utf-8") as f:
        captions = [line.strip() for line in f if line.strip()]
    if not captions:
        raise ConfigError(f"--captions {path} holds no caption (one per line expected)")
    return captions


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.images is None and args.captions is None:
        raise ConfigError("extract needs --images, --captions or both")
    if (args.mean is None) != (args.std is None):
        raise ConfigError("pass --mean and --std together")
    extractor = FeatureExtractor.from_checkpoint(args.ckpt, device=args.device, batch_size=args.batch_size,
                                                 task=args.task, mean=args.mean, std=args.std)
    out: dict = {"checkpoint": os.path.abspath(args.ckpt), "preprocessing": extractor.preprocessing.as_dict()}
    lines = []
    if args.images is not None:
        paths = list_images(args.images)
        values = extractor(paths)
        out.update({"path": paths, extractor.kind: values})
        if extractor.kind == "probs":
            out["attribute_names"] = extractor.attribute_names
        lines.append(f"{len(paths)} images -> {extractor.kind} {tuple(values.shape)}")
    if args.captions is not None:
        captions = read_captions(args.captions)
        text = extractor.encode_text(captions)
        out.update({"captions": captions, "text_features": text})
        lines.append(f"{len(captions)} captions -> text_features {tuple(text.shape)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(out, args.out)
    pre = extractor.preprocessing
    print(f"wrote {args.out}: {'; '.join(lines)} (input {pre.img_size[0]}x{pre.img_size[1]}, mean "
          f"{list(pre.mean)}, std {list(pre.std)} from {pre.origin})")
