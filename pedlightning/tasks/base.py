"""The base of every pedlightning LightningModule: optimizer, schedules in optimizer steps, the data contract."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from pedlightning.data.spec import DataSpec, SpecifiedData
from pedlightning.errors import ConfigError
from pedlightning.models.encoders import ImageEncoder, ImageEncoderConfig, warn_if_untrained
from pedlightning.optim import (
    DEFAULT_NO_DECAY_NAMES,
    Schedule,
    apply_lr_factors,
    build_scheduler,
    check_schedule,
    param_groups,
)


def encoder_config(value: ImageEncoderConfig | dict) -> ImageEncoderConfig:
    """An :class:`ImageEncoderConfig` from itself or from its dict (checkpoint hyper-parameters store dicts)."""
    return value if isinstance(value, ImageEncoderConfig) else ImageEncoderConfig(**value)


class TaskModule(L.LightningModule):
    """What every task shares: optimisation, step-based schedules and the datamodule contract.

    Schedules (warm-up, cosine or step decay, every ramp of a task) are functions of the optimizer step, computed
    from the run's total number of optimizer steps (:attr:`total_steps`); :meth:`epochs_to_steps` converts a length
    given in epochs with the run's real steps per epoch, so a run bounded by ``trainer.max_steps`` (``max_epochs``
    unset) warms up, peaks at the base lr and decays like one bounded by epochs. Every parameter group follows
    the same schedule, each from its own initial lr (base lr x its lr factor).

    Weight decay has one source, ``weight_decay`` here: it sets every parameter group's decay. An optimizer
    given another ``weight_decay`` in its own arguments is a :class:`ConfigError` (a value equal to the default
    of the optimizer class, or of the task's default optimizer, cannot be told from an unset one and is ignored).

    Args:
        optimizer: a callable that takes parameter groups and returns an optimizer
            (YAML: ``optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 3.5e-4}}``); its ``lr`` is the
            base lr.
        weight_decay: the weight decay of every decayed parameter (see ``no_decay_names``, ``decay_1d_params``).
        lr_schedule: ``cosine`` (warm-up then cosine decay to ``min_lr_ratio``), ``constant`` (warm-up then
            flat) or ``step`` (warm-up, then x ``lr_gamma`` at each of ``lr_milestones_epochs``).
        warmup_epochs: linear warm-up length in epochs (fractions allowed); stepped per optimizer step.
        min_lr_ratio: final lr of the cosine schedule as a fraction of each group's initial lr.
        warmup_start_factor: the warm-up starts at this fraction of the base lr (0: from ~0; Bag of Tricks and
            TransReID: 0.01; IRRA: 0.1). See :func:`pedlightning.optim.schedule_factor`.
        lr_milestones_epochs: epochs at which ``lr_schedule: step`` multiplies the lr by ``lr_gamma``
            (Bag of Tricks: [40, 70]).
        lr_gamma: decay factor of the step schedule (0.1).
        lr_multipliers: parameter-name pattern -> lr factor (fnmatch pattern or dotted prefix, first match wins,
            replaces ``bias_lr_factor``), e.g. ``{classifier: 5.0}`` for IRRA's new layers; a pattern matching
            no trainable parameter is a ConfigError.
        bias_lr_factor: lr factor of biases (TransReID and IRRA: 2).
        no_decay_names: parameter-name patterns without weight decay (default: biases, ViT position / class /
            mask tokens, as timm and MAE); ``[]`` with ``decay_1d_params: true`` decays every parameter
            (TransReID, Bag of Tricks).
        decay_1d_params: also decay parameters of at most one dimension (norm weights, biases); off by default,
            so norms are not decayed (timm, MAE).

    ``test_time_options`` names the constructor arguments that only change evaluation (features, metric); the
    CLI lets those be overridden when validating / testing / predicting from a checkpoint, every other model
    argument comes from the checkpoint.

    When training starts (``on_train_start``, fit only), every encoder the task's recipe starts from pre-trained
    weights (:meth:`recipe_pretrained_encoders`) that has none, is not a tiny preset and trains on real data gets a
    loud warning (:func:`~pedlightning.models.encoders.warn_if_untrained`): a ViT-B or ResNet-50 trained from
    scratch on a reID-sized dataset lands far below the published numbers. Pre-training tasks name the encoders
    they train from scratch by design in ``from_scratch_encoders``.
    """

    #: evaluation-only constructor arguments, which a checkpoint run may override (see the class docstring).
    test_time_options: ClassVar[tuple[str, ...]] = ()
    #: hyper-parameters holding an encoder config (image or text), checked for pre-trained weights at fit.
    encoder_keys: ClassVar[tuple[str, ...]] = ("encoder", "image_encoder", "text_encoder")
    #: the ``encoder_keys`` this task's recipe trains from random weights on purpose (no warning for them).
    from_scratch_encoders: ClassVar[tuple[str, ...]] = ()

    def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW, weight_decay: float = 0.05,
                 lr_schedule: Schedule = "cosine", warmup_epochs: float = 0.0, min_lr_ratio: float = 0.01, *,
                 warmup_start_factor: float = 0.0, lr_milestones_epochs: Sequence[float] = (),
                 lr_gamma: float = 0.1, lr_multipliers: dict[str, float] | None = None, bias_lr_factor: float = 1.0,
                 no_decay_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES, decay_1d_params: bool = False):
        super().__init__()
        check_schedule(lr_schedule, warmup_start_factor, min_lr_ratio, lr_milestones_epochs, lr_gamma,
                       type(self).__name__)
        if weight_decay < 0:
            raise ConfigError(f"{type(self).__name__}: model.init_args.weight_decay must be >= 0, got {weight_decay}")
        self.optimizer_factory = optimizer
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.warmup_epochs = warmup_epochs
        self.min_lr_ratio = min_lr_ratio
        self.warmup_start_factor = warmup_start_factor
        self.lr_milestones_epochs = tuple(lr_milestones_epochs)
        self.lr_gamma = lr_gamma
        self.lr_multipliers = dict(lr_multipliers or {})
        self.bias_lr_factor = bias_lr_factor
        self.no_decay_names = tuple(no_decay_names)
        self.decay_1d_params = decay_1d_params
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

    # ----------------------------------------------------------------- training from scratch by mistake
    @property
    def data_is_synthetic(self) -> bool:
        """Whether the attached datamodule writes built-in synthetic data (its ``synthesize`` option).

        Assumption: ``synthesize: true`` means synthetic data (it only writes when ``root`` is empty, so a root
        that already holds the real dataset reads as synthetic too: no warning, never a false one).
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return bool(getattr(datamodule, "hparams", {}).get("synthesize", False))

    def recipe_pretrained_encoders(self) -> list[tuple[str, Any]]:
        """``(role, config)`` of every encoder this task's recipe starts from pre-trained weights: each
        ``encoder_keys`` hyper-parameter this task has, less ``from_scratch_encoders``. A subclass whose weights
        come from elsewhere (e.g. another run's model, copied in ``setup``) overrides it."""
        hp = self.hparams
        return [(key, hp[key]) for key in self.encoder_keys
                if key not in self.from_scratch_encoders and hp.get(key) is not None]

    def warn_untrained_encoders(self) -> list[str]:
        """Warn (rank zero, once per model, data and role) for each recipe encoder that real data would train from
        random weights; returns the roles warned about now. Silent without a pedlightning datamodule (nothing
        says which data it is)."""
        spec = self.data_spec
        if spec is None:
            return []
        synthetic = self.data_is_synthetic
        return [role for role, config in self.recipe_pretrained_encoders()
                if warn_if_untrained(config, spec.source, synthetic=synthetic, role=role)]

    def size_from_data(self, stage: str) -> None:
        """Build the parts the data sizes (a classifier over its identities or attributes) that the configuration
        leaves unsized; idempotent (a built part is checked against the data instead). Tasks with such parts
        override it and call it from ``setup``."""

    def configure_model(self) -> None:
        """:meth:`size_from_data`, so that a callback copying the model in its own ``setup`` copies the data-sized
        parts too: Lightning sets callbacks up before the LightningModule, and its ``EMAWeightAveraging`` (any
        ``WeightAveraging``) calls this hook before it copies."""
        if self._trainer is not None:
            fn = self.trainer.state.fn
            self.size_from_data(fn.value if fn is not None else "fit")

    def on_train_start(self) -> None:
        """The from-scratch warning, once the data is set up; this hook because the tasks' own ``setup`` and
        ``on_fit_start`` do not call the base's."""
        self.warn_untrained_encoders()

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

    def build_param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: weight decay and lr factor per parameter (see the class docstring)."""
        return param_groups(self.optimized_modules(), self.weight_decay, self.no_decay_names, self.decay_1d_params,
                            self.lr_multipliers, self.bias_lr_factor)

    def check_optimizer_weight_decay(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's own ``weight_decay`` must not contradict ``weight_decay`` (the one that is used)."""
        given = optimizer.defaults.get("weight_decay")
        if given is None or math.isclose(given, self.weight_decay, rel_tol=1e-9, abs_tol=0.0):
            return
        defaults = {_weight_decay_default(type(optimizer))}
        task_default = inspect.signature(type(self).__init__).parameters.get("optimizer")
        if task_default is not None and isinstance(task_default.default, type):
            defaults.add(_weight_decay_default(task_default.default))
        if given in defaults:
            return
        raise ConfigError(f"{type(self).__name__}: optimizer.init_args.weight_decay={given} contradicts "
                          f"model.init_args.weight_decay={self.weight_decay}; the model's value sets the weight decay "
                          "of every parameter group: set it there and leave it out of optimizer.init_args")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.build_param_groups())
        self.check_optimizer_weight_decay(optimizer)
        apply_lr_factors(optimizer)
        total = self.total_steps
        warmup = int(round(self.epochs_to_steps(self.warmup_epochs)))
        if warmup >= total:
            rank_zero_warn(f"{type(self).__name__}: warm-up ({warmup} optimizer steps) is not shorter than the run "
                           f"({total} steps): the lr never reaches its base value")
        milestones = [int(round(self.epochs_to_steps(m))) for m in self.lr_milestones_epochs]
        scheduler = build_scheduler(optimizer, warmup, total, self.min_lr_ratio, self.lr_schedule,
                                    self.warmup_start_factor, milestones, self.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _weight_decay_default(optimizer_class: type) -> float | None:
    """The default ``weight_decay`` of an optimizer class (None when it has no such argument)."""
    try:
        parameter = inspect.signature(optimizer_class).parameters.get("weight_decay")
    except (TypeError, ValueError):
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
