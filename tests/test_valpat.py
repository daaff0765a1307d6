"""VAL-PAT: the MoCo queue and shuffled BN (1 and 2 gloo processes), each loss term against a hand computation,
the momentum update, overfitting, exact resume, and a 2-process DDP fit."""

from __future__ import annotations

import glob
import math
import os
import sys
from unittest import mock

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from torch import nn

from pedlightning.errors import ConfigError
from pedlightning.models.moco import (
    MoCoQueue,
    ProjectionMLP,
    grouped_forward,
    seeded_permutation,
    shuffled_forward,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(i: int, dim: int = 8) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), dim).float()


# ------------------------------------------------------------------------------------------------ queue and MLP
def test_queue_is_fifo_and_the_pointer_wraps():
    queue = MoCoQueue(dim=8, size=5, seed=0)
    assert queue.queue.shape == (5, 8) and torch.allclose(queue.queue.norm(dim=1), torch.ones(5))
    initial = queue.queue.clone()
    queue.enqueue(torch.stack([unit(0), 3 * unit(1)]))  # keys are stored L2-normalised
    assert int(queue.ptr) == 2
    assert torch.equal(queue.queue[:2], torch.stack([unit(0), unit(1)])) and torch.equal(queue.queue[2:], initial[2:])
    queue.enqueue(torch.stack([unit(2), unit(3)]))
    assert int(queue.ptr) == 4
    queue.enqueue(torch.stack([unit(4), unit(5), unit(6)]))  # wraps: rows 4, 0, 1
    assert int(queue.ptr) == 2
    assert torch.equal(queue.queue, torch.stack([unit(5), unit(6), unit(2), unit(3), unit(4)]))
    negatives = queue.negatives()
    queue.enqueue(torch.stack([unit(7)]))
    assert torch.equal(negatives[2], unit(2)) and torch.equal(queue.queue[2], unit(7))  # a copy, not a view
    with pytest.raises(ConfigError, match="larger than the MoCo queue"):
        queue.enqueue(torch.randn(6, 8))
    assert torch.equal(MoCoQueue(8, 5, seed=0).queue, initial)  # seeded: every rank starts alike


def test_projection_mlp_is_moco_v2s():
    mlp = ProjectionMLP(2048)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(2048, 2048), (128, 2048)]
    assert isinstance(mlp.net[1], nn.ReLU)
    assert ProjectionMLP(64, 32, 16)(torch.randn(3, 64)).shape == (3, 16)


# ------------------------------------------------------------------------------------------------ shuffled BN
EPS = 1e-5


def bn() -> nn.Module:
    return nn.BatchNorm1d(1, affine=False, eps=EPS)


def test_grouped_forward_normalises_each_group_by_hand():
    x = torch.tensor([[0.0], [2.0], [10.0], [14.0]])
    # groups {0, 2} and {10, 14}: mean 1 and 12, biased variance 1 and 4
    expected = torch.tensor([[-1 / math.sqrt(1 + EPS)], [1 / math.sqrt(1 + EPS)], [-2 / math.sqrt(4 + EPS)],
                             [2 / math.sqrt(4 + EPS)]])
    assert torch.allclose(grouped_forward(bn(), x, 2), expected, atol=1e-6)
    whole = grouped_forward(bn(), x, None)
    assert torch.allclose(whole, (x - 6.5) / (x.var(unbiased=False) + EPS).sqrt(), atol=1e-6)
    with pytest.raises(ConfigError, match="groups of 3"):
        grouped_forward(bn(), x, 3)


def test_shuffled_forward_on_one_process_uses_shuffled_groups_and_restores_order():
    x = torch.arange(8.0).view(8, 1) ** 2
    seed = (0, 5, 1)
    perm = seeded_permutation(8, seed)
    assert torch.equal(perm, seeded_permutation(8, seed)) and not torch.equal(perm, seeded_permutation(8, (0, 6, 1)))
    out = shuffled_forward(bn(), x, 2, seed)
    expected = torch.empty_like(x)
    for group in perm.view(4, 2):  # each group of the permuted batch is normalised on its own
        vals = x[group]
        expected[group] = (vals - vals.mean()) / (vals.var(unbiased=False) + EPS).sqrt()
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(shuffled_forward(nn.Identity(), x, 2, seed), x)


