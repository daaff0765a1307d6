"""Metric options the tasks expose: the tie rule of reID / text search, unlabelled attribute targets, and
AttributeModule's parameter groups; each checked against hand-computed numbers and the metric layer."""

import functools
import logging
import math
import os

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from pedlightning.cli import PedLightningCLI, RunConfigSaver, main, run_cli
from pedlightning.data.synthetic import write_pa100k
from pedlightning.errors import ConfigError
from pedlightning.losses import weighted_bce
from pedlightning.metrics import attribute_metrics, reid_evaluate, retrieval_evaluate
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.text import TextEncoderConfig
from pedlightning.tasks import ReIDModule, TextReIDModule
from pedlightning.tasks.attributes import AttributeModule
from pedlightning.tasks.lcr2s import LCR2SModule

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REID_DEMO = os.path.join(REPO, "configs/demo/reid_market_synthetic.yaml")
REID_TINY = os.path.join(REPO, "tests/support/tiny_reid.yaml")
ATTR_DEMO = os.path.join(REPO, "configs/attributes/demo_synthetic.yaml")
TINY_R50 = ImageEncoderConfig("resnet_tiny_test", (64, 32), drop_path_rate=0.0)

# Two queries (camera 0) and a gallery (camera 1) of exact cosine ties: query 0 ([1, 0], pid 0) ties its positive g0
# with the negative g1 at similarity 1, and its positive g2 with the negative g3 at 0; query 1 ([0, 1], pid 1) sees
# the negative of each tied pair first in gallery order (g2 before g3, g0 before g1).
QUERY = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
GALLERY = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
QUERY_PIDS, GALLERY_PIDS = torch.tensor([0, 1]), torch.tensor([0, 1, 0, 1])
# By hand: query 0's positives rank (2, 4) pessimistic, (1, 3) in gallery order, (1, 3) optimistic: AP 1/2, 5/6, 5/6;
# query 1's rank (2, 4), (2, 4), (1, 3): AP 1/2, 1/2, 5/6.
EXPECTED = {"pessimistic": {"mAP": 0.5, "rank1": 0.0},
            "gallery_order": {"mAP": (5 / 6 + 0.5) / 2, "rank1": 0.5},
            "optimistic": {"mAP": 5 / 6, "rank1": 1.0}}


