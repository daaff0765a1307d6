"""Reconstruction grids of masked-image-modelling pre-training (PersonMAE): see what the decoder predicts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid, save_image

from pedlightning.data.transforms.reid import IMAGENET_MEAN, IMAGENET_STD, denormalize

_KEYS = ("region_a", "region_b", "box_a", "box_b")

#: the grid's rows, top to bottom: key of ``reconstruct``'s output -> the row's label.
ROW_LABELS = {"masked_a": "input (RegionA, masked)", "region_b": "target (RegionB)", "prediction": "prediction"}


class ReconstructionGrid(L.Callback):
    """Writes a PNG grid every ``every_n_epochs`` training epochs, and logs it when the logger takes images.

    Rows: masked RegionA (the encoder's view, masked patches grey), RegionB (the target), the pixel
    prediction for RegionB, each named in a label band on the left (:data:`ROW_LABELS`); columns: the first
    ``num_images`` samples of the first training batch, kept fixed with a fixed mask so grids of successive
    epochs are comparable. Needs a module with a ``reconstruct(batch)`` method that returns those three image
    batches (:class:`PersonMAEModule`).

    Args:
        num_images: samples (columns) per grid.
        every_n_epochs: write after every n-th training epoch.
        dirpath: folder for ``epoch=NNN.png`` (default: ``<default_root_dir>/reconstructions``).
        mean, std: the data module's normalisation, undone for display.
        font_size: row-label text height in pixels (Pillow's built-in font).

    Attributes: ``label_width``, the width in pixels of the label band left of the images.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, dirpath: str | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, font_size: int = 11):
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.dirpath = dirpath
        self.mean, self.std = list(mean), list(std)
        self.font = ImageFont.load_default(size=font_size)
        draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        self.label_width = max(int(draw.textlength(text, font=self.font)) for text in ROW_LABELS.values()) + 8
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
        rows = [denormalize(images[k].float().cpu(), self.mean, self.std) for k in ROW_LABELS]
        grid = make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=1.0)
        grid = torch.cat([self.label_band(grid.shape[1], rows[0].shape[2], 2), grid], dim=2)
        folder = self.dirpath or os.path.join(trainer.default_root_dir, "reconstructions")
        os.makedirs(folder, exist_ok=True)
        self.last_path = os.path.join(folder, f"epoch={trainer.current_epoch:03d}.png")
        save_image(grid, self.last_path)
        log_image(trainer, "reconstruction", grid)

    def label_band(self, height: int, row_height: int, padding: int) -> torch.Tensor:
        """A white ``(3, height, label_width)`` band naming each row, the text centred on its row."""
        band = Image.new("RGB", (self.label_width, height), "white")
        draw = ImageDraw.Draw(band)
        for i, text in enumerate(ROW_LABELS.values()):
            centre = padding + i * (row_height + padding) + row_height // 2
            top, bottom = draw.textbbox((0, 0), text, font=self.font)[1::2]
            draw.text((4, centre - (top + bottom) // 2), text, fill="black", font=self.font)
        return torch.from_numpy(np.asarray(band).copy()).permute(2, 0, 1).float() / 255


def log_image(trainer: L.Trainer, tag: str, image: torch.Tensor) -> None:
    """Log a ``(3, H, W)`` image (float in [0, 1] or uint8) to TensorBoard (``add_image``) and to loggers with a
    ``log_image`` method (W&B, Neptune, MLflow-style); other loggers are skipped."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_image", None)):
            experiment.add_image(tag, image, trainer.global_step)
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=tag, images=[image], step=trainer.global_step)
