"""MomentumEncoder: EMA formula, schedules, once per optimizer step, outside the optimizer, exact resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pedlightning.errors import ConfigError
from pedlightning.models import ImageEncoder, MomentumEncoder, momentum_at

TOTAL = 4  # optimizer steps of the Lightning runs below: a fixed schedule length, the same in every run


def test_ema_formula_two_steps_by_hand():
    student = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        student[0].weight.fill_(1.0)
    ema = MomentumEncoder(student, momentum=0.9, schedule="constant")
    with torch.no_grad():
        student[0].weight.fill_(2.0)
        student[1].running_mean.fill_(10.0)
        student[1].num_batches_tracked.fill_(3)
    assert ema.update(student, 1, 10) == 0.9
    # 0.9 * 1 + 0.1 * 2 = 1.1; running mean 0.9 * 0 + 0.1 * 10 = 1; integer counters are copied
    assert ema.module[0].weight.item() == pytest.approx(1.1)
    assert ema.module[1].running_mean.item() == pytest.approx(1.0)
    assert ema.module[1].num_batches_tracked.item() == 3
    with torch.no_grad():
        student[0].weight.fill_(3.0)
    assert ema.update(student, 2, 10) == 0.9
    assert ema.module[0].weight.item() == pytest.approx(0.9 * 1.1 + 0.1 * 3.0)  # 1.29
    assert ema.module[0].weight.item() == pytest.approx(1.29)
    assert ema.last_step.item() == 2


def test_momentum_schedules():
    base, final = 0.99, 0.999
    assert [momentum_at(s, 100, base, final, "constant") for s in (0, 50, 100)] == [0.99, 0.99, 0.99]
    linear = [momentum_at(s, 100, base, final, "linear") for s in (0, 50, 100, 150)]
    assert linear == pytest.approx([0.99, 0.9945, 0.999, 0.999])
    cosine = [momentum_at(s, 100, base, final, "cosine") for s in (0, 25, 50, 100, 150)]
    quarter = final - (final - base) * (math.cos(math.pi / 4) + 1) / 2  # 0.991318
    assert cosine == pytest.approx([0.99, quarter, 0.9945, 0.999, 0.999])
    assert quarter == pytest.approx(0.9913180)
    # The encoder's own schedule; momentum_final=None keeps the momentum constant whatever the schedule.
    assert MomentumEncoder(nn.Linear(1, 1), 0.99, 0.999, "linear").momentum_at(50, 100) == pytest.approx(0.9945)
    assert MomentumEncoder(nn.Linear(1, 1), 0.99).momentum_at(50, 100) == pytest.approx(0.99)
    with pytest.raises(ConfigError, match="schedule"):
        MomentumEncoder(nn.Linear(1, 1), schedule="step")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        MomentumEncoder(nn.Linear(1, 1), momentum=1.5)


def test_copy_without_drop_path_is_deterministic_in_train_mode():
    torch.manual_seed(0)
    student = ImageEncoder("vit_tiny_test", img_size=(64, 32), drop_path_rate=0.5,
                           model_kwargs={"proj_drop_rate": 0.3, "attn_drop_rate": 0.3})
    ema = MomentumEncoder(student).train()
    assert ema.module.training and student.model.blocks[1].drop_path1.drop_prob == 0.5  # the student keeps its own
    assert ema.module.model.blocks[1].drop_path1.drop_prob == 0.0
    x = torch.randn(4, 3, 64, 32)
    first = ema(x)
    assert not first.requires_grad
    torch.testing.assert_close(ema(x), first, rtol=0, atol=0)
    torch.testing.assert_close(ema.module.eval()(x), first, rtol=0, atol=1e-6)  # train mode == eval mode
    student.train()
    assert not torch.allclose(student(x), student(x))  # the student is stochastic


def test_state_dict_round_trip_and_skipped_step():
    torch.manual_seed(0)
    student = nn.Linear(3, 2)
    ema = MomentumEncoder(student, 0.5, schedule="constant")
    with torch.no_grad():
        student.weight.add_(1.0)
    ema.update(student, 7, 10)
    restored = MomentumEncoder(nn.Linear(3, 2), 0.5, schedule="constant")
    restored.load_state_dict(ema.state_dict())
    assert "last_step" in ema.state_dict() and restored.last_step.item() == 7
    for a, b in zip(ema.state_dict().values(), restored.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    before = restored.module.weight.clone()
    assert restored.update(student, 7, 10) is None  # the same optimizer step again: skipped
    torch.testing.assert_close(restored.module.weight, before, rtol=0, atol=0)
    assert restored.update(student, 8, 10) == 0.5


class _Tiny(L.LightningModule):
    """A linear encoder pulled towards its own momentum copy (so the copy's weights matter for the loss)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 3)
        self.teacher = MomentumEncoder(self.encoder, momentum=0.5, momentum_final=0.9, schedule="cosine")
        self.updates: list[tuple[int, float]] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.encoder(x) - self.teacher(x) - 1.0).pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        momentum = self.teacher.update(self.encoder, self.global_step, TOTAL)
        if momentum is not None:
            self.updates.append((self.global_step, momentum))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def _loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.linspace(-1, 1, n * 4).reshape(n, 4)), batch_size=1, shuffle=False)


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


def test_copy_is_outside_the_optimizer():
    model = _Tiny()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["encoder.weight", "encoder.bias"]
    assert {n for n, _ in model.named_parameters()} >= {"teacher.module.weight", "teacher.module.bias"}
    assert set(model.state_dict()) == {"encoder.weight", "encoder.bias", "teacher.module.weight",
                                       "teacher.module.bias", "teacher.last_step"}


def test_gradient_accumulation_updates_once_per_optimizer_step(tmp_path):
    model = _Tiny()
    _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2).fit(model, _loader(4))
    assert model.trainer.global_step == 2
    assert model.updates == [(1, pytest.approx(momentum_at(1, TOTAL, 0.5, 0.9))),
                             (2, pytest.approx(momentum_at(2, TOTAL, 0.5, 0.9)))]
    assert model.updates[1][1] == pytest.approx(0.7)  # the cosine midpoint of 0.5 -> 0.9
    assert model.teacher.last_step.item() == 2


def test_resume_continues_exactly(tmp_path):
    """fit 2 steps + checkpoint + resume for 2 more == 4 steps straight (weights and EMA copy)."""
    straight = _Tiny()
    _trainer(tmp_path / "straight", max_epochs=2).fit(straight, _loader(2))

    first = _Tiny()
    trainer = _trainer(tmp_path / "first", max_epochs=1)
    trainer.fit(first, _loader(2))
    ckpt = tmp_path / "two_steps.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = _Tiny()
    _trainer(tmp_path / "resumed", max_epochs=2).fit(resumed, _loader(2), ckpt_path=str(ckpt))

    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    assert [s for s, _ in straight.updates] == [1, 2, 3, 4] and [s for s, _ in resumed.updates] == [3, 4]
    assert resumed.teacher.last_step.item() == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=name)
    assert not torch.allclose(straight.teacher.module.weight, straight.encoder.weight)  # the copy lags behind
