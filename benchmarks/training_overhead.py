"""Lightning's cost per training step against a minimal hand-written PyTorch loop (a benchmark, not a test).

    python benchmarks/training_overhead.py                      # reID demo ResNet and a small ViT, CPU, 1 thread
    python benchmarks/training_overhead.py --models resnet --steps 100 --rounds 3

Both sides train the same model on the same batches, pre-loaded into memory (so data loading is not measured),
with the same loss (the task's own ``training_step``) and the same optimizer and lr schedule (the task's own
``configure_optimizers``):

- Lightning: ``Trainer.fit`` of the task and datamodule exactly as ``pedlightning fit --config
  configs/demo/reid_market_synthetic.yaml`` builds them (the RichProgressBar, rank-list and feature-writer
  callbacks of the config, the TensorBoard logger, learning-rate monitor, RunCheckpoint, model summary), only
  with ``max_steps``, no validation, a smaller synthetic training set and a warm-up of 0.2 epochs (an "epoch" is
  the pre-loaded batches); the datamodule hands Lightning those batches. Variants switch off one piece each, to
  show what costs.
- hand loop: ``loss = task.training_step(batch, i)``, ``zero_grad``, ``backward``, ``step`` and the scheduler's
  ``step``, nothing else.

The time of a step is the time between the starts of consecutive batches (everything the loop does in between:
forward, backward, optimizer, logging, progress bar, callbacks); the table gives the median over every timed step
after ``--warmup`` steps of each run. Runs take turns (``--rounds`` times every variant), so load changes on a
shared machine hit them alike. Ratios are against the hand loop of the same model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from unittest import mock

import lightning as L
import torch
import yaml

from pedlightning.lightning_cli import PedLightningCLI, RunConfigSaver

DEMO = "configs/demo/reid_market_synthetic.yaml"
# Assumption: a "small ViT" is ViT-Tiny's width (192, 3 heads) at 4 blocks, 8x8 patches of a 64x32 image
# (32 tokens): a step of a few hundred ms on one CPU thread, long enough for the overhead ratio to mean something.
MODELS = {
    "resnet": [],  # the demo config's own model
    "vit": ["--model.init_args.encoder.name=vit_tiny_patch16_224",
            "--model.init_args.encoder.model_kwargs={depth: 4, patch_size: 8}"],
}


def _callbacks_without(class_name: str) -> str:
    """The demo config's callbacks minus one class, as a command-line value."""
    with open(DEMO) as f:
        callbacks = yaml.safe_load(f)["trainer"]["callbacks"]
    return "--trainer.callbacks=" + yaml.safe_dump([c for c in callbacks if not c["class_path"].endswith(class_name)],
                                                   default_flow_style=True).strip()


#: Lightning variants: the command-line changes against ``pedlightning fit`` as configured, and the callback
#: classes taken out of the built trainer (RunCheckpoint is always added by the command: it has no off switch).
VARIANTS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "pedlightning fit": ([], ()),
    "no progress bar": ([_callbacks_without("RichProgressBar"), "--trainer.enable_progress_bar=false"], ()),
    "TQDM progress bar": ([_callbacks_without("RichProgressBar")], ()),
    "no logger": (["--trainer.logger=false"], ()),
    "log_every_n_steps=50": (["--trainer.log_every_n_steps=50"], ()),
    "no checkpoint callback": ([], ("RunCheckpoint",)),
}


class StepClock(L.Callback):
    """``time.perf_counter()`` at the start of every training batch and at the end of training."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.stamps.append(time.perf_counter())


def build(model: str, extra: list[str], root: str, steps: int) -> PedLightningCLI:
    """The CLI objects of ``pedlightning fit`` on the demo config (instantiated, not run)."""
    args = ["--config", DEMO, f"--trainer.default_root_dir={root}/run", f"--trainer.max_steps={steps}",
            "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            f"--data.init_args.root={root}/market1501", "--data.init_args.num_workers=0",
            "--data.init_args.synthetic={num_train_ids: 64, num_test_ids: 8, images_per_id: 8}",
            "--model.init_args.warmup_epochs=0.2", *MODELS[model], *extra]
    with mock.patch.object(sys, "argv", ["pedlightning"]):
        return PedLightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                               subclass_mode_data=True, save_config_callback=RunConfigSaver,
                               save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                               args=args, run=False)


def preload(cli: PedLightningCLI, n: int) -> list:
    """``n`` training batches of the datamodule, read once (epochs repeat when one is shorter)."""
    data = cli.datamodule
    data.prepare_data()
    data.setup("fit")
    batches: list = []
    while len(batches) < n:
        batches.extend(data.train_dataloader())
    return batches[:n]


class Preloaded:
    """The pre-loaded batches as one loader (Lightning reads a plain list as a list of loaders)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def lightning_run(cli: PedLightningCLI, batches: list, drop: tuple[str, ...] = ()) -> list[float]:
    clock = StepClock()
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if type(c).__name__ not in drop] + [clock]
    cli.datamodule.train_dataloader = lambda: Preloaded(batches)  # instead of the datamodule's loader
    cli.trainer.fit(cli.model, cli.datamodule)
    return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]


def hand_run(cli: PedLightningCLI, batches: list) -> list[float]:
    """The minimal loop, continuing the task Lightning trained, with a fresh optimizer and schedule of its own."""
    task = cli.model
    configured = task.configure_optimizers()  # needs the trainer: total steps and steps per epoch
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    task.trainer = None
    task.train()
    stamps = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step's logging, without a trainer
        for i, batch in enumerate(batches):
            stamps.append(time.perf_counter())
            loss = task.training_step(batch, i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps per run not timed")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every variant, taking turns")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.warmup + args.steps
    print(f"Per-step time, {args.steps} steps after {args.warmup} of warm-up, {args.rounds} rounds, CPU "
          f"({args.threads} thread(s)), batch as in {DEMO}")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for model in args.models:
            batches = preload(build(model, [], root, n), n)
            times: dict[str, list[float]] = {"hand loop": [], **{v: [] for v in args.variants}}
            for _ in range(args.rounds):
                for variant in args.variants:
                    extra, drop = VARIANTS[variant]
                    cli = build(model, extra, root, n)
                    times[variant] += lightning_run(cli, batches, drop)[args.warmup:]
                    if variant == args.variants[0]:
                        times["hand loop"] += hand_run(cli, batches)[args.warmup:]
            base = statistics.median(times["hand loop"])
            for name, values in times.items():
                median = statistics.median(values)
                rows.append((model, name, median * 1e3, median / base, (median - base) * 1e3, len(values)))
    print(f"{'model':8} | {'run':22} | {'ms/step':>8} | {'vs hand':>7} | {'extra ms':>8} | steps")
    for model, name, ms, ratio, extra, count in rows:
        print(f"{model:8} | {name:22} | {ms:8.2f} | {ratio:7.3f} | {extra:8.2f} | {count}")


if __name__ == "__main__":
    main()
