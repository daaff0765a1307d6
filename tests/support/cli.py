"""Running ``pedlightning`` in-process as a user would: a config's resolved form, fit with an overlay, test from
the config the fit saved."""

import os
from pathlib import Path

import pytest
import yaml

from pedlightning.cli import main
from tests.support.results import logged_test_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository root: ``configs/`` lies below it."""


def resolved_config(capsys: pytest.CaptureFixture, config: str) -> dict:
    """What ``pedlightning fit --config <config> --print_config`` prints, parsed; the command must exit 0."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def fit_with_overlay(config: str, overlay: dict, run: Path) -> Path:
    """``pedlightning fit --config <config> --config <overlay>`` into the folder ``run`` (the overlay written beside
    it as ``<run>_overlay.yaml``); the run's last checkpoint."""
    path = run.with_name(run.name + "_overlay.yaml")
    path.write_text(yaml.safe_dump(overlay))
    main(["fit", "--config", config, "--config", str(path), f"--trainer.default_root_dir={run}"])
    return run / "checkpoints" / "last.ckpt"


def logged_test_run(run: Path, ckpt: Path) -> dict[str, float]:
    """``pedlightning test`` of ``ckpt`` with the config the fit saved in ``run``, logging CSV to ``run/csv``; the
    ``test/*`` values it logged."""
    main(["test", "--config", str(run / "config.yaml"), f"--ckpt_path={ckpt}",
          "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={run / 'csv'}"])
    return logged_test_metrics(run / "csv")
