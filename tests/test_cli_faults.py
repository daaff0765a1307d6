"""User errors of the `pedlightning` command give one clear line and exit 2; checkpoints survive full disks and
Ctrl-C; checkpoint evaluation honours evaluation options and refuses other model changes."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch

import pedlightning.data.datamodules.reid as reid_datamodule
from pedlightning import __version__
from pedlightning.cli import RUNS, TOOLS, run_cli
from pedlightning.data.resumable import ResumableBatches
from pedlightning.lightning_cli import PedLightningCLI, RunConfigSaver
from pedlightning.models.encoders import ImageEncoder, ImageEncoderConfig
from pedlightning.tasks import ReIDModule

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs/demo/reid_market_synthetic.yaml")
TINY = os.path.join(REPO, "tests/support/tiny_reid.yaml")
REID_OPTIONS = ("neck_feat", "flip_test", "metric", "rerank", "k1", "k2", "lambda_value")


def _args(root, data_root, *extra):
    return ["--config", DEMO, "--config", TINY, f"--trainer.default_root_dir={root}",
            f"--data.init_args.root={data_root}", "--trainer.enable_progress_bar=false", *extra]


def _cli(subcommand, args, callbacks=()):
    return PedLightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                           subclass_mode_data=True, save_config_callback=RunConfigSaver,
                           save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                           trainer_defaults={"callbacks": list(callbacks)}, args=[subcommand, *args])


def _fails(capsys, argv, *needles):
    """Runs the CLI in-process; asserts exit 2, one `pedlightning: error:` line, no traceback, every needle."""
    rc = run_cli(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err and "Does not validate against any of the Union subtypes" not in err
    assert err.count("pedlightning: error:") == 1, err[-3000:]
    for needle in needles:
        assert needle in err, (needle, err[-3000:])
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_market):
    """A reID run directory after one epoch of the tiny demo recipe (``checkpoints/last.ckpt``)."""
    root = tmp_path_factory.mktemp("trained") / "run"
    argv, sys.argv = sys.argv, ["pedlightning"]
    try:
        assert run_cli(["fit", *_args(root, synthetic_market, "--trainer.max_epochs=1")]) == 0
    finally:
        sys.argv = argv
    return root


@pytest.fixture
def lightning_log():
    """Messages Lightning's own loggers emit (they write to the stderr of import time, beyond capsys)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# ----------------------------------------------------------------- --ckpt_path last with nothing to load
@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_evaluating_last_without_a_checkpoint_names_the_directory(subcommand, tmp_path, synthetic_market, capsys):
    _fails(capsys, [subcommand, *_args(tmp_path / "empty", synthetic_market), "--ckpt_path=last"],
           f"no last checkpoint (last*.ckpt) in {tmp_path / 'empty' / 'checkpoints'}", f"nothing to {subcommand}")


def test_fit_last_without_a_checkpoint_says_it_starts_fresh(tmp_path, synthetic_market, lightning_log):
    root = tmp_path / "fresh"
    assert run_cli(["fit", *_args(root, synthetic_market), "--ckpt_path=last", "--trainer.max_steps=2",
                    "--trainer.limit_val_batches=0", "--checkpoint.monitor=null"]) == 0
    assert any(f"no checkpoint in {root / 'checkpoints'} yet: starting a fresh run" in m for m in lightning_log)
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


# ----------------------------------------------------------------- errors inside a model constructor
def _encoder_state() -> dict:
    return ImageEncoder.from_config(ImageEncoderConfig("resnet_tiny_test", img_size=(64, 32))).model.state_dict()


@pytest.mark.parametrize("problem", ["missing", "unrelated keys", "mismatched shapes"])
def test_pretrained_problems_are_one_clear_error(problem, tmp_path, synthetic_market, capsys):
    path = tmp_path / "weights.pth"
    if problem == "unrelated keys":
        torch.save({"head.fc.weight": torch.zeros(3, 3)}, path)
    elif problem == "mismatched shapes":
        torch.save({k: torch.zeros(*v.shape, 2) for k, v in _encoder_state().items()}, path)
    err = _fails(capsys, ["test", *_args(tmp_path / "run", synthetic_market),
                          f"--model.init_args.encoder.pretrained={path}"], str(path))
    assert ("not found" in err) == (problem == "missing")


# ----------------------------------------------------------------- the checkpoint file itself
def test_checkpoint_of_another_task_is_refused(trained, tmp_path, synthetic_market, capsys):
    state = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    state["hyper_parameters"]["_class_path"] = "pedlightning.tasks.attributes.AttributeModule"
    other = tmp_path / "attributes.ckpt"
    torch.save(state, other)
    _fails(capsys, ["test", *_args(tmp_path / "run", synthetic_market), f"--ckpt_path={other}"],
           f"{other} holds a AttributeModule checkpoint but the config's model is ReIDModule")


