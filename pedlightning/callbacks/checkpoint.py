"""RunCheckpoint: ModelCheckpoint whose ``last.ckpt`` is fresh after every training epoch and after a Ctrl-C."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from pedlightning.data.resumable import resumable_batches


class RunCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoints by ``monitor`` as ModelCheckpoint does, refreshes ``last.ckpt`` at the end of
    every training epoch, and writes it when a single-process run is interrupted (Ctrl-C), so
    ``--ckpt_path last`` continues at the batch where the run stopped.

    Lightning 2.6 refreshes ``last`` only together with a top-k save, so with a monitored validation metric and
    ``check_val_every_n_epoch > 1`` a killed run had nothing recent to resume from with ``--ckpt_path last``.

    Ctrl-C during training is deferred to the start of the next training batch: there the previous optimizer step
    and Lightning's loop counters are complete, and the checkpoint resumes exactly (the loops continue at the
    next batch; a training loader built on :class:`~pedlightning.data.resumable.ResumableBatches` skips the
    batches already trained on). A second Ctrl-C stops at once, without saving. A ``KeyboardInterrupt`` raised
    otherwise (no SIGINT handler could be installed, or raised by code) is saved too: most of a step is spent in
    the forward / backward pass, before any weight changes.

    Args:
        save_on_interrupt: write ``last`` on Ctrl-C. Assumption: only in single-process runs; with several
            processes the ranks see the signal at different steps and the save's barrier could hang, so a
            multi-process run resumes from its last epoch-end (or ``every_n_train_steps``) checkpoint.
        *args, **kwargs: as :class:`~lightning.pytorch.callbacks.ModelCheckpoint`.
    """

    def __init__(self, *args: Any, save_on_interrupt: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.save_on_interrupt = save_on_interrupt
        self._interrupt_requested = False
        self._forced_interrupt = False
        self._previous_sigint: Any = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # ----------------------------------------------------------------- exact mid-epoch resume
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._skip_completed_batches(trainer)
        self._interrupt_requested = self._forced_interrupt = False
        if self.save_on_interrupt and trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    @staticmethod
    def _skip_completed_batches(trainer: L.Trainer) -> None:
        """On a mid-epoch resume, make the training loaders start at the first batch not trained on."""
        fit_loop = trainer.fit_loop
        completed = fit_loop.epoch_loop.batch_progress.current.completed
        if not fit_loop.restarting or completed <= 0 or completed >= trainer.num_training_batches:
            return
        loaders = trainer.train_dataloader
        loaders = loaders if isinstance(loaders, (list, tuple)) else (
            list(loaders.values()) if isinstance(loaders, dict) else [loaders])
        batches = [resumable_batches(loader) for loader in loaders]
        if all(b is not None for b in batches):
            for b in batches:
                b.skip_next(completed)
            rank_zero_info(f"Resuming epoch {trainer.current_epoch} at batch {completed}")
        else:
            rank_zero_warn(f"Resuming epoch {trainer.current_epoch} mid-way ({completed} batches done) with a training "
                           "loader that restarts at its first batch (not built on pedlightning.data.resumable."
                           "ResumableBatches): the rest of this epoch repeats batches already trained on")

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._interrupt_requested:
            self._forced_interrupt = True
            self._restore_sigint()
            raise KeyboardInterrupt
        self._interrupt_requested = True
        rank_zero_info("\nInterrupt: saving last.ckpt at the start of the next training batch "
                       "(Ctrl-C again to stop now, without saving)")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._interrupt_requested:
            raise KeyboardInterrupt

    def _restore_sigint(self) -> None:
        """Put back the SIGINT handler found at the start, unless someone replaced ours since (Lightning ignores
        SIGINT while it shuts down after an interrupt)."""
        if self._previous_sigint is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if (isinstance(exception, KeyboardInterrupt) and self.save_on_interrupt and self.save_last
                and not self._forced_interrupt and trainer.world_size == 1 and trainer.state.fn == TrainerFn.FITTING
                and not trainer.sanity_checking and not trainer.fast_dev_run):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            rank_zero_info(f"Interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}: saved "
                           f"{self.last_model_path}; continue with --ckpt_path last")
            return
        super().on_exception(trainer, pl_module, exception)
