"""Momentum (EMA) encoders: a frozen copy of an encoder that follows it by exponential moving average.

PersonMAE's feature target is an EMA teacher's patch features (as in BootMAE), VAL-PAT's MoCo key encoder is an
EMA of the query encoder (He et al. 2020, "Momentum Contrast", Eq. 2). `MomentumEncoder` is an ordinary
submodule, so the copy and the step it was last updated at are in every checkpoint; its parameters do not require
gradients, so they stay outside the optimizer; it is updated once per optimizer step (call `update` from
`on_train_batch_end` with `global_step`), also under gradient accumulation.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from timm.layers import DropBlock2d, DropPath, PatchDropout
from torch import nn

from pedlightning.errors import ConfigError

__all__ = ["MomentumEncoder", "MomentumSchedule", "disable_stochastic_", "ema_update_", "momentum_at"]

MomentumSchedule = Literal["constant", "linear", "cosine"]
_SCHEDULES = ("constant", "linear", "cosine")


def momentum_at(step: int, total_steps: int, base: float = 0.999, final: float = 0.9999,
                schedule: MomentumSchedule = "cosine") -> float:
    """EMA momentum after `step` optimizer steps out of `total_steps`; from `base` at 0 to `final` at the end.

    `cosine` (BYOL, Grill et al. 2020, Sec. 3.2): `final - (final - base) * (cos(pi * t / T) + 1) / 2`.
    `linear`: `base + (final - base) * t / T`. `constant`: `base` throughout (MoCo). Steps past `total_steps`
    keep `final`. A pure function of the step, so a resumed run continues the schedule exactly.
    """
    if not (0.0 <= base <= 1.0 and 0.0 <= final <= 1.0):
        raise ConfigError(f"momentum values must be in [0, 1], got base={base}, final={final}")
    if schedule not in _SCHEDULES:
        raise ConfigError(f"momentum schedule must be one of {_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return base
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    if schedule == "linear":
        return base + (final - base) * progress
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def _paired(teacher: nn.Module, student: nn.Module, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    t = dict(getattr(teacher, f"named_{kind}")())
    s = dict(getattr(student, f"named_{kind}")())
    if t.keys() != s.keys():
        diff = sorted(set(t) ^ set(s))[:5]
        raise ConfigError(f"teacher and student {kind} differ (e.g. {diff}); the teacher must copy the student")
    return list(t.values()), [s[k] for k in t]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """`teacher <- momentum * teacher + (1 - momentum) * student` for every parameter, in place.

    Floating-point buffers (BatchNorm statistics) get the same average; other buffers (counters) are copied.
    """
    t_params, s_params = _paired(teacher, student, "parameters")
    if t_params:
        torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1.0 - momentum)
    for tb, sb in zip(*_paired(teacher, student, "buffers")):
        if tb.is_floating_point():
            tb.lerp_(sb, 1.0 - momentum)
        else:
            tb.copy_(sb)


def _stochastic_rates() -> tuple[tuple[type, str], ...]:
    """(module class, attribute holding its drop rate) of every stochastic layer this stack builds."""
    rates: list[tuple[type, str]] = [
        (nn.modules.dropout._DropoutNd, "p"),
        (nn.MultiheadAttention, "dropout"),
        (DropPath, "drop_prob"),
        (DropBlock2d, "drop_prob"),
        (PatchDropout, "prob"),
    ]
    open_clip_transformer = sys.modules.get("open_clip.transformer")  # only present if open_clip was imported
    if open_clip_transformer is not None:
        rates.append((open_clip_transformer.PatchDropout, "prob"))
    return tuple(rates)


def disable_stochastic_(module: nn.Module) -> nn.Module:
    """Set the rate of every Dropout, DropPath, DropBlock, PatchDropout and attention dropout in `module` to 0.

    The modules stay (state-dict keys and the train/eval behaviour of BatchNorm are unchanged); in train mode
    the module is then deterministic. Returns `module`.
    """
    rates = _stochastic_rates()
    for layer in module.modules():
        for cls, attr in rates:
            if isinstance(layer, cls):
                setattr(layer, attr, 0.0)
    return module


class MomentumEncoder(nn.Module):
    """An EMA copy of `encoder`: `copy <- m * copy + (1 - m) * encoder` once per optimizer step.

    The copy is made at construction (deep copy, every Dropout / DropPath disabled, no gradients) and is the
    submodule `module` (checkpoint keys `<name>.module.<encoder key>`). `last_step` (a buffer, so it is saved and
    restored with the weights) holds the optimizer step of the last update: 0 at construction, when the copy
    equals the encoder, so a micro-batch before the first optimizer step does not update.

    Args:
        encoder: the module to follow (the student / query encoder).
        momentum: momentum at step 0 (BootMAE / BYOL teachers 0.999; MoCo 0.999).
        momentum_final: momentum at the last step; None = `momentum` (no schedule).
        schedule: how the momentum moves from `momentum` to `momentum_final` (see `momentum_at`).
    """

    def __init__(self, encoder: nn.Module, momentum: float = 0.999, momentum_final: float | None = None,
                 schedule: MomentumSchedule = "cosine"):
        super().__init__()
        self.momentum = momentum
        self.momentum_final = momentum if momentum_final is None else momentum_final
        self.schedule = schedule
        momentum_at(0, 1, self.momentum, self.momentum_final, schedule)  # validates the arguments
        self.module = disable_stochastic_(copy.deepcopy(encoder))
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.register_buffer("last_step", torch.tensor(0, dtype=torch.long))
        self._last_step = 0  # a host-side mirror of `last_step`: reading the buffer would sync the device
        self._warned_backwards = False

    def momentum_at(self, step: int, total_steps: int) -> float:
        """The momentum this encoder uses at optimizer step `step` of `total_steps`."""
        return momentum_at(step, total_steps, self.momentum, self.momentum_final, self.schedule)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The copy's forward, without gradients."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, total_steps: int) -> float | None:
        """EMA towards `student` for optimizer step `step` (Lightning's `global_step` after the step).

        A no-op returning None when `step` is not past the last updated step (the other micro-batches of an
        accumulated step, a repeated call); else returns the momentum used.
        """
        if step <= self._last_step:
            if step < self._last_step and not self._warned_backwards:
                self._warned_backwards = True
                rank_zero_warn(f"MomentumEncoder: step {step} is before the last update (step {self._last_step}), "
                               f"so updates wait until step {self._last_step + 1}. For a new run from loaded "
                               f"weights call `reset_step(0)`.")
            return None
        momentum = self.momentum_at(step, total_steps)
        ema_update_(self.module, student, momentum)
        self.reset_step(step)
        return momentum

    def reset_step(self, step: int = 0) -> None:
        """Record `step` as the last updated step (e.g. 0 when a new run starts from weights of another)."""
        self._last_step = int(step)
        self.last_step.fill_(int(step))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._last_step = int(self.last_step)
