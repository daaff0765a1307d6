"""AttributeModule: pedestrian attribute recognition (the strong PAR baseline)."""

from __future__ import annotations

import csv
import os
from typing import Any, ClassVar

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from pedlightning.data.sources.base import format_table
from pedlightning.errors import ConfigError
from pedlightning.losses import weighted_bce
from pedlightning.metrics import AttributeMetric
from pedlightning.metrics.attributes import UnlabelledPredictions
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.heads import AttributeHead
from pedlightning.optim import Schedule
from pedlightning.tasks.base import TaskModule


class AttributeModule(TaskModule):
    """An image encoder + attribute head trained with (weighted) binary cross-entropy.

    The strong baseline of Jia et al. ("Rethinking of Pedestrian Attribute Recognition", 2021): the pooled
    backbone feature goes through Linear + BatchNorm1d to one logit per attribute; the loss is BCE weighted
    per attribute by its training positive ratio r (Li et al., DeepMAR, ACPR 2015: exp(1 - r) on positives,
    exp(r) on negatives; see :func:`pedlightning.losses.weighted_bce`). An attribute is predicted when its sigmoid
    exceeds ``threshold``.
    Metrics: label mA (on the progress bar during validation), instance accuracy / precision / recall / F1
    (:class:`pedlightning.metrics.AttributeMetric`). Every evaluation also writes its per-attribute metrics to
    ``<log_dir>/attributes_<stage>.csv`` (the logger's folder, else ``default_root_dir``; one row per attribute:
    training positive ratio, mA, positive and negative recall), and the test run prints that table.

    Labels of -1 mean "unlabelled" (datasets merged from several annotation sources): they add nothing to the
    loss and are left out of their attribute's metrics; an evaluation that met any logs their count as
    ``<stage>/num_unlabelled``.

    Args:
        encoder: the image encoder (:class:`~pedlightning.models.encoders.ImageEncoderConfig`; ``img_size`` must
            match the data; ``pretrained`` a local checkpoint: timm, MAE, open_clip visual, or a pedlightning
            pre-training checkpoint, the loader reports loaded / missing / unexpected keys). Default ResNet-50 with
            ``last_stride`` 2 (Assumption: the ImageNet ResNet, as the paper does not change it).
        num_attributes: ``None`` takes the data's ``num_attributes`` in ``setup`` (then stored in
            the hyper-parameters, so checkpoints rebuild the head).
        attribute_names: names for the per-attribute table; ``None`` takes the data's.
        positive_ratio: per-attribute positive ratio of the training set for the loss weights (positives over
            the labelled, not -1, targets); ``None`` takes the data's in ``setup``. Kept in the
            ``positive_ratio`` buffer, so checkpoints carry it.
        weighted_loss: weight the BCE by ``positive_ratio`` (on in the strong baseline); off = plain BCE.
        threshold: decision threshold on the sigmoid output (0.5, the protocol of every PAR benchmark).
        unlabelled_predictions: what a positive prediction on an unlabelled (-1) target does to the instance
            metrics (accuracy, precision, F1): ``ignore`` (default; Assumption: the image is scored on its labelled
            attributes only) or ``false_positive`` (it counts as predicted, lowering precision and accuracy: the
            strong baseline's code). mA never sees unlabelled targets; without them both give the same numbers.
            See :func:`pedlightning.metrics.attribute_metrics`.
        classifier_bn: BatchNorm1d after the linear classifier (on: the paper's head; the authors' released
            PA-100K config, ``CLASSIFIER.BN: False``, has none).
        optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio: see :class:`TaskModule`; defaults
            follow the baseline (Adam, weight decay 5e-4; Assumption: cosine decay instead of its plateau decay).
        optimization: the other options of :class:`TaskModule` by name (``warmup_start_factor``,
            ``lr_milestones_epochs``, ``lr_gamma``, ``lr_multipliers``, ``bias_lr_factor``, ``no_decay_names``,
            ``decay_1d_params``). The strong baseline's code decays every parameter (its ``BN_WD: true``):
            ``no_decay_names: []`` with ``decay_1d_params: true`` (``configs/attributes/pa100k_r50.yaml`` sets
            them). Defaults: no decay on biases and norms.

    ``test_time_options``: ``unlabelled_predictions``, which a test from a checkpoint may change.
    """

    #: the metric shown on the progress bar.
    main_metric: ClassVar[str] = "mA"
    test_time_options: ClassVar[tuple[str, ...]] = ("unlabelled_predictions",)

    def __init__(self, encoder: ImageEncoderConfig = ImageEncoderConfig(name="resnet50", drop_path_rate=0.0,
                                                                        last_stride=2),
                 num_attributes: int | None = None,
                 attribute_names: list[str] | None = None, positive_ratio: list[float] | None = None,
                 weighted_loss: bool = True, threshold: float = 0.5,
                 unlabelled_predictions: UnlabelledPredictions = "ignore", classifier_bn: bool = True,
                 optimizer: OptimizerCallable = torch.optim.Adam, weight_decay: float = 5e-4,
                 lr_schedule: Schedule = "cosine", warmup_epochs: float = 0.0, min_lr_ratio: float = 0.01,
                 **optimization: Any):
        super().__init__(optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio, **optimization)
        self.save_hyperparameters(ignore=["optimizer"])
        self.encoder = self.build_image_encoder(encoder)
        self.head: AttributeHead | None = None
        if num_attributes is not None:
            self._build_head(num_attributes)
        if unlabelled_predictions not in ("ignore", "false_positive"):
            raise ConfigError(f"AttributeModule: model.init_args.unlabelled_predictions must be 'ignore' or "
                              f"'false_positive', got {unlabelled_predictions!r}")
        self.val_metric = AttributeMetric(threshold, unlabelled_predictions)
        self.test_metric = AttributeMetric(threshold, unlabelled_predictions)

    def _build_head(self, num_attributes: int) -> None:
        hp = self.hparams
        for name, value in (("positive_ratio", hp.positive_ratio), ("attribute_names", hp.attribute_names)):
            if value is not None and len(value) != num_attributes:
                raise ConfigError(f"model.{name} has {len(value)} entries but num_attributes is {num_attributes}")
        self.head = AttributeHead(self.encoder.embed_dim, num_attributes, batch_norm=hp.classifier_bn)
        ratio = torch.full((num_attributes,), float("nan")) if hp.positive_ratio is None else \
            torch.tensor(hp.positive_ratio, dtype=torch.float32)
        self.register_buffer("positive_ratio", ratio)
        self.hparams.num_attributes = num_attributes

    def size_from_data(self, stage: str) -> None:
        self.count_from_data("num_attributes", self.head.num_attributes if self.head is not None else None,
                             self._build_head)

    def setup(self, stage: str) -> None:
        spec = self.data_spec
        if spec is not None:
            self.check_image_size(spec, self.hparams.encoder)
        self.size_from_data(stage)
        if spec is not None:
            if self.hparams.attribute_names is None and spec.attribute_names is not None:
                self.hparams.attribute_names = list(spec.attribute_names)
            if spec.positive_ratio is not None and torch.isnan(self.positive_ratio).any():
                self.positive_ratio.copy_(torch.as_tensor(spec.positive_ratio, dtype=torch.float32))
        if stage == "fit" and self.hparams.weighted_loss and torch.isnan(self.positive_ratio).any():
            raise ConfigError("weighted_loss needs the training positive ratio per attribute: pass "
                              "model.positive_ratio, use a datamodule whose data states it, or set "
                              "weighted_loss: false")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Attribute logits ``(B, num_attributes)``."""
        return self.head(self.encoder(images))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        ratio = self.positive_ratio if self.hparams.weighted_loss else None
        loss = weighted_bce(logits, batch["labels"], ratio)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def _eval_step(self, metric: AttributeMetric, batch: dict[str, Any]) -> None:
        metric.update(torch.sigmoid(self(batch["image"]).float()), batch["labels"], batch["index"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(self.val_metric, batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(self.test_metric, batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Attribute probabilities with labels, index and path (:class:`pedlightning.callbacks.FeatureWriter`)."""
        return {"split": "test", "probs": torch.sigmoid(self(batch["image"]).float()), "labels": batch["labels"],
                "index": batch["index"], "path": batch["path"]}

    def _log_metrics(self, metric: AttributeMetric, prefix: str) -> dict[str, Any]:
        results = metric.compute()
        metric.reset()
        scalars = {f"{prefix}/{k}": float(results[k]) for k in ("mA", "accuracy", "precision", "recall", "f1")}
        main = f"{prefix}/{self.main_metric}"
        self.log(main, scalars[main], prog_bar=True, sync_dist=False)
        self.log_dict({k: v for k, v in scalars.items() if k != main}, sync_dist=False)
        unlabelled = results["num_unlabelled"]
        note = ""
        if unlabelled:
            self.log(f"{prefix}/num_unlabelled", float(unlabelled), sync_dist=False)
            note = (f"; {unlabelled} unlabelled (-1) targets left out, positive predictions on them: "
                    f"{self.hparams.unlabelled_predictions}")
        rank_zero_info(f"attributes {prefix}: " + ", ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in scalars.items())
                       + " (chance: mA 0.5 for any constant prediction" + note + ")")
        self.write_attribute_csv(results["per_attribute"], prefix)
        return results

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metric, "val")

    def on_test_epoch_end(self) -> None:
        results = self._log_metrics(self.test_metric, "test")
        rank_zero_info(self.attribute_table(results["per_attribute"]))

    def attribute_rows(self, per_attribute: dict[str, torch.Tensor]) -> tuple[list[str], list[list[object]]]:
        """Header and one row per attribute: its name, training positive ratio, then the per-attribute metrics."""
        names = self.hparams.attribute_names or [f"attr{i}" for i in range(self.head.num_attributes)]
        columns = {"train_pos_ratio": self.positive_ratio.cpu(), **per_attribute}
        return ["attribute", *columns], [[name, *(float(v[i]) for v in columns.values())]
                                         for i, name in enumerate(names)]

    def attribute_table(self, per_attribute: dict[str, torch.Tensor]) -> str:
        """A text table of the per-attribute metrics, one row per attribute, with the training positive ratio."""
        header, rows = self.attribute_rows(per_attribute)
        cells = [[row[0], *(f"{v:.4f}" for v in row[1:])] for row in rows]
        return format_table(header, cells, title="Per-attribute test results")

    def write_attribute_csv(self, per_attribute: dict[str, torch.Tensor], stage: str) -> str | None:
        """Write ``attributes_<stage>.csv`` beside the logs (global rank 0); returns its path there, else None."""
        folder = self.trainer.log_dir or self.trainer.default_root_dir  # every rank: log_dir broadcasts
        if not self.trainer.is_global_zero:
            return None
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"attributes_{stage}.csv")
        header, rows = self.attribute_rows(per_attribute)
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([row[0], *(f"{v:.6f}" for v in row[1:])] for row in rows)
        return path
