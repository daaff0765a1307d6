"""pedlightning.inference and `pedlightning extract`: the features of a checkpoint equal those `predict` writes,
with the checkpoint's own preprocessing and evaluation options; clear errors where a checkpoint lacks a fact."""

import os

import lightning as L
import pytest
import torch
from PIL import Image

from pedlightning.callbacks import FeatureWriter
from pedlightning.data.caption_datasets import flatten_captions
from pedlightning.data.datamodules.attributes import AttributeDataModule
from pedlightning.data.datamodules.text import TextReIDDataModule
from pedlightning.data.synthetic import write_cuhk_pedes, write_pa100k
from pedlightning.errors import CheckpointError, ConfigError, DatasetLayoutError
from pedlightning.inference import FeatureExtractor, list_images
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.text import TextEncoderConfig
from pedlightning.tasks import AttributeModule, TextReIDModule
from pedlightning.tools import extract

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs/demo/reid_market_synthetic.yaml")
TINY = os.path.join(REPO, "tests/support/tiny_reid.yaml")
SIZE = (64, 32)
HALF = [0.5, 0.5, 0.5]


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path), **kw)


def _fit_and_predict(tmp_path, model, data):
    """Two training steps, the checkpoint, and the FeatureWriter output of `predict` for the same weights."""
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[FeatureWriter(str(tmp_path / "feats"))])
    trainer.fit(model, data)
    ckpt = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(ckpt)
    trainer.predict(model, data, return_predictions=False)
    return ckpt, tmp_path / "feats"


def _load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def reid_run(tmp_path_factory, synthetic_market):
    """A `pedlightning fit` checkpoint (it records its task class) trained with mean/std 0.5, flip test and the
    post-BNNeck feature, so a default (ImageNet) normalisation or a plain encoder forward would differ."""
    tmp = tmp_path_factory.mktemp("reid_run")
    with pytest.MonkeyPatch.context() as patch:  # LightningCLI(args=...) warns when pytest's argv is also present
        patch.setattr("sys.argv", ["pedlightning"])
        fit = _fit_cli(tmp, synthetic_market)
    ckpt = os.path.join(str(tmp), "checkpoints", "last.ckpt")
    assert fit.trainer.global_step == 2 and os.path.isfile(ckpt)
    _trainer(tmp, callbacks=[FeatureWriter(str(tmp / "feats"))]).predict(fit.model, fit.datamodule,
                                                                          return_predictions=False)
    return ckpt, tmp / "feats"


def _fit_cli(tmp, market):
    from pedlightning.cli import PedLightningCLI

    return PedLightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                           subclass_mode_data=True, save_config_callback=None, auto_configure_optimizers=False,
                           args=["fit", "--config", DEMO, "--config", TINY, f"--trainer.default_root_dir={tmp}",
                                 f"--data.init_args.root={market}", "--trainer.max_steps=2",
                                 "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                                 "--model.init_args.flip_test=true", "--model.init_args.neck_feat=after",
                                 f"--data.init_args.mean={HALF}", f"--data.init_args.std={HALF}"])


def test_reid_extract_cli_equals_predict(reid_run, tmp_path, capsys):
    ckpt, feats = reid_run
    query = _load(feats / "query.pt")
    listing = tmp_path / "query.txt"
    listing.write_text("\n".join(query["path"]) + "\n")
    out = tmp_path / "out.pt"
    extract.main(["--ckpt", ckpt, "--images", str(listing), "--out", str(out)])
    got = _load(out)
    assert got["path"] == query["path"]
    assert got["preprocessing"]["mean"] == HALF and got["preprocessing"]["img_size"] == list(SIZE)
    torch.testing.assert_close(got["features"], query["features"], atol=1e-6, rtol=0)
    assert "mean [0.5, 0.5, 0.5]" in capsys.readouterr().out


