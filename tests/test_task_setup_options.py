"""What every task does at set-up: the optimisation options of the base (VAL-PAT and PersonMAE too), the loud
warning for a real-data run that would train a recipe's encoder from random weights, and the progress of a long
re-ranking."""

from __future__ import annotations

import functools
import io
import sys
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.parsing import AttributeDict
from torch.utils.data import DataLoader

from pedlightning.data.progress import interactive
from pedlightning.data.spec import DataSpec
from pedlightning.errors import ConfigError
from pedlightning.metrics import reranking
from pedlightning.metrics.reranking import KReciprocalReranker
from pedlightning.models import encoders
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.text import TextEncoderConfig
from pedlightning.tasks import AttributeModule, ReIDModule, TextReIDModule
from pedlightning.tasks.personmae import PersonMAEModule
from pedlightning.tasks.valpat import VALPATModule

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCE = "market1501 at /datasets/market1501"
TINY_R = ImageEncoderConfig("resnet_tiny_test", (64, 32), drop_path_rate=0.0)
TINY_MAE = dict(encoder=ImageEncoderConfig("vit_tiny_test", (32, 16), drop_path_rate=0.0,
                                           model_kwargs={"patch_size": 4}),
                decoder_dim=32, decoder_depth=1, decoder_heads=2, min_block_patches=4)
TINY_VALPAT = dict(encoder=dict(name="resnet_tiny_test", img_size=(32, 16), drop_path_rate=0.0, last_stride=2),
                   text_encoder=dict(name="clip_tiny_test", context_length=16), projection_dim=8,
                   projection_hidden_dim=16, queue_size=16, bn_group_size=2, num_attributes=3,
                   positive_ratio=[0.2, 0.5, 0.7])


def _lr_and_decay(task: L.LightningModule) -> dict[str, tuple[float, float]]:
    """(lr, weight decay) of every parameter in the built optimizer, by name."""
    optimizer = task.configure_optimizers()["optimizer"]
    where = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    return {name: where[id(p)] for name, p in task.named_parameters() if id(p) in where}


# ------------------------------------------------------------------ optimisation options of VAL-PAT and PersonMAE
def test_personmae_takes_the_base_options_groups_carry_their_lrs_and_decays():
    model = PersonMAEModule(**TINY_MAE, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), weight_decay=0.05,
                            lr_multipliers={"decoders": 2.0}, bias_lr_factor=3.0, no_decay_names=[],
                            decay_1d_params=True, warmup_start_factor=0.1)
    assert model.hparams.warmup_start_factor == model.warmup_start_factor == 0.1  # stored: a checkpoint rebuilds it
    got = _lr_and_decay(model)
    assert not any(name.startswith("teacher.") for name in got)  # the EMA teacher stays out of the optimizer
    assert all(wd == pytest.approx(0.05) for _, wd in got.values())  # every parameter decayed, tokens included
    for name, (lr, _) in got.items():
        expected = 2e-3 if name.startswith("decoders.") else 3e-3 if name.endswith(".bias") else 1e-3
        assert lr == pytest.approx(expected), name
    assert got["decoders.pixel.mask_token"][0] == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match="PersonMAEModule: model.init_args.warmup_start_factor"):
        PersonMAEModule(**TINY_MAE, warmup_start_factor=2.0)


def test_personmae_default_groups_spare_norms_biases_and_the_query_token():
    got = _lr_and_decay(PersonMAEModule(**TINY_MAE, weight_decay=0.05))
    undecayed = {name for name, (_, wd) in got.items() if wd == 0}
    assert "decoders.pixel.mask_token" in undecayed and "encoder.model.cls_token" in undecayed
    assert all(name.endswith((".bias", "_token")) or "norm" in name for name in undecayed), undecayed


