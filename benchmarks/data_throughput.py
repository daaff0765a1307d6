"""Images/s of each training loader per loader process, against the decode ceilings of the same files, and the
loader processes that feed one GPU at the GPU goal.

    python benchmarks/data_throughput.py                     # 2-4 min on 2 shared cores
    python benchmarks/data_throughput.py --repeats 3 --gflop-per-image 66.04 --json runs/data_throughput.json

Synthetic data in the real layouts is written to a temporary folder: Market-1501 (reID, P x K batches), PA-100K
(attributes), CUHK-PEDES (text search, one sample per caption) and LUPerson shards (PersonMAE region pairs). Each
training loader is the one its datamodule returns, measured twice: with ``num_workers=0`` (``in-proc``: the loop
does exactly the work of one loader worker, on one thread, without handing batches between processes) and with one
loader worker (``1 worker``: plus the batch in shared memory and its hand-over to the main process). Every loader
runs with the datamodules' default float batches and with ``finish_on_device`` (the workers only
decode: batches of the decoded uint8 images that the datamodule crops, resizes, flips, shifts, normalises and erases
on the GPU after the transfer, with the same pixels; that work is not in their rate).
The row "per-image PIL (before)" is the reID loader as it was before the batched transforms. Workers are forked
once and kept (``persistent_workers``), as in training.

Ceilings over the same files (each image file read from disk; shards read member by member with Python's
``tarfile``, the least a reader of tar files does), one thread:

- ``PIL dec``: PIL decoding only (``Image.open`` + ``convert("RGB")``);
- ``tv dec``: torchvision decoding only (``decode_image``, libjpeg-turbo: what the loaders use);
- ``floor``: tv decoding plus the bicubic resize to the network input, once per view the loader makes (PersonMAE:
  two random crops, drawn as its loader draws them): what a loader that resizes in its workers cannot skip;
- ``f32 floor``: the floor plus what a loader of float batches must add: the resize written as CHW, converted
  and normalised into a fresh float32 batch (new memory for every batch, as a loader hands over).

Loaders and ceilings take turns for ``--repeats`` rounds (per round and loader back to back: in-process, the
ceilings of its files, one worker), so load from other processes hits a loader and its ceilings alike; the table
shows median images/s and the median of the per-round ratios.

Workers per GPU: a ViT-B/16 256x128 reID fine-tune at ``--mfu`` of ``--peak-tflops`` consumes
``mfu * peak / FLOPs per image`` images/s, the FLOPs per image (forward + backward) counted by
``benchmarks/gpu_throughput.py``'s reID step (``FlopCounterMode``, a batch of 4 on the CPU; ``--gflop-per-image``
skips the count). Workers = that rate / the 1-worker rate, rounded up, for every row (other models consume at
other rates). Assumption: loader workers scale linearly (each on its own core, plus one for the training process)
until the CPU cores run out.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from pedlightning.data.datamodules import AttributeDataModule, LUPersonDataModule, ReIDDataModule, TextReIDDataModule
from pedlightning.data.datasets import RecordDataset
from pedlightning.data.sources.luperson import find_shards
from pedlightning.data.synthetic import write_cuhk_pedes, write_luperson_shards, write_market1501, write_pa100k
from pedlightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pedlightning.data.transforms.batched import decode_rgb, resize
from pedlightning.data.transforms.regions import sample_crop

CEILINGS = ("pil_dec", "tv_dec", "floor", "floor_f32")


class Files:
    """The files a loader reads (image files, or shards), decoded by each ceiling; ``crop``:
    ``(scale, ratio)`` of the random crops each view is resized from (PersonMAE's regions), drawn as the loader
    draws them (:func:`~pedlightning.data.transforms.regions.sample_crop`)."""

    def __init__(self, items: list[str], size: tuple[int, int], views: int, batch_size: int,
                 crop: tuple[tuple[float, float], tuple[float, float]] | None = None):
        self.items, self.size, self.views, self.batch_size, self.crop = items, size, views, batch_size, crop
        self.rng = random.Random(0)

    def boxes(self, pixels: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
        if self.crop is None:
            return [None] * self.views
        height, width = pixels.shape[-2:]
        return [sample_crop(height, width, *self.crop, self.rng) for _ in range(self.views)]

    def encoded(self) -> Iterator[bytes]:
        """The encoded images, endlessly, read as the ceilings read them."""
        while True:
            for item in self.items:
                if item.endswith(".tar"):
                    with tarfile.open(item) as tar:
                        for member in tar:
                            if member.name.endswith(".jpg"):
                                yield tar.extractfile(member).read()
                else:
                    with open(item, "rb") as f:
                        yield f.read()

    def rate(self, ceiling: str, num_images: int) -> float:
        scale = torch.tensor(IMAGENET_STD).view(3, 1, 1).reciprocal() / 255
        offset = -torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * scale * 255
        batches: list[torch.Tensor] = []
        start = time.perf_counter()
        for i, data in enumerate(itertools.islice(self.encoded(), num_images)):
            if ceiling == "pil_dec":
                with Image.open(io.BytesIO(data)) as img:
                    img.convert("RGB")
                continue
            pixels = decode_rgb(data)
            if ceiling == "floor":
                for box in self.boxes(pixels):
                    resize(pixels, self.size, box)
            elif ceiling == "floor_f32":
                if i % self.batch_size == 0:  # fresh memory, as every batch a loader hands over
                    batches = [torch.empty(self.batch_size, 3, *self.size) for _ in range(self.views)]
                for batch, box in zip(batches, self.boxes(pixels)):
                    batch[i % self.batch_size].copy_(resize(pixels, self.size, box)).mul_(scale).add_(offset)
        return num_images / (time.perf_counter() - start)


@dataclass
class Pipeline:
    """One training loader (in-process and with one worker) over ``files``."""

    name: str
    loaders: dict[str, Iterable]  # "in-proc", "1 worker"
    files: Files
    streams: dict[str, object] = field(default_factory=dict)

    def next_batch(self, mode: str) -> dict:
        """Batches forever: the loader restarts when a pass ends."""
        while True:
            if mode not in self.streams:
                self.streams[mode] = iter(self.loaders[mode])
            try:
                return next(self.streams[mode])
            except StopIteration:
                del self.streams[mode]

    def rate(self, mode: str, num_images: int) -> float:
        """Images/s over ``num_images``. A worker prepares two batches ahead (``prefetch_factor``): the clock starts at
        the arrival of the batch after those, from when on the worker never idles; after the clock stops, the time
        of three batches passes, so that the worker's prefetching is done before anything else is timed."""
        for _ in range(3 if mode == "1 worker" else 0):
            self.next_batch(mode)
        start, seen, batches = time.perf_counter(), 0, 0
        while seen < num_images:
            batch = self.next_batch(mode)
            seen += len(next(v for k, v in batch.items() if isinstance(v, torch.Tensor)))
            batches += 1
        seconds = time.perf_counter() - start
        if mode == "1 worker":
            time.sleep(3 * seconds / batches)
        return seen / seconds


def per_image_baseline(data: ReIDDataModule, workers: int) -> DataLoader:
    """The reID loader as it was before the batched transforms: torchvision's per-image PIL pipeline (resize, flip,
    pad + crop, ToTensor, Normalize, RandomErasing) and ``default_collate``, on the same P x K batches."""
    h, w = data.img_size
    compose = T.Compose([T.Resize((h, w), interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(0.5),
                         T.Pad(10), T.RandomCrop((h, w)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                         T.RandomErasing(p=0.5, value="random")])
    sampler = data.train_dataloader().batch_sampler
    return DataLoader(RecordDataset(data.records("train"), compose), batch_sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0)


def build(tmp: str, n: int, batch_size: int) -> list[Pipeline]:
    """The training loaders over about ``n`` synthetic training images each."""
    roots = {
        "reid": write_market1501(os.path.join(tmp, "market"), num_train_ids=n // 8, images_per_id=8, num_test_ids=4,
                                 queries_per_id=1, gallery_per_id=2, num_junk=0, num_distractors=0),
        "pa": write_pa100k(os.path.join(tmp, "pa100k"), num_train=n, num_val=8, num_test=8),
        "text": write_cuhk_pedes(os.path.join(tmp, "cuhk"), num_train_ids=n // 6, images_per_id=3, num_val_ids=2,
                                 num_test_ids=2),
        "lup": write_luperson_shards(os.path.join(tmp, "lup"), num_images=n, shard_size=128),
    }
    lup = {"root": roots["lup"], "shuffle_buffer": 256}
    specs = [  # name (its first word names the files), datamodule, arguments, views per image
        ("reID P x K (Market-1501)", ReIDDataModule, {"root": roots["reid"]}, 1),
        ("reID P x K, finish on device", ReIDDataModule, {"root": roots["reid"], "finish_on_device": True}, 1),
        ("attributes (PA-100K)", AttributeDataModule, {"root": roots["pa"]}, 1),
        ("attributes, finish on device", AttributeDataModule, {"root": roots["pa"], "finish_on_device": True}, 1),
        ("text search (CUHK-PEDES)", TextReIDDataModule, {"dataset": "cuhk_pedes", "root": roots["text"]}, 1),
        ("text search, finish on device", TextReIDDataModule,
         {"dataset": "cuhk_pedes", "root": roots["text"], "finish_on_device": True}, 1),
        ("PersonMAE pairs (LUPerson shards)", LUPersonDataModule, lup, 2),
        ("PersonMAE pairs, finish on device", LUPersonDataModule, {**lup, "finish_on_device": True}, 2),
    ]
    files: dict[str, Files] = {}
    pipelines = []
    for name, module, kwargs, views in specs:
        loaders, before = {}, {}
        for mode, workers in (("in-proc", 0), ("1 worker", 1)):
            data = module(batch_size=batch_size, num_workers=workers, **kwargs)
            data.setup("fit")
            loaders[mode] = data.train_dataloader()
            if name.startswith("reID P x K (Market"):
                before[mode] = per_image_baseline(data, workers)
        key = name.split(" ")[0].rstrip(",")
        if key not in files:
            if isinstance(data, LUPersonDataModule):
                items = find_shards(roots["lup"])
            else:
                dataset = loaders["in-proc"].dataset
                items = [r.path for r in (dataset.images.records if hasattr(dataset, "images") else dataset.records)]
            crop = (tuple(data.hparams.region_scale), tuple(data.hparams.region_ratio)) if views > 1 else None
            files[key] = Files(items, tuple(data.img_size), views, batch_size, crop)
        if before:
            pipelines.append(Pipeline("reID P x K, per-image PIL (before)", before, files[key]))
        pipelines.append(Pipeline(name, loaders, files[key]))
    return pipelines


def measure(pipelines: list[Pipeline], num_images: int, repeats: int) -> list[dict]:
    """Per round and pipeline, back to back: the in-process loader, the ceilings of its files, the 1-worker
    loader (so that a change in the load from other processes hits a loader and its ceilings alike)."""
    for p in pipelines:  # warm-up: page cache, tokenizer, loader workers, first-use allocations
        for mode in p.loaders:
            p.rate(mode, num_images // 4)
        for c in CEILINGS:
            p.files.rate(c, num_images // 4)
    runs = {p.name: {k: [] for k in ("in-proc", *CEILINGS, "1 worker")} for p in pipelines}
    for _ in range(repeats):
        for p in pipelines:
            r = runs[p.name]
            r["in-proc"].append(p.rate("in-proc", num_images))
            for c in CEILINGS:
                r[c].append(p.files.rate(c, num_images))
            r["1 worker"].append(p.rate("1 worker", num_images))
    rows = []
    for p in pipelines:
        r = runs[p.name]
        row = {"pipeline": p.name, "img_size": list(p.files.size), "views": p.files.views,
               **{f"{k}_img_s": statistics.median(v) for k, v in r.items()}, "runs": r}
        for c in CEILINGS:
            row[f"ratio_{c}"] = statistics.median(a / b for a, b in zip(r["in-proc"], r[c]))
        row["ratio_worker_floor"] = statistics.median(a / b for a, b in zip(r["1 worker"], r["floor"]))
        row["ratio_worker_tv_dec"] = statistics.median(a / b for a, b in zip(r["1 worker"], r["tv_dec"]))
        rows.append(row)
    return rows


def reid_gflop_per_image() -> float:
    """FLOPs per image of ``benchmarks/gpu_throughput.py``'s ViT-B/16 reID training step (forward + backward),
    counted on the CPU with a batch of 4 (one identity x 4)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch.utils.flop_counter import FlopCounterMode

    import gpu_throughput

    args = argparse.Namespace(smoke=False, reid_batch=4, compile=False)
    workload = gpu_throughput.reid_workload(args, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        workload.step()
    return counter.get_total_flops() / workload.images / 1e9


def table(rows: list[dict], gpu_rate: float, gpu_note: str) -> str:
    header = (f"{'training loader':<35} {'input':>9} {'in-proc':>7} {'1 worker':>8} {'PIL dec':>7} {'tv dec':>6} "
              f"{'floor':>6} {'f32 floor':>9} {'/PIL':>5} {'/tv':>5} {'/floor':>6} {'/f32':>5} {'1w/tv':>5} {'1w/floor':>8} "
              f"{'workers':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        size = "x".join(map(str, r["img_size"])) + (f"x{r['views']}" if r["views"] > 1 else "")
        lines.append(f"{r['pipeline']:<35} {size:>9} {r['in-proc_img_s']:>7.0f} {r['1 worker_img_s']:>8.0f} "
                     f"{r['pil_dec_img_s']:>7.0f} {r['tv_dec_img_s']:>6.0f} {r['floor_img_s']:>6.0f} "
                     f"{r['floor_f32_img_s']:>9.0f} {r['ratio_pil_dec']:>5.2f} {r['ratio_tv_dec']:>5.2f} "
                     f"{r['ratio_floor']:>6.2f} {r['ratio_floor_f32']:>5.2f} {r['ratio_worker_tv_dec']:>5.2f} "
                     f"{r['ratio_worker_floor']:>8.2f} "
                     f"{math.ceil(gpu_rate / r['1 worker_img_s']):>7d}")
    lines += ["images/s per process (one thread), medians over the rounds. Ceilings over the same files: PIL dec / "
              "tv dec = decoding only with PIL / torchvision; floor = tv decoding + the bicubic resize to the input "
              "per view; f32 floor = floor + a normalised float32 batch. /PIL, /tv, /floor, /f32 = in-process "
              "loader / ceiling, 1w/tv, 1w/floor = 1-worker loader / tv dec, floor (medians of the per-round ratios). \"finish on "
              "device\" rows only decode: the GPU resizes and finishes.",
              f"workers = loader processes for {gpu_rate:.0f} images/s ({gpu_note}), at the 1-worker rate; "
              "Assumption: linear scaling, one core per worker plus one for training, until the cores run out."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/data_throughput.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1536, help="synthetic training images per dataset")
    parser.add_argument("--per-run", type=int, default=512, help="images per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (loaders and ceilings take turns)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mfu", type=float, default=0.45, help="the GPU goal: model FLOPs utilisation")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the GPU's dense bf16 peak (H200: 790)")
    parser.add_argument("--gflop-per-image", type=float, default=None,
                        help="FLOPs per training image of the GPU model in GFLOP (default: counted, about 30 s)")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gflop = args.gflop_per_image if args.gflop_per_image is not None else reid_gflop_per_image()
    gpu_rate = args.mfu * args.peak_tflops * 1e3 / gflop
    gpu_note = (f"ViT-B/16 256x128 reID at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s, "
                f"{gflop:.1f} GFLOP/image")
    with tempfile.TemporaryDirectory(prefix="data-throughput-") as tmp:
        start = time.perf_counter()
        pipelines = build(tmp, args.images, args.batch_size)
        print(f"wrote and parsed the synthetic data in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        rows = measure(pipelines, args.per_run, args.repeats)
    print(table(rows, gpu_rate, gpu_note))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "gflop_per_image": gflop, "gpu_images_per_s": gpu_rate, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
