"""ReIDModule and ReIDDataModule: training reduces both losses, evaluation options, predict output, errors."""

import functools
import inspect

import lightning as L
import pytest
import torch

from pedlightning.callbacks import FeatureWriter
from pedlightning.data.datamodules import ReIDDataModule
from pedlightning.data.samplers import IdentityBatchSampler
from pedlightning.errors import ConfigError
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.tasks import ReIDModule
from pedlightning.tasks.base import TaskModule
from pedlightning.tasks.text_reid import TextReIDModule


def _data(root, **kw):
    return ReIDDataModule("market1501", root, img_size=(64, 32), batch_size=16, num_instances=4, num_workers=0, **kw)


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     default_root_dir=str(tmp_path), **kw)


@pytest.fixture
def one_fixed_batch(monkeypatch):
    """``overfit_batches`` cannot replace a custom batch sampler, and the identity sampler reshuffles every epoch
    (of one batch here): keep epoch 0's order so every step sees the same batch."""
    monkeypatch.setattr(IdentityBatchSampler, "set_epoch", lambda self, epoch: None)


def test_overfitting_one_batch_reduces_id_and_triplet_loss(tmp_path, synthetic_market, one_fixed_batch):
    data = _data(synthetic_market, erasing_prob=0.0, flip_prob=0.0, padding=0)
    model = ReIDModule(ImageEncoderConfig("vit_tiny_test", (64, 32)), triplet_margin=0.3,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            losses.append((float(m["train/id_loss"]), float(m["train/triplet_loss"])))

    _trainer(tmp_path, max_steps=40, overfit_batches=1, callbacks=[Record()],
             limit_val_batches=0).fit(model, data)
    first, last = losses[0], losses[-1]
    assert last[0] < 0.6 * first[0] and last[1] < 0.5 * first[1], (first, last)
    assert model.hparams.num_classes == data.num_classes == 16


def test_flip_test_averages_image_and_mirror():
    model = ReIDModule(ImageEncoderConfig("vit_tiny_test", (64, 32)), num_classes=4, flip_test=True).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        expected = (model.encoder(x) + model.encoder(x.flip(-1))) / 2
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model(x.flip(-1)), model(x))  # flip-invariant by construction


def test_neck_feat_after_uses_bnneck():
    model = ReIDModule(ImageEncoderConfig("vit_tiny_test", (64, 32)), num_classes=4, neck_feat="after").eval()
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head.bn(model.encoder(x)))


def test_num_classes_mismatch_is_a_config_error(tmp_path, synthetic_market):
    model = ReIDModule(ImageEncoderConfig("vit_tiny_test", (64, 32)), num_classes=99)
    with pytest.raises(ConfigError, match=r"num_classes=99 but the data \(market1501 at .*\) has num_classes=16"):
        _trainer(tmp_path, fast_dev_run=True).fit(model, _data(synthetic_market))


def test_predict_writes_features_labels_and_paths(tmp_path, synthetic_market):
    data = _data(synthetic_market)
    model = ReIDModule(ImageEncoderConfig("vit_tiny_test", (64, 32)), num_classes=16)
    _trainer(tmp_path, callbacks=[FeatureWriter("feats")]).predict(model, data, return_predictions=False)
    query = torch.load(tmp_path / "feats" / "query.pt", weights_only=True)
    gallery = torch.load(tmp_path / "feats" / "gallery.pt", weights_only=True)
    data.setup()
    assert query["features"].shape == (len(data.source.query), model.encoder.embed_dim)
    assert query["index"].tolist() == list(range(len(data.source.query)))
    assert query["pid"].tolist() == [r.pid for r in data.source.query]
    assert gallery["camid"].tolist() == [r.camid for r in data.source.gallery]
    assert gallery["path"] == [r.path for r in data.source.gallery]
    with torch.no_grad():
        torch.testing.assert_close(query["features"][:1], model.eval()(data.test_dataloader().dataset.parts[0][0]["image"][None]))


TINY_R50 = ImageEncoderConfig("resnet_tiny_test", (64, 32))