class Recorder(nn.Module):
    """Identity that keeps what it saw (the samples of each BN group)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x * 2


def _gloo_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        queue = MoCoQueue(dim=8, size=6, seed=0)
        queue.enqueue(torch.stack([unit(2 * rank), unit(2 * rank + 1)]))
        after_one = queue.queue.clone()
        queue.enqueue(torch.stack([unit(4 + 2 * rank), unit(5 + 2 * rank)]))  # 4 more keys: wraps to rows 4, 5, 0, 1
        # MoCo's cross-rank batch shuffle: every sample is encoded once, by some rank, and comes back in order
        images = torch.arange(4.0).view(4, 1) + 10 * rank
        recorder = Recorder()
        keys = shuffled_forward(recorder, images, 2, (0, 3, 0))
        torch.save({"after_one": after_one, "queue": queue.queue, "ptr": queue.ptr, "keys": keys,
                    "seen": recorder.seen}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_enqueue_every_key_once_in_rank_order(tmp_path):
    mp.start_processes(_gloo_worker, args=(2, f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2,
                       start_method="fork")
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    initial = MoCoQueue(8, 6, seed=0).queue
    assert torch.equal(got[0]["after_one"][:4], torch.stack([unit(i) for i in range(4)]))
    assert torch.equal(got[0]["after_one"][4:], initial[4:])
    assert torch.equal(got[0]["queue"], torch.stack([unit(6), unit(7), unit(2), unit(3), unit(4), unit(5)]))
    assert int(got[0]["ptr"]) == int(got[1]["ptr"]) == 2
    assert torch.equal(got[0]["queue"], got[1]["queue"])
    everything = torch.cat([torch.arange(4.0) + 10 * r for r in (0, 1)]).view(8, 1)
    perm = seeded_permutation(8, (0, 3, 0))
    for r in (0, 1):
        assert torch.equal(got[r]["keys"], 2 * everything[4 * r:4 * r + 4])  # own rows, own order
        assert torch.equal(torch.cat(got[r]["seen"]), everything[perm[4 * r:4 * r + 4]])  # its slice of the shuffle
        assert [len(s) for s in got[r]["seen"]] == [2, 2]
    encoded = torch.cat([torch.cat(got[r]["seen"]) for r in (0, 1)]).flatten().tolist()
    assert sorted(encoded) == everything.flatten().tolist()  # each sample encoded exactly once
    assert torch.cat(got[0]["seen"]).flatten().tolist() != everything[:4].flatten().tolist()


# ------------------------------------------------------------------------------------------------ the module
TINY = dict(encoder=dict(name="resnet_tiny_test", img_size=(32, 16), drop_path_rate=0.0, last_stride=2),
            text_encoder=dict(name="clip_tiny_test", context_length=16), projection_dim=8, projection_hidden_dim=16,
            queue_size=16, bn_group_size=2, num_attributes=3, positive_ratio=[0.2, 0.5, 0.7])
EOT = 49407  # CLIP's end-of-text id: the text feature is read there


def make_batch(n: int = 4, seed: int = 0, has_caption=(1, 1, 0, 1), has_attributes=(1, 0, 1, 1)) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = F.interpolate(torch.randn(n, 3, 8, 4, generator=g), size=(32, 16), mode="bilinear")
    tokens = torch.randint(1, 400, (n, 16), generator=g)
    tokens[:, 0], tokens[:, 6], tokens[:, 7:] = 49406, EOT, 0
    return {"view_q": images + 0.1 * torch.randn(images.shape, generator=g),
            "view_k": images + 0.1 * torch.randn(images.shape, generator=g), "tokens": tokens,
            "has_caption": torch.tensor(has_caption[:n]).bool(), "attributes": torch.randint(0, 2, (n, 3), generator=g),
            "has_attributes": torch.tensor(has_attributes[:n]).bool()}


def build(**overrides):
    from pedlightning.tasks.valpat import VALPATModule

    torch.manual_seed(0)
    return VALPATModule(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def module():
    return build()


def log_softmax_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy written out: mean of logsumexp(row) - row[target]."""
    return (logits.exp().sum(dim=1).log() - logits.gather(1, target.view(-1, 1)).squeeze(1)).mean()