def test_valpat_takes_the_base_options_as_moco_decays_every_parameter():
    model = VALPATModule(**{**TINY_VALPAT, "itc_weight": 0.0}, optimizer=functools.partial(torch.optim.SGD, lr=0.06),
                         weight_decay=1e-4, no_decay_names=[], decay_1d_params=True,
                         lr_multipliers={"projection": 4.0})
    got = _lr_and_decay(model)
    assert not any(name.startswith("key_encoder.") for name in got)
    assert all(wd == pytest.approx(1e-4) for _, wd in got.values())
    for name, (lr, _) in got.items():
        assert lr == pytest.approx(0.24 if name.startswith("projection.") else 0.06), name
    stepped = VALPATModule(**TINY_VALPAT, lr_schedule="step", lr_milestones_epochs=[2.0], lr_gamma=0.5)
    assert stepped.hparams.lr_milestones_epochs == [2.0] and (stepped.lr_milestones_epochs, stepped.lr_gamma) == \
        ((2.0,), 0.5)
    with pytest.raises(ConfigError, match="VALPATModule: model.init_args.lr_gamma"):
        VALPATModule(**TINY_VALPAT, lr_schedule="step", lr_milestones_epochs=[1.0], lr_gamma=0.0)


# ------------------------------------------------------------------ the from-scratch warning
@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each test sees the warning afresh (it is given once per model, data and role in a process)."""
    monkeypatch.setattr(encoders, "_warned_untrained", set())


class RealLookingData(L.LightningDataModule):
    """A pedlightning-style datamodule whose data is real (``synthesize`` off) or synthetic: one random reID
    training batch, a query and a gallery."""

    def __init__(self, synthesize: bool = False):
        super().__init__()
        self.save_hyperparameters()

    def data_spec(self) -> DataSpec:
        return DataSpec(source=SOURCE, img_size=(64, 32), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=4)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(8, 3, 64, 32, generator=g)
        return DataLoader([{"image": images[i], "pid": i // 2} for i in range(8)], batch_size=8)

    def val_dataloader(self) -> list[DataLoader]:
        """Query (camera 0) and gallery (camera 1) of the same 4 identities."""
        images = torch.randn(12, 3, 64, 32, generator=torch.Generator().manual_seed(1))
        return [DataLoader([{"image": images[i + offset], "pid": i % 4, "camid": cam, "index": i} for i in range(n)],
                           batch_size=n) for offset, n, cam in ((0, 4, 0), (4, 8, 1))]


def _attach(model: L.LightningModule, synthesize: bool = False) -> L.LightningModule:
    """``model`` as a trainer running on :class:`RealLookingData` sees it."""
    model.trainer = SimpleNamespace(datamodule=RealLookingData(synthesize))
    return model


def _renamed(model: L.LightningModule, **names: str) -> L.LightningModule:
    """The model's encoder configs with other architecture names: the check reads the config, nothing is built."""
    for key, name in names.items():
        model.hparams[key] = {**model.hparams[key], "name": name}
    return model


def _warned(model: L.LightningModule) -> tuple[list[str], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        roles = model.warn_untrained_encoders()
    return roles, [str(w.message) for w in caught if "FROM RANDOM INITIALISATION" in str(w.message)]


def test_real_data_warns_at_fit_start_and_only_then(tmp_path, monkeypatch, fresh_warnings):
    monkeypatch.setattr(encoders, "is_tiny_preset", lambda name: False)  # the tiny model stands in for a ResNet-50
    model = ReIDModule(TINY_R, triplet_margin=0.3)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=1, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"encoder 'resnet_tiny_test' has no pretrained weights .* FROM RANDOM "
                                         r"INITIALISATION on market1501 at /datasets/market1501"):
        trainer.fit(model, RealLookingData())
    monkeypatch.setattr(encoders, "_warned_untrained", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, limit_val_batches=1,
                  enable_model_summary=False, default_root_dir=str(tmp_path)).validate(model, RealLookingData())
    assert not [w for w in caught if "FROM RANDOM INITIALISATION" in str(w.message)]  # evaluation: no warning


def test_the_config_alone_decides_which_roles_warn(fresh_warnings):
    reid = _attach(_renamed(ReIDModule(TINY_R, num_classes=4), encoder="resnet50"))
    roles, messages = _warned(reid)
    assert roles == ["encoder"] and len(messages) == 1
    assert "encoder 'resnet50'" in messages[0] and SOURCE in messages[0]
    assert "encoder.pretrained: timm:resnet50.tv_in1k" in messages[0]
    assert _warned(reid) == ([], [])  # once per model, data and role

    text = _attach(_renamed(TextReIDModule(TINY_R, TextEncoderConfig("clip_tiny_test"), num_classes=4),
                            image_encoder="open_clip:ViT-B-16", text_encoder="ViT-B-16"))
    roles, messages = _warned(text)
    assert roles == ["image_encoder", "text_encoder"]
    assert "image_encoder 'open_clip:ViT-B-16'" in messages[0] and "text_encoder 'ViT-B-16'" in messages[1]

    attributes = _attach(_renamed(AttributeModule(TINY_R, num_attributes=3), encoder="vit_base_patch16_224"))
    assert _warned(attributes)[0] == ["encoder"]


