"""TextReIDModule and TextReIDDataModule: each loss falls, caption datasets, model selection, ICFG's missing val
split, identity batches, CLI fit + test with numbers checked outside Lightning, config consistency."""

import glob
import os

import lightning as L
import pytest
import torch

from pedlightning.data.caption_datasets import CaptionDataset, ImageCaptionDataset
from pedlightning.data.datamodules.text import TextReIDDataModule
from pedlightning.data.datasets import RecordDataset
from pedlightning.data.synthetic import write_cuhk_pedes, write_icfg_pedes
from pedlightning.data.tokenizer import build_tokenizer
from pedlightning.data.transforms import build_test_transform
from pedlightning.errors import ConfigError
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.text import CLIP_PRESETS, TextEncoderConfig, build_clip
from pedlightning.tasks.text_reid import TextReIDModule
from tests.support.cli import REPO, fit_with_overlay, logged_test_run, resolved_config
from tests.support.results import text_to_image_on_test_split
from tests.support.trainers import cpu_trainer

DEMO = os.path.join(REPO, "configs/text_reid/demo_synthetic.yaml")
SIZE = (64, 32)


@pytest.fixture(scope="module")
def cuhk(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("cuhk") / "cuhk_pedes")
    return write_cuhk_pedes(root, num_train_ids=8, num_val_ids=4, num_test_ids=5, images_per_id=2, seed=0)


@pytest.fixture(scope="module")
def icfg(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("icfg") / "icfg_pedes")
    return write_icfg_pedes(root, num_train_ids=6, num_test_ids=4, images_per_id=2, seed=0)


def _data(root, dataset="cuhk_pedes", **kw):
    kw = {"img_size": SIZE, "batch_size": 16, "num_workers": 0, "tokenizer": "clip_tiny_test", **kw}
    return TextReIDDataModule(dataset, root, **kw)


def _model(lr=1e-3, image="open_clip:clip_tiny_test", size=SIZE, pretrained=None, **kw):
    drop_path = 0.0 if image.startswith("open_clip:") else 0.1  # CLIP towers never had drop-path; timm's default
    return TextReIDModule(ImageEncoderConfig(image, size, drop_path_rate=drop_path, pretrained=pretrained),
                          TextEncoderConfig("clip_tiny_test", pretrained=pretrained),
                          optimizer=lambda p: torch.optim.Adam(p, lr=lr), warmup_epochs=0.0, **kw)