def test_each_term_matches_a_hand_computation(module):
    batch, hp = make_batch(), module.hparams
    negatives = module.queue.queue.clone()
    assert int(module.queue.ptr) == 0
    losses = module.compute_losses(batch, batch_idx=3)
    assert set(losses) == {"ssl", "itc", "attr"}
    with torch.no_grad():
        # queries: BatchNorm over consecutive groups of bn_group_size=2
        feats = torch.cat([module.encoder(batch["view_q"][:2]), module.encoder(batch["view_q"][2:])])
        q = F.normalize(module.projection(feats), dim=1)
        # keys: the batch permuted with the seed (shuffle_seed, global_step, batch_idx), encoded in groups of 2
        perm = seeded_permutation(4, (0, 0, 3))
        k = torch.empty(4, 8)
        for group in perm.view(2, 2):
            k[group] = module.key_encoder.module(batch["view_k"][group])
        k = F.normalize(k, dim=1)
        ssl_logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.t()], dim=1) / 0.2
        ssl = log_softmax_ce(ssl_logits, torch.zeros(4, dtype=torch.long))
        # ITC over the captioned rows 0, 1, 3: symmetric InfoNCE, scale exp(log(1 / 0.07)) = 1 / 0.07
        rows = torch.tensor([0, 1, 3])
        img = F.normalize(module.image_proj(feats[rows]), dim=1)
        txt = F.normalize(module.text_encoder(batch["tokens"][rows]), dim=1)
        sim = img @ txt.t() / 0.07
        itc = (log_softmax_ce(sim, torch.arange(3)) + log_softmax_ce(sim.t(), torch.arange(3))) / 2
        # ATTR over the annotated rows 0, 2, 3: weights exp(1 - r) on positives, exp(r) on negatives (Jia et al.)
        rows = torch.tensor([0, 2, 3])
        logits, y = module.attr_head(feats)[rows], batch["attributes"][rows].float()
        r = torch.tensor([0.2, 0.5, 0.7])
        w = torch.where(y == 1, torch.exp(1 - r), torch.exp(r))
        p = torch.sigmoid(logits)
        attr = (-(w * (y * p.log() + (1 - y) * (1 - p).log()))).sum(1).mean()
    assert float(losses["ssl"].detach()) == pytest.approx(float(ssl), rel=1e-5)
    assert float(losses["itc"].detach()) == pytest.approx(float(itc), rel=1e-5)
    assert float(losses["attr"].detach()) == pytest.approx(float(attr), rel=1e-5)
    assert hp.temperature == 0.2 and float(module.logit_scale.exp()) == pytest.approx(1 / 0.07)
    # the step's keys were enqueued after the loss used the old queue
    assert int(module.queue.ptr) == 4 and torch.allclose(module.queue.queue[:4], k, atol=1e-6)
    assert torch.equal(module.queue.queue[4:], negatives[4:])
    assert module.sample_counts.tolist() == [4, 1, 1]  # seen, without caption, without attributes


@pytest.mark.parametrize("weights", [dict(itc_weight=0.0), dict(attr_weight=0.0), dict(ssl_weight=0.0),
                                     dict(ssl_weight=0.0, attr_weight=0.0)], ids=str)
