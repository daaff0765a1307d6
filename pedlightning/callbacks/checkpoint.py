"""RunCheckpoint: ModelCheckpoint whose ``last.ckpt`` is fresh after every training epoch."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoints by ``monitor`` as ModelCheckpoint does, and refreshes ``last.ckpt`` at the end of
    every training epoch.

    Lightning 2.6 refreshes ``last`` only together with a top-k save, so with a monitored validation metric and
    ``check_val_every_n_epoch > 1`` a killed run had nothing recent to resume from with ``--ckpt_path last``.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
