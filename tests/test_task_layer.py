"""The task layer every paper sits on: step-based schedules, the datamodule/task contract, one evaluation table."""

import lightning as L
import pytest
import torch
import yaml

from pedlightning.data.datamodules import ReIDDataModule
from pedlightning.data.spec import DataSpec
from pedlightning.errors import ConfigError
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.tasks import ReIDModule
from pedlightning.tasks.base import TaskModule

TINY = ImageEncoderConfig("resnet_tiny_test", (64, 32))


def _data(root, **kw):
    kw = {"img_size": (64, 32), "batch_size": 16, "num_instances": 4, "num_workers": 0, **kw}
    return ReIDDataModule("market1501", root, **kw)


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     default_root_dir=str(tmp_path), **kw)


class LrTrace(L.Callback):
    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("bound", ["max_steps", "max_epochs"])
def test_a_run_bounded_by_steps_warms_up_peaks_at_the_base_lr_and_decays(tmp_path, synthetic_market, bound):
    """warmup_epochs counts real epochs of the run: 16 ids x 4 images... -> steps per epoch from the loader."""
    data = _data(synthetic_market)
    model = ReIDModule(TINY, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), warmup_epochs=1.0, min_lr_ratio=0.01)
    trace = LrTrace()
    limits = {"max_steps": 12, "max_epochs": -1} if bound == "max_steps" else {"max_epochs": 3}
    _trainer(tmp_path, limit_val_batches=0, callbacks=[trace], **limits).fit(model, data)
    per_epoch = model.steps_per_epoch()
    assert per_epoch == len(data.train_dataloader())
    total = model.total_steps
    assert total == (12 if bound == "max_steps" else 3 * per_epoch)
    lrs = trace.lrs
    assert len(lrs) == total
    peak = max(lrs)
    assert peak == pytest.approx(0.1)  # the base lr is reached ...
    assert lrs.index(peak) == per_epoch - 1  # ... at the last step of one epoch of warm-up
    assert lrs[0] == pytest.approx(0.1 / per_epoch)
    assert lrs[-1] < 0.5 * peak  # and decays by the end


def test_epochs_to_steps_counts_gradient_accumulation(tmp_path, synthetic_market):
    data = _data(synthetic_market)
    model = ReIDModule(TINY, warmup_epochs=0.5)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0, accumulate_grad_batches=2)
    trainer.fit(model, data)
    batches = len(data.train_dataloader())
    assert model.steps_per_epoch() == -(-batches // 2)
    assert model.epochs_to_steps(2.0) == 2 * -(-batches // 2)


def test_data_spec_disagreements_are_config_errors(tmp_path, synthetic_market):
    data = _data(synthetic_market)
    wrong_size = ReIDModule(ImageEncoderConfig("resnet_tiny_test", (128, 64)), num_classes=16)
    with pytest.raises(ConfigError, match=r"has img_size=\[128, 64\] but the data \(market1501 at .*\) has "
                                          r"img_size=\[64, 32\]"):
        _trainer(tmp_path, fast_dev_run=True).fit(wrong_size, data)
    wrong_classes = ReIDModule(TINY, num_classes=7)
    with pytest.raises(ConfigError, match=r"num_classes=7 but the data .* has num_classes=16"):
        _trainer(tmp_path, fast_dev_run=True).fit(wrong_classes, data)


def test_a_plain_datamodule_without_the_facts_is_told_what_to_pass(tmp_path, synthetic_market):
    inner = _data(synthetic_market)

    class Plain(L.LightningDataModule):
        def train_dataloader(self):
            inner.trainer = self.trainer
            return inner.train_dataloader()

    with pytest.raises(ConfigError, match="ReIDModule needs num_classes: pass model.init_args.num_classes"):
        _trainer(tmp_path, fast_dev_run=True).fit(ReIDModule(TINY), Plain())


def test_data_spec_require_and_check_equal():
    spec = DataSpec("x at /data", (64, 32), (0.5,) * 3, (0.5,) * 3, num_classes=3)
    assert spec.require("num_classes", "T") == 3
    with pytest.raises(ConfigError, match=r"T needs `context_length` but the data \(x at /data\) does not provide"):
        spec.require("context_length", "T")
    spec.check_equal("img_size", [64, 32], "T")
    spec.check_equal("context_length", 77, "T")  # unknown on the data side: nothing to check


def test_an_evaluation_is_logged_once_not_per_dataloader(tmp_path, synthetic_market):
    """Queries and gallery form one loader: `test` returns one result dict, the table one column."""
    data = _data(synthetic_market)
    model = ReIDModule(TINY, num_classes=16)
    results = _trainer(tmp_path).test(model, data, verbose=False)
    assert len(results) == 1
    assert {"test/mAP", "test/rank1", "test/chance_mAP"} <= set(results[0])
    assert 0 < results[0]["test/mAP"] <= 1


def test_dataclass_hyper_parameters_are_stored_as_plain_dicts():
    model = ReIDModule(TINY, num_classes=4)
    assert model.hparams.encoder == {"name": "resnet_tiny_test", "img_size": (64, 32), "stride_size": None,
                                     "drop_path_rate": 0.1, "last_stride": 1, "pretrained": None,
                                     "model_kwargs": None}
    rebuilt = ReIDModule(**{k: v for k, v in model.hparams.items()})
    assert rebuilt.encoder.embed_dim == model.encoder.embed_dim
    assert TaskModule.build_image_encoder(model.hparams.encoder, drop_path_rate=0.0).embed_dim == 128


def test_a_command_line_null_checkpoint_means_none(capsys):
    """jsonargparse turns `--model.init_args.encoder.pretrained=null` into "None"; the configs read it as no file."""
    from pedlightning.cli import main
    from pedlightning.models.text import TextEncoderConfig

    assert ImageEncoderConfig(pretrained="None").pretrained is None
    assert TextEncoderConfig(pretrained="null").pretrained is None
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/demo/reid_market_synthetic.yaml", "--model.init_args.encoder.pretrained=null",
              "--print_config"])
    encoder = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["encoder"]
    assert ImageEncoderConfig(**encoder).pretrained is None  # what the model is built from