def test_caption_datasets_have_one_item_per_caption(cuhk):
    data = _data(cuhk)
    data.setup("fit")
    records, tok, transform = data.source.train, build_tokenizer("clip_tiny_test", 77), build_test_transform(SIZE)
    pairs = ImageCaptionDataset(records, tok, transform)
    assert len(pairs) == sum(len(r.captions) for r in records) == 32
    images = RecordDataset(records, transform)
    for index in (0, 1, 5, 31):
        item = pairs[index]
        record = records[index // 2]  # two captions per synthetic image, in record order
        assert item["image_index"] == index // 2 and item["pid"] == record.pid and item["index"] == index
        torch.testing.assert_close(item["tokens"], tok([record.captions[index % 2]])[0])
        assert item["path"] == record.path
        torch.testing.assert_close(item["image"], images[index // 2]["image"])
    queries = CaptionDataset(data.source.test, tok)
    assert queries.captions == [c for r in data.source.test for c in r.captions]
    assert "image" not in queries[0] and queries[3]["pid"] == data.source.test[1].pid


@pytest.mark.parametrize("loss, lr", [("sdm", 1e-3), ("id", 3e-3), ("itc", 1e-3)])
def test_each_loss_alone_falls_when_overfitting_one_batch(tmp_path, cuhk, loss, lr):
    L.seed_everything(0)
    weights = {f"{name}_weight": float(name == loss) for name in ("sdm", "id", "itc")}
    first, last = _overfit_one_batch(tmp_path, cuhk, _model(lr, **weights))
    assert set(first) == {"train/loss", f"train/{loss}_loss"}
    assert last[f"train/{loss}_loss"] < 0.5 * first[f"train/{loss}_loss"], (first, last)
    assert first["train/loss"] == first[f"train/{loss}_loss"]


def test_all_losses_with_a_timm_image_tower(tmp_path, cuhk):
    L.seed_everything(0)
    model = _model(image="resnet_tiny_test", itc_weight=1.0)
    assert not any("class_embedding" in k for k in model.state_dict())  # no CLIP visual tower is built
    assert model.encode_image(torch.randn(2, 3, *SIZE)).shape == (2, model.embed_dim)
    first, last = _overfit_one_batch(tmp_path, cuhk, model)
    assert first["train/loss"] == pytest.approx(sum(first[f"train/{k}_loss"] for k in ("sdm", "id", "itc")), rel=1e-5)
    assert last["train/loss"] < 0.5 * first["train/loss"], (first, last)
    assert all(last[k] < first[k] for k in first), (first, last)
    assert model.hparams.num_classes == 8 == model.classifier.out_features


def _overfit_one_batch(tmp_path, root, model) -> tuple[dict[str, float], dict[str, float]]:
    """Train 20 steps on one fixed batch; the logged losses of the first and the last step."""
    data = _data(root, flip_prob=0.0, padding=0, erasing_prob=0.0)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("loss")})

    cpu_trainer(tmp_path, max_steps=20, overfit_batches=1, check_val_every_n_epoch=1000, num_sanity_val_steps=0,
                callbacks=[Record()]).fit(model, data)
    return losses[0], losses[-1]


def test_local_clip_checkpoint_loads_with_resized_position_embeddings(tmp_path):
    source, _ = build_clip("clip_tiny_test", (224, 224))
    path = tmp_path / "open_clip_tiny.pt"
    torch.save(source.state_dict(), path)
    model = _model(pretrained=str(path), num_classes=8)
    torch.testing.assert_close(model.text_encoder.model.token_embedding.weight, source.token_embedding.weight)
    torch.testing.assert_close(model.image_encoder.model.conv1.weight, source.visual.conv1.weight)
    # 14x14 patch grid (+ CLS) resized to the 4x2 grid of 64x32 images.
    assert model.image_encoder.model.positional_embedding.shape == (1 + 4 * 2, 64)
    image_report, text_report = model.image_encoder.pretrained_report, model.text_encoder.pretrained_report
    assert image_report.resized == ["positional_embedding"]
    assert not image_report.missing and not text_report.missing and not image_report.unexpected


def test_identity_batches_hold_k_captions_of_each_identity(cuhk):
    data = _data(cuhk, num_instances=2, batch_size=4)  # K counts distinct images: each identity has 2
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert len(batches) == 4  # 8 ids x 2 images = 16 samples, 2 ids per batch
    for batch in batches:
        assert sorted(torch.bincount(batch["pid"]).tolist())[-2:] == [2, 2]


@pytest.mark.parametrize("selection", ["val", "test"])
def test_model_selection_chooses_the_validation_split(tmp_path, cuhk, selection, caplog):
    data = _data(cuhk, model_selection=selection)
    if selection == "test":
        with pytest.warns(UserWarning, match="VALIDATION RUNS ON THE cuhk_pedes TEST SPLIT"):
            data.setup("fit")
    else:
        data.setup("fit")
    queries, gallery = data.val_dataloader().dataset.parts
    records = getattr(data.source, selection)
    assert gallery.records == records
    assert queries.captions == [c for r in records for c in r.captions]
    test_queries, test_gallery = data.test_dataloader().dataset.parts
    assert test_gallery.records == data.source.test

    model, trainer = _model(), cpu_trainer(tmp_path, max_steps=1, limit_train_batches=1)
    caplog.set_level("INFO")
    if selection == "test":
        with pytest.warns(UserWarning, match=r"val/\* metrics are computed on the TEST split"):
            trainer.fit(model, data)
    else:
        trainer.fit(model, data)
    said = "on the TEST split" if selection == "test" else "on the val split"
    assert any(said in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert model.trainer.callback_metrics["val/num_valid_queries"] == len(queries)


def test_icfg_has_no_val_split(tmp_path, icfg):
    data = _data(icfg, "icfg_pedes", model_selection="val")
    data.setup("fit")
    assert data.source.val == []
    with pytest.raises(ConfigError, match="has no validation split .*model_selection: test"):
        cpu_trainer(tmp_path, max_steps=1).fit(_model(), data)
    test_selected = _data(icfg, "icfg_pedes", model_selection="test")
    with pytest.warns(UserWarning, match="TEST SPLIT"):
        test_selected.setup("fit")
    assert test_selected.val_dataloader().dataset.parts[1].records == test_selected.source.test


def test_mismatched_image_size_is_a_config_error(tmp_path, cuhk):
    model = _model(size=(128, 64), num_classes=8)
    with pytest.raises(ConfigError, match=r"model has img_size=\[128, 64\] but the data .* has img_size=\[64, 32\]"):
        cpu_trainer(tmp_path, fast_dev_run=True).fit(model, _data(cuhk))


def test_cli_fit_then_test_of_the_demo_config(tmp_path, cuhk):
    """`pedlightning fit` / `test` with the demo config; the logged test metrics equal retrieval_evaluate on the
    checkpoint's features computed outside Lightning, and rank lists of caption queries are drawn."""
    run = tmp_path / "run"
    ckpt = fit_with_overlay(DEMO, {
        "trainer": {"max_epochs": 2, "check_val_every_n_epoch": 1, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "pedlightning.callbacks.RankListCallback",
                                   "init_args": {"num_queries": 3, "top_k": 5}}]},
        "data": {"init_args": {"root": cuhk, "num_workers": 0, "batch_size": 16}}}, run)
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["num_classes"] == 8
    logged = logged_test_run(run, ckpt)
    assert sorted(os.listdir(run / "ranklists")) == ["ranklist_000.png"]

    model = TextReIDModule.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    data = _data(cuhk)
    data.setup("test")
    expected = text_to_image_on_test_split(model, data)
    assert expected["num_valid_queries"] == 20
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert logged[f"test/{key}"] == pytest.approx(expected[key], abs=1e-6), key
    # Chance: random features on the same captions and gallery (2 of 10 images match each caption).
    assert 0 < logged["test/chance_rank1"] < 1 and 0 < logged["test/chance_mAP"] < 1


