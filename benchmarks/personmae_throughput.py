"""PersonMAE pre-training throughput against the mask ratio (a benchmark, not a test).

    python benchmarks/personmae_throughput.py --threads 1                       # ViT-B/16, 256x128, CPU
    python benchmarks/personmae_throughput.py --device cuda --batch-size 128 --precision bf16

For mask ratios 0 / 0.5 / 0.75 it reports the encoder's forward FLOPs per image (counted by
``torch.utils.flop_counter`` on the visible-token forward, so they fall with the visible tokens), the FLOPs of
a whole training step per image (student encoder + decoders, forward and backward, plus the teacher's forward
on RegionB), and images/s of a full training step (mask drawing, forward, backward, AdamW, EMA update): the
median of ``--repeats`` timings of ``--steps`` steps each after one warm-up step, the ratios taking turns so
that load changes on a shared machine hit them alike. Ratios are against the first mask ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.masking import forward_visible, visible_indices
from pedlightning.models.momentum import ema_update_
from pedlightning.tasks.personmae import PersonMAEModule


def make_batch(n: int, size: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    box_a = torch.tensor([[0.0, 0.0, 0.9, 0.9]]).repeat(n, 1)
    box_b = torch.tensor([[0.1, 0.1, 0.9, 0.9]]).repeat(n, 1)
    batch = {"region_a": torch.randn(n, 3, *size, generator=g), "region_b": torch.randn(n, 3, *size, generator=g),
             "box_a": box_a, "box_b": box_b}
    return {k: v.to(device) for k, v in batch.items()}


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class Setting:
    """One mask ratio: a PersonMAE model with its optimizer, a fixed batch, and its FLOP counts."""

    def __init__(self, args: argparse.Namespace, ratio: float, device: torch.device):
        torch.manual_seed(0)
        self.args, self.device, self.ratio = args, device, ratio
        encoder = ImageEncoderConfig(args.backbone, tuple(args.img_size), model_kwargs=args.backbone_kwargs)
        self.model = PersonMAEModule(encoder, mask_ratio=ratio, feat_weight_warmup_epochs=0.0).to(device)
        params = [p for p in self.model.optimized_modules().parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
        self.batch = make_batch(args.batch_size, tuple(args.img_size), device)
        self.steps_done = 0
        keep = visible_indices(self.model.masks(1, seed=0).to(device))
        with self.autocast:
            self.encoder_flops = flops(lambda: forward_visible(self.model.encoder.model, self.batch["region_a"][:1],
                                                               keep))
        self.step_flops = flops(self.step) / args.batch_size  # also the warm-up step
        self.timings: list[float] = []

    def step(self) -> None:
        """One training step: draw masks, forward, backward, AdamW, EMA update of the teacher."""
        model = self.model
        mask = model.draw_masks(self.args.batch_size, self.steps_done)
        with self.autocast:
            losses = model.compute_losses(self.batch, mask)
            loss = losses["pixel"] + losses["feature"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        ema_update_(model.teacher.module, model.encoder, 0.999)
        self.steps_done += 1

    def time_steps(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(self.args.steps):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.timings.append(time.perf_counter() - start)

    @property
    def images_per_s(self) -> float:
        return self.args.steps * self.args.batch_size / statistics.median(self.timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, nargs=2, default=[256, 128])
    parser.add_argument("--backbone-kwargs", type=json.loads, default=None, help="JSON, e.g. {\"patch_size\": 8}")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"PersonMAE training step, {args.backbone} at {args.img_size[0]}x{args.img_size[1]}, "
          f"batch {args.batch_size}, {args.precision}, {device} ({torch.get_num_threads()} threads); "
          f"median of {args.repeats} x {args.steps} steps")
    settings = [Setting(args, r, device) for r in args.ratios]
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit every ratio alike
        for setting in settings:
            setting.time_steps()
    base = settings[0]
    header = ("mask ratio", "visible", "encoder GFLOPs/img", "vs first", "step GFLOPs/img", "images/s", "vs first")
    print(" | ".join(header))
    for s in settings:
        m = s.model.masks
        print(f"{s.ratio:10.2f} | {m.num_visible:3d}/{m.num_patches:3d} | {s.encoder_flops / 1e9:18.3f} | "
              f"{s.encoder_flops / base.encoder_flops:8.3f} | {s.step_flops / 1e9:15.3f} | "
              f"{s.images_per_s:8.2f} | {s.images_per_s / base.images_per_s:8.2f}")
    print("FLOPs count a multiply-add as 2 (torch.utils.flop_counter).")


if __name__ == "__main__":
    main()
