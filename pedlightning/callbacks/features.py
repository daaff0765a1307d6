"""FeatureWriter: ``pedlightning predict`` writes features with their labels, one file per split."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class FeatureWriter(BasePredictionWriter):
    """Gathers the predict outputs of a task (dicts with ``split``, ``features``, ``index`` and label tensors)
    and writes ``<output_dir>/<split>.pt`` per split: a dict of tensors in dataset order (duplicates that
    distributed padding adds are dropped), plus ``path`` when the task returns image paths.

    Each process writes its own ``<split>.rank<r>.pt`` under DDP; rank 0 then merges them.

    Args:
        output_dir: folder for the feature files; relative paths are taken under ``default_root_dir``.
    """

    def __init__(self, output_dir: str = "features"):
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def _dir(self, trainer: L.Trainer) -> str:
        return self.output_dir if os.path.isabs(self.output_dir) else os.path.join(trainer.default_root_dir,
                                                                                    self.output_dir)

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        out = self._dir(trainer)
        os.makedirs(out, exist_ok=True)
        loaders = predictions if predictions and isinstance(predictions[0], list) else [predictions]
        by_split: dict[str, list[dict]] = {}
        for outputs in loaders:
            for batch in outputs:
                by_split.setdefault(batch["split"], []).append(batch)
        for split, batches in by_split.items():
            merged = {k: (torch.cat([b[k].cpu() for b in batches]) if torch.is_tensor(batches[0][k])
                          else [x for b in batches for x in b[k]])
                      for k in batches[0] if k != "split"}
            torch.save(merged, os.path.join(out, f"{split}.rank{trainer.global_rank}.pt"))
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            for split in by_split:
                self._merge(out, split, trainer.world_size)

    @staticmethod
    def _merge(out: str, split: str, world_size: int) -> None:
        parts = [torch.load(os.path.join(out, f"{split}.rank{r}.pt"), weights_only=True) for r in range(world_size)]
        index = torch.cat([p["index"] for p in parts])
        order = index.argsort(stable=True)
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[order][1:] != index[order][:-1]
        first = order[keep]
        merged = {}
        for key in parts[0]:
            values = [p[key] for p in parts]
            if torch.is_tensor(values[0]):
                merged[key] = torch.cat(values)[first]
            else:
                flat = [x for v in values for x in v]
                merged[key] = [flat[i] for i in first.tolist()]
        torch.save(merged, os.path.join(out, f"{split}.pt"))
        for r in range(world_size):
            os.remove(os.path.join(out, f"{split}.rank{r}.pt"))
