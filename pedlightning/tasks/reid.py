"""ReIDModule: supervised person re-identification (BNNeck baseline, TransReID recipe)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from pedlightning.callbacks.ranklist import RankListInputs
from pedlightning.errors import ConfigError
from pedlightning.losses import TripletLoss
from pedlightning.metrics import ReIDMetric, reid_evaluate
from pedlightning.models.encoders import ImageEncoder
from pedlightning.models.heads import BNNeck
from pedlightning.optim import Schedule
from pedlightning.tasks.base import TaskModule


class ReIDModule(TaskModule):
    """An image encoder + BNNeck trained with label-smoothed ID loss and batch-hard triplet loss.

    The strong baseline of Luo et al. ("Bag of Tricks", CVPR-W 2019) with the TransReID settings
    (He et al., ICCV 2021): soft-margin triplet on the pre-BN feature, ID loss on the BNNeck logits,
    evaluation on the pre-BN feature (``neck_feat="before"``) with cosine similarity.

    Args:
        backbone: encoder name (timm, or a pedlightning preset such as ``vit_tiny_test``).
        img_size: ``[height, width]`` of the input; must match the datamodule.
        stride_size: patch stride for ViTs; below the patch size gives TransReID's overlapping patches.
        drop_path_rate, last_stride, backbone_kwargs: passed to :class:`ImageEncoder`.
        pretrained: a local checkpoint for the encoder (timm, MAE, open_clip visual, or a pedlightning
            checkpoint such as PersonMAE's); the loader reports loaded / missing / unexpected keys.
        num_classes: training identities; ``None`` takes the datamodule's ``num_classes`` in ``setup``.
        id_loss_weight, triplet_loss_weight: loss weights.
        triplet_margin: batch-hard triplet margin; ``None`` = soft margin (TransReID).
        label_smoothing: epsilon of the label-smoothed ID loss (0.1, Bag of Tricks).
        neck_feat: evaluate on the feature ``before`` or ``after`` the BNNeck.
        flip_test: average the features of the image and its horizontal flip.
        metric, rerank, k1, k2, lambda_value: evaluation options (see :func:`reid_evaluate`).
        report_chance: also evaluate random features, logged as ``test/chance_*`` so results can be read
            against chance.
    """

    def __init__(self, backbone: str = "vit_base_patch16_224", img_size: Sequence[int] = (256, 128),
                 stride_size: int | None = None, drop_path_rate: float = 0.1, last_stride: int = 1,
                 backbone_kwargs: dict | None = None, pretrained: str | None = None, num_classes: int | None = None,
                 id_loss_weight: float = 1.0, triplet_loss_weight: float = 1.0, triplet_margin: float | None = None,
                 label_smoothing: float = 0.1, neck_feat: Literal["before", "after"] = "before",
                 flip_test: bool = False, metric: Literal["cosine", "euclidean"] = "cosine", rerank: bool = False,
                 k1: int = 20, k2: int = 6, lambda_value: float = 0.3, report_chance: bool = True,
                 optimizer: OptimizerCallable = torch.optim.AdamW, weight_decay: float = 1e-4,
                 lr_schedule: Schedule = "cosine", warmup_epochs: float = 0.0, min_lr_ratio: float = 0.01):
        super().__init__(optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        self.encoder = ImageEncoder(backbone, tuple(img_size), stride_size, drop_path_rate, last_stride,
                                    pretrained, backbone_kwargs)
        self.head: BNNeck | None = None
        if num_classes is not None:
            self.head = BNNeck(self.encoder.embed_dim, num_classes)
        self.triplet = TripletLoss(margin=triplet_margin)
        eval_kwargs = dict(metric=metric, rerank=rerank, k1=k1, k2=k2, lambda_value=lambda_value)
        self.val_metric = ReIDMetric(**eval_kwargs)
        self.test_metric = ReIDMetric(**eval_kwargs)
        self._ranklist: RankListInputs | None = None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        n = getattr(datamodule, "num_classes", None)
        if self.head is None:
            if n is None:
                raise ConfigError("ReIDModule needs num_classes: pass it, or use a datamodule with `num_classes`")
            self.head = BNNeck(self.encoder.embed_dim, n)
            self.hparams.num_classes = n
        elif stage == "fit" and n is not None and n != self.head.num_classes:
            raise ConfigError(f"model.num_classes={self.head.num_classes} but the training set has {n} identities")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation embedding of a batch of images (flip-averaged when ``flip_test``)."""
        feats = self._embed(images)
        if self.hparams.flip_test:
            feats = (feats + self._embed(images.flip(-1))) / 2
        return feats

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(images)
        return self.head.bn(feats) if self.hparams.neck_feat == "after" else feats

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        feats = self.encoder(batch["image"])
        _, logits = self.head(feats)
        id_loss = F.cross_entropy(logits, batch["pid"], label_smoothing=hp.label_smoothing)
        tri = self.triplet(feats, batch["pid"])
        loss = hp.id_loss_weight * id_loss + hp.triplet_loss_weight * tri.loss
        acc = (logits.argmax(1) == batch["pid"]).float().mean()
        self.log_dict({"train/loss": loss, "train/id_loss": id_loss, "train/triplet_loss": tri.loss,
                       "train/acc": acc}, prog_bar=True, batch_size=len(feats))
        return loss

    def _eval_step(self, metric: ReIDMetric, batch: dict[str, Any], dataloader_idx: int) -> None:
        metric.update(self(batch["image"]), batch["pid"], batch["camid"], dataloader_idx == 0, batch["index"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.val_metric, batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_metric, batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": float(v) for k, v in self.val_metric.compute().items()}, sync_dist=False)
        self.val_metric.reset()

    def on_test_epoch_end(self) -> None:
        metric = self.test_metric
        results = {f"test/{k}": float(v) for k, v in metric.compute().items()}
        with metric.sync_context():  # every rank's samples, padding duplicates dropped
            s = metric.samples(key_extra="is_query")
        q, g = s["is_query"], ~s["is_query"]
        if self.hparams.report_chance:
            rand = torch.randn(len(q), 64, generator=torch.Generator().manual_seed(0))
            chance = reid_evaluate(rand[q.cpu()], rand[g.cpu()], s["pids"][q], s["pids"][g], s["camids"][q],
                                   s["camids"][g])
            results.update({f"test/chance_{k}": float(chance[k]) for k in ("mAP", "rank1")})
        self.log_dict(results, sync_dist=False)
        rank_zero_info("reID test: " + ", ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in results.items()))
        self._ranklist = RankListInputs(s["features"][q].cpu(), s["features"][g].cpu(), s["pids"][q].cpu(),
                                        s["pids"][g].cpu(), s["camids"][q].cpu(), s["camids"][g].cpu(),
                                        self._paths("query", s["indices"][q]), self._paths("gallery", s["indices"][g]))
        metric.reset()

    def _paths(self, split: str, indices: torch.Tensor) -> list[str]:
        source = getattr(getattr(self.trainer, "datamodule", None), "source", None)
        records = getattr(source, split, None)
        return [records[i].path for i in indices.tolist()] if records is not None else []

    def ranklist_inputs(self) -> RankListInputs | None:
        """Query/gallery features and labels of the last test run, for :class:`RankListCallback`."""
        return self._ranklist

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {"split": "query" if dataloader_idx == 0 else "gallery", "features": self(batch["image"]).float(),
                "pid": batch["pid"], "camid": batch["camid"], "index": batch["index"], "path": batch["path"]}
