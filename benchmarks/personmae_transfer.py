"""PersonMAE's claims on synthetic data, measured on frozen features (a benchmark, not a test).

PersonMAE (arXiv 2311.04496) claims that block-masking RegionA and predicting a *different* RegionB make features
that are occlusion-robust and cross-region invariant, and that the feature-level target adds to the pixel one.
Each arm below pre-trains the same small ViT (16 x 8 patch grid, the paper's grid) with the same steps, mask
ratio 0.75, on synthetic LUPerson shards with 30% occluded images (identities disjoint from the test sets):

    random init   no pre-training: the encoder every other arm starts from (same seed)
    paper         block masking, RegionA != RegionB, pixel + feature targets, loss on the whole RegionB
    rand-mask     random masking, RegionA != RegionB, pixel + feature, whole RegionB
    same          block masking, RegionA = RegionB, pixel + feature, loss on the masked patches only
    rand-same     random masking, RegionA = RegionB, pixel + feature, masked patches only (plain MAE + features)
    pixel         the paper's setting with the pixel target only

RegionA = RegionB needs the masked-only loss (the visible patches would otherwise be copied), so the 2 x 2 grid
(masking x regions) compares like with like along each axis except that loss choice, which the region axis
implies. Pre-training is repeated per seed (initialisation, data order, crops and masks follow the seed); nothing
is fine-tuned, so the numbers carry no fine-tuning noise. Frozen-feature measures (the encoder's output, the CLS
token, unless stated):

    occduke_mAP      kNN reID mAP (cosine) on synthetic Occluded-Duke (every query occluded)
    occduke_mAP_avg  the same with the mean of the patch tokens as the feature
    occ_<kind>       occlusion robustness per occluder (pole, box, car, person): the same render with and without
                     its occluder (same person, pose, background, exposure), s = (c_pair - c_imp) / (1 - c_imp),
                     c_pair = cosine(occluded, its clean twin), c_imp = mean cosine(occluded, clean renders of the
                     other identities); 1 = the occluder changes nothing, 0 = the twin is no closer than a stranger
    crop_inv         cross-region invariance: two random crops (RegionA/RegionB sampling) of one clean render,
                     s as above with c_pair = cosine of the two crops, c_imp = against the crops of other identities

Prints mean ± std (x100) per arm and the paired differences (same seed) with 95% t-intervals
(benchmarks/paired.py), and writes JSON (--out; finished (seed, arm) runs are reused when the file exists).

    python benchmarks/personmae_transfer.py           # 3 seeds (about 25-30 min on 2 loaded CPU cores)
    python benchmarks/personmae_transfer.py --quick   # 2 seeds, tiny data, a few steps: checks that it runs
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from ablation_cli import ablation_parser, parse_with_presets, quiet_logs  # noqa: E402  # benchmarks/ablation_cli.py
from paired import summarise  # noqa: E402  # benchmarks/paired.py (scripts run from this folder)
from PIL import Image, ImageDraw  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from pedlightning.data.datamodules.luperson import LUPersonDataModule  # noqa: E402
from pedlightning.data.sources.market import OccludedDuke  # noqa: E402
from pedlightning.data.synthetic import write_luperson_shards, write_occluded_duke  # noqa: E402
from pedlightning.data.synthetic.identity import derive_seed, make_identity  # noqa: E402
from pedlightning.data.synthetic.render import (  # noqa: E402
    VIEWS,
    _background,
    _draw_occluder,
    _draw_person,
    _finish,
    _random_pose,
    camera_style,
    render_person,
)
from pedlightning.data.transforms.regions import RegionPairTransform  # noqa: E402
from pedlightning.data.transforms.reid import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pedlightning.metrics.reid import reid_evaluate  # noqa: E402
from pedlightning.models.encoders import ImageEncoderConfig  # noqa: E402
from pedlightning.tasks.personmae import PersonMAEModule  # noqa: E402

SIZE = (64, 32)  # with 4-pixel patches: the paper's 16 x 8 grid at a quarter of the cost of 128 x 64
OCCLUDERS = ("pole", "box", "car", "person")  # the renderer's occluder kinds, in the order it draws from
ARMS: dict[str, tuple[dict, dict] | None] = {  # arm -> (PersonMAEModule arguments, LUPersonDataModule arguments)
    "random init": None,
    "paper": ({}, {}),
    "rand-mask": ({"mask_type": "random"}, {}),
    "same": ({"loss_patches": "masked"}, {"same_region": True}),
    "rand-same": ({"mask_type": "random", "loss_patches": "masked"}, {"same_region": True}),
    "pixel": ({"loss_type": "pixel"}, {}),
}
LABELS = {"random init": "", "paper": "(block, A≠B, pix+feat)", "rand-mask": "(random, A≠B, pix+feat)",
          "same": "(block, A=B, pix+feat, masked loss)", "rand-same": "(random, A=B, pix+feat, masked loss)",
          "pixel": "(block, A≠B, pixel only)"}
METRICS = ("occduke_mAP", "occduke_mAP_avg", *(f"occ_{k}" for k in OCCLUDERS), "crop_inv")
DIFFS = (("paper", "random init"),
         ("paper", "rand-mask"), ("same", "rand-same"),  # block vs random masking, at A≠B and at A=B
         ("paper", "same"), ("rand-mask", "rand-same"),  # RegionA≠RegionB vs RegionA=RegionB, per masking
         ("paper", "pixel"))  # the feature target
EVAL_PID = 5_000_000  # identities of the occlusion / crop pairs: nobody in LUPerson or Occluded-Duke


def encoder_config() -> ImageEncoderConfig:
    return ImageEncoderConfig("vit_tiny_test", SIZE, drop_path_rate=0.0, model_kwargs={"patch_size": 4})


def build(arm: tuple[dict, dict] | None, seed: int, args: argparse.Namespace) -> PersonMAEModule:
    """The PersonMAE module of an arm, initialised from ``seed`` (the random-init arm's encoder is its start)."""
    L.seed_everything(seed, verbose=False)
    model_kwargs = arm[0] if arm else {}
    return PersonMAEModule(encoder_config(), mask_seed=seed, decoder_dim=64, decoder_depth=2, decoder_heads=4,
                           feat_weight_warmup_epochs=args.pretrain_epochs / 4,  # BootMAE: w_feat = 1 at 25%
                           teacher_momentum=0.98, teacher_momentum_final=0.995,  # short run: a faster teacher
                           weight_decay=0.05, warmup_epochs=min(1.0, args.pretrain_epochs / 4),
                           optimizer=functools.partial(torch.optim.AdamW, lr=1.5e-3, betas=(0.9, 0.95)),
                           **model_kwargs)


def pretrain(arm: tuple[dict, dict], seed: int, args: argparse.Namespace, shards: str, workdir: str) -> torch.nn.Module:
    model = build(arm, seed, args)
    data = LUPersonDataModule(shards, source="shards", img_size=SIZE, batch_size=args.batch_size,
                              num_workers=args.num_workers, shuffle_buffer=512, seed=seed, **arm[1])
    trainer = L.Trainer(max_epochs=args.pretrain_epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=workdir)
    trainer.fit(model, data)
    return model.encoder


# ----------------------------------------------------------------------------------------------- evaluation data
def to_tensor(img: Image.Image) -> torch.Tensor:
    img = img.convert("RGB").resize((SIZE[1], SIZE[0]), Image.BICUBIC) if img.size != (SIZE[1], SIZE[0]) else img
    return TF.normalize(TF.to_tensor(img.convert("RGB")), IMAGENET_MEAN, IMAGENET_STD)


def occluded_pair(pid: int, camera: int, seed: int) -> tuple[Image.Image, Image.Image, str]:
    """The same render with and without its occluder, and the occluder's kind.

    The renderer draws the occluder between the person and the camera's exposure, both from one random stream,
    so ``render_person(occluded=True)`` also changes the exposure; here the occluder gets a copy of the stream and
    both images get the same exposure. The clean image is checked against ``render_person(occluded=False)``.
    """
    ident = make_identity(pid, 0)
    height, width = SIZE
    rng = random.Random(derive_seed(seed, ident.pid, camera))
    view = rng.choices(VIEWS, weights=(0.4, 0.25, 0.35))[0]
    img = _background(camera, rng, height, width)
    pose = _random_pose(ident, view, rng, height, width, camera_style(camera).scale)
    _draw_person(ImageDraw.Draw(img), ident, pose, rng)
    occluded = img.copy()
    occluder_rng = random.Random()
    occluder_rng.setstate(rng.getstate())
    kind = random.Random()
    kind.setstate(rng.getstate())
    _draw_occluder(ImageDraw.Draw(occluded), pose, occluder_rng, height, width)
    finish_rng = random.Random()
    finish_rng.setstate(rng.getstate())
    clean = _finish(img, camera, rng)
    occluded = _finish(occluded, camera, finish_rng)
    reference, _ = render_person(ident, camera=camera, seed=seed, size=SIZE)
    if list(reference.getdata()) != list(clean.getdata()):
        raise RuntimeError("the renderer changed: the clean twin no longer equals render_person(occluded=False)")
    return clean, occluded, kind.choice(OCCLUDERS)


def eval_sets(root: str, args: argparse.Namespace) -> dict[str, object]:
    """Occluded-Duke (query, gallery), occlusion pairs and crop pairs as normalised tensors."""
    duke = os.path.join(root, "occluded_duke")
    if not os.path.isdir(duke):
        write_occluded_duke(duke, size=SIZE, num_train_ids=4, num_test_ids=args.ids)
    source = OccludedDuke(duke)
    sets: dict[str, object] = {}
    for split in ("query", "gallery"):
        records = getattr(source, split)
        sets[split] = (torch.stack([to_tensor(Image.open(r.path)) for r in records]),
                       torch.tensor([r.pid for r in records]), torch.tensor([r.camid for r in records]))
    clean, occluded, kinds, pids = [], [], [], []
    for i in range(args.pair_ids):
        for k in range(args.pairs_per_id):
            a, b, kind = occluded_pair(EVAL_PID + i, camera=1 + (i + k) % 8, seed=derive_seed(7, i, k))
            clean.append(to_tensor(a))
            occluded.append(to_tensor(b))
            kinds.append(kind)
            pids.append(i)
    sets["pairs"] = (torch.stack(clean), torch.stack(occluded), kinds, torch.tensor(pids))
    crops = RegionPairTransform(SIZE, scale=(0.4, 1.0), flip_prob=0.0, rng=random.Random(11))
    views = [crops(TF.to_pil_image(_unnormalise(x))) for x in sets["pairs"][0]]
    sets["crops"] = (torch.stack([v["region_a"] for v in views]), torch.stack([v["region_b"] for v in views]))
    return sets


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


# ----------------------------------------------------------------------------------------------- measures
@torch.no_grad()
def features(encoder: torch.nn.Module, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    encoder.eval()
    out = []
    for chunk in images.split(256):
        if pool == "cls":
            out.append(encoder(chunk))
        else:
            tokens = encoder.forward_tokens(chunk)
            out.append(tokens[:, encoder.num_prefix_tokens:].mean(1))
    return F.normalize(torch.cat(out).float(), dim=-1)


def normalised_similarity(x: torch.Tensor, y: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """Per row i: (cos(x_i, y_i) - mean_j cos(x_i, y_j) over other identities j) / (1 - that mean)."""
    sims = x @ y.T
    other = pids[:, None] != pids[None, :]
    impostor = (sims * other).sum(1) / other.sum(1)
    return (sims.diagonal() - impostor) / (1 - impostor).clamp(min=1e-6)


def evaluate(encoder: torch.nn.Module, sets: dict) -> dict[str, float]:
    (q, q_pids, q_cams), (g, g_pids, g_cams) = sets["query"], sets["gallery"]
    out = {}
    for pool, key in (("cls", "occduke_mAP"), ("avg", "occduke_mAP_avg")):
        out[key] = reid_evaluate(features(encoder, q, pool), features(encoder, g, pool), q_pids, g_pids,
                                 q_cams, g_cams)["mAP"]
    clean, occluded, kinds, pids = sets["pairs"]
    s = normalised_similarity(features(encoder, occluded), features(encoder, clean), pids)
    for kind in OCCLUDERS:
        chosen = torch.tensor([k == kind for k in kinds])
        out[f"occ_{kind}"] = float(s[chosen].mean()) if chosen.any() else float("nan")
    crop_a, crop_b = sets["crops"]
    out["crop_inv"] = float(normalised_similarity(features(encoder, crop_a), features(encoder, crop_b), pids).mean())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = ablation_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-images", type=int, default=None)
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--occluded", type=float, default=0.3, help="share of occluded pre-training images")
    parser.add_argument("--ids", type=int, default=None, help="Occluded-Duke test identities")
    parser.add_argument("--pair-ids", type=int, default=None, help="identities of the occlusion / crop pairs")
    parser.add_argument("--pairs-per-id", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=None, help="where the synthetic sets are written (default: a temp folder)")
    parser.add_argument("--out", default="runs/bench/personmae_transfer.json")
    quick = {"seeds": [0, 1], "pretrain_images": 128, "pretrain_epochs": 1, "ids": 8, "pair_ids": 8}
    full = {"seeds": [0, 1, 2], "pretrain_images": 2048, "pretrain_epochs": 4, "ids": 48, "pair_ids": 48}
    args = parse_with_presets(parser, argv, quick, full)
    torch.set_num_threads(args.threads)
    quiet_logs()
    settings = {k: getattr(args, k) for k in ("pretrain_images", "pretrain_epochs", "occluded", "ids", "pair_ids",
                                              "pairs_per_id", "batch_size")}
    saved = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            saved = json.load(f)
        if saved.get("settings") != settings:
            saved = {}
    runs: dict[int, dict[str, dict[str, float]]] = {int(s): r for s, r in saved.get("runs", {}).items()}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or tmp
        shards = os.path.join(root, f"luperson_{args.pretrain_images}_{args.occluded}")
        if not os.path.isdir(shards):
            write_luperson_shards(shards, num_images=args.pretrain_images, shard_size=256, size=SIZE,
                                  occluded=args.occluded)
        sets = eval_sets(root, args)
        kinds = {k: sets["pairs"][2].count(k) for k in OCCLUDERS}
        print(f"data ready ({time.time() - start:.0f} s): {len(sets['query'][0])} queries, "
              f"{len(sets['gallery'][0])} gallery, occlusion pairs per kind {kinds}", flush=True)
        for seed in args.seeds:
            runs.setdefault(seed, {})
            for name, arm in ARMS.items():
                if name in runs[seed]:
                    continue
                encoder = build(arm, seed, args).encoder if arm is None else pretrain(arm, seed, args, shards, root)
                runs[seed][name] = evaluate(encoder, sets)
                print(f"seed {seed} {name}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in runs[seed][name].items())
                      + f" ({time.time() - start:.0f} s)", flush=True)
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump({"settings": settings, "runs": runs}, f, indent=1)
    seeds = [s for s in args.seeds if set(runs.get(s, {})) == set(ARMS)]
    table, summary = summarise({s: runs[s] for s in seeds}, list(ARMS), METRICS, DIFFS, LABELS)
    print(f"\nPersonMAE on synthetic data: vit_tiny_test (2 blocks, width 64), {SIZE[0]}x{SIZE[1]}, 4-pixel patches "
          f"(16 x 8 grid); {args.pretrain_epochs} epochs on {args.pretrain_images} synthetic LUPerson images "
          f"({100 * args.occluded:.0f}% occluded), batch {args.batch_size}, mask ratio 0.75; seeds {seeds}; "
          f"frozen features; values x100.\n")
    print(table)
    with open(args.out, "w") as f:
        json.dump({"settings": settings, "runs": runs, "summary": summary}, f, indent=1)
    print(f"\ntotal {time.time() - start:.0f} s; JSON in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
