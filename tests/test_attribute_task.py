"""AttributeModule and AttributeDataModule: losses fall, wiring of the positive ratio, protocol switch, CLI run."""

import csv
import glob
import os

import lightning as L
import pytest
import torch

from pedlightning.data.datamodules.attributes import AttributeDataModule
from pedlightning.data.synthetic import write_pa100k
from pedlightning.errors import ConfigError
from pedlightning.losses import weighted_bce
from pedlightning.metrics import attribute_metrics
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.tasks.attributes import AttributeModule
from tests.support.cli import REPO, fit_with_overlay, logged_test_run, resolved_config
from tests.support.trainers import cpu_trainer

DEMO = os.path.join(REPO, "configs/attributes/demo_synthetic.yaml")
SIZE = (64, 32)


@pytest.fixture(scope="module")
def pa100k(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("pa") / "pa100k")
    return write_pa100k(root, num_train=48, num_val=16, num_test=24, seed=0)


def _data(root, **kw):
    kw = {"img_size": SIZE, "batch_size": 16, "num_workers": 0, **kw}
    return AttributeDataModule("pa100k", root, **kw)


def _model(lr=3e-3, **kw):
    return AttributeModule(ImageEncoderConfig("resnet_tiny_test", SIZE, drop_path_rate=0.0, last_stride=2), optimizer=lambda p: torch.optim.Adam(p, lr=lr), **kw)


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted_bce", "plain_bce"])
def test_overfitting_one_batch_reduces_the_loss(tmp_path, pa100k, weighted):
    L.seed_everything(0)
    # The BatchNorm on the logits keeps them at unit scale until its weight grows: a high lr shows the fall in 40 steps.
    data, model = _data(pa100k, flip_prob=0.0, padding=0), _model(lr=1e-2, weighted_loss=weighted)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    cpu_trainer(tmp_path, max_steps=40, overfit_batches=1, check_val_every_n_epoch=1000, num_sanity_val_steps=0,
                callbacks=[Record()]).fit(model, data)
    assert losses[-1] < 0.6 * losses[0], losses
    # The head width, the loss weights and the names came from the datamodule.
    assert model.hparams.num_attributes == 26 == model.head.fc.out_features
    assert model.hparams.attribute_names == data.attribute_names
    if weighted:
        torch.testing.assert_close(model.positive_ratio, torch.tensor(data.positive_ratio))


def test_training_step_weights_the_bce_by_the_positive_ratio(pa100k):
    data = _data(pa100k, flip_prob=0.0, padding=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    ratio = data.positive_ratio
    for weighted in (True, False):
        torch.manual_seed(0)
        model = _model(num_attributes=26, positive_ratio=ratio, weighted_loss=weighted)
        with torch.no_grad():
            expected = weighted_bce(model(batch["image"]), batch["labels"], torch.tensor(ratio) if weighted else None)
            torch.testing.assert_close(model.training_step(batch, 0), expected)
    assert not torch.isclose(weighted_bce(torch.zeros(2, 26), batch["labels"][:2], torch.tensor(ratio)),
                             weighted_bce(torch.zeros(2, 26), batch["labels"][:2]))


def test_checkpoint_rebuilds_the_head_and_carries_the_positive_ratio(tmp_path, pa100k):
    data, model = _data(pa100k), _model()
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, data)
    path = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(path)
    loaded = AttributeModule.load_from_checkpoint(path, map_location="cpu").eval()
    torch.testing.assert_close(loaded.positive_ratio, torch.tensor(data.positive_ratio))
    assert loaded.hparams.attribute_names == data.attribute_names
    images = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.eval()(images))


def test_validation_split_follows_train_split(pa100k):
    data = _data(pa100k)
    data.setup("fit")
    assert data.val_dataloader().dataset.records == data.source.val
    assert len(data.source.train) == 48

    trainval = _data(pa100k, train_split="trainval")
    with pytest.warns(UserWarning, match="VALIDATION RUNS ON THE TEST SPLIT"):
        trainval.setup("fit")
    assert len(trainval.source.train) == 48 + 16
    assert trainval.val_dataloader().dataset.records == trainval.source.test
    assert trainval.test_dataloader().dataset.records == trainval.source.test


def test_without_num_attributes_or_datamodule_is_a_config_error(tmp_path, pa100k):
    data = _data(pa100k)
    data.setup("fit")
    with pytest.raises(ConfigError, match="num_attributes"):
        cpu_trainer(tmp_path, fast_dev_run=True).fit(_model(), train_dataloaders=data.train_dataloader())
    with pytest.raises(ConfigError, match="model.positive_ratio has 3 entries"):
        _model(num_attributes=26, positive_ratio=[0.5, 0.5, 0.5])