def test_ranklist_inputs_are_captions_and_gallery_paths_in_dataset_order(tmp_path, cuhk):
    data, model = _data(cuhk), _model(num_classes=8)
    cpu_trainer(tmp_path).test(model, data, verbose=False)
    inputs = model.ranklist_inputs()
    assert inputs.query_is_text and inputs.query_camids is None
    assert inputs.query_items == [c for r in data.source.test for c in r.captions]
    assert inputs.gallery_paths == [r.path for r in data.source.test]
    assert inputs.query_feats.shape == (20, model.embed_dim) and inputs.gallery_feats.shape[0] == 10
    with torch.no_grad():
        first = model.encode_text(data.test_dataloader().dataset.parts[0][0]["tokens"][None])
    torch.testing.assert_close(inputs.query_feats[:1], first.float())


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(REPO, "configs/text_reid/*.yaml"))),
                         ids=os.path.basename)
def test_config_is_consistent(config, capsys):
    resolved = resolved_config(capsys, config)
    model, data = resolved["model"]["init_args"], resolved["data"]["init_args"]
    image, text = model["image_encoder"], model["text_encoder"]
    assert image["img_size"] == data["img_size"] and text["context_length"] == data["context_length"]
    def tokenizer_of(name):
        return CLIP_PRESETS[name][1] if name in CLIP_PRESETS else name

    assert tokenizer_of(data["tokenizer"]) == tokenizer_of(text["name"])
    assert resolved["checkpoint"]["monitor"] == "val/rank1"
    # ICFG-PEDES has no val split: its config must select on test, the others on val.
    assert data["model_selection"] == ("test" if data["dataset"] == "icfg_pedes" else "val")
    if "demo" not in config:
        assert model["logit_scale"] == 50.0 and model["sdm_weight"] == 1.0 and model["id_weight"] == 1.0
        assert tuple(image["img_size"]) == (384, 128) and data["batch_size"] == 64
        assert resolved["trainer"]["max_epochs"] == 60 and model["warmup_epochs"] == 5


def _irra_expected(name: str, base: float, wd: float, new_layers: tuple[str, ...]) -> tuple[float, float]:
    """IRRA's build_optimizer, written out: 5x for new layers, else 2x for biases; no decay on biases only."""
    bias = "bias" in name.rsplit(".", 1)[-1]
    lr = base * 5 if name.startswith(new_layers) else base * 2 if bias else base
    return lr, 0.0 if bias else wd


@pytest.mark.parametrize("config, image, new_layers", [
    ("configs/text_reid/cuhk_pedes_clip.yaml", "open_clip:clip_tiny_test", ("classifier.",)),
    ("configs/valpat/finetune_cuhk_pedes.yaml", "resnet_tiny_test", ("classifier.", "image_proj.")),
])
def test_irra_configs_build_irras_parameter_groups(config, image, new_layers, capsys):
    """The recipe keys of the config, on tiny towers: every parameter's lr and weight decay as IRRA's solver."""
    init = resolved_config(capsys, os.path.join(REPO, config))["model"]["init_args"]
    opt = init.pop("optimizer")
    assert opt["class_path"] == "torch.optim.Adam"
    recipe = {k: init[k] for k in ("weight_decay", "lr_multipliers", "bias_lr_factor", "no_decay_names",
                                   "decay_1d_params", "warmup_start_factor", "lr_schedule", "min_lr_ratio")}
    assert recipe["warmup_start_factor"] == 0.1 and recipe["min_lr_ratio"] == 0.0
    model = _model(image=image, num_classes=5, **{k: v for k, v in recipe.items() if k != "weight_decay"},
                   weight_decay=recipe["weight_decay"])
    model.optimizer_factory = lambda groups: torch.optim.Adam(groups, **opt["init_args"])
    optimizer = model.configure_optimizers()["optimizer"]
    base = opt["init_args"]["lr"]
    where = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(where) == len(trainable)
    for name, p in trainable:
        lr, wd = _irra_expected(name, base, recipe["weight_decay"], new_layers)
        assert where[id(p)] == (pytest.approx(lr), pytest.approx(wd)), name
    assert {lr for lr, _ in where.values()} == {base, 2 * base, 5 * base}