def _bad_file(kind, tmp_path, good):
    path = tmp_path / f"{kind.replace(' ', '_')}.ckpt"
    if kind == "random bytes":
        path.write_bytes(bytes(range(7, 250)) * 20)
    elif kind == "truncated zip":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "python object":
        state = torch.load(good, weights_only=True)
        state["when"] = __import__("datetime").timedelta(days=1)  # only full unpickling restores it
        torch.save(state, path)
    elif kind == "plain state dict":
        torch.save(_encoder_state(), path)
    elif kind == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "checkpoint file not found"),
    ("directory", "it is a directory"),
    ("random bytes", "is not a PyTorch checkpoint"),
    ("truncated zip", "is a truncated checkpoint"),
    ("python object", "needs unpickling of datetime.timedelta, refused for safety"),
    ("plain state dict", "is not a Lightning checkpoint (no 'state_dict' entry"),
])
def test_unusable_checkpoint_files_are_named(kind, message, trained, tmp_path, synthetic_market, capsys):
    path = _bad_file(kind, tmp_path, trained / "checkpoints" / "last.ckpt")
    err = _fails(capsys, ["test", *_args(tmp_path / "run", synthetic_market), f"--ckpt_path={path}"],
                 str(path), message)
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err


def test_malformed_yaml_names_the_file(tmp_path, capsys):
    bad = tmp_path / "overlay.yaml"
    bad.write_text("trainer:\n  max_epochs: [1, 2\nmodel: {}\n")
    _fails(capsys, ["fit", "--config", DEMO, "--config", str(bad)], f"--config {bad}: malformed YAML at line 3")
    _fails(capsys, ["fit", "--config", str(tmp_path / "nowhere.yaml")], "nowhere.yaml: no such file")


# ----------------------------------------------------------------- atomic writes
def test_failed_write_keeps_the_previous_last_checkpoint(tmp_path, synthetic_market, monkeypatch, capsys):
    """The disk fills up while epoch 1's checkpoint is written: epoch 0's last.ckpt survives and resumes."""
    root = tmp_path / "run"
    args = ["fit", *_args(root, synthetic_market, "--trainer.max_epochs=2", "--trainer.limit_val_batches=0",
                          "--checkpoint.monitor=null")]
    real_save = torch.save

    def disk_full(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("epoch") == 1 and "last.ckpt" in str(getattr(f, "name", "")):
            f.write(b"PK\x03\x04" + bytes(4096))  # half a zip archive, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full)
    err = _fails(capsys, args, f"Could not write checkpoint {root / 'checkpoints' / 'last.ckpt'}",
                 "No space left on device", "the previous file is unchanged")
    monkeypatch.setattr(torch, "save", real_save)
    last = root / "checkpoints" / "last.ckpt"
    kept = torch.load(last, weights_only=True)
    steps_per_epoch = kept["global_step"]
    assert kept["epoch"] == 0 and steps_per_epoch > 0, err
    assert "last.ckpt" in os.listdir(root / "checkpoints")
    assert not [name for name in os.listdir(root / "checkpoints") if name.endswith(".tmp")]  # none left behind
    assert run_cli(args + ["--ckpt_path=last"]) == 0
    final = torch.load(last, weights_only=True)
    assert final["epoch"] == 1 and final["global_step"] == 2 * steps_per_epoch


# ----------------------------------------------------------------- Ctrl-C
class RecordBatches(L.Callback):
    """The (epoch, batch index, first sample indices) of every completed training batch."""

    def __init__(self):
        self.seen: list[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch_idx, batch["index"].tolist()))


class InterruptAt(L.Callback):
    """Ctrl-C at (epoch, batch): ``sigint`` sends the signal at the end of that batch, ``raise`` raises
    KeyboardInterrupt at its start."""

    def __init__(self, epoch: int, batch: int, how: str):
        self.epoch, self.batch, self.how = epoch, batch, how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.how == "raise" and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.how == "sigint" and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def resumable_reid_batches(monkeypatch):
    """The reID training loader built on ResumableBatches (a no-op once the datamodule does it itself)."""
    build = reid_datamodule.batch_loader

    def batch_loader(dataset, batch_sampler, *args, **kwargs):
        if not isinstance(batch_sampler, ResumableBatches):
            batch_sampler = ResumableBatches(batch_sampler)
        return build(dataset, batch_sampler, *args, **kwargs)

    monkeypatch.setattr(reid_datamodule, "batch_loader", batch_loader)


