"""LCR2SModule: a support-set "richer" teacher, then a single-input student distilled from it (LCR²S)."""

from __future__ import annotations

import inspect
import os
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from pedlightning.errors import CheckpointError, ConfigError
from pedlightning.losses.distillation import (
    FeatureDistance,
    feature_distillation,
    relation_distillation,
)
from pedlightning.metrics import TieRule
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.fusion import SupportFusion, support_mask
from pedlightning.models.text import TextEncoderConfig
from pedlightning.optim import Schedule
from pedlightning.tasks.text_reid import TextReIDModule

Stage = Literal["teacher", "student"]


class _Frozen:
    """Holds the frozen teacher outside the module tree: not in ``parameters()``, ``state_dict()``, the optimizer
    or DDP's gradient buckets, so the student's checkpoints and exported weights never contain it."""

    def __init__(self, module: LCR2SModule):
        self.module = module


class LCR2SModule(TextReIDModule):
    """LCR²S (Yan et al., "Learning Comprehensive Representations with Richer Self for Text-to-Image Person
    Re-Identification", ACM MM 2023), on the encoders, losses and evaluation of :class:`TextReIDModule`.

    Two runs of this class, chosen by ``stage``:

    - ``teacher``: the "richer" model. In an identity batch (P identities x K distinct images, set
      ``data.init_args.num_instances: K``), every image is fused with a support set of other images of its
      identity, every caption with other captions of its identity (:func:`~pedlightning.models.fusion.support_mask`,
      drawn at random, seeded), by one :class:`~pedlightning.models.fusion.SupportFusion` per modality. SDM + ID
      (and ITC if weighted) train on the enriched features; ``single_feature_loss`` adds the same terms on the
      single features.
    - ``student``: the single-input model used at inference. The teacher is read from ``teacher_ckpt`` and frozen
      (eval mode, no gradients, outside the module tree); the student's encoders and classifier start as copies
      of the teacher's (``init_from_teacher``). Loss = SDM + ID on the student's features
      + ``feature_kd_weight`` (alpha) x feature distillation of both modalities towards the teacher's enriched
      features + ``relation_kd_weight`` (beta) x relation distillation of the in-batch image-text similarity
      matrices (:mod:`pedlightning.losses.distillation`).

    Validation and test rank the gallery with one caption and one image at a time (no support set): the student
    with its single features; the teacher with each sample fused with itself alone (Assumption: the deployable
    teacher; its upper reference with ground-truth support sets at test is :meth:`fuse_split`).

    Args:
        image_encoder, text_encoder, num_classes, sdm_weight, id_weight, itc_weight, logit_scale, report_chance,
            ties, optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio: as :class:`TextReIDModule`
            (Assumption: its IRRA defaults; the paper's own towers were ResNet-50 and BERT / TextCNN).
        stage: ``teacher`` or ``student``.
        teacher_ckpt: the teacher's checkpoint (a ``stage: teacher`` run); needed to fit a student, not to test it.
        support_size: teacher stage: support samples per sample; ``None`` = every other sample of its identity in
            the batch (K - 1), ``0`` = none (a fusion without support: plain self-distillation). Assumption:
            ``None``. A student's teacher enriches with its own ``support_size`` (the one it was trained with).
        fusion_heads, fusion_depth, fusion_mlp_dim, fusion_dropout: :class:`SupportFusion` (Assumption: 8 heads,
            1 layer, MLP 4 x width, no dropout; the paper does not give them).
        single_feature_loss: teacher only: also apply the matching losses to the single (unfused) features.
            Assumption: off (the paper aligns the enriched features).
        feature_kd_weight: alpha. Assumption: 1.0.
        relation_kd_weight: beta. Assumption: 1.0.
        feature_distance: ``mse`` (the paper's) or ``cosine``; see :func:`feature_distillation`.
        relation_normalize: divide the Frobenius norm by the batch size (Assumption, see
            :func:`relation_distillation`).
        init_from_teacher: start the student from the teacher's encoders and classifier (Assumption: the paper's
            "lightweight" student is not said to be initialised otherwise).
        support_seed: seed of the support-set draws (combined with epoch, batch index and rank, so a resumed run
            draws the same support sets).
        optimization: the other options of :class:`TaskModule` by name (``warmup_start_factor``,
            ``lr_milestones_epochs``, ``lr_gamma``, ``lr_multipliers``, ``bias_lr_factor``, ``no_decay_names``,
            ``decay_1d_params``).
    """

    def __init__(self, image_encoder: ImageEncoderConfig = ImageEncoderConfig(
                     name="open_clip:ViT-B-16", img_size=(384, 128), drop_path_rate=0.0),
                 text_encoder: TextEncoderConfig = TextEncoderConfig(), stage: Stage = "teacher",
                 teacher_ckpt: str | None = None, support_size: int | None = None, fusion_heads: int = 8,
                 fusion_depth: int = 1, fusion_mlp_dim: int | None = None, fusion_dropout: float = 0.0,
                 single_feature_loss: bool = False, feature_kd_weight: float = 1.0, relation_kd_weight: float = 1.0,
                 feature_distance: FeatureDistance = "mse", relation_normalize: bool = True,
                 init_from_teacher: bool = True, support_seed: int = 0, num_classes: int | None = None,
                 sdm_weight: float = 1.0, id_weight: float = 1.0, itc_weight: float = 0.0, logit_scale: float = 50.0,
                 report_chance: bool = True, ties: TieRule = "pessimistic",
                 optimizer: OptimizerCallable = torch.optim.Adam, weight_decay: float = 4e-5,
                 lr_schedule: Schedule = "cosine", warmup_epochs: float = 5.0, min_lr_ratio: float = 0.0,
                 **optimization: Any):
        super().__init__(image_encoder, text_encoder, num_classes, sdm_weight, id_weight, itc_weight, logit_scale,
                         report_chance, ties, optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio,
                         **optimization)
        if stage not in ("teacher", "student"):
            raise ConfigError(f"LCR2SModule: stage must be 'teacher' or 'student', got {stage!r}")
        if support_size is not None and support_size < 0:
            raise ConfigError(f"LCR2SModule: support_size must be >= 0 or null (all), got {support_size}")
        if min(feature_kd_weight, relation_kd_weight) < 0:
            raise ConfigError(f"LCR2SModule: feature_kd_weight and relation_kd_weight must be >= 0, got "
                              f"{feature_kd_weight}, {relation_kd_weight}")
        if feature_distance not in ("mse", "cosine"):
            raise ConfigError(f"LCR2SModule: feature_distance must be 'mse' or 'cosine', got {feature_distance!r}")
        self.image_fusion: SupportFusion | None = None
        self.text_fusion: SupportFusion | None = None
        if stage == "teacher":
            self.image_fusion, self.text_fusion = (
                SupportFusion(self.embed_dim, fusion_heads, fusion_depth, fusion_mlp_dim, fusion_dropout)
                for _ in range(2))
        self._teacher: _Frozen | None = None

    @property
    def is_teacher(self) -> bool:
        return self.hparams.stage == "teacher"

    # ----------------------------------------------------------------- support sets and fusion
    def support_generator(self, batch_idx: int) -> torch.Generator:
        """A CPU generator seeded from (``support_seed``, epoch, batch index, rank): reproducible, resume-exact."""
        trainer = self._trainer
        epoch, rank = (trainer.current_epoch, trainer.global_rank) if trainer is not None else (0, 0)
        seed = np.random.SeedSequence([self.hparams.support_seed, epoch, batch_idx, rank]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

    def support_masks(self, batch: dict[str, Any], generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Image and caption support masks of an identity batch: the other images (``image_index``) and the other
        captions (``index``) of each sample's identity."""
        pids, size = batch["pid"], self.hparams.support_size
        image_mask = support_mask(pids, size, generator, batch.get("image_index"))
        text_mask = support_mask(pids, size, generator, batch.get("index"))
        return image_mask, text_mask

    def enrich(self, image_feats: Tensor, text_feats: Tensor, image_mask: Tensor,
               text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's enriched features: each sample fused with the rows of its mask."""
        if not self.is_teacher:
            raise ConfigError("LCR2SModule: only a stage='teacher' model has support fusion")
        return self.image_fusion(image_feats, image_mask), self.text_fusion(text_feats, text_mask)

    def fuse_split(self, feats: Tensor, pids: Tensor, modality: Literal["image", "text"],
                   support_size: int | None = None, generator: torch.Generator | None = None,
                   distinct: Tensor | None = None) -> Tensor:
        """Teacher features of a whole split with support sets from its ground-truth identities
        (:func:`support_mask`; ``distinct``: e.g. each caption's image index, so that, as in training, a caption's
        support holds captions of the identity's other images, not the second caption of its own image).

        An oracle (test labels choose the support sets), reported only as the teacher's upper reference.
        """
        fusion = self.image_fusion if modality == "image" else self.text_fusion
        if fusion is None:
            raise ConfigError("LCR2SModule.fuse_split needs a stage='teacher' model")
        return fusion(feats, support_mask(pids, support_size, generator, distinct))

    def _alone(self, fusion: SupportFusion | None, feats: Tensor) -> Tensor:
        if fusion is None:
            return feats
        return fusion(feats, torch.eye(len(feats), dtype=torch.bool, device=feats.device))

    def query_features(self, batch: dict[str, Any]) -> Tensor:
        return self._alone(self.text_fusion, self.encode_text(batch["tokens"]))

    def gallery_features(self, batch: dict[str, Any]) -> Tensor:
        return self._alone(self.image_fusion, self.encode_image(batch["image"]))

    # ----------------------------------------------------------------- the frozen teacher
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and not self.is_teacher:
            teacher = self.teacher  # loaded (and checked) now, not at the first training step
            if self.hparams.init_from_teacher:
                self._init_from(teacher)

    def recipe_pretrained_encoders(self) -> list[tuple[str, Any]]:
        """A student initialised from the teacher has trained weights whatever its ``pretrained`` says."""
        if not self.is_teacher and self.hparams.init_from_teacher:
            return []
        return super().recipe_pretrained_encoders()

    @property
    def teacher(self) -> LCR2SModule:
        """The frozen teacher (student stage), loaded from ``teacher_ckpt`` on first use."""
        if self.is_teacher:
            raise ConfigError("LCR2SModule: a stage='teacher' model has no teacher")
        if self._teacher is None:
            self._teacher = _Frozen(load_teacher(self.hparams.teacher_ckpt))
        module = self._teacher.module
        param = next(self.parameters())
        return module.to(device=param.device, dtype=param.dtype)

    def _init_from(self, teacher: LCR2SModule) -> None:
        """Copy the teacher's encoders, projection and classifier (every key the student has) into the student."""
        ours, theirs = self.state_dict(), teacher.state_dict()
        missing = [k for k in ours if k not in theirs]
        shapes = [f"{k}: {tuple(ours[k].shape)} vs {tuple(theirs[k].shape)}" for k in ours
                  if k in theirs and ours[k].shape != theirs[k].shape]
        if missing or shapes:
            raise ConfigError(f"LCR2SModule: the student cannot start from the teacher {self.hparams.teacher_ckpt}: "
                              f"keys missing in the teacher {missing[:5]}, shape mismatches {shapes[:5]}; give the "
                              "student the teacher's image_encoder / text_encoder / num_classes, or set "
                              "init_from_teacher: false")
        self.load_state_dict({k: theirs[k] for k in ours})
        rank_zero_info(f"LCR2SModule: student initialised from the teacher's {len(ours)} tensors "
                       f"({self.hparams.teacher_ckpt}).")

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hp, pids = self.hparams, batch["pid"]
        images, texts = self.encode_image(batch["image"]), self.encode_text(batch["tokens"])
        generator = self.support_generator(batch_idx)
        single: dict[str, Tensor] = {}
        if self.is_teacher:
            rich_images, rich_texts = self.enrich(images, texts, *self.support_masks(batch, generator))
            losses = self.matching_losses(rich_images, rich_texts, pids)
            if hp.single_feature_loss:
                single = self.matching_losses(images, texts, pids)
        else:
            teacher = self.teacher
            with torch.no_grad():  # the teacher's support sets, of the size it was trained with
                rich_images, rich_texts = teacher.enrich(teacher.encode_image(batch["image"]),
                                                         teacher.encode_text(batch["tokens"]),
                                                         *teacher.support_masks(batch, generator))
            losses = self.matching_losses(images, texts, pids)
            if hp.feature_kd_weight > 0:
                losses["feature_kd"] = (feature_distillation(images, rich_images, hp.feature_distance)
                                        + feature_distillation(texts, rich_texts, hp.feature_distance))
            if hp.relation_kd_weight > 0:
                losses["relation_kd"] = relation_distillation(images, texts, rich_images, rich_texts,
                                                              hp.relation_normalize)
        loss = self.weighted_sum(losses) + (self.weighted_sum(single) if single else 0)
        logged = {f"train/{k}_loss": v for k, v in losses.items()}
        logged.update({f"train/single_{k}_loss": v for k, v in single.items()})
        self.log_dict({"train/loss": loss, **logged}, prog_bar=True, batch_size=len(pids))
        return loss


def load_teacher(path: str | None) -> LCR2SModule:
    """A frozen (eval, ``requires_grad=False``) teacher from a ``stage: teacher`` checkpoint, strictly loaded.

    The encoders are built without their ``pretrained`` files (the checkpoint holds every weight), so the teacher
    loads where those files are absent.
    """
    if not path:
        raise ConfigError("LCR2SModule(stage='student') needs model.init_args.teacher_ckpt: the checkpoint of a "
                          "stage='teacher' run (e.g. <teacher run>/checkpoints/last.ckpt)")
    if not os.path.isfile(path):
        raise ConfigError(f"model.init_args.teacher_ckpt={path}: no such file; fit the teacher first "
                          "(stage: teacher)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if hparams.get("stage") != "teacher" or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an LCR2SModule teacher checkpoint (hyper-parameter stage="
                              f"{hparams.get('stage')!r}, expected 'teacher')")
    names = set(inspect.signature(LCR2SModule.__init__).parameters) - {"self", "optimizer"}
    kwargs = {k: v for k, v in hparams.items() if k in names}
    for key in ("image_encoder", "text_encoder"):
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = {**kwargs[key], "pretrained": None}
    teacher = LCR2SModule(**kwargs)
    result = teacher.load_state_dict(ckpt["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"teacher checkpoint {path} does not fit its own hyper-parameters: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return teacher.eval().requires_grad_(False)
