"""The base of every pedlightning LightningModule: optimizer and lr schedule from YAML."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from pedlightning.optim import Schedule, build_scheduler, param_groups


class TaskModule(L.LightningModule):
    """Shared optimisation set-up.

    Args:
        optimizer: a callable that takes parameter groups and returns an optimizer
            (YAML: ``optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 3.5e-4}}``).
        weight_decay: applied to weight matrices only; biases, norms and embeddings get none.
        lr_schedule: ``cosine`` (linear warm-up then cosine decay) or ``constant`` (warm-up then flat).
        warmup_epochs: linear warm-up length in epochs (fractions allowed); stepped per optimizer step.
        min_lr_ratio: final lr as a fraction of the base lr.
    """

    def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW, weight_decay: float = 0.05,
                 lr_schedule: Schedule = "cosine", warmup_epochs: float = 0.0, min_lr_ratio: float = 0.01):
        super().__init__()
        self.optimizer_factory = optimizer
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.warmup_epochs = warmup_epochs
        self.min_lr_ratio = min_lr_ratio

    def optimized_modules(self) -> torch.nn.Module:
        """The parameters the optimizer updates; subclasses exclude frozen teachers here."""
        return self

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(param_groups(self.optimized_modules(), self.weight_decay))
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = int(round(self.warmup_epochs * total / epochs)) if total > 0 else 0
        scheduler = build_scheduler(optimizer, warmup, max(total, 1), self.min_lr_ratio, self.lr_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
