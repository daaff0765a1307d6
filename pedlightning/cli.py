"""The ``pedlightning`` command: LightningCLI for fit/validate/test/predict, plus data and export tools."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from pedlightning.callbacks.checkpoint import RunCheckpoint
from pedlightning.errors import PedLightningError

#: ``pedlightning <tool> ...`` sub-commands that are not Lightning runs: name -> "module:function(argv)".
TOOLS: dict[str, str] = {
    "synth": "pedlightning.data.synthetic.__main__:main",
    "make-shards": "pedlightning.tools.make_shards:main",
    "export-encoder": "pedlightning.tools.export_encoder:main",
    "extract": "pedlightning.tools.extract:main",
    "export-onnx": "pedlightning.tools.export_onnx:main",
}


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config of a ``fit`` run as ``<default_root_dir>/config.yaml``, beside ``checkpoints/``.

    ``pedlightning test --config <run>/config.yaml --ckpt_path <ckpt>`` then reproduces the run's test numbers.
    Only ``fit`` writes it, so a later ``test`` with that file never overwrites it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        path = os.path.join(trainer.default_root_dir, self.config_filename)
        self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)


def _default_logger() -> dict:
    """TensorBoard when installed, CSV otherwise; ``save_dir`` follows ``trainer.default_root_dir``."""
    try:
        import tensorboard  # noqa: F401

        logger = "lightning.pytorch.loggers.TensorBoardLogger"
    except ImportError:
        logger = "lightning.pytorch.loggers.CSVLogger"
    return {"logger": {"class_path": logger, "init_args": {"save_dir": _ROOT_PLACEHOLDER, "name": "logs"}}}


_ROOT_PLACEHOLDER = "<default_root_dir>"


class PedLightningCLI(LightningCLI):
    """LightningCLI in subclass mode for any LightningModule / LightningDataModule.

    Adds a ``checkpoint`` group (a :class:`RunCheckpoint` whose ``dirpath`` is always ``<default_root_dir>/checkpoints``,
    so ``--ckpt_path last`` finds the last checkpoint after a restart) and turns off Lightning's automatic
    DistributedSampler: pedlightning datamodules shard data themselves (identity samplers, padded evaluation).
    The logger's ``save_dir`` follows ``default_root_dir`` too.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "trainer.use_distributed_sampler": False,
                             "trainer.default_root_dir": "runs/default"})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath",
                              compute_fn=lambda root: os.path.join(root, "checkpoints"))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        root = config.trainer.default_root_dir
        if hasattr(logger, "init_args") and logger.init_args.get("save_dir") == _ROOT_PLACEHOLDER:
            logger.init_args.save_dir = root


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``pedlightning`` console script. Returns None (a returned CLI object would exit 1)."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in TOOLS:
            module, func = TOOLS[argv[0]].split(":")
            tool: Callable[[list[str]], None] = getattr(importlib.import_module(module), func)
            tool(argv[1:])
            return
        PedLightningCLI(model_class=L.LightningModule, datamodule_class=L.LightningDataModule,
                        subclass_mode_model=True, subclass_mode_data=True, save_config_callback=RunConfigSaver,
                        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                        trainer_defaults=_default_logger(), args=None if args is None else argv)
    except PedLightningError as err:
        print(f"pedlightning: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
