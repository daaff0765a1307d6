"""Reconstruction grids of masked-image-modelling pre-training (PersonMAE): see what the decoder predicts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchvision.utils import make_grid, save_image

from pedlightning.data.transforms.reid import IMAGENET_MEAN, IMAGENET_STD, denormalize

_KEYS = ("region_a", "region_b", "box_a", "box_b")


class ReconstructionGrid(L.Callback):
    """Writes a PNG grid every ``every_n_epochs`` training epochs, and logs it when the logger takes images.

    Rows: masked RegionA (the encoder's view, masked patches grey), RegionB (the target), the pixel
    prediction for RegionB; columns: the first ``num_images`` samples of the first training batch, kept
    fixed with a fixed mask so grids of successive epochs are comparable. Needs a module with a
    ``reconstruct(batch)`` method that returns those three image batches (:class:`PersonMAEModule`).

    Args:
        num_images: samples (columns) per grid.
        every_n_epochs: write after every n-th training epoch.
        dirpath: folder for ``epoch=NNN.png`` (default: ``<default_root_dir>/reconstructions``).
        mean, std: the data module's normalisation, undone for display.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, dirpath: str | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.dirpath = dirpath
        self.mean, self.std = list(mean), list(std)
        self.batch: dict[str, torch.Tensor] | None = None
        self.last_path: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not callable(getattr(pl_module, "reconstruct", None)) or "pixel" not in getattr(pl_module, "out_dims", {}):
            rank_zero_warn(f"ReconstructionGrid: {type(pl_module).__name__} predicts no pixels; no grids are written")
            self.every_n_epochs = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.batch is None and trainer.is_global_zero and self.every_n_epochs > 0:
            self.batch = {k: batch[k][: self.num_images].detach().cpu() for k in _KEYS}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (not trainer.is_global_zero or self.batch is None or self.every_n_epochs <= 0
                or (trainer.current_epoch + 1) % self.every_n_epochs):
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = pl_module.reconstruct({k: v.to(pl_module.device) for k, v in self.batch.items()})
        finally:
            pl_module.train(was_training)
        rows = [denormalize(images[k].float().cpu(), self.mean, self.std)
                for k in ("masked_a", "region_b", "prediction")]
        grid = make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=1.0)
        folder = self.dirpath or os.path.join(trainer.default_root_dir, "reconstructions")
        os.makedirs(folder, exist_ok=True)
        self.last_path = os.path.join(folder, f"epoch={trainer.current_epoch:03d}.png")
        save_image(grid, self.last_path)
        self._log(trainer, grid)

    @staticmethod
    def _log(trainer: L.Trainer, grid: torch.Tensor) -> None:
        """TensorBoard (``add_image``) and loggers with a ``log_image`` method (W&B, Neptune, MLflow-style)."""
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if callable(getattr(experiment, "add_image", None)):
                experiment.add_image("reconstruction", grid, trainer.global_step)
            elif callable(getattr(logger, "log_image", None)):
                logger.log_image(key="reconstruction", images=[grid], step=trainer.global_step)
