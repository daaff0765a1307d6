"""PersonMAE through the pedlightning command: synthetic pre-training -> export -> reID fine-tuning."""

import os
import sys
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from pedlightning.callbacks.reconstruction import ReconstructionGrid
from pedlightning.cli import PedLightningCLI, RunConfigSaver, main
from pedlightning.data.transforms.reid import IMAGENET_MEAN, denormalize
from pedlightning.models.encoders import ImageEncoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "configs/personmae/demo_pretrain_synthetic.yaml")
FINETUNE = os.path.join(REPO, "configs/personmae/demo_finetune_synthetic.yaml")

PRETRAIN_TINY = """
trainer:
  max_epochs: 1
  limit_train_batches: 2
  enable_model_summary: false
  enable_progress_bar: false
  callbacks:
    - class_path: pedlightning.callbacks.reconstruction.ReconstructionGrid
      init_args: {num_images: 4, every_n_epochs: 1}
data:
  class_path: pedlightning.data.datamodules.luperson.LUPersonDataModule
  init_args:
    synthetic: {num_images: 32, shard_size: 8, size: [64, 32]}
    batch_size: 8
    num_workers: 0
"""
FINETUNE_TINY = """
trainer:
  fast_dev_run: true
  enable_model_summary: false
  enable_progress_bar: false
data:
  class_path: pedlightning.data.datamodules.ReIDDataModule
  init_args:
    synthetic: {num_train_ids: 8, num_test_ids: 6, size: [64, 32], num_gallery_only_ids: 2}
    batch_size: 16
    num_workers: 0
"""


def _cli(args):
    with mock.patch.object(sys, "argv", ["pedlightning"]):  # LightningCLI warns when args= and sys.argv both exist
        return PedLightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                               subclass_mode_data=True, save_config_callback=RunConfigSaver,
                               save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny PersonMAE pre-training run of the demo config (synthetic shards written by prepare_data)."""
    tmp = tmp_path_factory.mktemp("personmae")
    (tmp / "tiny.yaml").write_text(PRETRAIN_TINY)
    cli = _cli(["fit", "--config", PRETRAIN, "--config", str(tmp / "tiny.yaml"),
                f"--trainer.default_root_dir={tmp / 'run'}", f"--data.init_args.root={tmp / 'shards'}"])
    return tmp, cli


def test_pretraining_writes_checkpoint_and_reconstruction_grid(pretrained):
    tmp, cli = pretrained
    run = tmp / "run"
    assert cli.trainer.global_step == 2
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("teacher.module.model.") for k in state) and any(k.startswith("decoders.pixel.") for k in state)
    with Image.open(run / "reconstructions" / "epoch=000.png") as png:
        grid = np.asarray(png.convert("RGB")).astype(int)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ReconstructionGrid))
    # a label band, then 3 rows (masked RegionA, RegionB, prediction) x 4 columns of 128x64 images, 2-pixel padding
    left = callback.label_width
    assert grid.shape == (3 * (128 + 2) + 2, left + 4 * (64 + 2) + 2, 3)

    def cell(row: int, col: int) -> np.ndarray:
        return grid[2 + row * 130: 130 + row * 130, left + 2 + col * 66: left + 66 + col * 66]

    region_b = (denormalize(callback.batch["region_b"][1]).permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(cell(1, 1) - region_b).max() <= 1
    # masked RegionA patches show the normalisation mean; the mask is the module's fixed visualisation mask
    mask = cli.model.masks(4, seed=[cli.model.hparams.mask_seed, 0])[1].view(16, 8)
    masked_a = cell(0, 1).reshape(16, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4)
    mean = np.round(np.array(IMAGENET_MEAN) * 255)
    assert np.abs(masked_a[mask.numpy()] - mean).max() <= 1
    assert np.abs(masked_a[~mask.numpy()] - mean).max() > 20


def test_export_encoder_gives_a_strict_timm_state_dict(pretrained, capsys):
    tmp, _ = pretrained
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    main(["export-encoder", str(ckpt), str(tmp / "encoder.pth")])
    assert "loads strictly into vit_tiny_test" in capsys.readouterr().out
    exported = torch.load(tmp / "encoder.pth", weights_only=True)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    student = {k[len("encoder.model."):]: v for k, v in state.items() if k.startswith("encoder.model.")}
    assert exported.keys() == student.keys() and all(torch.equal(exported[k], student[k]) for k in student)
    model = ImageEncoder("vit_tiny_test", (128, 64), model_kwargs={"patch_size": 8}).model
    model.load_state_dict(exported, strict=True)
    main(["export-encoder", str(ckpt), str(tmp / "teacher.pth"), "--which", "teacher"])
    teacher = torch.load(tmp / "teacher.pth", weights_only=True)
    assert all(torch.equal(teacher[k], state["teacher.module.model." + k]) for k in student)
    with pytest.raises(SystemExit):
        main(["export-encoder", str(ckpt), str(tmp / "x.pth"), "--prefix", "nothing"])


@pytest.mark.parametrize("source", ["checkpoint", "exported"])
def test_finetuning_through_the_cli_loads_every_encoder_key(pretrained, source, tmp_path):
    tmp, _ = pretrained
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    weights = ckpt
    if source == "exported":
        weights = tmp_path / "encoder.pth"
        main(["export-encoder", str(ckpt), str(weights)])
    (tmp_path / "tiny.yaml").write_text(FINETUNE_TINY)
    cli = _cli(["fit", "--config", FINETUNE, "--config", str(tmp_path / "tiny.yaml"),
                f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.init_args.root={tmp / 'occduke'}",
                f"--model.init_args.encoder.pretrained={weights}"])
    report = cli.model.encoder.pretrained_report
    encoder_keys = set(cli.model.encoder.model.state_dict())
    assert set(report.loaded) == encoder_keys and not report.missing and not report.unexpected
    assert not report.skipped and not report.resized
    if source == "checkpoint":
        assert report.prefix == "encoder.model."
        assert any(k.startswith("teacher.") for k in report.ignored)
        assert any(k.startswith("decoders.") for k in report.ignored)
    assert cli.trainer.global_step == 1  # fast_dev_run trained a step after loading


def test_a_different_input_size_resizes_the_position_embedding(pretrained):
    tmp, _ = pretrained
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    encoder = ImageEncoder("vit_tiny_test", (192, 64), model_kwargs={"patch_size": 8}, pretrained=str(ckpt))
    report = encoder.pretrained_report
    assert report.resized == ["pos_embed"] and not report.missing and not report.skipped
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(encoder.model.blocks[1].mlp.fc2.weight, state["encoder.model.blocks.1.mlp.fc2.weight"])
