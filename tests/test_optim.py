"""Parameter groups (lr factors, weight decay) and lr schedules as the recipes write them, checked by hand."""

import functools
import math
import os

import lightning as L
import pytest
import torch
from torch import nn

from pedlightning.cli import main
from pedlightning.data.datamodules import ReIDDataModule
from pedlightning.errors import ConfigError
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.optim import check_schedule, name_matches, param_groups, schedule_factor
from pedlightning.tasks import ReIDModule
from pedlightning.tasks.base import TaskModule

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tiny(TaskModule):
    """Every kind of parameter a recipe treats differently: weights, biases, norms, tokens, a new classifier."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.backbone = nn.ModuleDict({"fc": nn.Linear(3, 4), "norm": nn.LayerNorm(4),
                                       "attn": nn.MultiheadAttention(4, 1)})
        self.pos_embed = nn.Parameter(torch.zeros(1, 2, 4))
        self.classifier = nn.Linear(4, 5)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _lr_and_decay(task: TaskModule) -> dict[str, tuple[float, float]]:
    """(lr, weight decay) of every trainable parameter in the built optimizer; each in exactly one group."""
    optimizer = task.configure_optimizers()["optimizer"]
    where = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in where
            where[id(p)] = (group["lr"], group["weight_decay"])
    names = {name: where[id(p)] for name, p in task.named_parameters() if p.requires_grad}
    assert len(names) == len(where)  # no frozen parameter reached the optimizer
    return names


def test_irra_groups_new_layers_5x_biases_2x_and_undecayed():
    task = Tiny(optimizer=functools.partial(torch.optim.Adam, lr=1e-5), weight_decay=4e-5,
                lr_multipliers={"classifier": 5.0}, bias_lr_factor=2.0, no_decay_names=["*bias*"], decay_1d_params=True)
    got = _lr_and_decay(task)
    expected = {
        "backbone.fc.weight": (1e-5, 4e-5), "backbone.fc.bias": (2e-5, 0.0),
        "backbone.norm.weight": (1e-5, 4e-5), "backbone.norm.bias": (2e-5, 0.0),
        "backbone.attn.in_proj_weight": (1e-5, 4e-5), "backbone.attn.in_proj_bias": (2e-5, 0.0),
        "backbone.attn.out_proj.weight": (1e-5, 4e-5), "backbone.attn.out_proj.bias": (2e-5, 0.0),
        "pos_embed": (1e-5, 4e-5),
        "classifier.weight": (5e-5, 4e-5), "classifier.bias": (5e-5, 0.0),  # the pattern wins over the bias factor
    }
    assert got.keys() == expected.keys()
    for name, (lr, wd) in expected.items():
        assert got[name] == (pytest.approx(lr), pytest.approx(wd)), name


def test_transreid_groups_decay_everything_and_double_bias_lr():
    task = Tiny(optimizer=functools.partial(torch.optim.SGD, lr=0.008, momentum=0.9), weight_decay=1e-4,
                bias_lr_factor=2.0, no_decay_names=[], decay_1d_params=True)
    got = _lr_and_decay(task)
    for name, (lr, wd) in got.items():
        assert wd == pytest.approx(1e-4), name
        assert lr == pytest.approx(0.016 if "bias" in name.rsplit(".", 1)[-1] else 0.008), name
    assert len(task.configure_optimizers()["optimizer"].param_groups) == 2


def test_default_groups_skip_decay_on_norms_biases_and_tokens():
    task = Tiny(optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), weight_decay=0.05)
    got = _lr_and_decay(task)
    decayed = {n for n, (_, wd) in got.items() if wd > 0}
    assert decayed == {"backbone.fc.weight", "backbone.attn.in_proj_weight", "backbone.attn.out_proj.weight",
                       "classifier.weight"}
    assert [lr for lr, _ in got.values()] == pytest.approx([1e-3] * len(got))


def test_first_matching_pattern_wins_and_prefixes_respect_dots():
    assert name_matches("head.classifier.weight", "head") and not name_matches("header.weight", "head")
    assert name_matches("a.classifier.bias", "*classifier*") and not name_matches("classifier.bias", "*.classifier*")
    task = Tiny(optimizer=functools.partial(torch.optim.SGD, lr=1.0),
                lr_multipliers={"classifier.bias": 7.0, "classifier": 3.0, "backbone.norm": 0.5})
    got = _lr_and_decay(task)
    assert got["classifier.bias"][0] == 7.0 and got["classifier.weight"][0] == 3.0
    assert got["backbone.norm.weight"][0] == got["backbone.norm.bias"][0] == 0.5
    assert got["backbone.fc.bias"][0] == 1.0


def test_bad_group_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"no trainable parameter of Tiny matches \['clasifier'\]"):
        param_groups(Tiny(), 0.0, lr_multipliers={"clasifier": 5.0})
    with pytest.raises(ConfigError, match=r"no trainable parameter .* matches \['frozen'\]"):
        param_groups(Tiny(), 0.0, lr_multipliers={"frozen": 5.0})
    with pytest.raises(ConfigError, match=r"lr_multipliers\['classifier'\] must be >= 0, got -1"):
        param_groups(Tiny(), 0.0, lr_multipliers={"classifier": -1.0})
    with pytest.raises(ConfigError, match="weight_decay must be >= 0"):
        Tiny(weight_decay=-0.1)


def test_step_schedule_by_hand():
    """Bag of Tricks: warm-up from 0.01 over 4 steps, x0.1 at steps 6 and 9."""
    factors = [schedule_factor(s, 4, 12, "step", warmup_start_factor=0.01, milestones=(6, 9), gamma=0.1)
               for s in range(12)]
    expected = [0.2575, 0.505, 0.7525, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01]
    assert factors == pytest.approx(expected)


def test_cosine_schedule_with_warmup_start_and_floor_by_hand():
    factors = [schedule_factor(s, 2, 6, "cosine", min_lr_ratio=0.2, warmup_start_factor=0.1) for s in range(7)]
    assert factors == pytest.approx([0.55, 1.0, 1.0, 0.2 + 0.4 * (1 + math.sqrt(0.5)), 0.6,
                                     0.2 + 0.4 * (1 - math.sqrt(0.5)), 0.2])
    # start factor 0: the first step already at 1 / warmup_steps (no step at lr 0), as before
    assert [schedule_factor(s, 4, 8, "constant") for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "step", "milestones_epochs": []}, "lr_schedule: step needs model.init_args.lr_milestones_epochs"),
    ({"schedule": "cosine", "milestones_epochs": [40]}, r"lr_milestones_epochs=\[40\] is only read by"),
    ({"schedule": "step", "milestones_epochs": [70, 40]}, "must be increasing"),
    ({"schedule": "step", "milestones_epochs": [40], "gamma": 0.0}, "lr_gamma must be > 0"),
    ({"warmup_start_factor": 1.5}, r"warmup_start_factor must lie in \[0, 1\], got 1.5"),
    ({"schedule": "linear"}, "lr_schedule must be one of"),
])
def test_bad_schedules_are_config_errors(kwargs, message):
    args = {"schedule": "cosine", "warmup_start_factor": 0.0, "min_lr_ratio": 0.0, "milestones_epochs": [],
            "gamma": 0.1, **kwargs}
    with pytest.raises(ConfigError, match=message):
        check_schedule(args["schedule"], args["warmup_start_factor"], args["min_lr_ratio"],
                       args["milestones_epochs"], args["gamma"], "Task")


class GroupLrs(L.Callback):
    def __init__(self):
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_every_group_follows_the_step_schedule_in_epochs(tmp_path, synthetic_market):
    data = ReIDDataModule("market1501", synthetic_market, img_size=(64, 32), batch_size=16, num_instances=4,
                          num_workers=0)
    model = ReIDModule(ImageEncoderConfig("resnet_tiny_test", (64, 32)),
                       optimizer=functools.partial(torch.optim.SGD, lr=0.1), bias_lr_factor=2.0,
                       lr_multipliers={"head.classifier": 10.0}, lr_schedule="step", lr_milestones_epochs=[2],
                       warmup_epochs=1, warmup_start_factor=0.01)
    trace = GroupLrs()
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path),
              max_epochs=3, limit_val_batches=0, callbacks=[trace]).fit(model, data)
    epoch = model.steps_per_epoch()
    assert epoch == len(data.train_dataloader()) and len(trace.lrs) == 3 * epoch
    factors = [g["lr_factor"] for g in model.trainer.optimizers[0].param_groups]
    assert sorted(set(factors)) == [1.0, 2.0, 10.0]
    for step, lrs in enumerate(trace.lrs):
        warm = 0.01 + 0.99 * (step + 1) / epoch if step < epoch else 1.0
        decay = 0.1 if step >= 2 * epoch else 1.0
        assert lrs == pytest.approx([0.1 * f * warm * decay for f in factors]), step


def test_optimizer_weight_decay_contradicting_the_models_is_a_config_error():
    task = Tiny(optimizer=functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.3), weight_decay=1e-4)
    with pytest.raises(ConfigError, match=r"optimizer.init_args.weight_decay=0.3 contradicts "
                                          r"model.init_args.weight_decay=0.0001"):
        task.configure_optimizers()
    for same in (functools.partial(torch.optim.SGD, lr=0.1, weight_decay=1e-4),
                 functools.partial(torch.optim.SGD, lr=0.1)):  # equal, or the class default (unset)
        groups = Tiny(optimizer=same, weight_decay=1e-4).configure_optimizers()["optimizer"].param_groups
        assert {g["weight_decay"] for g in groups} == {0.0, 1e-4}


def test_cli_rejects_a_second_weight_decay_and_accepts_the_default(tmp_path, synthetic_market, capsys):
    """jsonargparse fills the SGD's weight_decay with AdamW's default (the task's default optimizer): not a choice."""
    args = ["fit", "--config", os.path.join(REPO, "configs/reid/market1501_vitb.yaml"),
            f"--trainer.default_root_dir={tmp_path}/run", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
            "--model.init_args.encoder.name=vit_tiny_test",
            "--model.init_args.encoder.img_size=[64, 32]", "--data.init_args.img_size=[64, 32]",
            f"--data.init_args.root={synthetic_market}", "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=16"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--model.init_args.optimizer.init_args.weight_decay=0.3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "optimizer.init_args.weight_decay=0.3 contradicts model.init_args.weight_decay=0.0001" in err
    main(args)  # the config as written: SGD's weight_decay is unset, the model's 1e-4 is used
