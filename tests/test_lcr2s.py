"""LCR²S: support-set masks and fusion (identity isolation, a hand-computed attention), distillation losses
against hand computations, LCR2SModule (loss composition, frozen teacher outside the student, 2-process fits),
the CLI chain teacher -> student -> test, and every config."""

from __future__ import annotations

import functools
import glob
import math
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from pedlightning.cli import main
from pedlightning.data.datamodules.text import TextReIDDataModule
from pedlightning.data.synthetic import write_cuhk_pedes
from pedlightning.data.tokenizer import build_tokenizer
from pedlightning.errors import CheckpointError, ConfigError
from pedlightning.losses import sdm_loss
from pedlightning.losses.distillation import (
    feature_distillation,
    relation_distillation,
    similarity_matrix,
)
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.fusion import FusionBlock, SupportFusion, support_mask
from pedlightning.models.text import TextEncoderConfig
from pedlightning.tasks.lcr2s import LCR2SModule
from tests.support.results import logged_test_metrics, text_to_image_on_test_split

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------------------------- support sets

PIDS = torch.tensor([0, 0, 0, 1, 1, 2])


def test_full_support_is_every_other_sample_of_the_identity():
    expected = torch.tensor([[1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(support_mask(PIDS), expected)
    assert torch.equal(support_mask(PIDS, 0), torch.eye(6, dtype=torch.bool))


def test_distinct_drops_other_captions_of_the_same_image():
    # Samples 0 and 1 are two captions of image 7: neither is in the other's image support set.
    mask = support_mask(PIDS, distinct=torch.tensor([7, 7, 8, 9, 10, 11]))
    assert mask[0].tolist() == [True, False, True, False, False, False]
    assert mask[1].tolist() == [False, True, True, False, False, False]
    assert mask[2].tolist() == [True, True, True, False, False, False]


def test_random_support_is_seeded_uniform_and_inside_the_identity():
    def draw(seed):
        return support_mask(PIDS, 1, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    counts = torch.zeros(6, 6)
    for seed in range(400):
        mask = draw(seed)
        assert torch.equal(mask & ~support_mask(PIDS), torch.zeros(6, 6, dtype=torch.bool))  # never another id
        assert mask.diagonal().all()
        assert mask.sum(1).tolist() == [2, 2, 2, 2, 2, 1]  # itself + 1 (identity 2 has no other sample)
        counts += mask.float()
    # Rows of identity 0 choose between two candidates: each about half of the time.
    off = counts[:3, :3][~torch.eye(3, dtype=torch.bool)] / 400
    assert off.min() > 0.4 and off.max() < 0.6, off
    assert counts[3, 4] == counts[4, 3] == 400


def test_bad_support_size_is_a_config_error():
    with pytest.raises(ConfigError, match="support_size must be >= 0"):
        support_mask(PIDS, -1)


# ----------------------------------------------------------------------------------------------------- fusion


def test_fused_features_depend_only_on_the_own_identity():
    torch.manual_seed(0)
    fusion = SupportFusion(16, num_heads=4, depth=2, mlp_dim=24).eval()
    pids = torch.arange(3).repeat_interleave(3)  # P=3 identities x K=3
    mask = support_mask(pids, 1, torch.Generator().manual_seed(0))
    feats = torch.randn(9, 16)
    before = fusion(feats, mask)
    changed = feats.clone()
    changed[3:] = 100 * torch.randn(6, 16)  # identities 1 and 2
    after = fusion(changed, mask)
    assert (after[:3] - before[:3]).abs().max() < 1e-6
    assert (after[3:] - before[3:]).abs().min() > 1e-3
    # ... and identity 0's own support does change its fused features.
    own = feats.clone()
    own[1] += 1.0
    assert (fusion(own, mask)[:3] - before[:3]).abs().max() > 1e-3


def test_fusion_block_against_a_hand_computed_attention():
    """One head, two samples of one identity: attention weights softmax(q.k / sqrt(d)) over [self; other]."""
    torch.manual_seed(1)
    block = FusionBlock(4, num_heads=1, mlp_dim=6).eval()
    x = torch.randn(3, 4)
    mask = support_mask(torch.tensor([0, 0, 1]))
    wq, wk, wv = block.attn.in_proj_weight.chunk(3)
    bq, bk, bv = block.attn.in_proj_bias.chunk(3)
    out = []
    torch.set_grad_enabled(False)
    for i, keys in ((0, [0, 1]), (1, [0, 1]), (2, [2])):
        q = wq @ x[i] + bq
        scores = [float(q @ (wk @ x[j] + bk)) / math.sqrt(4) for j in keys]
        weights = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
        attended = sum(w * (wv @ x[j] + bv) for w, j in zip(weights, keys))
        attended = block.attn.out_proj.weight @ attended + block.attn.out_proj.bias
        h = F.layer_norm(x[i] + attended, (4,), block.norm1.weight, block.norm1.bias)
        out.append(F.layer_norm(h + block.mlp(h), (4,), block.norm2.weight, block.norm2.bias))
    torch.set_grad_enabled(True)
    torch.testing.assert_close(block(x, mask), torch.stack(out), atol=1e-5, rtol=1e-5)


def test_fusion_rejects_a_wrong_mask():
    with pytest.raises(ConfigError, match=r"bool \(3, 3\)"):
        SupportFusion(8, num_heads=2)(torch.randn(3, 8), torch.ones(3, 3))


# -------------------------------------------------------------------------------------------- distillation


def test_feature_distillation_by_hand():
    student = torch.tensor([[3.0, 4.0], [0.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0], [0.0, -1.0]], requires_grad=True)
    # Normalised: s = (0.6, 0.8), (0, 1); t = (1, 0), (0, -1).
    # mse: ((0.6 - 1)^2 + 0.8^2 + (1 + 1)^2) / 2 = (0.8 + 4) / 2; cosine: ((1 - 0.6) + (1 + 1)) / 2.
    assert feature_distillation(student, teacher, "mse").item() == pytest.approx(2.4, abs=1e-6)
    loss = feature_distillation(student, teacher, "cosine")
    assert loss.item() == pytest.approx(1.2, abs=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="'mse' or 'cosine'"):
        feature_distillation(student, teacher, "l1")


def test_relation_distillation_by_hand():
    s_img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s_txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t_img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    t_txt = torch.tensor([[0.0, 3.0], [1.0, 0.0]], requires_grad=True)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(similarity_matrix(s_img, s_txt), torch.tensor([[1.0, r], [0.0, r]]))
    # S_student - S_teacher = [[1 - 0, r - 1], [0 - 1, r - 0]]
    frobenius = math.sqrt(1 + (r - 1) ** 2 + 1 + r**2)
    assert relation_distillation(s_img, s_txt, t_img, t_txt, normalize_by_batch=False).item() == pytest.approx(
        frobenius, abs=1e-6)
    loss = relation_distillation(s_img.requires_grad_(), s_txt, t_img, t_txt)
    assert loss.item() == pytest.approx(frobenius / 2, abs=1e-6)
    loss.backward()
    assert t_img.grad is None and t_txt.grad is None and s_img.grad.abs().sum() > 0
    # Equal matrices: loss 0 with a zero (not NaN) gradient.
    same = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    zero = relation_distillation(same, same, same.detach(), same.detach())
    zero.backward()
    assert zero.item() == 0 and torch.equal(same.grad, torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------------ LCR2SModule

SIZE = (64, 32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs/lcr2s/*.yaml")))


@pytest.fixture(scope="module")
def cuhk(tmp_path_factory) -> str:
    """8 training identities x 4 images (two captions each): identity batches of 4 x 4 distinct images."""
    root = str(tmp_path_factory.mktemp("lcr2s") / "cuhk_pedes")
    return write_cuhk_pedes(root, num_train_ids=8, num_val_ids=2, num_test_ids=4, images_per_id=4, seed=0,
                            size=(64, 32))


def _model(stage="teacher", **kw) -> LCR2SModule:
    kw = {"num_classes": 8, "fusion_heads": 4, "warmup_epochs": 0.0,
          "optimizer": functools.partial(torch.optim.Adam, lr=1e-3), **kw}
    return LCR2SModule(ImageEncoderConfig("resnet_tiny_test", SIZE), TextEncoderConfig("clip_tiny_test"), stage, **kw)


def _data(root, **kw) -> TextReIDDataModule:
    kw = {"img_size": SIZE, "batch_size": 16, "num_instances": 4, "num_workers": 0, "tokenizer": "clip_tiny_test",
          "flip_prob": 0.0, "padding": 0, "erasing_prob": 0.0, **kw}
    return TextReIDDataModule("cuhk_pedes", root, **kw)


def _trainer(tmp_path, **kw) -> L.Trainer:
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
          "num_sanity_val_steps": 0, "use_distributed_sampler": False, "default_root_dir": str(tmp_path), **kw}
    return L.Trainer(**kw)


def _batch(pids=(0, 0, 0, 0, 1, 1, 1, 1), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = build_tokenizer("clip_tiny_test")([f"a person in {c} clothes" for c in
                                                ("red", "blue", "green", "black", "white", "grey", "pink", "brown")])
    return {"image": torch.randn(len(pids), 3, *SIZE, generator=g), "tokens": tokens[:len(pids)],
            "pid": torch.tensor(pids), "image_index": torch.arange(len(pids)), "index": torch.arange(len(pids))}


def _teacher_file(tmp_path, **kw) -> tuple[LCR2SModule, str]:
    torch.manual_seed(0)
    teacher = _model(**kw).eval()
    path = str(tmp_path / "teacher.ckpt")
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path)
    return teacher, path


def test_teacher_enrichment_ignores_other_identities():
    torch.manual_seed(0)
    teacher = _model(support_size=2).eval()  # eval: the encoders' batch norm must not mix the batch either
    batch = _batch()
    masks = teacher.support_masks(batch, teacher.support_generator(0))
    with torch.no_grad():
        before = teacher.enrich(teacher.encode_image(batch["image"]), teacher.encode_text(batch["tokens"]), *masks)
        other = dict(batch, image=batch["image"].clone(), tokens=batch["tokens"].clone())
        other["image"][4:] = torch.rand(4, 3, *SIZE)
        other["tokens"][4:] = batch["tokens"][[0, 1, 2, 3]]
        after = teacher.enrich(teacher.encode_image(other["image"]), teacher.encode_text(other["tokens"]), *masks)
    for b, a in zip(before, after):
        assert (a[:4] - b[:4]).abs().max() < 1e-6 and (a[4:] - b[4:]).abs().max() > 1e-3
    assert masks[0].sum(1).tolist() == [3] * 8  # itself + support_size 2


def test_oracle_split_fusion_follows_identities_and_can_skip_captions_of_the_same_image():
    """``fuse_split`` (the teacher's upper reference): captions 0, 1 describe image 0, captions 2, 3 image 1 (one
    person), 4, 5 the one image of another. With ``distinct`` = image index, caption 0's support is captions 2 and 3
    only, and captions 4, 5 have none."""
    torch.manual_seed(0)
    teacher = _model().eval()
    feats, pids, images = torch.randn(6, 64), torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 0, 1, 1, 2, 2])

    def changed(distinct, row):  # does caption 0's fused feature move when caption `row` changes?
        with torch.no_grad():
            before = teacher.fuse_split(feats, pids, "text", distinct=distinct)
            other = feats.clone()
            other[row] += 1.0
            return (teacher.fuse_split(other, pids, "text", distinct=distinct)[0] - before[0]).abs().max() > 1e-4

    assert changed(images, 2) and not changed(images, 1) and not changed(images, 4)
    assert changed(None, 1) and changed(None, 2) and not changed(None, 5)
    with torch.no_grad():
        mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0],
                             [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # 4, 5: one image
        expected = teacher.text_fusion(feats, mask)
        assert torch.allclose(teacher.fuse_split(feats, pids, "text", distinct=images), expected, atol=1e-6)
    with pytest.raises(ConfigError, match="needs a stage='teacher' model"):
        _model("student").fuse_split(feats, pids, "image")


def test_student_starts_as_the_teacher_and_its_loss_is_the_weighted_sum_of_the_terms(tmp_path):
    teacher, path = _teacher_file(tmp_path, support_size=2)  # the student enriches with the teacher's size
    student = _model("student", teacher_ckpt=path, feature_kd_weight=0.5, relation_kd_weight=2.0).eval()
    assert student.image_fusion is None and not any("fusion" in k for k in student.state_dict())
    student.setup("fit")
    theirs = teacher.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in student.state_dict().items())
    batch = _batch()
    with pytest.warns(UserWarning, match="self.log"):
        loss = student.training_step(batch, 3)
    # The same loss from its parts, the teacher's support sets redrawn from the step's generator.
    masks = teacher.support_masks(batch, student.support_generator(3))
    with torch.no_grad():
        image, text = student.encode_image(batch["image"]), student.encode_text(batch["tokens"])
        rich = teacher.enrich(teacher.encode_image(batch["image"]), teacher.encode_text(batch["tokens"]), *masks)
        pids = batch["pid"]
        sdm = sdm_loss(image, text, pids, 50.0)
        ident = (F.cross_entropy(student.classifier(image), pids) + F.cross_entropy(student.classifier(text), pids)) / 2
        feature = feature_distillation(image, rich[0]) + feature_distillation(text, rich[1])
        relation = relation_distillation(image, text, *rich)
    assert float(feature) > 0.01 and float(relation) > 0.01  # single features are not the enriched ones
    assert float(loss.detach()) == pytest.approx(float(sdm + ident + 0.5 * feature + 2.0 * relation), rel=1e-5)


def test_student_without_a_teacher_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="needs model.init_args.teacher_ckpt"):
        _model("student").setup("fit")
    with pytest.raises(ConfigError, match="no such file; fit the teacher first"):
        _model("student", teacher_ckpt=str(tmp_path / "missing.ckpt")).setup("fit")
    student = _model("student")
    path = str(tmp_path / "student.ckpt")
    torch.save({"state_dict": student.state_dict(), "hyper_parameters": dict(student.hparams)}, path)
    with pytest.raises(CheckpointError, match="not an LCR2SModule teacher checkpoint"):
        _model("student", teacher_ckpt=path).setup("fit")


def test_optimization_options_reach_the_optimizer_and_the_teacher_still_loads(tmp_path, capsys):
    """TaskModule's options by name (``**optimization``), from the CLI to the parameter groups; a teacher saved with
    them loads as the frozen teacher (its optimisation options are not needed there)."""
    options = {"lr_multipliers": {"image_fusion": 4.0}, "bias_lr_factor": 2.0}
    with pytest.raises(SystemExit):
        main(["fit", "--config", os.path.join(REPO, "configs/lcr2s/demo_teacher_synthetic.yaml"), "--print_config",
              "--model.init_args.lr_multipliers={image_fusion: 4.0}", "--model.init_args.bias_lr_factor=2.0"])
    resolved = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert {k: resolved[k] for k in options} == options
    teacher = _model(**options)
    assert {k: teacher.hparams[k] for k in options} == options
    optimizer = teacher.configure_optimizers()["optimizer"]
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in teacher.named_parameters():
        bias = "bias" in name.rsplit(".", 1)[-1]  # attention's in_proj_bias included
        expected = 4e-3 if name.startswith("image_fusion.") else 2e-3 if bias else 1e-3
        assert lrs[id(p)] == pytest.approx(expected), name
    assert sorted({round(lr, 6) for lr in lrs.values()}) == [1e-3, 2e-3, 4e-3]
    path = str(tmp_path / "teacher.ckpt")
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path)
    student = _model("student", teacher_ckpt=path)
    assert student.teacher.hparams.stage == "teacher" and student.teacher.lr_multipliers == {}


def _fit_teacher(tmp_path, cuhk, **kw) -> str:
    L.seed_everything(0)
    trainer = _trainer(tmp_path / "teacher", **{"max_steps": 2, **kw})
    teacher = _model()
    trainer.fit(teacher, _data(cuhk))
    path = str(tmp_path / "teacher.ckpt")
    trainer.save_checkpoint(path)
    return path


def test_teacher_is_frozen_unchanged_and_outside_the_student(tmp_path, cuhk):
    path = _fit_teacher(tmp_path, cuhk)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert any(k.startswith("image_fusion.") for k in saved) and any(k.startswith("text_fusion.") for k in saved)
    student = _model("student", teacher_ckpt=path)
    trainer = _trainer(tmp_path / "student", max_steps=3)
    trainer.fit(student, _data(cuhk))
    teacher = student.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items()) and len(saved) == len(
        teacher.state_dict())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert optimized == {id(p) for p in student.parameters() if p.requires_grad}
    # The student trained away from its teacher initialisation; its checkpoint holds the student only.
    assert not torch.equal(student.classifier.weight, saved["classifier.weight"])
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    keys = set(torch.load(tmp_path / "student.ckpt", weights_only=True)["state_dict"])
    assert keys == set(student.state_dict()) == {k for k in saved if "fusion" not in k}
    logged = trainer.callback_metrics
    assert {"train/feature_kd_loss", "train/relation_kd_loss", "train/sdm_loss", "train/id_loss"} <= set(logged)


def _ddp_fit(tmp_path, model, cuhk) -> dict:
    """Two forked CPU processes (gloo), 2 epochs; the last checkpoint, written by rank 0 in its process.

    ddp_fork rather than ddp_spawn, whose children re-import torch, Lightning and this module: the test took 24 s
    with ddp_spawn on an idle 2-core machine, 3 s with ddp_fork under load. The parent forks on one intra-op
    thread (the module's ``one_thread``).
    """
    folder = tmp_path / "ckpt"
    trainer = _trainer(tmp_path, strategy="ddp_fork", devices=2, max_epochs=2, enable_checkpointing=True,
                       callbacks=[ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0)])
    trainer.fit(model, _data(cuhk))
    return torch.load(folder / "last.ckpt", weights_only=True)


def test_two_process_fit_of_each_stage(tmp_path, cuhk):
    """8 identities = 2 identity batches of 4 x 4 per epoch, one per rank: 2 optimizer steps in 2 epochs."""
    L.seed_everything(0)
    teacher = _model()
    initial = {k: v.clone() for k, v in teacher.state_dict().items()}
    ckpt = _ddp_fit(tmp_path / "teacher", teacher, cuhk)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["stage"] == "teacher"
    assert not torch.equal(ckpt["state_dict"]["text_fusion.blocks.0.mlp.0.weight"],
                           initial["text_fusion.blocks.0.mlp.0.weight"])
    path = str(tmp_path / "teacher" / "ckpt" / "last.ckpt")
    L.seed_everything(0)
    student = _ddp_fit(tmp_path / "student", _model("student", teacher_ckpt=path), cuhk)
    assert student["global_step"] == 2 and not any("fusion" in k for k in student["state_dict"])
    assert set(student["state_dict"]) == {k for k in ckpt["state_dict"] if "fusion" not in k}
    assert not torch.equal(student["state_dict"]["classifier.weight"], ckpt["state_dict"]["classifier.weight"])
    # The teacher file is what the teacher stage wrote: the student stage did not touch it.
    again = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(v, again[k]) for k, v in ckpt["state_dict"].items())


def test_cli_chain_teacher_student_test(tmp_path, cuhk):
    """`pedlightning fit` teacher, `fit` student, `test` the student from its saved config with the teacher file
    deleted: the numbers equal retrieval_evaluate on the student's single-input features outside Lightning."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "check_val_every_n_epoch": 1,
                    "callbacks": [{"class_path": "pedlightning.callbacks.RankListCallback",
                                   "init_args": {"num_queries": 3, "top_k": 5}}]},
        "data": {"init_args": {"root": cuhk, "num_workers": 0, "batch_size": 16, "test_batch_size": 16}}}))
    teacher_run, student_run = tmp_path / "teacher", tmp_path / "student"
    main(["fit", "--config", os.path.join(REPO, "configs/lcr2s/demo_teacher_synthetic.yaml"), "--config",
          str(overlay), f"--trainer.default_root_dir={teacher_run}"])
    teacher_ckpt = teacher_run / "checkpoints" / "last.ckpt"
    main(["fit", "--config", os.path.join(REPO, "configs/lcr2s/demo_student_synthetic.yaml"), "--config",
          str(overlay), f"--trainer.default_root_dir={student_run}", f"--model.init_args.teacher_ckpt={teacher_ckpt}"])
    ckpt = student_run / "checkpoints" / "last.ckpt"
    teacher_keys = set(torch.load(teacher_ckpt, weights_only=True)["state_dict"])
    student = torch.load(ckpt, weights_only=True)
    assert student["hyper_parameters"]["stage"] == "student"
    assert set(student["state_dict"]) == {k for k in teacher_keys if "fusion" not in k}
    os.remove(teacher_ckpt)  # test and inference need the student alone
    main(["test", "--config", str(student_run / "config.yaml"), f"--ckpt_path={ckpt}",
          "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={student_run / 'csv'}"])
    logged = logged_test_metrics(student_run / "csv")
    assert os.listdir(student_run / "ranklists")

    model = LCR2SModule.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    data = _data(cuhk)
    data.setup("test")
    expected = text_to_image_on_test_split(model, data)
    assert expected["num_valid_queries"] == 32
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert logged[f"test/{key}"] == pytest.approx(expected[key], abs=1e-6), key


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_config_is_consistent(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    model, data = resolved["model"]["init_args"], resolved["data"]["init_args"]
    assert resolved["model"]["class_path"] == "pedlightning.tasks.lcr2s.LCR2SModule"
    assert model["image_encoder"]["img_size"] == data["img_size"]
    assert model["text_encoder"]["context_length"] == data["context_length"]
    assert data["batch_size"] % data["num_instances"] == 0 and data["num_instances"] >= 2  # support sets exist
    assert data["model_selection"] == ("test" if data["dataset"] == "icfg_pedes" else "val")
    stage = "student" if "student" in os.path.basename(config) else "teacher"
    assert model["stage"] == stage
    if stage == "student":  # the student reads the checkpoint its teacher config writes
        with open(config.replace("student", "teacher")) as f:
            teacher_root = yaml.safe_load(f)["trainer"]["default_root_dir"]
        assert model["teacher_ckpt"] == f"{teacher_root}/checkpoints/last.ckpt"
    if "demo" not in config:
        assert model["logit_scale"] == 50.0 and model["sdm_weight"] == 1.0 and model["id_weight"] == 1.0
        assert tuple(model["image_encoder"]["img_size"]) == (384, 128) and data["batch_size"] == 64


SYNTHETIC = {"cuhk_pedes": "{num_train_ids: 8, num_val_ids: 2, num_test_ids: 2, images_per_id: 4}",
             "icfg_pedes": "{num_train_ids: 8, num_test_ids: 2, images_per_id: 4}",
             "rstpreid": "{num_train_ids: 8, num_val_ids: 2, num_test_ids: 2, images_per_id: 4}"}


@pytest.mark.parametrize("name", ["cuhk_pedes", "icfg_pedes", "rstpreid", "demo"])
def test_configs_run_two_steps_shrunk(name, tmp_path):
    """Teacher then student config as written, with only the data, the towers and the batch shrunk for CPU."""
    dataset = "cuhk_pedes" if name == "demo" else name
    prefix = "demo_" if name == "demo" else f"{name}_"
    suffix = "_synthetic" if name == "demo" else ""
    common = ["--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu",
              "--trainer.devices=1", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
              "--trainer.callbacks=[]", "--model.init_args.image_encoder.name=resnet_tiny_test",
              "--model.init_args.image_encoder.img_size=[64, 32]", "--model.init_args.text_encoder.name=clip_tiny_test",
              "--data.init_args.img_size=[64, 32]", "--data.init_args.tokenizer=clip_tiny_test",
              f"--data.init_args.root={tmp_path}/{dataset}", "--data.init_args.synthesize=true",
              f"--data.init_args.synthetic={SYNTHETIC[dataset]}", "--data.init_args.num_workers=0",
              "--data.init_args.batch_size=8", "--data.init_args.num_instances=4"]
    teacher_cfg = os.path.join(REPO, f"configs/lcr2s/{prefix}teacher{suffix}.yaml")
    main(["fit", "--config", teacher_cfg, f"--trainer.default_root_dir={tmp_path}/teacher",
          "--model.init_args.fusion_heads=4", *common])
    teacher_ckpt = tmp_path / "teacher" / "checkpoints" / "last.ckpt"
    assert torch.load(teacher_ckpt, weights_only=True)["global_step"] == 2
    main(["fit", "--config", teacher_cfg.replace("teacher", "student"), f"--trainer.default_root_dir={tmp_path}/student",
          f"--model.init_args.teacher_ckpt={teacher_ckpt}", *common])
    student = torch.load(tmp_path / "student" / "checkpoints" / "last.ckpt", weights_only=True)
    assert student["global_step"] == 2 and student["hyper_parameters"]["num_classes"] == 8


def test_only_a_student_started_from_its_teacher_skips_the_untrained_weights_warning(tmp_path):
    _, path = _teacher_file(tmp_path)
    teacher_roles = [role for role, _ in _model().recipe_pretrained_encoders()]
    assert teacher_roles == ["image_encoder", "text_encoder"]
    assert _model("student", teacher_ckpt=path).recipe_pretrained_encoders() == []  # weights come from the teacher
    cold = _model("student", teacher_ckpt=path, init_from_teacher=False)
    assert [role for role, _ in cold.recipe_pretrained_encoders()] == teacher_roles
