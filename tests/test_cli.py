"""The pedlightning command end to end: configs, resume after a kill, test from the saved config, errors, DDP.

Runs in this process (``run_cli`` / ``PedLightningCLI``) where that tests the same thing; a kill and DDP need real
processes."""

import csv
import glob
import os
import subprocess
import sys

import pytest
import torch

from pedlightning.cli import PedLightningCLI, RunConfigSaver, run_cli
from pedlightning.data.samplers import IdentityBatchSampler
from pedlightning.data.sources import DukeMTMC, Market1501

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs/demo/reid_market_synthetic.yaml")
TINY = os.path.join(REPO, "tests/support/tiny_reid.yaml")
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


def _run_args(tmp_path, data_root, *extra):
    return ["--config", DEMO, "--config", TINY, f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--data.init_args.root={data_root}", *extra]


def _cli(subcommand, args):
    import lightning as L

    return PedLightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           save_config_callback=RunConfigSaver, save_config_kwargs={"overwrite": True},
                           auto_configure_optimizers=False, args=[subcommand, *args])


def _pedlightning(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pedlightning.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(REPO, "configs/**/*.yaml"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, REPO))
def test_every_config_parses(config, capsys):
    assert run_cli(["fit", "--config", config, "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "class_path" in printed and "trainer:" in printed


def test_fit_then_test_from_saved_config_reproduces_numbers(tmp_path, synthetic_market):
    csv_logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}/csv",
                  "--trainer.log_every_n_steps=1"]
    fit = _cli("fit", _run_args(tmp_path, synthetic_market, *csv_logger))
    run = tmp_path / "run"
    # The lr of every optimizer step is logged (LearningRateMonitor, a CLI default when a logger exists).
    with open(glob.glob(f"{tmp_path}/csv/*/version_*/metrics.csv")[0]) as file:
        rows = list(csv.DictReader(file))
    lrs = [float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")]  # pg1: weights; pg2: no decay
    assert len(lrs) == fit.trainer.global_step  # warm-up to the demo's lr, then cosine decay
    assert lrs[0] < lrs[1] and max(lrs) == pytest.approx(0.003) and lrs[-1] < max(lrs)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    ckpt = str(run / "checkpoints" / "last.ckpt")
    first = _cli("test", ["--config", DEMO, "--config", TINY, f"--trainer.default_root_dir={run}",
                          f"--data.init_args.root={synthetic_market}", f"--ckpt_path={ckpt}"])
    again = _cli("test", ["--config", str(run / "config.yaml"), f"--ckpt_path={ckpt}"])
    a = {k: float(v) for k, v in first.trainer.callback_metrics.items() if k.startswith("test/")}
    b = {k: float(v) for k, v in again.trainer.callback_metrics.items() if k.startswith("test/")}
    assert set(a) >= {"test/mAP", "test/rank1", "test/rank5", "test/rank10", "test/mINP", "test/chance_mAP"}
    assert a == b
    assert 0 < a["test/mAP"] <= 1 and 0 < a["test/chance_mAP"] < 1
    # The classifier width came from the datamodule and was stored for checkpoint reloads.
    assert fit.model.hparams.num_classes == 16 == torch.load(ckpt, weights_only=True)["hyper_parameters"]["num_classes"]
    # Rank lists were drawn at test time.
    assert sorted(os.listdir(run / "ranklists")) == ["ranklist_000.png"]


def test_killed_run_resumes_from_last(tmp_path, synthetic_market):
    args = _run_args(tmp_path, synthetic_market, "--trainer.max_epochs=3", "--trainer.check_val_every_n_epoch=10")
    killed = _pedlightning("fit", *args, "--trainer.callbacks+=tests.support.callbacks.KillAt",
                           "--trainer.callbacks.init_args.epoch=1", "--trainer.callbacks.init_args.batch=1")
    assert killed.returncode == 137, killed.stderr[-2000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0  # saved at the end of epoch 0, killed inside epoch 1
    steps_per_epoch = state["global_step"]
    resumed = _pedlightning("fit", *args, "--ckpt_path=last", "--trainer.enable_model_summary=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    printed = resumed.stdout + resumed.stderr
    assert "Restored all states from the checkpoint" in printed and "Total params" in printed
    for noise in ("💡 Tip", "LeafSpec", "FLOPs", "Traceback"):  # known noise is filtered, narrowly
        assert noise not in printed, noise
    final = torch.load(last, weights_only=True)
    assert final["epoch"] == 2 and final["global_step"] == 3 * steps_per_epoch
    # The per-step lr schedule continued where it stopped: it ends at min_lr_ratio of the base lr.
    sched = final["lr_schedulers"][0]
    assert sched["last_epoch"] == 3 * steps_per_epoch
    assert sched["_last_lr"][0] == pytest.approx(0.003 * 0.01, rel=1e-6)  # base lr of the demo config


def test_unknown_key_is_a_clear_error(capsys):
    assert run_cli(["fit", "--config", DEMO, "--model.init_args.no_such_knob=3"]) == 2
    assert "no_such_knob" in capsys.readouterr().err


def test_missing_dataset_root_is_a_clear_error_without_traceback(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert run_cli(["fit", *_run_args(tmp_path, missing, "--data.init_args.synthesize=false")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "synthesize: true" in err
    assert "Traceback" not in err and err.startswith("pedlightning: error: ")


def _printed_results(result) -> dict[str, float]:
    line = next(ln for ln in (result.stdout + result.stderr).splitlines() if "reID test: " in ln)
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split("reID test: ")[1].split(", "))}


def test_ddp_and_bf16_without_code_changes(tmp_path, synthetic_market):
    """Two CPU processes (gloo) train with bf16-mixed; a 2-process test gives the single-process numbers."""
    args = _run_args(tmp_path, synthetic_market, "--trainer.max_epochs=1")
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2"]
    fit = _pedlightning("fit", *args, *ddp, "--trainer.precision=bf16-mixed")
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    single_rank_batches = len(IdentityBatchSampler([r.pid for r in Market1501(synthetic_market).train], 16, 4))
    assert torch.load(ckpt, weights_only=True)["global_step"] == single_rank_batches // 2
    two = _printed_results(_pedlightning("test", *args, *ddp, f"--ckpt_path={ckpt}"))
    one = _printed_results(_pedlightning("test", *args, f"--ckpt_path={ckpt}"))
    assert two == one and two["mAP"] > 0


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(REPO, "configs/reid/*.yaml"))),
                         ids=os.path.basename)
def test_real_data_reid_configs_run(config, tmp_path):
    """Each paper-scale config runs as written, with only the data root and the model size shrunk for CPU."""
    dataset = "msmt17" if "msmt17" in config else "occluded_duke" if "occduke" in config else "market1501"
    tiny = "resnet_tiny_test" if "_r50" in config else "vit_tiny_test"
    fit = _cli("fit", ["--config", config, f"--trainer.default_root_dir={tmp_path}/run", "--trainer.max_steps=2",
                       "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
                       "--trainer.precision=32-true", f"--model.init_args.encoder.name={tiny}",
                       f"--data.init_args.root={tmp_path}/{dataset}", "--data.init_args.synthesize=true",
                       "--data.init_args.synthetic={num_train_ids: 8, num_test_ids: 6}",
                       "--data.init_args.num_workers=0", "--data.init_args.batch_size=16"])
    assert fit.trainer.global_step == 2
    assert fit.model.hparams.num_classes == 8 and fit.datamodule.hparams.dataset == dataset


def test_synth_tool_writes_a_dataset_the_parser_reads(tmp_path):
    root = tmp_path / "duke"
    assert run_cli(["synth", "dukemtmc", "--root", str(root), "--num-train-ids", "5", "--num-test-ids", "4",
                    "--seed", "3"]) == 0
    assert len(os.listdir(root / "bounding_box_train")) == 5 * 6
    assert DukeMTMC(str(root)).num_train_pids == 5
    assert run_cli(["synth", "dukemtmc", "--root", str(root)]) == 2  # refuses to overwrite: loses nothing
