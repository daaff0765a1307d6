"""Callbacks that tests inject through the CLI (``--trainer.callbacks+=tests.support.callbacks.X``)."""

import os

import lightning as L


class KillAt(L.Callback):
    """Kills the process without any clean-up (as SIGKILL would) at a given epoch and batch."""

    def __init__(self, epoch: int = 1, batch: int = 1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os._exit(137)