class CentreSteps(L.Callback):
    """The centres and their gradient just before each optimizer step (callbacks run before the module's hook),
    and the centres after it."""

    def __init__(self):
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.after: list[torch.Tensor] = []
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        centers = pl_module.center_loss.centers
        self.before.append((centers.detach().clone(), centers.grad.detach().clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(pl_module.center_loss.centers.detach().clone())
        self.losses.append(float(trainer.callback_metrics["train/center_loss"]))


def test_bag_of_tricks_centres_take_a_plain_sgd_step_on_the_unweighted_gradient(tmp_path, synthetic_market,
                                                                                one_fixed_batch):
    model = ReIDModule(TINY_R50, triplet_margin=0.3, center_loss_weight=0.01, center_lr=0.5,
                       optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    steps = CentreSteps()
    _trainer(tmp_path, max_steps=12, overfit_batches=1, limit_val_batches=0, callbacks=[steps]).fit(
        model, _data(synthetic_market, erasing_prob=0.0, flip_prob=0.0, padding=0))
    assert len(steps.before) == len(steps.after) == 12
    for (before, grad), after in zip(steps.before, steps.after):
        torch.testing.assert_close(after, before - 0.5 * grad / 0.01)
        moved = (grad != 0).any(dim=1)
        assert moved.sum() == 4  # the 4 identities of the batch (16 = 4 ids x 4), the other 12 centres stay
    optimizer = model.trainer.optimizers[0]
    assert model.center_loss.centers not in optimizer.state  # the main (Adam) optimizer never stepped them
    assert steps.losses[-1] < 0.2 * steps.losses[0], steps.losses


def test_centres_in_the_main_optimizer_take_its_lr_times_their_multiplier(tmp_path, synthetic_market):
    model = ReIDModule(TINY_R50, center_loss_weight=0.01, center_lr=None, weight_decay=1e-4,
                       optimizer=functools.partial(torch.optim.SGD, lr=0.01), lr_multipliers={"center_loss": 100.0},
                       lr_schedule="constant")
    steps = CentreSteps()
    _trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[steps]).fit(model, _data(synthetic_market))
    groups = model.trainer.optimizers[0].param_groups
    group = next(g for g in groups if any(p is model.center_loss.centers for p in g["params"]))
    assert group["lr"] == pytest.approx(1.0) and len(group["params"]) == 1
    for (before, grad), after in zip(steps.before, steps.after):  # SGD: c -= lr * (grad + wd * c)
        torch.testing.assert_close(after, before - 1.0 * (grad + 1e-4 * before))


def test_centre_loss_options_are_checked():
    with pytest.raises(ConfigError, match="centre loss .* BNNeck head"):
        ReIDModule(TINY_R50, head="mgn", center_loss_weight=0.0005)
    with pytest.raises(ConfigError, match="center_loss_weight must be >= 0"):
        ReIDModule(TINY_R50, center_loss_weight=-1.0)
    with pytest.raises(ConfigError, match="center_lr must be > 0 or null"):
        ReIDModule(TINY_R50, center_loss_weight=0.0005, center_lr=0.0)
    assert ReIDModule(TINY_R50, num_classes=4).center_loss is None
    assert ReIDModule(TINY_R50, num_classes=4, center_loss_weight=1e-3).center_loss.centers.shape == (4, 128)


def test_test_time_options_name_evaluation_arguments_of_each_task():
    assert TaskModule.test_time_options == ()
    assert ReIDModule.test_time_options == ("neck_feat", "flip_test", "metric", "rerank", "k1", "k2",
                                            "lambda_value", "ties", "report_chance")
    assert TextReIDModule.test_time_options == ("ties", "report_chance")
    for cls in (ReIDModule, TextReIDModule):
        assert set(cls.test_time_options) <= set(inspect.signature(cls).parameters), cls


def test_weight_averaging_copies_the_classifier_sized_from_the_data(tmp_path, synthetic_market):
    """Lightning's EMA callback copies the model in its setup, before the task's own: ``configure_model`` sizes the
    classifier from the data first, so the average holds it, and after fit the model carries the averaged weights."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    ema = EMAWeightAveraging(decay=0.5)
    model = ReIDModule(ImageEncoderConfig("resnet_tiny_test", (64, 32)), report_chance=False,
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert model.head is None  # num_classes comes from the data
    _trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[ema]).fit(model, _data(synthetic_market))
    averaged = dict(ema._average_model.module.named_parameters())
    assert averaged["head.classifier.weight"].shape == model.head.classifier.weight.shape
    for name, param in model.named_parameters():  # fit ends with the average copied into the model
        assert torch.equal(param, averaged[name]), name
