"""TextReIDModule: text-to-image person search with a CLIP dual encoder (the IRRA baseline without MLM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from pedlightning.callbacks.ranklist import RankListInputs
from pedlightning.errors import ConfigError
from pedlightning.losses import clip_contrastive, sdm_loss
from pedlightning.metrics import RetrievalMetric, retrieval_evaluate
from pedlightning.models.encoders import ImageEncoder
from pedlightning.models.text import ClipDualEncoder
from pedlightning.optim import Schedule
from pedlightning.tasks.base import TaskModule


class TextReIDModule(TaskModule):
    """Image and text towers trained so that each caption retrieves the images of its person.

    The dual-encoder baseline of IRRA (Jiang & Ye, "Cross-Modal Implicit Relation Reasoning and Aligning for
    Text-to-Image Person Retrieval", CVPR 2023) without its MLM branch: CLIP's towers (ViT-B/16 layout, images
    384 x 128), global features = the image CLS token and the text end-of-text token, each projected to the
    joint space. Losses, weighted in the config (a weight of 0 switches a loss off):

    - SDM, similarity-distribution matching (IRRA Sec. 3.3, Eq. 4-6): KL divergence between the softmax of
      ``logit_scale`` x cosine similarities and the true matching distribution over the batch (every pair of
      the same identity is a match), both directions.
    - ID (IRRA Sec. 3.4): one linear classifier over the training identities, shared by both modalities,
      cross-entropy averaged over the image and the text logits.
    - ITC: CLIP's symmetric InfoNCE (Radford et al. 2021), pair i <-> i, same ``logit_scale``.

    With ``image_backbone`` a timm encoder (e.g. a reID or PersonMAE checkpoint via ``image_pretrained``)
    replaces CLIP's image tower and a linear layer projects its feature to the text embedding width.
    Evaluation: every caption queries the image gallery by cosine similarity
    (:class:`pedlightning.metrics.RetrievalMetric`: R1/R5/R10, mAP, mINP). Which split validation uses is the
    datamodule's ``model_selection``; the module states it at fit start and on every validation summary
    (IRRA's public code validates, and keeps its best epoch, on the test split by default).

    Args:
        clip_model: open_clip config (``ViT-B-16``; ``ViT-B-16-quickgelu`` for OpenAI's weights) or a preset
            (``clip_tiny_test``).
        img_size: ``[height, width]``; the position embeddings are built (and loaded checkpoints resized) for it.
        context_length: text tokens; must match the datamodule's tokenizer.
        pretrained: a local open_clip or OpenAI CLIP checkpoint (loaded with position embeddings resized, the
            loaded / missing / unexpected keys reported).
        clip_config: an open_clip model config dict that replaces ``clip_model``'s.
        image_backbone: ``None`` = CLIP's image tower; else a timm / pedlightning encoder name.
        image_backbone_kwargs: extra :class:`ImageEncoder` arguments (``stride_size``, ``drop_path_rate``, ...).
        image_pretrained: local checkpoint for ``image_backbone``.
        num_classes: training identities of the ID classifier; ``None`` takes the datamodule's ``num_classes``
            in ``setup`` (then stored in the hyper-parameters, so checkpoints rebuild it).
        sdm_weight, id_weight, itc_weight: loss weights. Defaults: IRRA's SDM + ID (Assumption: ITC off, as
            IRRA's best configuration; MLM not implemented).
        logit_scale: fixed multiplier of the cosine similarities in SDM and ITC (IRRA: 1 / 0.02 = 50).
        report_chance: also evaluate random features on the test split, logged as ``test/chance_*``.
        optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio: see :class:`TaskModule`; the
            defaults follow IRRA (Adam, weight decay 4e-5, 5 warm-up epochs, cosine to 0). Assumption: one
            learning rate for every parameter (IRRA gives new layers 5x the base rate).
    """

    def __init__(self, clip_model: str = "ViT-B-16", img_size: Sequence[int] = (384, 128), context_length: int = 77,
                 pretrained: str | None = None, clip_config: dict | None = None, image_backbone: str | None = None,
                 image_backbone_kwargs: dict | None = None, image_pretrained: str | None = None,
                 num_classes: int | None = None, sdm_weight: float = 1.0, id_weight: float = 1.0,
                 itc_weight: float = 0.0, logit_scale: float = 50.0, report_chance: bool = True,
                 optimizer: OptimizerCallable = torch.optim.Adam, weight_decay: float = 4e-5,
                 lr_schedule: Schedule = "cosine", warmup_epochs: float = 5.0, min_lr_ratio: float = 0.0):
        super().__init__(optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        if min(sdm_weight, id_weight, itc_weight) < 0 or sdm_weight + id_weight + itc_weight == 0:
            raise ConfigError(f"loss weights must be >= 0 with at least one > 0, got sdm_weight={sdm_weight}, "
                              f"id_weight={id_weight}, itc_weight={itc_weight}")
        self.clip = ClipDualEncoder(clip_model, tuple(img_size), pretrained, context_length, clip_config)
        # The fixed `logit_scale` replaces CLIP's learnt temperature; a trainable but unused parameter would
        # also break DDP's gradient bookkeeping.
        self.clip.clip.logit_scale.requires_grad_(False)
        self.image_encoder: ImageEncoder | None = None
        self.image_proj: nn.Linear | None = None
        if image_backbone is not None:
            self.clip.clip.visual = nn.Identity()  # replaced by the timm encoder: do not train or store it
            self.image_encoder = ImageEncoder(image_backbone, tuple(img_size), pretrained=image_pretrained,
                                              **(image_backbone_kwargs or {}))
            self.image_proj = nn.Linear(self.image_encoder.embed_dim, self.clip.embed_dim)
        self.classifier: nn.Linear | None = None
        if num_classes is not None:
            self._build_classifier(num_classes)
        self.val_metric = RetrievalMetric()
        self.test_metric = RetrievalMetric()
        self._ranklist: RankListInputs | None = None

    def _build_classifier(self, num_classes: int) -> None:
        """IRRA's shared ID classifier: weights N(0, 0.001^2), bias 0."""
        self.hparams.num_classes = num_classes
        if self.hparams.id_weight == 0:
            return
        self.classifier = nn.Linear(self.clip.embed_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        datamodule = getattr(self.trainer, "datamodule", None)
        for name, ours in (("img_size", tuple(hp.img_size)), ("context_length", hp.context_length)):
            theirs = getattr(datamodule, name, None)
            if theirs is not None and theirs != ours:
                raise ConfigError(f"model.{name}={ours} but data.{name}={theirs}: they must agree")
        n = getattr(datamodule, "num_classes", None)
        if hp.num_classes is None:
            if n is None and hp.id_weight > 0:
                raise ConfigError("the ID loss needs num_classes: pass it, use a datamodule with `num_classes`, or "
                                  "set id_weight: 0")
            if n is not None:
                self._build_classifier(n)
        elif stage == "fit" and n is not None and n != hp.num_classes:
            raise ConfigError(f"model.num_classes={hp.num_classes} but the training set has {n} identities")

    @property
    def selection_split(self) -> str:
        """The split validation runs on: the datamodule's ``model_selection`` (``val`` without one)."""
        return getattr(getattr(self.trainer, "datamodule", None), "model_selection", "val")

    def on_fit_start(self) -> None:
        if self.selection_split == "test":
            rank_zero_warn("TextReIDModule: model_selection='test': val/* metrics are computed on the TEST split; "
                           "checkpoints selected on them are selected on the test set.")
        else:
            rank_zero_info(f"TextReIDModule: val/* metrics are computed on the {self.selection_split} split.")

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Global image feature in the joint space, ``(B, embed_dim)`` (unnormalised)."""
        if self.image_encoder is None:
            return self.clip.encode_image(images)
        return self.image_proj(self.image_encoder(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Global text feature (end-of-text token) in the joint space, ``(B, embed_dim)`` (unnormalised)."""
        return self.clip.encode_text(tokens)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        images, texts, pids = self.encode_image(batch["image"]), self.encode_text(batch["tokens"]), batch["pid"]
        losses: dict[str, torch.Tensor] = {}
        if hp.sdm_weight > 0:
            losses["sdm"] = sdm_loss(images, texts, pids, hp.logit_scale)
        if hp.itc_weight > 0:
            losses["itc"] = clip_contrastive(images, texts, hp.logit_scale)
        if hp.id_weight > 0:
            image_logits, text_logits = self.classifier(images), self.classifier(texts)
            losses["id"] = (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2
            self.log_dict({"train/image_acc": (image_logits.argmax(1) == pids).float().mean(),
                           "train/text_acc": (text_logits.argmax(1) == pids).float().mean()}, batch_size=len(pids))
        loss = sum(getattr(hp, f"{name}_weight") * value for name, value in losses.items())
        self.log_dict({"train/loss": loss, **{f"train/{k}_loss": v for k, v in losses.items()}}, prog_bar=True,
                      batch_size=len(pids))
        return loss

    def _eval_step(self, metric: RetrievalMetric, batch: dict[str, Any], dataloader_idx: int) -> None:
        is_query = dataloader_idx == 0
        feats = self.encode_text(batch["tokens"]) if is_query else self.encode_image(batch["image"])
        metric.update(feats.float(), batch["pid"], is_query, batch["index"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.val_metric, batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_metric, batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        results = {f"val/{k}": float(v) for k, v in self.val_metric.compute().items()}
        self.val_metric.reset()
        self.log_dict(results, sync_dist=False)
        split = self.selection_split.upper() if self.selection_split == "test" else self.selection_split
        rank_zero_info(f"text-to-image val (on the {split} split): "
                       + ", ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in results.items()))

    def on_test_epoch_end(self) -> None:
        results = {f"test/{k}": float(v) for k, v in self.test_metric.compute().items()}
        with self.test_metric.sync_context():  # every rank's samples, padding duplicates dropped, index order
            s = self.test_metric.samples(key_extra="is_query")
        self.test_metric.reset()
        text, image = s["is_query"], ~s["is_query"]
        feats, pids, indices = s["features"].cpu(), s["pids"].cpu(), s["indices"].cpu()
        if self.hparams.report_chance:
            g = torch.Generator().manual_seed(0)
            chance = retrieval_evaluate(torch.randn(int(text.sum()), 64, generator=g),
                                        torch.randn(int(image.sum()), 64, generator=g), pids[text], pids[image])
            results.update({f"test/chance_{k}": float(chance[k]) for k in ("mAP", "rank1")})
        self.log_dict(results, sync_dist=False)
        rank_zero_info("text-to-image test: " + ", ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in results.items()))
        loaders = self.trainer.test_dataloaders
        captions = getattr(loaders[0].dataset, "captions", None)
        records = getattr(loaders[1].dataset, "records", None)
        self._ranklist = RankListInputs(
            feats[text], feats[image], pids[text], pids[image], None, None,
            [captions[i] for i in indices[text].tolist()] if captions is not None else [],
            [records[i].path for i in indices[image].tolist()] if records is not None else [],
            query_is_text=True)

    def ranklist_inputs(self) -> RankListInputs | None:
        """Caption queries and gallery images of the last test run, for :class:`RankListCallback`."""
        return self._ranklist

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        is_query = dataloader_idx == 0
        feats = self.encode_text(batch["tokens"]) if is_query else self.encode_image(batch["image"])
        out = {"split": "text" if is_query else "image", "features": feats.float(), "pid": batch["pid"],
               "index": batch["index"]}
        if not is_query:
            out["path"] = batch["path"]
        return out
