"""The Lightning side of the ``pedlightning`` command: :class:`PedLightningCLI` for fit/validate/test/predict.

Kept apart from :mod:`pedlightning.cli` so that the tools, ``--version``, ``--help`` and config errors found
before parsing never import Lightning or torch.
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

# Imported for their subclasses: jsonargparse resolves `--model ReIDModule` / `--data ReIDDataModule` by short
# name only among subclasses that are already imported.
import pedlightning.data.datamodules  # noqa: F401
import pedlightning.tasks  # noqa: F401
from pedlightning.callbacks.checkpoint import RunCheckpoint
from pedlightning.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from pedlightning.errors import CheckpointError, ConfigError

__all__ = ["PedLightningCLI", "RunConfigSaver", "find_last_checkpoint", "quiet_known_noise", "run"]

_ROOT_PLACEHOLDER = "<default_root_dir>"
# Checkpoint hyper-parameter entries that are Lightning's bookkeeping, not model arguments.
_BOOKKEEPING_KEYS = ("_class_path", "_instantiator")

# Known messages that say nothing about the user's run (Lightning 2.6 / torch 2.13 / jsonargparse 4.53).
_NOISY_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # lightning/pytorch/utilities/_pytree.py vs torch 2.13
)
_NOISY_LOG_PREFIXES = (
    "💡 Tip: For seamless cloud logging",  # Lightning's logger connector advertises litlogger on every run
    "`weights_only` was not set",  # Lightning's checkpoint connector, on every save
)


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISY_LOG_PREFIXES)


def quiet_known_noise() -> None:
    """Filter the known, uninformative messages above by their text, nothing else (idempotent)."""
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, _DropKnownNoise) for f in target.filters):
                target.addFilter(_DropKnownNoise())


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config of a ``fit`` run as ``<default_root_dir>/config.yaml``, beside ``checkpoints/``.

    ``pedlightning test --config <run>/config.yaml --ckpt_path <ckpt>`` then reproduces the run's test numbers.
    Only ``fit`` writes it, so a later ``test`` with that file never overwrites it.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        path = os.path.join(trainer.default_root_dir, self.config_filename)
        self.parser.save(self.config, path, skip_unset=False, overwrite=True, multifile=False)


class FlopsFreeModelSummary(ModelSummary):
    """Lightning's model summary without the FLOPs column and "Total FLOPs" line when nothing was counted.

    Lightning counts FLOPs only with a model's ``example_input_array``; without one every entry reads 0. Also
    used instead of the RichModelSummary Lightning pairs with a RichProgressBar, whose FLOPs rows are fixed.
    """

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

        if total_flops:
            ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                   total_training_modes, total_flops, **summarize_kwargs)
            return
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        rank_zero_info("\n" + table.rsplit("\n", 1)[0])


def _default_logger() -> dict:
    """TensorBoard when installed, CSV otherwise; ``save_dir`` follows ``trainer.default_root_dir``."""
    try:
        import tensorboard  # noqa: F401

        logger = "lightning.pytorch.loggers.TensorBoardLogger"
    except ImportError:
        logger = "lightning.pytorch.loggers.CSVLogger"
    return {"logger": {"class_path": logger, "init_args": {"save_dir": _ROOT_PLACEHOLDER, "name": "logs"}}}


def find_last_checkpoint(directory: str) -> str | None:
    """The newest ``last*.ckpt`` in ``directory`` (``last.ckpt``, ``last-v1.ckpt``), as Lightning picks it."""
    found = [p for p in glob.glob(os.path.join(glob.escape(directory), "last*.ckpt")) if os.path.isfile(p)]
    return max(found, key=os.path.getmtime) if found else None


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _plain(value: Any) -> Any:
    """Namespaces / tuples as the dicts / lists a checkpoint's hyper-parameters hold."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if k != "__path__"}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _effective(given: Any, effective: Any) -> Any:
    """The part of ``given`` (explicit values) that the effective config kept: a config that gives a whole
    dataclass block (``encoder: {...}``) replaces the block of an earlier config, while a parse without defaults
    merges them, so an explicit value counts only where the effective config holds it. ``None`` when none."""
    if isinstance(given, dict) and isinstance(effective, dict):
        kept = {k: _effective(v, effective[k]) for k, v in given.items() if k in effective}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None
    return effective if given == effective else None


