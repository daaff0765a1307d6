"""Images/s of each training loader per loader process, against the decode ceiling of the same files.

    python benchmarks/data_throughput.py                     # 1-3 min on 2 shared cores
    python benchmarks/data_throughput.py --workers 1 --json runs/data_throughput.json

Synthetic data in the real layouts is written to a temporary folder: Market-1501 (reID, P x K batches), PA-100K
(attributes), CUHK-PEDES (text search, one sample per caption) and LUPerson shards (PersonMAE region pairs), plus,
for comparison, the reID loader with torchvision's per-image PIL pipeline that the datamodules used before. Each
training loader is the one its datamodule returns, with ``num_workers=0``: the loop then does exactly the work one
loader worker does (read, decode, augment, collate), without handing batches between processes, on one thread
(loader workers run torch on one thread). Its ceilings are the same files (the bytes read from disk, or from
memory for shards) decoded and resized to the network input once per view the loader makes (two for PersonMAE),
nothing else: with PIL, with torchvision (``decode_image`` + its uint8 bicubic resize, what the loaders use), and
the latter plus the copy into a fresh float32 batch that any loader must hand over. Loader and ceilings take turns
for ``--repeats`` rounds, so load from other processes hits all alike; the table shows median images/s, the median
of the per-round ratios, and the loader processes needed to feed a GPU that consumes ``--gpu-rate`` images/s
(ViT-B/16 at 256x128 in bf16 on an H200 trains at about 2000 images/s).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from pedlightning.data.datamodules import AttributeDataModule, LUPersonDataModule, ReIDDataModule, TextReIDDataModule
from pedlightning.data.datasets import RecordDataset
from pedlightning.data.sources.luperson import find_shards
from pedlightning.data.synthetic import write_cuhk_pedes, write_luperson_shards, write_market1501, write_pa100k
from pedlightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pedlightning.data.transforms.batched import decode_rgb, pil_to_tensor, resize


class Pipeline:
    """One training loader and its decode ceiling over the same files."""

    def __init__(self, name: str, loader: Iterator | object, images: list[bytes] | list[str], size: tuple[int, int],
                 views: int):
        self.name, self.loader, self.images, self.size, self.views = name, loader, images, size, views
        self.stream: Iterator | None = None

    def next_batch(self) -> dict:
        """Batches forever: the loader restarts when a pass ends."""
        while True:
            if self.stream is None:
                self.stream = iter(self.loader)
            try:
                return next(self.stream)
            except StopIteration:
                self.stream = None

    def loader_rate(self, num_images: int) -> float:
        start, seen = time.perf_counter(), 0
        while seen < num_images:
            batch = self.next_batch()
            seen += len(next(v for k, v in batch.items() if isinstance(v, torch.Tensor)))
        return seen / (time.perf_counter() - start)

    def ceiling_rate(self, num_images: int, decoder: str = "torchvision", batch_size: int = 0) -> float:
        """Decode + bicubic resize per view, with PIL or with torchvision (``decode_image`` + its uint8 resize, what
        the training transforms use); with ``batch_size``, also write each view into a fresh float32 batch tensor
        (the memory a loader hands over: new pages, faulted in on first write, for every batch)."""
        height, width = self.size
        start = time.perf_counter()
        batches: list[torch.Tensor] = []
        for i in range(num_images):
            if batch_size and i % batch_size == 0:
                batches = [torch.empty(batch_size, 3, height, width) for _ in range(self.views)]
            item = self.images[i % len(self.images)]
            if isinstance(item, str):
                with open(item, "rb") as f:
                    item = f.read()
            if decoder == "pil":
                with Image.open(io.BytesIO(item)) as img:
                    img = img.convert("RGB")
                views = [img.resize((width, height), Image.BICUBIC) for _ in range(self.views)]
            else:
                pixels = decode_rgb(item)
                views = [resize(pixels, self.size) for _ in range(self.views)]
            if batch_size:
                for batch, view in zip(batches, views):
                    batch[i % batch_size].copy_(view if isinstance(view, torch.Tensor) else pil_to_tensor(view))
        return num_images / (time.perf_counter() - start)


def shard_images(root: str) -> list[bytes]:
    images = []
    for shard in find_shards(root):
        with tarfile.open(shard) as tar:
            images += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    return images


def build(tmp: str, n: int, batch_size: int, workers: int) -> list[Pipeline]:
    """The four training loaders over about ``n`` synthetic training images each."""
    reid_root = write_market1501(os.path.join(tmp, "market"), num_train_ids=n // 8, images_per_id=8, num_test_ids=4,
                                 queries_per_id=1, gallery_per_id=2, num_junk=0, num_distractors=0)
    pa_root = write_pa100k(os.path.join(tmp, "pa100k"), num_train=n, num_val=8, num_test=8)
    text_root = write_cuhk_pedes(os.path.join(tmp, "cuhk"), num_train_ids=n // 6, images_per_id=3, num_val_ids=2,
                                 num_test_ids=2)
    lup_root = write_luperson_shards(os.path.join(tmp, "lup"), num_images=n, shard_size=128)
    common = {"batch_size": batch_size, "num_workers": workers}
    modules: list[tuple[str, object, int]] = [
        ("reID P x K (Market-1501)", ReIDDataModule(root=reid_root, **common), 1),
        ("attributes (PA-100K)", AttributeDataModule(root=pa_root, **common), 1),
        ("text search (CUHK-PEDES)", TextReIDDataModule("cuhk_pedes", text_root, **common), 1),
        ("PersonMAE pairs (LUPerson shards)", LUPersonDataModule(root=lup_root, shuffle_buffer=256, **common), 2),
    ]
    pipelines = [per_image_baseline(reid_root, batch_size, workers)]
    for name, data, views in modules:
        data.setup("fit")
        loader = data.train_dataloader()
        if isinstance(data, LUPersonDataModule):
            images = shard_images(lup_root)
        else:
            dataset = loader.dataset
            records = dataset.images.records if hasattr(dataset, "images") else dataset.records
            images = [r.path for r in records]
        pipelines.append(Pipeline(name, loader, images, tuple(data.img_size), views))
    return pipelines


CEILINGS = {"pil": ("pil", 0), "tv": ("torchvision", 0), "tv_batch": ("torchvision", 1)}


def per_image_baseline(root: str, batch_size: int, workers: int) -> Pipeline:
    """The reID loader as it was before the batched transforms: torchvision's per-image PIL pipeline (resize, flip,
    pad + crop, ToTensor, Normalize, RandomErasing) and ``default_collate``, on the same P x K batches."""
    data = ReIDDataModule(root=root, batch_size=batch_size, num_workers=workers)
    data.setup("fit")
    h, w = data.img_size
    compose = T.Compose([T.Resize((h, w), interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(0.5),
                         T.Pad(10), T.RandomCrop((h, w)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                         T.RandomErasing(p=0.5, value="random")])
    reference = data.train_dataloader()
    loader = DataLoader(RecordDataset(data.records("train"), compose), batch_sampler=reference.batch_sampler,
                        num_workers=workers, persistent_workers=workers > 0)
    return Pipeline("reID P x K, per-image PIL (before)", loader, [r.path for r in data.records("train")],
                    (h, w), 1)


def measure(pipelines: list[Pipeline], num_images: int, repeats: int, batch_size: int) -> list[dict]:
    for p in pipelines:  # warm-up: page cache, tokenizer, loader workers, first-use allocations
        p.loader_rate(num_images // 4)
        p.ceiling_rate(num_images // 4)
    runs = {p.name: {k: [] for k in ("loader", *CEILINGS)} for p in pipelines}
    for _ in range(repeats):
        for p in pipelines:
            runs[p.name]["loader"].append(p.loader_rate(num_images))
            for key, (decoder, batched) in CEILINGS.items():
                runs[p.name][key].append(p.ceiling_rate(num_images, decoder, batch_size * batched))
    out = []
    for p in pipelines:
        r = runs[p.name]
        row = {"pipeline": p.name, "img_size": list(p.size), "views": p.views,
               **{f"{k}_img_s": statistics.median(v) for k, v in r.items()}, "runs": r}
        for key in CEILINGS:
            row[f"ratio_{key}"] = statistics.median(a / b for a, b in zip(r["loader"], r[key]))
        out.append(row)
    return out


def table(rows: list[dict], gpu_rate: float) -> str:
    header = (f"{'training loader':<34} {'input':>9} {'loader':>7} {'PIL':>6} {'ratio':>6} {'tv':>6} {'ratio':>6} "
              f"{'tv+batch':>8} {'ratio':>6} {f'workers for {gpu_rate:g}/s':>18}")
    lines = [header, "-" * len(header)]
    for r in rows:
        size = "x".join(map(str, r["img_size"])) + (f"x{r['views']}" if r["views"] > 1 else "")
        lines.append(f"{r['pipeline']:<34} {size:>9} {r['loader_img_s']:>7.0f} {r['pil_img_s']:>6.0f} "
                     f"{r['ratio_pil']:>6.2f} {r['tv_img_s']:>6.0f} {r['ratio_tv']:>6.2f} {r['tv_batch_img_s']:>8.0f} "
                     f"{r['ratio_tv_batch']:>6.2f} {math.ceil(gpu_rate / r['loader_img_s']):>18d}")
    lines.append("images/s per process, medians. Ceilings over the same files: PIL = PIL decode + bicubic resize per "
                 "view; tv = torchvision decode_image + its uint8 bicubic resize (what the loaders use); tv+batch = "
                 "tv plus copying each view into a fresh float32 batch tensor. ratio = loader / ceiling (median of "
                 "the rounds).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/data_throughput.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1536, help="synthetic training images per dataset")
    parser.add_argument("--per-run", type=int, default=1024, help="images per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (loaders and ceilings take turns)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0,
                        help="loader worker processes (0: the loop does a worker's work itself; 1: one worker, "
                             "plus the cost of handing batches over)")
    parser.add_argument("--gpu-rate", type=float, default=2000.0, help="images/s the GPU consumes")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="data-throughput-") as tmp:
        start = time.perf_counter()
        pipelines = build(tmp, args.images, args.batch_size, args.workers)
        print(f"wrote and parsed the synthetic data in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        rows = measure(pipelines, args.per_run, args.repeats, args.batch_size)
    print(table(rows, args.gpu_rate))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