def test_cli_fit_then_test_of_the_demo_config(tmp_path, pa100k):
    """`pedlightning fit` / `test` with the demo config; the logged test metrics equal attribute_metrics computed
    from the checkpoint's predictions outside Lightning."""
    run = tmp_path / "run"
    ckpt = fit_with_overlay(DEMO, {
        "trainer": {"max_epochs": 2, "check_val_every_n_epoch": 1, "enable_progress_bar": False, "callbacks": []},
        "data": {"init_args": {"root": pa100k, "num_workers": 0, "batch_size": 16}}}, run)
    state = torch.load(ckpt, weights_only=True)
    assert state["hyper_parameters"]["num_attributes"] == 26
    logged = logged_test_run(run, ckpt)

    model = AttributeModule.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    data = _data(pa100k)
    data.setup("test")
    probs, labels = _probabilities(model, data.test_dataloader())
    expected = attribute_metrics(probs, labels)
    assert len(labels) == 24
    for key in ("mA", "accuracy", "precision", "recall", "f1"):
        assert logged[f"test/{key}"] == pytest.approx(expected[key], abs=1e-6), key
    # The per-attribute table was saved beside the logs of the test run, one row per attribute.
    (table,) = glob.glob(str(run / "csv" / "**" / "attributes_test.csv"), recursive=True)
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["attribute", "train_pos_ratio", "mA", "pos_recall", "neg_recall"]
    assert [r["attribute"] for r in rows] == data.attribute_names
    for column in ("mA", "pos_recall", "neg_recall"):
        torch.testing.assert_close(torch.tensor([float(r[column]) for r in rows], dtype=torch.float64),
                                   expected["per_attribute"][column].double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor([float(r["train_pos_ratio"]) for r in rows]),
                               torch.tensor(data.positive_ratio), atol=1e-6, rtol=0)


def _probabilities(model: AttributeModule, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's attribute probabilities over ``loader`` and the labels, in loader order."""
    probs, labels = [], []
    with torch.no_grad():
        for batch in loader:
            probs.append(torch.sigmoid(model(batch["image"])))
            labels.append(batch["labels"])
    return torch.cat(probs), torch.cat(labels)


def test_validation_puts_mA_on_the_progress_bar_and_writes_the_table(tmp_path, pa100k):
    data, model = _data(pa100k), _model()
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(model, data)
    model.eval()
    expected = attribute_metrics(*_probabilities(model, data.val_dataloader()))
    assert set(trainer.progress_bar_metrics) == {"train/loss", "val/mA"}
    assert trainer.progress_bar_metrics["val/mA"] == pytest.approx(expected["mA"], abs=1e-6)
    # Without a logger the table goes to default_root_dir.
    with open(tmp_path / "attributes_val.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 26
    mean_ma = sum(float(r["mA"]) for r in rows) / len(rows)
    assert mean_ma == pytest.approx(expected["mA"], abs=1e-5)


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(REPO, "configs/attributes/*.yaml"))),
                         ids=os.path.basename)
def test_config_is_consistent(config, capsys):
    resolved = resolved_config(capsys, config)
    model, data = resolved["model"]["init_args"], resolved["data"]["init_args"]
    assert model["encoder"]["img_size"] == data["img_size"]
    assert model["threshold"] == 0.5 and model["weighted_loss"] is True
    assert resolved["checkpoint"]["monitor"] == "val/mA"
    assert data["train_split"] == "train"


def test_released_code_recipe_runs_with_ema_clipping_and_no_classifier_bn(tmp_path, pa100k, capsys):
    """The authors' released PA-100K recipe: no BN after the classifier, gradient-norm clipping at 10, an EMA of
    the weights (decay 0.9998) that the checkpoint stores and the test evaluates."""
    config = os.path.join(REPO, "configs/attributes/pa100k_r50_released.yaml")
    resolved = resolved_config(capsys, config)
    assert resolved["trainer"]["gradient_clip_val"] == 10.0 and resolved["trainer"]["gradient_clip_algorithm"] == "norm"
    (ema,) = [c for c in resolved["trainer"]["callbacks"] if c["class_path"].endswith("EMAWeightAveraging")]
    assert ema["init_args"]["decay"] == 0.9998 and resolved["model"]["init_args"]["classifier_bn"] is False
    run = tmp_path / "run"
    ckpt = fit_with_overlay(config, {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "precision": "32-true",
                    "enable_progress_bar": False, "limit_val_batches": 1,
                    "callbacks": [{"class_path": ema["class_path"], "init_args": ema["init_args"]}]},
        "model": {"init_args": {"encoder": {"name": "resnet_tiny_test", "img_size": list(SIZE)}}},
        "data": {"init_args": {"root": pa100k, "num_workers": 0, "batch_size": 16, "img_size": list(SIZE)}}}, run)
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 3 and not any(k.startswith("head.bn") for k in state["state_dict"])
    averaged, current = state["state_dict"]["head.fc.weight"], state["current_model_state"]["head.fc.weight"]
    assert not torch.equal(averaged, current)  # the checkpoint holds the average, not the last weights
    logged = logged_test_run(run, ckpt)
    model = AttributeModule.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    assert isinstance(model.head.bn, torch.nn.Identity) and torch.equal(model.head.fc.weight, averaged)
    data = _data(pa100k)
    data.setup("test")
    expected = attribute_metrics(*_probabilities(model, data.test_dataloader()))
    assert logged["test/mA"] == pytest.approx(expected["mA"], abs=1e-6)  # the test scored the averaged weights