def _differences(given: Any, stored: Any, key: str) -> list[tuple[str, Any, Any]]:
    """``(key, given, stored)`` for each leaf the user gave that differs from the checkpoint. ``None`` given means
    "not set" (e.g. ``num_classes: null``, filled from the data), never a difference."""
    if given is None:
        return []
    if isinstance(given, dict) and isinstance(stored, dict):
        return [d for k, v in given.items() for d in _differences(v, stored.get(k), f"{key}.{k}")]
    return [] if given == stored else [(key, given, stored)]


class PedLightningCLI(LightningCLI):
    """LightningCLI in subclass mode for any LightningModule / LightningDataModule.

    * A ``checkpoint`` group (a :class:`RunCheckpoint` whose ``dirpath`` is always
      ``<default_root_dir>/checkpoints``, so ``--ckpt_path last`` finds the last checkpoint after a restart).
    * ``--ckpt_path``: ``last`` is looked up in that directory (``fit`` with none starts fresh and says so;
      validate/test/predict with none is an error naming the directory); the file is checked before anything is
      built (:func:`~pedlightning.checkpoint_io.read_checkpoint`); a checkpoint of another LightningModule class
      than the config's is an error; the model is built from the checkpoint's hyper-parameters, except the
      model class's ``test_time_options`` (e.g. reID ``rerank``), which the config / command line set; any other
      model argument the config or command line gives that differs from the checkpoint's is an error.
    * Checkpoints are written atomically (:class:`~pedlightning.checkpoint_io.AtomicCheckpointIO`, unless the
      trainer has its own CheckpointIO plugin); ``fit`` with a logger logs the lr of every step
      (LearningRateMonitor); the model summary drops its FLOPs entries when none were counted.
    * Lightning's automatic DistributedSampler is off: pedlightning datamodules shard data themselves (identity
      samplers, padded evaluation). The logger's ``save_dir`` follows ``default_root_dir``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        quiet_known_noise()
        kwargs["trainer_defaults"] = {**_default_logger(), **(kwargs.get("trainer_defaults") or {})}
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "trainer.use_distributed_sampler": False,
                             "trainer.default_root_dir": "runs/default"})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath",
                              compute_fn=lambda root: os.path.join(root, "checkpoints"))

    def parse_arguments(self, parser, args) -> None:
        self._given_args = args
        super().parse_arguments(parser, args)

    # ----------------------------------------------------------------- --ckpt_path
    def _parse_ckpt_path(self) -> None:
        """Resolve and check ``--ckpt_path`` and build the model from the checkpoint (see the class docstring);
        replaces Lightning's version, which loads the whole checkpoint and lets its hyper-parameters silently win
        over everything the user gave."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
            return
        if ckpt_path == "last":
            directory = config.checkpoint.dirpath
            found = find_last_checkpoint(directory)
            if found is None:
                if subcommand == "fit":
                    rank_zero_info(f"--ckpt_path last: no checkpoint in {directory} yet: starting a fresh run")
                    config.ckpt_path = None
                    return
                raise CheckpointError(
                    f"--ckpt_path last: no last checkpoint (last*.ckpt) in {directory}, the checkpoint directory of "
                    f"trainer.default_root_dir={config.trainer.default_root_dir}; nothing to {subcommand}. Pass "
                    "the checkpoint file, or the default_root_dir of the run that wrote it")
            config.ckpt_path = ckpt_path = found
        hparams = dict(read_checkpoint(ckpt_path, what="--ckpt_path").get("hyper_parameters") or {})
        if not any(k not in _BOOKKEEPING_KEYS for k in hparams):
            return
        model = self._model_from_checkpoint(subcommand, str(ckpt_path), hparams)
        try:
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        except SystemExit:
            raise CheckpointError(f"the hyper-parameters in {ckpt_path} do not fit {model['class_path']} "
                                  "(see the message above)") from None

    def _model_from_checkpoint(self, subcommand: str, ckpt_path: str, hparams: dict[str, Any]) -> dict[str, Any]:
        configured = self.config[subcommand].get("model")
        config_class_path = configured.get("class_path") if isinstance(configured, Namespace) else None
        class_path = hparams.pop("_class_path", None) or config_class_path
        hparams.pop("_instantiator", None)
        if class_path is None:
            raise ConfigError(f"{ckpt_path} does not say which LightningModule wrote it: pass the model's class, "
                              "e.g. --model ReIDModule (or the run's --config)")
        try:
            cls = _import_class(class_path)
        except (ImportError, AttributeError) as err:
            raise CheckpointError(f"{ckpt_path} holds a checkpoint of {class_path}, which cannot be imported: "
                                  f"{err}") from None
        if config_class_path is not None:
            config_cls = _import_class(config_class_path)
            if config_cls is not cls:
                raise CheckpointError(f"{ckpt_path} holds a {cls.__name__} checkpoint but the config's model is "
                                      f"{config_cls.__name__}")
        options = tuple(getattr(cls, "test_time_options", ()))
        init_args = configured.get("init_args") if isinstance(configured, Namespace) else None
        given = _effective(self._given_model_args(subcommand), _plain(init_args) if init_args else {}) or {}
        conflicts = []
        for key, value in given.items():
            if key not in hparams:
                continue  # not stored in the checkpoint (e.g. the optimizer): the config's value stands
            if key in options:
                hparams[key] = value
            else:
                conflicts += _differences(value, hparams[key], key)
        if conflicts:
            lines = "\n".join(f"  model.init_args.{k}: {g!r} given, {s!r} in the checkpoint" for k, g, s in conflicts)
            changeable = ", ".join(options) if options else "none for this model"
            raise ConfigError(
                f"{ckpt_path} was trained with other model arguments than the config / command line give:\n{lines}\n"
                f"A checkpoint's model is fixed; only evaluation options can change ({changeable}). Drop these "
                "arguments, or use the run's own config.yaml")
        return {"class_path": class_path, "init_args": hparams}

    def _given_model_args(self, subcommand: str) -> dict[str, Any]:
        """The model init args given explicitly (config files and command line), without defaults."""
        args = self._given_args
        if isinstance(args, (dict, Namespace)):
            given = self.parser.parse_object(args, defaults=False)
        else:
            given = self.parser.parse_args(args, defaults=False)
        model = given.get(subcommand, Namespace()).get("model") if subcommand in given else None
        init_args = model.get("init_args") if isinstance(model, Namespace) else None
        return _plain(init_args) if init_args is not None else {}

    # ----------------------------------------------------------------- instantiation
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        root = config.trainer.default_root_dir
        if hasattr(logger, "init_args") and logger.init_args.get("save_dir") == _ROOT_PLACEHOLDER:
            logger.init_args.save_dir = root

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        extra = []
        if (self.subcommand == "fit" and config.get("logger") not in (False, [])
                and not any(isinstance(c, LearningRateMonitor) for c in callbacks)):
            extra.append(LearningRateMonitor(logging_interval="step"))
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            extra.append(FlopsFreeModelSummary())
        if extra:
            kwargs.setdefault("callbacks", [*callbacks, *extra])
        return super().instantiate_trainer(**kwargs)


def run(args: list[str] | None = None) -> None:
    """``pedlightning fit|validate|test|predict ...``: the CLI in subclass mode for any module and datamodule."""
    PedLightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    save_config_callback=RunConfigSaver, save_config_kwargs={"overwrite": True},
                    auto_configure_optimizers=False, args=args)
