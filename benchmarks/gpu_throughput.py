"""Training throughput and model FLOPs utilisation on one GPU, MSMT17-size evaluation time, and whether the
loader keeps up (a benchmark, not a test).

    python benchmarks/gpu_throughput.py                          # one H200, bf16-mixed; a few minutes
    python benchmarks/gpu_throughput.py --peak-tflops 989 --compile
    python benchmarks/gpu_throughput.py --smoke                  # CPU, tiny models: checks the script end to end

Rows:

- ``reid``: ViT-B/16 at 256x128 reID fine-tuning, the model, optimizer and batch size of
  ``configs/reid/market1501_vitb.yaml`` (751 classes), random PxK batches (K=4) through ``ReIDModule.training_step``.
- ``personmae r=...``: PersonMAE pre-training (``configs/personmae/pretrain_luperson.yaml``) at mask ratios 0, 0.5
  and 0.75: masks drawn, student + decoders forward / backward, AdamW, the teacher's EMA update.
- ``valpat``: VAL-PAT pre-training (``configs/valpat/pretrain_luperson_ta_r50.yaml``: ResNet-50 + CLIP ViT-B-16
  text tower, MoCo queue, shuffled BN), every term on (all samples captioned and annotated), key-encoder EMA.
- ``eval msmt17``: ``pedlightning.metrics.reid_evaluate`` of 11,659 queries x 82,161 gallery x 768 random features
  (MSMT17's test split sizes) on the device.
- ``loader``: the reID step fed by ``ReIDDataModule`` on a synthetic Market-1501 (JPEG files decoded by ``--workers``
  loader processes; the decoded uint8 images resized and augmented on the device, ``finish_on_device``): time
  blocked waiting for the next batch (and its transfer) and time finishing it on the device, against the step time.

Training rows run under ``torch.autocast(bfloat16)`` with fp32 weights (Lightning's ``bf16-mixed``). FLOPs are
counted by ``torch.utils.flop_counter.FlopCounterMode`` on one whole step (forward and backward; a multiply-add
counts 2), not by a formula; MFU = counted FLOPs x steps/s / ``--peak-tflops`` (dense bf16; H200: 790 TFLOP/s
without sparsity). Throughput is ``--steps`` steps after ``--warmup`` untimed ones, synchronised at both ends.
Goals printed at the end: reID fine-tuning >= 45% MFU; PersonMAE images/s rising with the mask ratio.
``--smoke`` runs every row on the CPU with tiny models and sizes, for the test suite.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"reid": "configs/reid/market1501_vitb.yaml", "personmae": "configs/personmae/pretrain_luperson.yaml",
           "valpat": "configs/valpat/pretrain_luperson_ta_r50.yaml"}
MSMT17 = (11659, 82161, 768, 3060, 15)  # queries, gallery, feature dim, test identities, cameras
# --smoke: what replaces the paper-size pieces (every other setting stays the config's).
SMOKE_VIT = {"name": "vit_tiny_test", "img_size": [128, 64], "model_kwargs": {"patch_size": 8}, "stride_size": None}
SMOKE = {
    "reid": {"encoder": SMOKE_VIT},
    "personmae": {"encoder": SMOKE_VIT, "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4},
    "valpat": {"encoder": {"name": "resnet_tiny_test", "img_size": [128, 64]},
               "text_encoder": {"name": "clip_tiny_test", "context_length": 16}, "queue_size": 64, "bn_group_size": 2},
}
SMOKE_EVAL = (64, 512, 32, 40, 6)
ROWS = ("reid", "personmae", "valpat", "eval", "loader")


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) and key != "model_kwargs" else value
    return out


def from_config(kind: str, smoke: bool, **extra: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """The task, its optimizer and the per-device batch size of a config (``extra`` = arguments the data gives)."""
    with open(os.path.join(REPO, CONFIGS[kind])) as f:
        config = yaml.safe_load(f)
    init = dict(config["model"]["init_args"])
    optimizer = init.pop("optimizer")
    if smoke:
        init = _merge(init, SMOKE[kind])
    torch.manual_seed(0)
    task = _import(config["model"]["class_path"])(**{**init, **extra})
    opt = _import(optimizer["class_path"])(task.build_param_groups(), **optimizer.get("init_args", {}))
    return task, opt, config["data"]["init_args"]["batch_size"]


class Workload:
    """One training step of a task on a fixed batch, its FLOPs and its throughput."""

    def __init__(self, name: str, task: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Any],
                 loss: Callable[[dict[str, Any], int], torch.Tensor], after: Callable[[int], None] | None,
                 device: torch.device, compile_model: bool):
        self.name, self.task, self.opt, self.batch, self.loss, self.after = name, task, opt, batch, loss, after
        self.device, self.steps_done = device, 0
        self.images = len(next(v for v in batch.values() if torch.is_tensor(v)))
        self.task.to(device).train()
        if compile_model:
            self.loss = torch.compile(loss)
        self.flops = 0
        self.seconds_per_step = float("nan")

    def step(self, batch: dict[str, Any] | None = None) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.loss(self.batch if batch is None else batch, self.steps_done)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.after is not None:
            self.after(self.steps_done)
        self.steps_done += 1

    def measure(self, warmup: int, steps: int) -> None:
        for _ in range(warmup):
            self.step()
        with FlopCounterMode(display=False) as counter:
            self.step()
        self.flops = counter.get_total_flops()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        self.seconds_per_step = (time.perf_counter() - start) / steps

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds_per_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quiet_step(method: Callable) -> Callable:
    """A task's ``training_step`` outside a Trainer: its ``self.log`` calls only warn, silenced here."""
    def call(batch: dict[str, Any], i: int) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")
            return method(batch, i)
    return call