def test_no_warning_for_synthetic_data_tiny_presets_given_weights_or_unknown_data(fresh_warnings):
    assert _warned(_attach(_renamed(ReIDModule(TINY_R, num_classes=4), encoder="resnet50"), synthesize=True)) \
        == ([], [])
    assert _warned(_attach(ReIDModule(TINY_R, num_classes=4))) == ([], [])  # a tiny preset
    given = _renamed(ReIDModule(TINY_R, num_classes=4), encoder="resnet50")
    given.hparams.encoder = {**given.hparams.encoder, "pretrained": "timm:resnet50.tv_in1k"}
    assert _warned(_attach(given)) == ([], [])
    unattached = _renamed(ReIDModule(TINY_R, num_classes=4), encoder="resnet50")
    assert _warned(unattached) == ([], [])  # no pedlightning datamodule: nothing says the data is real


def test_pre_training_from_scratch_does_not_warn(fresh_warnings):
    mae = _attach(_renamed(PersonMAEModule(**TINY_MAE), encoder="vit_base_patch16_224"))
    assert mae.recipe_pretrained_encoders() == [] and _warned(mae) == ([], [])
    valpat = _attach(_renamed(VALPATModule(**TINY_VALPAT), encoder="resnet50", text_encoder="ViT-B-16"))
    assert valpat.recipe_pretrained_encoders() == [] and _warned(valpat) == ([], [])


def test_synthetic_means_the_datamodules_synthesize_option():
    model = ReIDModule(TINY_R, num_classes=4)
    assert not model.data_is_synthetic  # no trainer
    assert _attach(model, synthesize=True).data_is_synthetic
    model.trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams=AttributeDict()))
    assert not model.data_is_synthetic


# ------------------------------------------------------------------ progress of a long re-ranking
def _features(nq: int = 30, ng: int = 70) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(nq + ng, 16, generator=g), dim=1)
    return x[:nq], x[nq:]


def _rerank_all(reranker: KReciprocalReranker, block: int = 8) -> torch.Tensor:
    return torch.cat([reranker(s, min(s + block, reranker.num_query)) for s in range(0, reranker.num_query, block)])


def test_a_large_reranking_reports_start_and_end_a_small_one_is_silent(monkeypatch, capsys):
    q, g = _features()
    quiet = _rerank_all(KReciprocalReranker(q, g))  # 100 images: far below the threshold
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(reranking, "PROGRESS_MIN_IMAGES", 100)
    loud = _rerank_all(KReciprocalReranker(q, g))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "re-ranking 30 queries against 70 gallery images (k-reciprocal, k1=20, k2=6) ..."
    assert len(err) == 2 and err[1].startswith("re-ranking done in ") and err[1].endswith(" s")
    assert torch.equal(loud, quiet)  # reporting changes no number
    monkeypatch.setattr(reranking, "is_rank_zero", lambda: False)
    _rerank_all(KReciprocalReranker(q, g))
    assert capsys.readouterr().err == ""  # other ranks compute the same distances silently


def test_a_terminal_gets_one_bar_per_phase(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    q, g = _features()
    _rerank_all(KReciprocalReranker(q, g, progress=True))
    err = capsys.readouterr().err
    for phase in ("neighbours", "encodings", "query expansion", "distances"):
        assert f"re-ranking: {phase}" in err, phase
    assert "0/100 " in err and "0/30 " in err  # the totals: every image, every query


def test_no_bars_under_a_live_display_that_captures_stderr(monkeypatch):
    from rich.console import Console
    from rich.file_proxy import FileProxy

    terminal = SimpleNamespace(isatty=lambda: True, write=lambda s: None, flush=lambda: None)
    monkeypatch.setattr(sys, "stderr", terminal)
    assert interactive()
    monkeypatch.setattr(sys, "stderr", FileProxy(Console(file=io.StringIO()), terminal))
    assert not interactive()
