"""Momentum (EMA) teachers: the momentum schedule and the in-place update.

Used by PersonMAE (the semantic target is an EMA teacher's patch features, as in BootMAE) and by
VAL-PAT's MoCo key encoder. The teacher is an ordinary submodule of the LightningModule, so it is saved in
every checkpoint; it is updated after each optimizer step (``on_train_batch_end``), never by the optimizer.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import nn

from pedlightning.errors import ConfigError

MomentumSchedule = Literal["cosine", "constant"]


def momentum_at(step: int, total_steps: int, base: float = 0.999, final: float = 0.9999,
                schedule: MomentumSchedule = "cosine") -> float:
    """Teacher momentum after ``step`` optimizer steps out of ``total_steps``.

    ``cosine`` (BYOL, Grill et al. 2020, Sec. 3.2): ``final - (final - base) * (cos(pi * t / T) + 1) / 2``,
    rising from ``base`` at step 0 to ``final`` at ``total_steps`` and staying there. ``constant``: ``base``
    throughout (MoCo). A pure function of the step, so a resumed run continues the schedule exactly.
    """
    if not (0.0 <= base <= 1.0 and 0.0 <= final <= 1.0):
        raise ConfigError(f"momentum values must be in [0, 1], got base={base}, final={final}")
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ConfigError(f"momentum schedule must be 'cosine' or 'constant', got {schedule!r}")
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` (no gradients) to be updated with :func:`ema_update_`."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


def _paired(teacher: nn.Module, student: nn.Module, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    t = dict(getattr(teacher, f"named_{kind}")())
    s = dict(getattr(student, f"named_{kind}")())
    if t.keys() != s.keys():
        diff = sorted(set(t) ^ set(s))[:5]
        raise ValueError(f"teacher and student {kind} differ (e.g. {diff}); the teacher must copy the student")
    return [t[k] for k in t], [s[k] for k in t]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter, in place.

    Floating-point buffers get the same average; other buffers (counters) are copied from the student.
    """
    t_params, s_params = _paired(teacher, student, "parameters")
    if t_params:
        torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1.0 - momentum)
    for tb, sb in zip(*_paired(teacher, student, "buffers")):
        if tb.is_floating_point():
            tb.lerp_(sb, 1.0 - momentum)
        else:
            tb.copy_(sb)
