"""VAL-PAT ablation on synthetic data: does each pre-training objective add to the frozen features?

Arms (equal pre-training steps; the same synthetic LUPerson-TA shards, whose captions name colours and details the
26 attribute flags do not):

    random         no pre-training (the encoder at its seeded random initialisation)
    SSL            MoCo v2 term only                    (itc_weight 0, attr_weight 0)
    SSL+ITC        + image-text InfoNCE                 (attr_weight 0)
    SSL+ATTR       + weighted attribute BCE             (itc_weight 0)
    SSL+ITC+ATTR   the paper's VAL-PAT

Each arm is pre-trained once per seed (model initialisation, data order, BN shuffle and augmentations follow the
seed), then evaluated with its image encoder FROZEN (eval mode, no gradient) on synthetic downstream sets:

    Market-1501, Occluded-Duke   kNN reID: cosine ranking of the encoder features, mAP (ReIDModule.test, untrained)
    PA-100K                      linear probe: the attribute head alone trained on frozen features, test mA
    CUHK-PEDES                   text-to-image R1: projection + text tower trained (SDM + ID) over frozen image
                                 features; the text tower starts from the arm's pre-trained one when it has one

Prints mean ± std per arm and metric and the paired differences (same seed) with 95% t-intervals; the paper's claim
is that each objective adds (SSL > random, SSL+ITC > SSL, SSL+ATTR > SSL, SSL+ITC+ATTR > both). Writes JSON (--out).

    python benchmarks/valpat_ablation.py            # 3 seeds (the budget is ~25 min on 2 CPU cores)
    python benchmarks/valpat_ablation.py --quick    # 2 seeds, tiny data, 1 epoch each: checks that it runs
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from ablation_cli import ablation_parser, parse_with_presets, quiet_logs  # noqa: E402  # benchmarks/ablation_cli.py
from paired import summarise  # noqa: E402  # benchmarks/paired.py (scripts run from this folder)

from pedlightning.data.datamodules import (  # noqa: E402
    AttributeDataModule,
    LUPersonTADataModule,
    ReIDDataModule,
    TextReIDDataModule,
)
from pedlightning.data.synthetic import (  # noqa: E402
    write_cuhk_pedes,
    write_luperson_shards,
    write_market1501,
    write_occluded_duke,
    write_pa100k,
)
from pedlightning.models.encoders import ImageEncoderConfig  # noqa: E402
from pedlightning.models.text import TextEncoderConfig  # noqa: E402
from pedlightning.tasks.attributes import AttributeModule  # noqa: E402
from pedlightning.tasks.reid import ReIDModule  # noqa: E402
from pedlightning.tasks.text_reid import TextReIDModule  # noqa: E402
from pedlightning.tasks.valpat import VALPATModule  # noqa: E402

SIZE = (64, 32)
ARMS = {"random": None, "SSL": dict(itc_weight=0.0, attr_weight=0.0), "SSL+ITC": dict(attr_weight=0.0),
        "SSL+ATTR": dict(itc_weight=0.0), "SSL+ITC+ATTR": {}}
METRICS = ("market_mAP", "occduke_mAP", "pa100k_mA", "cuhk_R1")
DIFFS = (("SSL", "random"), ("SSL+ITC", "SSL"), ("SSL+ATTR", "SSL"), ("SSL+ITC+ATTR", "SSL+ITC"),
         ("SSL+ITC+ATTR", "SSL+ATTR"))
#: two-sided 95% Student-t quantiles by degrees of freedom.


def _trainer(epochs: int, workdir: str, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=workdir, **kwargs)


def _encoder(pretrained: str | None) -> ImageEncoderConfig:
    return ImageEncoderConfig("resnet_tiny_test", SIZE, drop_path_rate=0.0, last_stride=1, pretrained=pretrained)


def _text(pretrained: str | None) -> TextEncoderConfig:
    return TextEncoderConfig("clip_tiny_test", 77, pretrained)


def frozen(cls: type, attr: str) -> type:
    """``cls`` whose image encoder ``attr`` is frozen: no gradients, always in eval mode (BN statistics fixed)."""

    class Frozen(cls):
        def setup(self, stage: str) -> None:
            super().setup(stage)
            getattr(self, attr).requires_grad_(False)

        def train(self, mode: bool = True):
            super().train(mode)
            getattr(self, attr).eval()
            return self

    Frozen.__name__ = f"Frozen{cls.__name__}"
    return Frozen


def pretrain(arm: dict, seed: int, args: argparse.Namespace, roots: dict[str, str], workdir: str) -> str:
    """Pre-train one arm; returns its checkpoint."""
    L.seed_everything(seed, verbose=False)
    model = VALPATModule(_encoder(None), _text(None), projection_dim=64, queue_size=args.queue_size, momentum=0.99,
                         bn_group_size=args.batch_size // 4, shuffle_seed=seed, warmup_epochs=0.5,
                         optimizer=functools.partial(torch.optim.AdamW, lr=2e-3), **arm)
    data = LUPersonTADataModule(roots["luperson_ta"], img_size=SIZE, tokenizer="clip_tiny_test",
                                batch_size=args.batch_size, num_workers=args.num_workers,
                                shuffle_buffer=256, seed=seed)
    trainer = _trainer(args.pretrain_epochs, workdir)
    trainer.fit(model, data)
    path = os.path.join(workdir, f"valpat_{seed}_{'_'.join(f'{k}{v}' for k, v in sorted(arm.items())) or 'all'}.ckpt")
    trainer.save_checkpoint(path)
    return path


def evaluate(ckpt: str | None, has_text: bool, seed: int, args: argparse.Namespace, roots: dict[str, str],
             workdir: str) -> dict[str, float]:
    """Frozen-feature numbers of one encoder (``ckpt`` None: seeded random initialisation)."""
    out = {}
    for name, dataset in (("market", "market1501"), ("occduke", "occluded_duke")):
        L.seed_everything(seed, verbose=False)
        model = ReIDModule(_encoder(ckpt), report_chance=False)
        data = ReIDDataModule(dataset, roots[dataset], img_size=SIZE, num_workers=args.num_workers, seed=seed)
        trainer = _trainer(1, workdir)
        trainer.test(model, data, verbose=False)
        out[f"{name}_mAP"] = float(trainer.callback_metrics["test/mAP"])
    L.seed_everything(seed, verbose=False)
    probe = frozen(AttributeModule, "encoder")(_encoder(ckpt), optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
                                               weight_decay=0.0)
    data = AttributeDataModule("pa100k", roots["pa100k"], img_size=SIZE, batch_size=64, padding=3,
                               num_workers=args.num_workers, seed=seed)
    trainer = _trainer(args.probe_epochs, workdir)
    trainer.fit(probe, data)
    trainer.test(probe, data, verbose=False)
    out["pa100k_mA"] = float(trainer.callback_metrics["test/mA"])
    L.seed_everything(seed, verbose=False)
    search = frozen(TextReIDModule, "image_encoder")(
        _encoder(ckpt), _text(ckpt if has_text else None), report_chance=False, warmup_epochs=0.5,
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3))
    data = TextReIDDataModule("cuhk_pedes", roots["cuhk_pedes"], tokenizer="clip_tiny_test", img_size=SIZE,
                              batch_size=32, num_workers=args.num_workers, padding=3, erasing_prob=0.0, seed=seed)
    trainer = _trainer(args.probe_epochs, workdir)
    trainer.fit(search, data)
    trainer.test(search, data, verbose=False)
    out["cuhk_R1"] = float(trainer.callback_metrics["test/rank1"])
    return out


def write_data(root: str, args: argparse.Namespace) -> dict[str, str]:
    roots = {name: os.path.join(root, name) for name in
             ("luperson_ta", "market1501", "occluded_duke", "pa100k", "cuhk_pedes")}
    n = args.ids
    writers = {
        "luperson_ta": lambda r: write_luperson_shards(r, num_images=args.pretrain_images, shard_size=128,
                                                       with_text=True, missing_captions=0.1, missing_attributes=0.1),
        "market1501": lambda r: write_market1501(r, num_train_ids=4, num_test_ids=n),
        "occluded_duke": lambda r: write_occluded_duke(r, num_train_ids=4, num_test_ids=n),
        "pa100k": lambda r: write_pa100k(r, num_train=8 * n, num_val=16, num_test=4 * n),
        "cuhk_pedes": lambda r: write_cuhk_pedes(r, num_train_ids=2 * n, num_val_ids=4, num_test_ids=n),
    }
    for name, write in writers.items():
        if not os.path.isdir(roots[name]):
            write(roots[name])
    return roots


def main(argv: list[str] | None = None) -> None:
    parser = ablation_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-images", type=int, default=None)
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--probe-epochs", type=int, default=None)
    parser.add_argument("--ids", type=int, default=None, help="test identities of each downstream set")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--data", default=None, help="where the synthetic sets are written (default: a temp folder)")
    parser.add_argument("--out", default="runs/bench/valpat_ablation.json")
    quick = {"seeds": [0, 1], "pretrain_images": 128, "pretrain_epochs": 1, "probe_epochs": 1, "ids": 8}
    full = {"seeds": [0, 1, 2], "pretrain_images": 1024, "pretrain_epochs": 3, "probe_epochs": 2, "ids": 24}
    args = parse_with_presets(parser, argv, quick, full)
    torch.set_num_threads(2)
    quiet_logs()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        roots = write_data(args.data or tmp, args)
        runs: dict[int, dict[str, dict[str, float]]] = {}
        for seed in args.seeds:
            runs[seed] = {}
            for arm, weights in ARMS.items():
                ckpt = None if weights is None else pretrain(weights, seed, args, roots, tmp)
                has_text = weights is not None and weights.get("itc_weight", 1.0) > 0
                runs[seed][arm] = evaluate(ckpt, has_text, seed, args, roots, tmp)
                print(f"seed {seed} {arm} after {time.time() - start:.0f} s: {json.dumps(runs[seed][arm])}",
                      flush=True)
    table, summary = summarise(runs, ARMS, METRICS, DIFFS)
    elapsed = time.time() - start
    print(f"\nVAL-PAT ablation, synthetic data ({args.pretrain_images} LUPerson-TA images x {args.pretrain_epochs} "
          f"pre-training epochs per arm, frozen-feature evaluation, {args.ids} test ids per set, seeds {args.seeds}), "
          f"{elapsed:.0f} s\n\n{table}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "seconds": elapsed, "runs": runs, **summary}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