@pytest.mark.usefixtures("resumable_reid_batches")
def test_ctrl_c_saves_last_and_the_resumed_run_is_the_uninterrupted_one(tmp_path, synthetic_market):
    """Interrupted in epoch 1 and resumed with --ckpt_path last, a run trains on the same batches in the same order
    and ends with the same weights (augmentation off: Lightning checkpoints hold no RNG state)."""
    deterministic = ["--trainer.max_epochs=3", "--trainer.limit_val_batches=0", "--checkpoint.monitor=null",
                     "--data.init_args.flip_prob=0", "--data.init_args.erasing_prob=0", "--data.init_args.padding=0",
                     "--model.init_args.encoder.drop_path_rate=0"]
    reference = RecordBatches()
    _cli("fit", _args(tmp_path / "reference", synthetic_market, *deterministic), [reference])
    expected = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    steps_per_epoch = expected["global_step"] // 3
    assert len({tuple(s[2]) for s in reference.seen}) == len(reference.seen)  # epochs differ in order

    previous_handler = signal.getsignal(signal.SIGINT)
    try:
        for how, stop_after in (("sigint", 2), ("raise", 1)):  # sigint stops at the next batch's start
            root = tmp_path / how
            args = _args(root, synthetic_market, *deterministic)
            record = RecordBatches()
            with pytest.raises(SystemExit) as exit_info:  # Lightning exits 1 after a graceful interrupt
                _cli("fit", args, [record, InterruptAt(epoch=1, batch=1, how=how)])
            assert exit_info.value.code == 1
            saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
            assert saved["epoch"] == 1 and saved["global_step"] == steps_per_epoch + stop_after, how
            _cli("fit", [*args, "--ckpt_path=last"], [record])
            resumed = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
            assert record.seen == reference.seen, how
            assert resumed["global_step"] == expected["global_step"]
            for key, value in expected["state_dict"].items():
                assert torch.allclose(resumed["state_dict"][key].float(), value.float(), atol=1e-6), (how, key)
    finally:
        signal.signal(signal.SIGINT, previous_handler)


# ----------------------------------------------------------------- evaluation options of a checkpoint
def test_test_time_options_take_effect_and_other_model_changes_are_refused(trained, synthetic_market, monkeypatch,
                                                                            capsys):
    if "rerank" not in getattr(ReIDModule, "test_time_options", ()):
        monkeypatch.setattr(ReIDModule, "test_time_options", REID_OPTIONS, raising=False)
    ckpt = f"--ckpt_path={trained / 'checkpoints' / 'last.ckpt'}"
    base = _args(trained, synthetic_market, "--trainer.callbacks=[]")
    plain = _cli("test", [*base, ckpt])
    reranked = _cli("test", [*base, ckpt, "--model.init_args.rerank=true", "--model.init_args.k1=6",
                             "--model.init_args.k2=3"])
    assert plain.model.hparams.rerank is False and reranked.model.hparams.rerank is True
    assert reranked.model.hparams.k1 == 6
    before, after = (float(c.trainer.callback_metrics["test/mAP"]) for c in (plain, reranked))
    assert 0 < before <= 1 and 0 < after <= 1 and abs(before - after) > 1e-4
    _fails(capsys, ["test", *base, ckpt, "--model.init_args.encoder.name=resnet18",
                    "--model.init_args.triplet_margin=0.7"],
           "model.init_args.encoder.name: 'resnet18' given, 'resnet_tiny_test' in the checkpoint",
           "model.init_args.triplet_margin: 0.7 given, 0.3 in the checkpoint", "rerank")


# ----------------------------------------------------------------- usability
def test_help_lists_runs_and_tools_and_version_prints(capsys):
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*RUNS, *TOOLS]:
        assert f"\n  {name} " in out, name
    assert {"export-onnx", "extract", "synth", "make-shards", "export-encoder"} <= set(TOOLS)
    assert run_cli(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"pedlightning {__version__} (lightning ")


def test_console_script_resolves_short_class_names_and_stays_light(tmp_path):
    """In fresh processes: `--model ReIDModule --data ReIDDataModule` resolve; tools, --version and config errors
    import neither Lightning nor torch."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    short = subprocess.run([sys.executable, "-m", "pedlightning.cli", "fit", "--model", "ReIDModule",
                            "--model.init_args.encoder.name=resnet_tiny_test", "--data", "ReIDDataModule",
                            "--data.init_args.root=nowhere", "--print_config"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert short.returncode == 0 and "Traceback" not in short.stderr, short.stderr[-2000:]
    assert "class_path: pedlightning.tasks.ReIDModule" in short.stdout
    assert "class_path: pedlightning.data.datamodules.ReIDDataModule" in short.stdout

    (tmp_path / "bad.yaml").write_text("model: [\n")
    probe = ("import json, sys\nfrom pedlightning.cli import run_cli\n"
             "codes = [run_cli(a) for a in (['--version'], ['synth', '--help'], ['fit', '--config', 'bad.yaml'])]\n"
             "print(json.dumps([codes, sorted(m for m in ('lightning', 'torch') if m in sys.modules)]))")
    light = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert light.returncode == 0, light.stderr[-2000:]
    assert json.loads(light.stdout.strip().splitlines()[-1]) == [[0, 0, 2], []]
    assert "bad.yaml: malformed YAML at line 2" in light.stderr and "Traceback" not in light.stderr