def test_reid_extractor_takes_paths_pil_images_and_tensors(reid_run):
    ckpt, feats = reid_run
    gallery = _load(feats / "gallery.pt")
    extractor = FeatureExtractor.from_checkpoint(ckpt, batch_size=5)
    assert extractor.task.hparams.flip_test and extractor.task.hparams.neck_feat == "after"
    paths = gallery["path"][:7]
    from_paths = extractor(paths)
    torch.testing.assert_close(from_paths, gallery["features"][:7], atol=1e-6, rtol=0)
    pil = [Image.open(p) for p in paths[:2]]
    torch.testing.assert_close(extractor(pil), from_paths[:2], atol=1e-6, rtol=0)
    net_input = extractor.preprocess(paths[:3])
    assert net_input.shape == (3, 3, *SIZE)
    torch.testing.assert_close(extractor(net_input), from_paths[:3], atol=1e-6, rtol=0)
    # The same images normalised with ImageNet's statistics (the default a guess would use) give other features.
    imagenet = FeatureExtractor.from_checkpoint(ckpt, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert (imagenet(paths) - from_paths).abs().max() > 1e-2


def test_reid_extractor_errors(reid_run, tmp_path):
    ckpt, _ = reid_run
    extractor = FeatureExtractor.from_checkpoint(ckpt)
    with pytest.raises(ConfigError, match=r"normalised float \(3, 64, 32\)"):
        extractor(torch.randn(3, 128, 64))
    with pytest.raises(ConfigError, match="has no text tower"):
        extractor.encode_text(["a man"])
    state = _load(ckpt)
    del state["datamodule_hyper_parameters"]
    bare = tmp_path / "bare.ckpt"
    torch.save(state, bare)
    with pytest.raises(CheckpointError, match="does not record its normalisation.*--mean 0.5 0.5 0.5"):
        FeatureExtractor.from_checkpoint(bare)
    given = FeatureExtractor.from_checkpoint(bare, mean=HALF, std=HALF)
    assert given.preprocessing.origin == "the caller"
    del state["hyper_parameters"]["_class_path"]
    torch.save(state, bare)
    with pytest.raises(CheckpointError, match="--task pedlightning.tasks.ReIDModule"):
        FeatureExtractor.from_checkpoint(bare, mean=HALF, std=HALF)
    listing = tmp_path / "list.txt"
    listing.write_text("no_such.jpg\n")
    with pytest.raises(DatasetLayoutError, match="1 image.*no_such.jpg"):
        list_images(listing)


@pytest.fixture(scope="module")
def pa100k(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("pa") / "pa100k")
    return write_pa100k(root, num_train=32, num_val=8, num_test=12, seed=0)


def test_attribute_extractor_equals_predict_probabilities(tmp_path, pa100k):
    data = AttributeDataModule("pa100k", pa100k, img_size=SIZE, batch_size=16, num_workers=0, mean=HALF, std=HALF)
    model = AttributeModule(ImageEncoderConfig("resnet_tiny_test", SIZE, drop_path_rate=0.0, last_stride=2),
                            optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    ckpt, feats = _fit_and_predict(tmp_path, model, data)
    expected = _load(feats / "test.pt")
    extractor = FeatureExtractor.from_checkpoint(ckpt, task="pedlightning.tasks.AttributeModule")
    assert extractor.kind == "probs"
    assert extractor.attribute_names == list(data.data_spec().attribute_names)
    probs = extractor(expected["path"])
    assert probs.shape == (12, 26) and 0 < probs.min() and probs.max() < 1
    torch.testing.assert_close(probs, expected["probs"], atol=1e-6, rtol=0)
    out = tmp_path / "attrs.pt"
    extract.main(["--ckpt", ckpt, "--task", "pedlightning.tasks.AttributeModule", "--images",
                  str(os.path.join(pa100k, "data")), "--out", str(out)])
    got = _load(out)
    assert got["attribute_names"] == extractor.attribute_names and len(got["path"]) == len(got["probs"])


def test_text_search_extractor_equals_predict_for_images_and_captions(tmp_path_factory, tmp_path):
    root = write_cuhk_pedes(str(tmp_path_factory.mktemp("cuhk") / "cuhk"), num_train_ids=6, num_val_ids=2,
                            num_test_ids=3, images_per_id=2, seed=0)
    data = TextReIDDataModule("cuhk_pedes", root, img_size=SIZE, batch_size=8, num_workers=0,
                              tokenizer="clip_tiny_test")
    model = TextReIDModule(ImageEncoderConfig("open_clip:clip_tiny_test", SIZE, drop_path_rate=0.0),
                           TextEncoderConfig("clip_tiny_test"), optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
                           warmup_epochs=0.0)
    ckpt, feats = _fit_and_predict(tmp_path, model, data)
    images, texts = _load(feats / "image.pt"), _load(feats / "text.pt")
    captions = flatten_captions(data.source.test)[0]
    assert len(captions) == len(texts["features"])
    extractor = FeatureExtractor.from_checkpoint(ckpt, task=TextReIDModule)
    assert extractor.preprocessing.mean == data.hparams.mean  # CLIP's statistics, the text datamodule's default
    torch.testing.assert_close(extractor(images["path"]), images["features"], atol=1e-6, rtol=0)
    torch.testing.assert_close(extractor.encode_text(captions), texts["features"], atol=1e-6, rtol=0)
