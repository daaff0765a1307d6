"""The base of every pedlightning LightningModule: optimizer, schedules in optimizer steps, the data contract."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from pedlightning.data.spec import DataSpec, SpecifiedData
from pedlightning.errors import ConfigError
from pedlightning.models.encoders import ImageEncoder, ImageEncoderConfig
from pedlightning.optim import Schedule, build_scheduler, param_groups


def encoder_config(value: ImageEncoderConfig | dict) -> ImageEncoderConfig:
    """An :class:`ImageEncoderConfig` from itself or from its dict (checkpoint hyper-parameters store dicts)."""
    return value if isinstance(value, ImageEncoderConfig) else ImageEncoderConfig(**value)


class TaskModule(L.LightningModule):
    """What every task shares: optimisation, step-based schedules and the datamodule contract.

    Schedules (warm-up, cosine decay, every ramp of a task) are functions of the optimizer step, computed from the
    run's total number of optimizer steps (:attr:`total_steps`); :meth:`epochs_to_steps` converts a length given in
    epochs with the run's real steps per epoch, so a run bounded by ``trainer.max_steps`` (``max_epochs`` unset)
    warms up, peaks at the base lr and decays like one bounded by epochs.

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
        self._total_steps: int | None = None

    def save_hyperparameters(self, *args: Any, ignore: Any = None, frame: Any = None, logger: bool = True) -> None:
        """Lightning's, with dataclass arguments (encoder configs) stored as plain dicts.

        Checkpoints re-read hyper-parameters with ``weights_only=True``, which admits plain types only.
        """
        super().save_hyperparameters(*args, ignore=ignore, frame=frame or inspect.currentframe().f_back,
                                     logger=logger)
        for key, value in list(self.hparams.items()):
            if is_dataclass(value) and not isinstance(value, type):
                self.hparams[key] = asdict(value)

    @staticmethod
    def build_image_encoder(config: ImageEncoderConfig | dict, **overrides: Any) -> ImageEncoder:
        """The one way a task builds its image encoder (``overrides`` e.g. ``drop_path_rate=0`` for a teacher)."""
        return ImageEncoder.from_config(encoder_config(config), **overrides)

    # ----------------------------------------------------------------- the data contract
    @property
    def data_spec(self) -> DataSpec | None:
        """The attached datamodule's :class:`DataSpec`; None without a trainer or with a plain datamodule."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return datamodule.data_spec() if isinstance(datamodule, SpecifiedData) else None

    def count_from_data(self, name: str, current: int | None, build: Callable[[int], None], check: bool = True,
                        hint: str = "") -> None:
        """A count the model is sized by (``num_classes``, ``num_attributes``): taken from the data when the model
        has none (``build(n)``), else checked against the data when ``check``."""
        spec, task = self.data_spec, type(self).__name__
        if current is None:
            if spec is None:
                raise ConfigError(f"{task} needs {name}: pass model.init_args.{name}{hint}, or use a pedlightning "
                                  "datamodule (its data states it)")
            build(spec.require(name, task))
        elif check and spec is not None:
            spec.check_equal(name, current, task)

    def check_image_size(self, spec: DataSpec, config: ImageEncoderConfig | dict) -> None:
        """The encoder's input size must be the size the data yields."""
        spec.check_equal("img_size", encoder_config(config).img_size, type(self).__name__)

    # ----------------------------------------------------------------- schedules in optimizer steps
    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (fixed at first use, so a resumed run gets the same value)."""
        if self._trainer is None:
            return 1
        if self._total_steps is None:
            total = self.trainer.estimated_stepping_batches
            if total <= 0 or math.isinf(total):
                raise ConfigError("the run's length in optimizer steps is unknown (a training loader without a "
                                  "length and no trainer.max_steps): set trainer.max_steps")
            self._total_steps = int(total)
        return self._total_steps

    def steps_per_epoch(self) -> float:
        """Optimizer steps per training epoch (after ``limit_train_batches`` and gradient accumulation)."""
        trainer = self.trainer
        if trainer.train_dataloader is None:  # a max_steps run: Lightning has not loaded it yet
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if math.isinf(batches) or batches <= 0:
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
            if epochs is None:
                raise ConfigError("a length in epochs needs the training loader's length or trainer.max_epochs")
            return self.total_steps / epochs
        return math.ceil(batches / trainer.accumulate_grad_batches)

    def epochs_to_steps(self, epochs: float) -> float:
        """A length in epochs (fractions allowed) as optimizer steps of this run (fractional: ramps stay exact)."""
        return epochs * self.steps_per_epoch() if epochs > 0 else 0.0

    def optimized_modules(self) -> torch.nn.Module:
        """The parameters the optimizer updates; subclasses exclude frozen teachers here."""
        return self

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(param_groups(self.optimized_modules(), self.weight_decay))
        total = self.total_steps
        warmup = int(round(self.epochs_to_steps(self.warmup_epochs)))
        if warmup >= total:
            rank_zero_warn(f"{type(self).__name__}: warm-up ({warmup} optimizer steps) is not shorter than the run "
                           f"({total} steps): the lr never reaches its base value")
        scheduler = build_scheduler(optimizer, warmup, total, self.min_lr_ratio, self.lr_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
