"""Does PersonMAE pre-training help reID? A small end-to-end check on synthetic data (a benchmark, not a test).

    python benchmarks/personmae_transfer.py                       # about 15 minutes on 2 CPU cores
    python benchmarks/personmae_transfer.py --pretrain-epochs 20 --finetune-seeds 0 1 2 3 4

1. Synthetic LUPerson shards (identities disjoint from the reID set) pre-train a small ViT with PersonMAE:
   the paper's setting (block masking, RegionA != RegionB, pixel + feature targets) and three ablations
   (random masking, same region, pixel-only), each with the same number of steps.
2. Each encoder, and a randomly initialised one, is fine-tuned on synthetic Occluded-Duke (every query occluded)
   with the same recipe and budget, then tested: mAP and rank-1 (mean +- std over the fine-tuning seeds).
All runs use the package's own modules (PersonMAEModule, LUPersonDataModule, ReIDModule, ReIDDataModule).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch

from pedlightning.data.datamodules.luperson import LUPersonDataModule
from pedlightning.data.datamodules.reid import ReIDDataModule
from pedlightning.data.synthetic import write_luperson_shards, write_occluded_duke
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.tasks.personmae import PersonMAEModule
from pedlightning.tasks.reid import ReIDModule

VARIANTS = {  # name -> (PersonMAEModule arguments, LUPersonDataModule arguments)
    "PersonMAE (block, RegionA != RegionB, pixel + feature)": ({}, {}),
    "  ablation: random masking": ({"mask_type": "random"}, {}),
    "  ablation: same region (RegionB = RegionA)": ({}, {"same_region": True}),
    "  ablation: pixel target only": ({"loss_type": "pixel"}, {}),
}


def trainer(epochs: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def encoder(args, pretrained: str | None = None) -> ImageEncoderConfig:
    return ImageEncoderConfig(args.backbone, tuple(args.img_size), drop_path_rate=0.0, pretrained=pretrained,
                              model_kwargs=args.backbone_kwargs)


def pretrain(args, model_kwargs: dict, data_kwargs: dict, shards: str, out: str) -> str:
    L.seed_everything(0, verbose=False)
    model = PersonMAEModule(encoder(args),
                            min_block_patches=16, decoder_dim=64, decoder_depth=2, decoder_heads=4,
                            feat_weight_warmup_epochs=args.pretrain_epochs / 5, teacher_momentum=0.99,
                            teacher_momentum_final=0.999, weight_decay=0.05, warmup_epochs=1,
                            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.95)),
                            **model_kwargs)
    data = LUPersonDataModule(shards, source="shards", img_size=args.img_size, batch_size=64,
                              num_workers=args.num_workers, **data_kwargs)
    t = trainer(args.pretrain_epochs)
    t.fit(model, data)
    t.save_checkpoint(out)
    return out


def finetune(args, pretrained: str | None, seed: int, root: str) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    model = ReIDModule(encoder(args, pretrained),
                       triplet_margin=None, report_chance=True, weight_decay=5e-4,
                       warmup_epochs=2, optimizer=functools.partial(torch.optim.AdamW, lr=args.finetune_lr))
    data = ReIDDataModule("occluded_duke", root, img_size=args.img_size, batch_size=32, num_instances=4,
                          num_workers=args.num_workers, seed=seed)
    t = trainer(args.finetune_epochs, check_val_every_n_epoch=args.finetune_epochs + 1)
    t.fit(model, data)
    metrics = t.test(model, data, verbose=False)[0]
    return {k.split("/")[1]: float(v) for k, v in metrics.items()}


def summary(runs: list[dict[str, float]], key: str) -> str:
    values = [100 * r[key] for r in runs]
    spread = f" +- {statistics.stdev(values):4.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):5.1f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_tiny_test")
    parser.add_argument("--backbone-kwargs", type=json.loads, default={"patch_size": 8},
                        help="JSON timm arguments (default: 8-pixel patches, the paper's 16 x 8 grid at 128x64)")
    parser.add_argument("--img-size", type=int, nargs=2, default=[128, 64])
    parser.add_argument("--pretrain-images", type=int, default=2048)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keep data and checkpoints here (default: a temp folder)")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    workdir = args.workdir or tempfile.mkdtemp(prefix="personmae_transfer_")
    shards, duke = os.path.join(workdir, "luperson_shards"), os.path.join(workdir, "occluded_duke")
    if not os.path.isdir(shards):
        write_luperson_shards(shards, num_images=args.pretrain_images, shard_size=256, size=tuple(args.img_size))
    if not os.path.isdir(duke):
        write_occluded_duke(duke, size=tuple(args.img_size))

    start = time.time()
    encoders: dict[str, str | None] = {"random initialisation (same fine-tuning)": None}
    for name, (model_kwargs, data_kwargs) in VARIANTS.items():
        path = os.path.join(workdir, f"pretrain_{len(encoders)}.ckpt")
        encoders[name] = path if os.path.isfile(path) else pretrain(args, model_kwargs, data_kwargs, shards, path)
        print(f"pre-trained {name.strip()} ({time.time() - start:.0f} s)", flush=True)
    results = {}
    for name, path in encoders.items():
        results[name] = [finetune(args, path, seed, duke) for seed in args.finetune_seeds]
        print(f"fine-tuned {name.strip()} ({time.time() - start:.0f} s)", flush=True)

    size = f"{args.img_size[0]}x{args.img_size[1]}"
    print(f"\nSynthetic Occluded-Duke, {args.backbone} {args.backbone_kwargs} at {size}; "
          f"pre-training {args.pretrain_epochs} epochs on {args.pretrain_images} synthetic LUPerson images; "
          f"fine-tuning {args.finetune_epochs} epochs, seeds {args.finetune_seeds} (mean +- std, %)")
    width = max(map(len, results))
    print(f"{'encoder initialisation':<{width}} | {'mAP':>13} | {'rank-1':>13}")
    for name, runs in results.items():
        print(f"{name:<{width}} | {summary(runs, 'mAP'):>13} | {summary(runs, 'rank1'):>13}")
    chance = results["random initialisation (same fine-tuning)"]
    print(f"{'chance (random features)':<{width}} | {summary(chance, 'chance_mAP'):>13} | "
          f"{summary(chance, 'chance_rank1'):>13}")
    print(f"total {time.time() - start:.0f} s; data and checkpoints in {workdir}")


if __name__ == "__main__":
    main()
