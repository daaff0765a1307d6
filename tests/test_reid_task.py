"""ReIDModule and ReIDDataModule: training reduces both losses, evaluation options, predict output, errors."""

import lightning as L
import pytest
import torch

from pedlightning.callbacks import FeatureWriter
from pedlightning.data.datamodules import ReIDDataModule
from pedlightning.errors import ConfigError
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.tasks import ReIDModule


def _data(root, **kw):
    return ReIDDataModule("market1501", root, img_size=(64, 32), batch_size=16, num_instances=4, num_workers=0, **kw)


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     default_root_dir=str(tmp_path), **kw)


def test_overfitting_one_batch_reduces_id_and_triplet_loss(tmp_path, synthetic_market):
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
