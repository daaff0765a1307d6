"""Learning-rate schedules and parameter groups shared by every task.

A parameter group carries a ``weight_decay`` and an ``lr_factor``; :func:`apply_lr_factors` turns the factor into
the group's lr once the optimizer exists (the optimizer's own ``lr`` is the base lr), and the per-step LambdaLR of
:func:`build_scheduler` then multiplies every group's initial lr by the same schedule factor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Literal

import torch
from torch import nn

from pedlightning.errors import ConfigError

Schedule = Literal["cosine", "constant", "step"]
SCHEDULES: tuple[str, ...] = ("cosine", "constant", "step")

#: parameters without weight decay by default (timm, MAE): biases and the ViT token / position embeddings.
DEFAULT_NO_DECAY_NAMES: tuple[str, ...] = ("*bias", "*pos_embed", "*cls_token", "*mask_token")


def name_matches(name: str, pattern: str) -> bool:
    """``pattern`` names the parameter: an fnmatch pattern (``*classifier*``) or a dotted prefix (``head``
    matches ``head.classifier.weight``)."""
    return fnmatchcase(name, pattern) or name == pattern or name.startswith(pattern + ".")


def is_bias(name: str) -> bool:
    """A bias by its own name (``fc.bias``, ``attn.in_proj_bias``), as TransReID / IRRA test ``"bias" in key``.

    Only the last dotted component is tested, so a module whose path contains "bias" does not make its
    weights biases.
    """
    return "bias" in name.rsplit(".", 1)[-1]


def schedule_factor(step: int, warmup_steps: int, total_steps: int, schedule: Schedule = "cosine",
                    min_lr_ratio: float = 0.0, warmup_start_factor: float = 0.0,
                    milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Multiplier of every group's initial lr at optimizer step ``step`` (0-based).

    Warm-up: linear from ``warmup_start_factor`` to 1 over ``warmup_steps`` steps, the first step already one
    increment up (``s + (1 - s) (step + 1) / warmup_steps``: with ``s = 0`` no step runs at lr 0). Then
    ``cosine`` decays to ``min_lr_ratio`` at ``total_steps`` (measured from the end of warm-up), ``constant``
    stays at 1, and ``step`` multiplies by ``gamma`` at each milestone reached (``step >= milestone``; the
    decay also applies inside warm-up, as Bag of Tricks' WarmupMultiStepLR).
    """
    in_warmup = warmup_steps > 0 and step < warmup_steps
    warm = warmup_start_factor + (1.0 - warmup_start_factor) * (step + 1) / warmup_steps if in_warmup else 1.0
    if schedule == "step":
        return warm * gamma ** sum(step >= m for m in milestones)
    if in_warmup or schedule == "constant" or total_steps <= warmup_steps:
        return warm
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_schedule(schedule: str, warmup_start_factor: float, min_lr_ratio: float,
                   milestones_epochs: Sequence[float], gamma: float, owner: str) -> None:
    """Reject schedule options that cannot mean anything (named as ``model.init_args.<key>``)."""
    key = "model.init_args"
    if schedule not in SCHEDULES:
        raise ConfigError(f"{owner}: {key}.lr_schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if not 0.0 <= warmup_start_factor <= 1.0:
        raise ConfigError(f"{owner}: {key}.warmup_start_factor must lie in [0, 1], got {warmup_start_factor}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"{owner}: {key}.min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    milestones = list(milestones_epochs)
    if schedule != "step" and milestones:
        raise ConfigError(f"{owner}: {key}.lr_milestones_epochs={milestones} is only read by lr_schedule: step "
                          f"(got lr_schedule: {schedule})")
    if schedule == "step":
        if not milestones:
            raise ConfigError(f"{owner}: lr_schedule: step needs {key}.lr_milestones_epochs (e.g. [40, 70])")
        if milestones != sorted(milestones) or milestones[0] < 0:
            raise ConfigError(f"{owner}: {key}.lr_milestones_epochs must be increasing and >= 0, got {milestones}")
        if gamma <= 0:
            raise ConfigError(f"{owner}: {key}.lr_gamma must be > 0, got {gamma}")


def param_groups(module: nn.Module, weight_decay: float,
                 no_decay_names: Iterable[str] = DEFAULT_NO_DECAY_NAMES, decay_1d_params: bool = False,
                 lr_multipliers: Mapping[str, float] | None = None, bias_lr_factor: float = 1.0) -> list[dict]:
    """The trainable parameters of ``module`` grouped by (lr factor, weight decay), in first-seen order.

    Weight decay: 0 for names matching a ``no_decay_names`` pattern (:func:`name_matches`) and, unless
    ``decay_1d_params``, for every parameter of at most one dimension (norm weights, biases); ``weight_decay``
    otherwise. lr factor: that of the first ``lr_multipliers`` pattern the name matches (in the mapping's
    order; it replaces the bias factor, as IRRA's and TransReID's new-layer factors do), else
    ``bias_lr_factor`` for biases (:func:`is_bias`), else 1. A pattern that matches no trainable parameter is
    a :class:`ConfigError` (a typo would otherwise be silently ignored).
    """
    skip = tuple(no_decay_names)
    multipliers = dict(lr_multipliers or {})
    for pattern, factor in multipliers.items():
        if factor < 0:
            raise ConfigError(f"lr_multipliers[{pattern!r}] must be >= 0, got {factor}")
    if bias_lr_factor < 0:
        raise ConfigError(f"bias_lr_factor must be >= 0, got {bias_lr_factor}")
    used: set[str] = set()
    groups: dict[tuple[float, float], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        pattern = next((pat for pat in multipliers if name_matches(name, pat)), None)
        if pattern is not None:
            used.add(pattern)
            factor = float(multipliers[pattern])
        else:
            factor = float(bias_lr_factor) if is_bias(name) else 1.0
        no_decay = any(name_matches(name, pat) for pat in skip) or (p.ndim <= 1 and not decay_1d_params)
        decay = 0.0 if no_decay else float(weight_decay)
        group = groups.setdefault((factor, decay), {"params": [], "weight_decay": decay, "lr_factor": factor})
        group["params"].append(p)
    unused = [pat for pat in multipliers if pat not in used]
    if unused:
        raise ConfigError(f"lr_multipliers: no trainable parameter of {type(module).__name__} matches {unused} "
                          "(patterns are fnmatch patterns or dotted prefixes of parameter names, e.g. 'classifier' "
                          "or '*classifier*')")
    return list(groups.values())


def apply_lr_factors(optimizer: torch.optim.Optimizer) -> None:
    """Scale each group's lr (the optimizer's base lr) by its ``lr_factor``; call before building the scheduler."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_factor", 1.0)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float, schedule: Schedule, warmup_start_factor: float = 0.0,
                    milestones: Sequence[int] = (), gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following :func:`schedule_factor`; its state is checkpointed by Lightning."""
    milestones = tuple(milestones)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: schedule_factor(s, warmup_steps, total_steps, schedule, min_lr_ratio,
                                             warmup_start_factor, milestones, gamma))