class Collect(logging.Handler):
    """The messages Lightning's rank-zero logger emits (it writes to the stderr of import time, beyond capsys)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def lightning_log():
    handler = Collect()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def _trainer(tmp_path):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     default_root_dir=str(tmp_path))


def _part(feats, pids, camid, part):
    n = len(feats)
    return {"image": feats.view(n, 1, 1, -1), "pid": pids, "camid": torch.full((n,), camid),
            "index": torch.arange(n), "part": torch.full((n,), part)}


def _reid_test(tmp_path, **kw) -> dict[str, float]:
    """``trainer.test`` of a ReIDModule whose encoder passes the given feature vectors through (``Flatten``)."""
    model = ReIDModule(TINY_R50, num_classes=2, report_chance=False, **kw)
    model.encoder = nn.Flatten()
    batches = [_part(QUERY, QUERY_PIDS, 0, 0), _part(GALLERY, GALLERY_PIDS, 1, 1)]
    (logged,) = _trainer(tmp_path).test(model, DataLoader(batches, batch_size=None), verbose=False)
    return logged


@pytest.mark.parametrize("ties", ["pessimistic", "gallery_order", "optimistic"])
def test_reid_task_ranks_ties_by_its_tie_rule(ties, tmp_path, lightning_log):
    logged = _reid_test(tmp_path, ties=ties)
    layer = reid_evaluate(QUERY, GALLERY, QUERY_PIDS, GALLERY_PIDS, torch.zeros(2), torch.ones(4), ties=ties)
    for key, value in EXPECTED[ties].items():
        assert layer[key] == pytest.approx(value, abs=1e-12), key
        assert logged[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
    assert logged["test/rank5"] == 1.0 and logged["test/num_valid_queries"] == 2
    assert f"reID test ranking: cosine distance, ties: {ties} (" in "\n".join(lightning_log)


def test_the_default_rule_is_pessimistic_and_an_unknown_rule_is_refused(tmp_path):
    assert _reid_test(tmp_path)["test/mAP"] == pytest.approx(EXPECTED["pessimistic"]["mAP"], abs=1e-6)
    with pytest.raises(ConfigError, match="ReIDModule: model.init_args.ties must be one of 'pessimistic', "
                                          "'gallery_order', 'optimistic', got 'worst'"):
        ReIDModule(TINY_R50, num_classes=2, ties="worst")


def test_reid_chance_baseline_follows_the_rule():
    """The chance baseline of a test run is ``evaluate_features``: same labels, same tie rule."""
    query = {"pids": QUERY_PIDS, "camids": torch.zeros(2, dtype=torch.long)}
    gallery = {"pids": GALLERY_PIDS, "camids": torch.ones(4, dtype=torch.long)}
    for ties, expected in EXPECTED.items():
        model = ReIDModule(TINY_R50, num_classes=2, ties=ties)
        assert model.evaluate_features(QUERY, GALLERY, query, gallery)["mAP"] == pytest.approx(expected["mAP"])


def test_reid_chance_baseline_uses_the_distance_of_the_task():
    """Cosine ranks the distant, well-aligned gallery item first, euclidean the near, misaligned one."""
    query = {"pids": torch.tensor([0]), "camids": torch.tensor([0])}
    gallery = {"pids": torch.tensor([0, 1]), "camids": torch.tensor([1, 1])}
    feats_q, feats_g = torch.tensor([[1.0, 0.0]]), torch.tensor([[5.0, 0.5], [0.8, 0.5]])
    for metric, expected in (("cosine", 1.0), ("euclidean", 0.5)):
        model = ReIDModule(TINY_R50, num_classes=2, metric=metric)
        assert model.evaluate_features(feats_q, feats_g, query, gallery)["mAP"] == pytest.approx(expected)


def test_text_search_and_lcr2s_pass_the_rule_to_their_metrics():
    text = TextReIDModule(ImageEncoderConfig("open_clip:clip_tiny_test", (64, 32), drop_path_rate=0.0),
                          TextEncoderConfig("clip_tiny_test"), num_classes=2, ties="gallery_order")
    assert text.val_metric.ties == text.test_metric.ties == "gallery_order"
    assert "ties: gallery_order" in text.test_metric.description
    # the chance baseline: captions [1, 0] / [0, 1] against the tied images, no camera filter
    got = text.evaluate_features(QUERY, GALLERY, {"pids": QUERY_PIDS}, {"pids": GALLERY_PIDS})["mAP"]
    assert got == pytest.approx(EXPECTED["gallery_order"]["mAP"])
    assert got != pytest.approx(retrieval_evaluate(QUERY, GALLERY, QUERY_PIDS, GALLERY_PIDS)["mAP"])
    lcr2s = LCR2SModule(ImageEncoderConfig("resnet_tiny_test", (64, 32)), TextEncoderConfig("clip_tiny_test"),
                        "teacher", num_classes=2, fusion_heads=4, ties="optimistic")
    assert lcr2s.hparams.ties == lcr2s.test_metric.ties == "optimistic"
    assert set(LCR2SModule.test_time_options) == {"ties", "report_chance"}


# ----------------------------------------------------------------- the rule as a test-time option
def _cli(subcommand, args):
    return PedLightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                           subclass_mode_data=True, save_config_callback=RunConfigSaver,
                           save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                           args=[subcommand, *args])


def test_ties_is_a_test_time_option_of_a_reid_checkpoint(tmp_path, synthetic_market, lightning_log, capsys):
    base = ["--config", REID_DEMO, "--config", REID_TINY, f"--trainer.default_root_dir={tmp_path}",
            f"--data.init_args.root={synthetic_market}", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=[]"]
    assert run_cli(["fit", *base, "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                    "--checkpoint.monitor=null"]) == 0
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["ties"] == "pessimistic"
    for ties in ("pessimistic", "gallery_order"):
        cli = _cli("test", [*base, f"--ckpt_path={ckpt}"] + ([f"--model.init_args.ties={ties}"]
                                                             if ties != "pessimistic" else []))
        assert cli.model.hparams.ties == ties and cli.model.test_metric.options["ties"] == ties
        r = cli.model.ranklist_inputs()
        expected = reid_evaluate(r.query_feats, r.gallery_feats, r.query_pids, r.gallery_pids, r.query_camids,
                                 r.gallery_camids, ties=ties)
        assert float(cli.trainer.callback_metrics["test/mAP"]) == pytest.approx(expected["mAP"], abs=1e-6)
        assert 0 < expected["mAP"] < 1
        assert any(f"reID test ranking: cosine distance, ties: {ties} (" in m for m in lightning_log), ties
    capsys.readouterr()
    assert run_cli(["test", *base, f"--ckpt_path={ckpt}", "--model.init_args.ties=worst"]) == 2
    err = capsys.readouterr().err
    assert "ties" in err and "Traceback" not in err


# ----------------------------------------------------------------- unlabelled attribute targets
LOGITS = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.3, -0.2]])
LABELS = torch.tensor([[1, -1, 0], [0, 1, -1]])
RATIO = [0.2, 0.5, 0.7]


def _bce(x: float, y: int, r: float) -> float:
    """One weighted BCE term by hand: exp(1 - r) on a positive, exp(r) on a negative."""
    p = 1 / (1 + math.exp(-x))
    return -math.exp(1 - r) * math.log(p) if y == 1 else -math.exp(r) * math.log(1 - p)


def test_the_loss_leaves_unlabelled_targets_out():
    # by hand: image 0 has attributes 0 (positive) and 2 (negative), image 1 attributes 0 (negative) and 1 (positive)
    terms = [_bce(0.5, 1, 0.2) + _bce(2.0, 0, 0.7), _bce(1.0, 0, 0.2) + _bce(0.3, 1, 0.5)]
    assert float(weighted_bce(LOGITS, LABELS, torch.tensor(RATIO))) == pytest.approx(sum(terms) / 2, rel=1e-6)
    assert sum(terms) / 2 == pytest.approx(3.92809, abs=1e-5)
    plain = [-math.log(1 / (1 + math.exp(-x))) if y == 1 else -math.log(1 - 1 / (1 + math.exp(-x)))
             for row_x, row_y in zip(LOGITS.tolist(), LABELS.tolist()) for x, y in zip(row_x, row_y) if y != -1]
    assert float(weighted_bce(LOGITS, LABELS, reduction="mean")) == pytest.approx(sum(plain) / 4, rel=1e-6)
    logits = LOGITS.clone().requires_grad_()
    weighted_bce(logits, LABELS, torch.tensor(RATIO)).backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 2] == 0 and (logits.grad[LABELS != -1] != 0).all()
    # with every target labelled, the loss is the one of before (BCE over all elements)
    full = torch.tensor([[1, 0, 0], [0, 1, 1]])
    torch.testing.assert_close(weighted_bce(LOGITS, full, reduction="mean"),
                               nn.functional.binary_cross_entropy_with_logits(LOGITS, full.float()))


def test_attribute_training_step_leaves_unlabelled_targets_out():
    torch.manual_seed(0)
    model = AttributeModule(TINY_R50, num_attributes=3, positive_ratio=RATIO).eval()
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        logits = model(images).tolist()
        loss = float(model.training_step({"image": images, "labels": LABELS}, 0))
    by_hand = sum(_bce(x, y, r) for row_x, row_y in zip(logits, LABELS.tolist())
                  for x, y, r in zip(row_x, row_y, RATIO) if y != -1) / 2
    assert loss == pytest.approx(by_hand, rel=1e-5)


# Three images, two attributes; image 0's attribute 1 is unlabelled and predicted positive.
ATTR_TARGETS = torch.tensor([[1, -1], [0, 1], [1, 0]])
ATTR_LOGITS = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [-5.0, 5.0]])
# By hand: attribute 0: TPR 1/2, TNR 1 -> 0.75; attribute 1: TPR 1, TNR 0 -> 0.5; mA 0.625 under both settings.
# ignore: image 0 is scored on attribute 0 only: precision = recall = accuracy = (1 + 1 + 0) / 3.
# false_positive: image 0 predicts {0, 1} for truth {0}: precision 1/2, accuracy 1/2 -> (1/2 + 1 + 0) / 3.
EXPECTED_ATTR = {
    "ignore": {"mA": 0.625, "precision": 2 / 3, "recall": 2 / 3, "accuracy": 2 / 3, "f1": 2 / 3},
    "false_positive": {"mA": 0.625, "precision": 0.5, "recall": 2 / 3, "accuracy": 0.5, "f1": 4 / 7},
}


@pytest.mark.parametrize("setting", ["ignore", "false_positive"])
def test_attribute_metrics_of_unlabelled_targets_follow_the_setting(setting, tmp_path, lightning_log):
    model = AttributeModule(TINY_R50, num_attributes=2, attribute_names=["a", "b"], positive_ratio=[0.5, 0.5],
                            unlabelled_predictions=setting)
    model.encoder, model.head = nn.Flatten(), nn.Identity()  # the logits are the "images"
    model.head.num_attributes = 2
    batch = {"image": ATTR_LOGITS.view(3, 1, 1, 2), "labels": ATTR_TARGETS, "index": torch.arange(3)}
    (logged,) = _trainer(tmp_path).test(model, DataLoader([batch], batch_size=None), verbose=False)
    layer = attribute_metrics(torch.sigmoid(ATTR_LOGITS), ATTR_TARGETS, unlabelled_predictions=setting)
    for key, value in EXPECTED_ATTR[setting].items():
        assert layer[key] == pytest.approx(value, abs=1e-12), key
        assert logged[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
    assert logged["test/num_unlabelled"] == 1 and layer["num_unlabelled"] == 1
    assert any(f"1 unlabelled (-1) targets left out, positive predictions on them: {setting}" in m
               for m in lightning_log)


def test_unlabelled_predictions_is_checked_and_a_test_time_option():
    assert AttributeModule.test_time_options == ("unlabelled_predictions",)
    with pytest.raises(ConfigError, match="unlabelled_predictions must be 'ignore' or 'false_positive'"):
        AttributeModule(TINY_R50, num_attributes=2, unlabelled_predictions="negative")


@pytest.fixture(scope="module")
def pa100k(tmp_path_factory) -> str:
    return write_pa100k(str(tmp_path_factory.mktemp("pa") / "pa100k"), num_train=32, num_val=16, num_test=16, seed=0)


def test_unlabelled_predictions_overrides_an_attribute_checkpoint(tmp_path, pa100k):
    base = ["--config", ATTR_DEMO, f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.root={pa100k}",
            "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"]
    assert run_cli(["fit", *base, "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                    "--checkpoint.monitor=null"]) == 0
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    cli = _cli("test", [*base, f"--ckpt_path={ckpt}", "--model.init_args.unlabelled_predictions=false_positive"])
    assert cli.model.hparams.unlabelled_predictions == "false_positive"
    assert cli.model.test_metric.unlabelled_predictions == "false_positive"
    assert 0 < float(cli.trainer.callback_metrics["test/mA"]) < 1


# ----------------------------------------------------------------- AttributeModule's parameter groups
def _lr_and_decay(model) -> dict[str, tuple[float, float]]:
    optimizer = model.configure_optimizers()["optimizer"]
    where = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    names = {n: where[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    assert len(names) == len(where) == sum(len(g["params"]) for g in optimizer.param_groups)
    return names


def test_attribute_module_takes_the_optimization_options():
    model = AttributeModule(TINY_R50, num_attributes=3, optimizer=functools.partial(torch.optim.Adam, lr=1e-4),
                            weight_decay=5e-4, lr_multipliers={"head": 10.0}, no_decay_names=[],
                            decay_1d_params=True, warmup_start_factor=0.1)
    got = _lr_and_decay(model)
    assert any(".bn" in n or "norm" in n for n in got) and any(n.endswith("bias") for n in got)
    for name, (lr, wd) in got.items():
        assert lr == pytest.approx(1e-3 if name.startswith("head.") else 1e-4), name
        assert wd == pytest.approx(5e-4), name
    assert model.warmup_start_factor == 0.1
    default_model = AttributeModule(TINY_R50, num_attributes=3, weight_decay=5e-4)
    default, params = _lr_and_decay(default_model), dict(default_model.named_parameters())
    for name, (_, wd) in default.items():  # the default: norms and biases (1-D parameters) are not decayed
        assert wd == pytest.approx(0.0 if params[name].ndim <= 1 else 5e-4), name


@pytest.mark.parametrize("config", ["configs/attributes/pa100k_r50.yaml", "configs/valpat/finetune_pa100k.yaml"])
def test_strong_baseline_configs_decay_every_parameter(config, capsys):
    """Rethinking_of_PAR's BN_WD: true: weight decay 5e-4 on every parameter, norms and biases included."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", os.path.join(REPO, config), "--print_config"])
    init = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init["no_decay_names"] == [] and init["decay_1d_params"] is True
    assert init["weight_decay"] == 0.0005 and init["optimizer"]["class_path"] == "torch.optim.Adam"
    model = AttributeModule(TINY_R50, num_attributes=26, weight_decay=init["weight_decay"],
                            no_decay_names=init["no_decay_names"], decay_1d_params=init["decay_1d_params"],
                            optimizer=functools.partial(torch.optim.Adam, **init["optimizer"]["init_args"]))
    got = _lr_and_decay(model)
    assert {wd for _, wd in got.values()} == {0.0005} and {lr for lr, _ in got.values()} == {0.0001}