def test_a_zero_weight_removes_the_term_and_its_parameters(weights):
    model = build(**weights)
    keys = model.state_dict().keys()
    for term, prefixes in {"ssl": ("projection.", "key_encoder.", "queue."),
                           "itc": ("text_encoder.", "image_proj.", "logit_scale"), "attr": ("attr_head.",)}.items():
        on = weights.get(f"{term}_weight", 1.0) > 0
        assert any(k.startswith(prefixes) for k in keys) == on, term
    losses = model.compute_losses(make_batch())
    assert set(losses) == {t for t in ("ssl", "itc", "attr") if weights.get(f"{t}_weight", 1.0) > 0}
    sum(losses.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused  # DDP without find_unused_parameters needs a gradient for every trainable parameter
    with pytest.raises(ConfigError, match="at least one > 0"):
        build(ssl_weight=0.0, itc_weight=0.0, attr_weight=0.0)


def test_terms_without_any_caption_or_attribute_are_zero_and_counted(module):
    before = module.sample_counts.clone()
    losses = module.compute_losses(make_batch(has_caption=(0, 0, 0, 0), has_attributes=(0, 0, 0, 0)))
    assert float(losses["itc"]) == 0.0 and float(losses["attr"]) == 0.0 and float(losses["ssl"]) > 0
    sum(losses.values()).backward()
    assert module.text_encoder.model.token_embedding.weight.grad is not None  # still in the graph (DDP)
    assert (module.sample_counts - before).tolist() == [4, 4, 4]
    module.zero_grad()


def test_overfitting_one_batch_lowers_each_term():
    model = build(momentum=0.9)
    batch = make_batch()
    negatives = model.queue.queue.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for step in range(30):
        model.queue.queue.copy_(negatives)  # fixed negatives: the objective of one batch, not of a growing queue
        model.queue.ptr.zero_()
        losses = model.compute_losses(batch)
        history.append({k: float(v.detach()) for k, v in losses.items()})
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        model.key_encoder.update(model.student(), step + 1, 30)
    first, last = history[0], history[-1]  # measured: ssl 0.82 -> 0.15, itc 0.91 -> 0.0006, attr 5.5 -> 2.2
    for term in ("ssl", "itc", "attr"):
        assert last[term] < 0.5 * first[term], term


# ------------------------------------------------------------------------------------------------ training runs
class Batches(torch.utils.data.Dataset):
    """8 fixed samples (2 batches of 4), one without a caption and one without attributes per batch."""

    def __init__(self):
        self.items = [make_batch(4, seed=s) for s in (1, 2)]

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {k: v[i % 4] for k, v in self.items[i // 4].items()}


class KeyRecorder(L.Callback):
    """Key encoder and query encoder weights at the start of every batch (the previous step's EMA is done)."""

    def __init__(self):
        self.states = []

    def _record(self, trainer, pl_module):
        pick = lambda m: m.model.conv1[0].weight.detach().clone()  # noqa: E731 - the deep stem's first conv
        self.states.append((trainer.global_step, pick(pl_module.key_encoder.module.encoder), pick(pl_module.encoder)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._record(trainer, pl_module)


class StopAfterEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = trainer.current_epoch == 0


def fit(tmp_path, name, callbacks=(), ckpt_path=None, **trainer_kwargs):
    torch.manual_seed(0)
    model = build(momentum=0.9, optimizer=torch.optim.SGD)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
    trainer = L.Trainer(**{**dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                  enable_model_summary=False, callbacks=[ckpt, *callbacks]), **trainer_kwargs})
    trainer.fit(model, torch.utils.data.DataLoader(Batches(), batch_size=4), ckpt_path=ckpt_path)
    return model, trainer


def test_momentum_update_and_exact_resume(tmp_path):
    rec = KeyRecorder()
    straight, trainer = fit(tmp_path, "a", [rec])
    assert trainer.global_step == 4 and int(straight.queue.ptr) == 0  # 4 steps x 4 keys: the 16 rows once
    # one EMA step per optimizer step: k_t = 0.9 k_{t-1} + 0.1 q_t
    assert [s for s, _, _ in rec.states] == list(range(5))
    for (_, k0, _), (_, k1, q1) in zip(rec.states, rec.states[1:]):
        assert torch.allclose(k1, 0.9 * k0 + 0.1 * q1, atol=1e-6)
    assert not torch.allclose(rec.states[-1][1], rec.states[0][1])
    assert straight.sample_counts.tolist() == [16, 4, 4]
    assert float(trainer.callback_metrics["train/no_caption_count"]) == 2.0  # per epoch

    fit(tmp_path, "b", [StopAfterEpoch()])
    resumed, _ = fit(tmp_path, "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    state, again = straight.state_dict(), resumed.state_dict()
    assert state.keys() == again.keys() and {"queue.queue", "queue.ptr", "key_encoder.last_step"} <= state.keys()
    for key, value in state.items():
        assert torch.allclose(value.float(), again[key].float(), atol=1e-6), key


class QueueSaver(L.Callback):
    def __init__(self, out: str):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save({"queue": pl_module.queue.queue, "ptr": pl_module.queue.ptr,
                    "key": pl_module.key_encoder.module.projection.net[2].weight,
                    "counts": pl_module.sample_counts}, f"{self.out}/rank{trainer.global_rank}.pt")


def test_two_process_ddp_fit_keeps_identical_queues(tmp_path):
    """2 gloo processes, no find_unused_parameters (every parameter must get a gradient on each rank).

    ddp_fork is ddp_spawn's DDP started with fork: the children keep the imported stack (measured here: 4 s against
    122 s for ddp_spawn, whose children re-import torch, Lightning and this module).
    """
    fit(tmp_path, "ddp", [QueueSaver(str(tmp_path))], max_epochs=1, devices=2,
                         strategy="ddp_fork")
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert int(got[0]["ptr"]) == int(got[1]["ptr"]) == 8  # 1 step per rank x 4 keys x 2 ranks
    assert torch.equal(got[0]["queue"], got[1]["queue"]) and torch.equal(got[0]["key"], got[1]["key"])
    assert not torch.equal(got[0]["queue"][:8], MoCoQueue(8, 16, seed=0).queue[:8])
    # counted over both ranks: the 8 samples, 2 without a caption, 2 without attributes
    assert got[0]["counts"].tolist() == got[1]["counts"].tolist() == [8, 2, 2]


# ------------------------------------------------------------------------------------------------ through the CLI
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "valpat")
PRETRAIN_TINY = ["--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                 ("--data.init_args.synthetic={num_images: 48, shard_size: 16, size: [64, 32], missing_captions: 0.2, "
                  "missing_attributes: 0.2}"), "--data.init_args.batch_size=16", "--data.init_args.num_workers=0",
                 "--data.init_args.shuffle_buffer=16", "--model.init_args.queue_size=64",
                 "--model.init_args.bn_group_size=8"]


def cli(args: list[str]):
    from pedlightning.cli import PedLightningCLI, RunConfigSaver

    with mock.patch.object(sys, "argv", ["pedlightning"]):
        return PedLightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                               subclass_mode_data=True, save_config_callback=RunConfigSaver,
                               save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The demo pre-training config, shrunk to 2 steps on 48 synthetic LUPerson-TA samples."""
    tmp = tmp_path_factory.mktemp("valpat")
    run = cli(["fit", "--config", os.path.join(CONFIGS, "demo_pretrain_synthetic.yaml"), *PRETRAIN_TINY,
               f"--trainer.default_root_dir={tmp / 'run'}", f"--data.init_args.root={tmp / 'shards'}"])
    return tmp, run


def test_pretraining_through_the_cli_checkpoints_queue_and_counts(pretrained):
    tmp, run = pretrained
    assert run.trainer.global_step == 2
    state = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(state["queue.ptr"]) == 32 and state["queue.queue"].shape == (64, 64)
    counts = state["sample_counts"].tolist()
    assert counts[0] == 32 and 0 < counts[1] < 32 and 0 < counts[2] < 32  # ~20% without caption / attributes
    ratio = torch.tensor(run.datamodule.data_spec().positive_ratio)
    assert torch.allclose(state["positive_ratio"], ratio) and len(ratio) == 26
    for prefix in ("encoder.model.", "key_encoder.module.encoder.model.", "text_encoder.model.", "attr_head."):
        assert any(k.startswith(prefix) for k in state), prefix


def test_export_encoder_works_on_a_valpat_checkpoint(pretrained, capsys):
    from pedlightning.cli import main

    tmp, _ = pretrained
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    main(["export-encoder", str(ckpt), str(tmp / "encoder.pth")])
    assert "loads strictly into resnet_tiny_test" in capsys.readouterr().out
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    exported = torch.load(tmp / "encoder.pth", weights_only=True)
    assert exported.keys() == {k[len("encoder.model."):] for k in state if k.startswith("encoder.model.")}


FINETUNE_TINY = {
    "ReIDModule": ["--data.init_args.synthetic={num_train_ids: 8, num_test_ids: 6, size: [64, 32]}",
                   "--data.init_args.batch_size=16"],
    "AttributeModule": ["--data.init_args.synthetic={num_train: 32, num_val: 8, num_test: 8, size: [64, 32]}",
                        "--data.init_args.batch_size=16"],
    "TextReIDModule": [("--data.init_args.synthetic={num_train_ids: 8, num_val_ids: 4, num_test_ids: 4, "
                        "images_per_id: 2, size: [64, 32]}"), "--data.init_args.batch_size=8",
                       "--data.init_args.tokenizer=clip_tiny_test",
                       "--model.init_args.text_encoder.name=clip_tiny_test"],
}


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(CONFIGS, "*finetune*.yaml"))), ids=os.path.basename)
def test_every_finetune_config_loads_every_encoder_key_and_runs_2_steps(pretrained, config, tmp_path):
    """Each fine-tune config as written, the encoder shrunk to the tiny pre-trained one and the data synthetic."""
    tmp, _ = pretrained
    ckpt = str(tmp / "run" / "checkpoints" / "last.ckpt")
    with open(config) as f:
        task = yaml.safe_load(f)["model"]["class_path"].rsplit(".", 1)[1]
    image = "image_encoder" if task == "TextReIDModule" else "encoder"
    args = ["fit", "--config", config, f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.precision=32-true", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
            f"--model.init_args.{image}.name=resnet_tiny_test", f"--model.init_args.{image}.pretrained={ckpt}",
            f"--data.init_args.root={tmp_path / 'data'}", "--data.init_args.synthesize=true",
            "--data.init_args.num_workers=0", *FINETUNE_TINY[task]]
    if task == "TextReIDModule":
        args.append(f"--model.init_args.text_encoder.pretrained={ckpt}")
    run = cli(args)
    assert run.trainer.global_step == 2
    encoder = getattr(run.model, image)
    report = encoder.pretrained_report
    assert set(report.loaded) == set(encoder.model.state_dict()) and not report.missing and not report.skipped
    assert report.prefix == "encoder.model." and any(k.startswith("key_encoder.") for k in report.ignored)
    if task == "TextReIDModule":
        text = run.model.text_encoder.pretrained_report
        assert set(text.loaded) == set(run.model.text_encoder.model.state_dict()) and not text.missing


@pytest.mark.parametrize("config", ["pretrain_luperson_ta_r50.yaml", "pretrain_luperson_ta_vitb.yaml"])
def test_paper_scale_pretraining_configs_run_2_steps_shrunk(config, tmp_path):
    tiny = ["--model.init_args.encoder.name=resnet_tiny_test"] if "r50" in config else [
        "--model.init_args.encoder.name=vit_tiny_test", "--model.init_args.encoder.model_kwargs={patch_size: 8}"]
    run = cli(["fit", "--config", os.path.join(CONFIGS, config), *PRETRAIN_TINY, *tiny,
               f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.init_args.root={tmp_path / 'shards'}",
               "--data.init_args.synthesize=true", "--trainer.accelerator=cpu", "--trainer.devices=1",
               "--trainer.strategy=auto", "--trainer.precision=32-true", "--trainer.callbacks=[]",
               "--model.init_args.encoder.img_size=[64, 32]", "--data.init_args.img_size=[64, 32]",
               "--model.init_args.text_encoder.name=clip_tiny_test", "--data.init_args.tokenizer=clip_tiny_test"])
    assert run.trainer.global_step == 2 and int(run.model.queue.ptr) == 32
