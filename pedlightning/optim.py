"""Learning-rate schedules and parameter groups shared by every task."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

Schedule = Literal["cosine", "constant"]


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                         schedule: Schedule = "cosine") -> float:
    """Multiplier of the base lr at ``step``: linear warm-up from ~0, then cosine decay to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float,
                 skip_decay_names: Iterable[str] = ("bias", "pos_embed", "cls_token", "mask_token")) -> list[dict]:
    """Two groups: decayed weights, and biases / norm weights / embeddings without weight decay (timm, MAE)."""
    skip = tuple(skip_decay_names)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following :func:`warmup_cosine_factor`; its state is checkpointed by Lightning."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine_factor(s, warmup_steps, total_steps, min_lr_ratio, schedule))