def reid_batch(n: int, size: tuple[int, int], num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pids = torch.randperm(num_classes, generator=g)[: n // 4].repeat_interleave(4)  # P x K = n/4 x 4
    return {"image": torch.randn(n, 3, *size, generator=g).to(device), "pid": pids.to(device)}


def reid_workload(args: argparse.Namespace, device: torch.device) -> Workload:
    task, opt, batch_size = from_config("reid", args.smoke, num_classes=751)
    size = tuple(task.hparams.encoder["img_size"])
    batch = reid_batch(args.reid_batch or batch_size, size, 751, device)
    return Workload("reid", task, opt, batch, _quiet_step(task.training_step), None, device, args.compile)


def personmae_workload(args: argparse.Namespace, ratio: float, device: torch.device) -> Workload:
    task, opt, batch_size = from_config("personmae", args.smoke, mask_ratio=ratio)
    n, size = args.personmae_batch or batch_size, tuple(task.hparams.encoder["img_size"])
    g = torch.Generator().manual_seed(0)
    batch = {"region_a": torch.randn(n, 3, *size, generator=g), "region_b": torch.randn(n, 3, *size, generator=g),
             "box_a": torch.tensor([[0.0, 0.0, 0.9, 0.9]]).repeat(n, 1),
             "box_b": torch.tensor([[0.1, 0.1, 1.0, 1.0]]).repeat(n, 1)}
    batch = {k: v.to(device) for k, v in batch.items()}
    total = args.warmup + args.steps + 1

    def loss(b: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        losses = task.compute_losses(b, task.draw_masks(n, i).to(device))
        return losses["pixel"] + losses["feature"]

    def after(i: int) -> None:
        task.teacher.update(task.encoder, i + 1, total)

    return Workload(f"personmae r={ratio:g}", task, opt, batch, loss, after, device, args.compile)


def valpat_workload(args: argparse.Namespace, device: torch.device) -> Workload:
    num_attributes = 26  # LUPerson-TA's attribute count
    task, opt, batch_size = from_config("valpat", args.smoke, num_attributes=num_attributes,
                                        positive_ratio=[0.3] * num_attributes)
    n, size = args.valpat_batch or batch_size, tuple(task.hparams.encoder["img_size"])
    context = task.hparams.text_encoder["context_length"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 49000, (n, context), generator=g)
    tokens[:, 0], tokens[:, context // 2], tokens[:, context // 2 + 1:] = 49406, 49407, 0  # start, end (pooled), pad
    batch = {"view_q": torch.randn(n, 3, *size, generator=g), "view_k": torch.randn(n, 3, *size, generator=g),
             "tokens": tokens, "has_caption": torch.ones(n, dtype=torch.bool),
             "attributes": torch.randint(0, 2, (n, num_attributes), generator=g),
             "has_attributes": torch.ones(n, dtype=torch.bool)}
    batch = {k: v.to(device) for k, v in batch.items()}
    total = args.warmup + args.steps + 1

    def loss(b: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        return sum(task.weights[k] * v for k, v in task.compute_losses(b, i).items())

    def after(i: int) -> None:
        task.key_encoder.update(task.student(), i + 1, total)

    return Workload("valpat", task, opt, batch, loss, after, device, args.compile)


def eval_seconds(sizes: tuple[int, int, int, int, int], device: torch.device) -> float:
    """One ``reid_evaluate`` of random features of the given sizes (after a small warm-up call)."""
    from pedlightning.metrics import reid_evaluate

    nq, ng, dim, ids, cams = sizes
    g = torch.Generator().manual_seed(0)

    def data(q: int, gal: int) -> tuple:
        """Query and gallery features, identities and cameras."""
        values = (torch.randn(q, dim, generator=g), torch.randn(gal, dim, generator=g),
                  torch.randint(0, ids, (q,), generator=g), torch.randint(0, ids, (gal,), generator=g),
                  torch.randint(0, cams, (q,), generator=g), torch.randint(0, cams, (gal,), generator=g))
        return tuple(v.to(device) for v in values)

    reid_evaluate(*data(min(nq, 64), min(ng, 512)))
    inputs = data(nq, ng)
    sync(device)
    start = time.perf_counter()
    reid_evaluate(*inputs)
    sync(device)
    return time.perf_counter() - start


def loader_check(args: argparse.Namespace, workload: Workload, root: str) -> tuple[float, float, float]:
    """Median ms blocked on the next batch (and its transfer), of finishing it on the device (resize, normalise,
    erase: ``on_after_batch_transfer``) and of the step, reID step fed by ReIDDataModule."""
    from pedlightning.data.datamodules import ReIDDataModule
    from pedlightning.data.synthetic import write_market1501

    size = tuple(workload.task.hparams.encoder["img_size"])
    ids = 16 if args.smoke else 400
    write_market1501(os.path.join(root, "market1501"), num_train_ids=ids, num_test_ids=8, seed=0)
    # finish_on_device: decoded images resized and finished after the transfer, as a GPU trainer gets them by default.
    data = ReIDDataModule("market1501", os.path.join(root, "market1501"), img_size=size,
                          batch_size=workload.images, num_instances=4, num_workers=args.workers,
                          finish_on_device=True)
    data.prepare_data()
    data.setup("fit")
    waits, finishes, steps = [], [], []
    batches = iter(data.train_dataloader())
    for i in range(args.warmup + args.loader_steps):
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            batches = iter(data.train_dataloader())
            batch = next(batches)
        batch = {k: v.to(workload.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        sync(workload.device)
        got = time.perf_counter()
        batch = data.on_after_batch_transfer(batch, 0)
        sync(workload.device)
        finished = time.perf_counter()
        workload.step(batch)
        sync(workload.device)
        if i >= args.warmup:
            waits.append(got - start)
            finishes.append(finished - got)
            steps.append(time.perf_counter() - finished)
    return tuple(statistics.median(times) * 1e3 for times in (waits, finishes, steps))


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure every row, print the table, return its rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models and sizes (seconds)")
    parser.add_argument("--device", default=None, help="default: cuda when available, cpu for --smoke")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="the device's dense (no sparsity) bf16 peak in TFLOP/s that MFU is against. Default: "
                             "790, the figure this project uses for its H200; NVIDIA's H200 SXM sheet states 1,979 "
                             "with 2:4 sparsity, i.e. 989 dense: pass 989 to compare against that")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    parser.add_argument("--reid-batch", type=int, default=None, help="default: the config's (64)")
    parser.add_argument("--personmae-batch", type=int, default=None, help="default: the config's (256)")
    parser.add_argument("--valpat-batch", type=int, default=None, help="default: the config's (64)")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default min(8, CPUs); smoke 0)")
    parser.add_argument("--loader-steps", type=int, default=None, help="timed loader steps (default 30; smoke 2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each step's loss function")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows to measure")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.steps = args.steps or (2 if smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.loader_steps = args.loader_steps or (2 if smoke else 30)
    if args.workers is None:
        args.workers = 0 if smoke else min(8, os.cpu_count() or 1)
    if smoke:
        args.reid_batch, args.personmae_batch, args.valpat_batch = (args.reid_batch or 8, args.personmae_batch or 4,
                                                                    args.valpat_batch or 4)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not smoke else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = args.peak_tflops * 1e12
    rows: list[dict[str, Any]] = []

    def train_row(workload: Workload) -> None:
        workload.measure(args.warmup, args.steps)
        per_s = workload.flops / workload.seconds_per_step
        rows.append({"row": workload.name, "batch": workload.images, "images/s": workload.images_per_s,
                     "GFLOP/img": workload.flops / workload.images / 1e9, "TFLOP/s": per_s / 1e12,
                     "MFU %": 100 * per_s / peak, "ms/step": workload.seconds_per_step * 1e3})
        print(f"  {workload.name}: done", file=sys.stderr, flush=True)

    reid = reid_workload(args, device) if {"reid", "loader"} & set(args.rows) else None
    if "reid" in args.rows:
        train_row(reid)
    for ratio in args.ratios if "personmae" in args.rows else ():
        train_row(personmae_workload(args, ratio, device))  # one model on the device at a time
    if "valpat" in args.rows:
        train_row(valpat_workload(args, device))
    if "eval" in args.rows:
        sizes = SMOKE_EVAL if smoke else MSMT17
        seconds = eval_seconds(sizes, device)
        rows.append({"row": f"eval {'smoke' if smoke else 'msmt17'} {sizes[0]}x{sizes[1]}x{sizes[2]}",
                     "seconds": seconds, "queries/s": sizes[0] / seconds})
    if "loader" in args.rows:
        with tempfile.TemporaryDirectory() as root:
            wait_ms, finish_ms, step_ms = loader_check(args, reid, root)
        rows.append({"row": f"loader ({args.workers} workers)", "wait ms": wait_ms, "finish ms": finish_ms,
                     "step ms": step_ms, "wait share %": 100 * wait_ms / (wait_ms + finish_ms + step_ms),
                     "finish share %": 100 * finish_ms / (wait_ms + finish_ms + step_ms)})
    print_table(rows, device, args)
    return rows


def print_table(rows: list[dict[str, Any]], device: torch.device, args: argparse.Namespace) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, bf16 autocast, peak {args.peak_tflops:g} TFLOP/s, {args.steps} timed steps after {args.warmup}"
          f"{', torch.compile' if args.compile else ''}{' (smoke: tiny models)' if args.smoke else ''}")
    for row in rows:
        cells = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "row"]
        print(f"{row['row']:28} | " + " | ".join(cells))
    reid = next((r for r in rows if r["row"] == "reid"), None)
    if reid is not None:
        print(f"goal reID fine-tune MFU >= 45%: {'met' if reid['MFU %'] >= 45 else 'not met'} "
              f"({reid['MFU %']:.1f}%)")
    mae = [r["images/s"] for r in rows if r["row"].startswith("personmae")]
    if len(mae) > 1:
        rising = all(b > a for a, b in zip(mae, mae[1:]))
        print(f"goal PersonMAE images/s rising with the mask ratio: {'met' if rising else 'not met'} "
              f"({' < '.join(f'{v:.4g}' for v in mae)} over ratios {args.ratios})")


if __name__ == "__main__":
    run()
