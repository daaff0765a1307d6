"""``pedlightning make-shards``: pack a LUPerson image folder or list file into WebDataset shards.

    pedlightning make-shards data/LUPerson/images data/LUPerson/shards --shard-size 10000 --num-workers 8
    pedlightning make-shards data/LUPerson/list.txt data/LUPerson/shards --image-root data/LUPerson/images

Images keep their original bytes; every image is decoded once to check it (``--no-verify`` skips that),
unreadable ones are reported and skipped (``--on-error fail`` stops at the first). ``shards.json`` records the
number of samples per shard, which the data module uses to plan equal batch counts per process.
"""

from __future__ import annotations

import argparse
import os
import time

from pedlightning.data.progress import announce
from pedlightning.data.shards import write_shards
from pedlightning.data.sources.luperson import luperson_images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pedlightning make-shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="an image folder tree, or a list file with one image path per line")
    parser.add_argument("output", help="folder to write shard-000000.tar ... into (must be empty or new)")
    parser.add_argument("--image-root", default=None, help="folder the paths of a list file are relative to")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per shard (default: 10000)")
    parser.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                        help="unreadable images: report and skip them (default), or stop")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="do not decode images to check them")
    parser.add_argument("--num-workers", type=int, default=0, help="processes that read and check images")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    paths = luperson_images(args.source, image_root=args.image_root)
    root = args.image_root or (args.source if os.path.isdir(args.source) else None)
    announce(f"packing {len(paths)} images from {args.source} into shards of {args.shard_size} in {args.output}"
             + (" (decoding each to check it)" if args.verify else ""))
    start = time.monotonic()
    summary = write_shards(paths, args.output, args.shard_size, root=root, on_error=args.on_error,
                           verify=args.verify, num_workers=args.num_workers)
    print(f"wrote {summary.total} images into {len(summary.shards)} shards in {args.output}"
          f" ({len(summary.skipped)} unreadable skipped) in {time.monotonic() - start:.1f} s")
    for path, error in summary.skipped[:20]:
        print(f"  skipped {path}: {error}")
