"""ReIDModule: supervised person re-identification (BNNeck baseline, TransReID recipe)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from pedlightning.errors import ConfigError
from pedlightning.losses import CenterLoss, TripletLoss
from pedlightning.metrics import ReIDMetric, TieRule, reid_evaluate
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.heads import BNNeck
from pedlightning.models.mgn import MGN, mgn_losses
from pedlightning.optim import Schedule
from pedlightning.tasks.retrieval import RetrievalTask


class ReIDModule(RetrievalTask):
    """An image encoder + BNNeck trained with label-smoothed ID loss and batch-hard triplet loss.

    The strong baseline of Luo et al. ("Bag of Tricks", CVPR-W 2019) with the TransReID settings
    (He et al., ICCV 2021): soft-margin triplet on the pre-BN feature, ID loss on the BNNeck logits,
    evaluation on the pre-BN feature (``neck_feat="before"``) with cosine similarity. Bag of Tricks' centre loss
    on the pre-BN feature is an option (``center_loss_weight``).

    Args:
        encoder: the image encoder (:class:`~pedlightning.models.encoders.ImageEncoderConfig`: timm or preset
            ``name``, ``img_size`` (must match the data), ``stride_size`` (below the patch size: TransReID's
            overlapping patches), ``drop_path_rate``, ``last_stride``, ``pretrained`` (a local checkpoint: timm,
            MAE, open_clip visual, or a pedlightning checkpoint such as PersonMAE's or VAL-PAT's; the loader
            reports loaded / missing / unexpected keys), ``model_kwargs``).
        num_classes: training identities; ``None`` takes the data's ``num_classes`` in ``setup``.
        head: ``bnneck`` (one BNNeck on the pooled feature) or ``mgn`` (Wang et al. 2018's Multiple Granularity
            Network on a ResNet, VAL-PAT's downstream model: global + 2-part + 3-part branches, ID loss on every
            feature and triplet on each branch's global feature, all BN features concatenated at test;
            :class:`~pedlightning.models.mgn.MGN`).
        mgn_reduction_dim, mgn_parts, mgn_pool: MGN's feature width per branch (256), stripes per part branch
            ((2, 3)) and pooling (``max``, the paper's).
        id_loss_weight, triplet_loss_weight: loss weights.
        triplet_margin: batch-hard triplet margin; ``None`` = soft margin (TransReID).
        label_smoothing: epsilon of the label-smoothed ID loss (0.1, Bag of Tricks; TransReID's configs: 0).
        center_loss_weight: weight of Bag of Tricks' centre loss (:class:`~pedlightning.losses.CenterLoss`) on the
            pre-BN feature; 0 = off (Bag of Tricks: 0.0005). BNNeck head only.
        center_lr: how the centres learn. A float: plain SGD at this constant lr on the gradient of the
            unweighted centre loss, applied before each optimizer step (Bag of Tricks' separate SGD optimizer at
            lr 0.5, reproduced without a second Lightning optimizer; the centres then skip the main optimizer).
            ``None``: the main optimizer trains them like every parameter, under its schedule, with the lr set by
            ``lr_multipliers: {center_loss: f}`` (with plain SGD as main optimizer,
            ``f = center_lr / (center_loss_weight * base_lr)`` gives Bag of Tricks' step, but scheduled).
        neck_feat: evaluate on the feature ``before`` or ``after`` the BNNeck.
        flip_test: average the features of the image and its horizontal flip.
        metric, rerank, k1, k2, lambda_value: evaluation options (see :func:`reid_evaluate`).
        ties: how a positive and a negative at exactly the same distance are ranked (see
            :mod:`pedlightning.metrics.ranking`): ``pessimistic`` (default: the positive after the negatives, the
            lowest score any order gives, independent of gallery order), ``gallery_order`` (tied items keep their
            gallery order, a stable sort: what fast-reid's, torchreid's and IRRA's evaluation give where their
            sort keeps ties in order) or ``optimistic`` (the positive first). Continuous float32 features
            rarely tie (the rules then agree to ~1e-7); quantised, binarised or bf16 features tie often.
            The rule used is printed with the results.
        report_chance: also evaluate random features, logged as ``test/chance_*`` so results can be read
            against chance.
        optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio: see :class:`TaskModule`.
        optimization: the other options of :class:`TaskModule` by name (``warmup_start_factor``,
            ``lr_milestones_epochs``, ``lr_gamma``, ``lr_multipliers``, ``bias_lr_factor``, ``no_decay_names``,
            ``decay_1d_params``).

    ``test_time_options``: ``neck_feat``, ``flip_test``, the metric options (``ties`` included) and
    ``report_chance``, which a test from a checkpoint may change.
    """

    test_time_options: ClassVar[tuple[str, ...]] = ("neck_feat", "flip_test", "metric", "rerank", "k1", "k2",
                                                    "lambda_value", "ties", "report_chance")
    eval_title = "reID"

    def __init__(self, encoder: ImageEncoderConfig = ImageEncoderConfig(), num_classes: int | None = None,
                 head: Literal["bnneck", "mgn"] = "bnneck", mgn_reduction_dim: int = 256,
                 mgn_parts: Sequence[int] = (2, 3), mgn_pool: Literal["max", "avg"] = "max",
                 id_loss_weight: float = 1.0, triplet_loss_weight: float = 1.0, triplet_margin: float | None = None,
                 label_smoothing: float = 0.1, center_loss_weight: float = 0.0, center_lr: float | None = 0.5,
                 neck_feat: Literal["before", "after"] = "before",
                 flip_test: bool = False, metric: Literal["cosine", "euclidean"] = "cosine", rerank: bool = False,
                 k1: int = 20, k2: int = 6, lambda_value: float = 0.3, ties: TieRule = "pessimistic",
                 report_chance: bool = True, optimizer: OptimizerCallable = torch.optim.AdamW,
                 weight_decay: float = 1e-4, lr_schedule: Schedule = "cosine", warmup_epochs: float = 0.0,
                 min_lr_ratio: float = 0.01, **optimization: Any):
        super().__init__(optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio, **optimization)
        self.save_hyperparameters(ignore=["optimizer"])
        if center_loss_weight < 0:
            raise ConfigError(f"ReIDModule: center_loss_weight must be >= 0, got {center_loss_weight}")
        if center_loss_weight > 0 and head == "mgn":
            raise ConfigError("ReIDModule: the centre loss (center_loss_weight > 0) is defined on the BNNeck head's "
                              "feature; set center_loss_weight: 0 with head: mgn")
        if center_lr is not None and center_lr <= 0:
            raise ConfigError(f"ReIDModule: center_lr must be > 0 or null (main optimizer), got {center_lr}")
        self.encoder = self.build_image_encoder(encoder)
        self.head: BNNeck | MGN | None = None
        self.center_loss: CenterLoss | None = None
        if num_classes is not None:
            self._build_head(num_classes)
        self.triplet = TripletLoss(margin=triplet_margin)
        self.init_evaluation(report_chance)

    def _build_head(self, num_classes: int) -> None:
        hp = self.hparams
        if hp.head == "mgn":
            self.head = MGN(self.encoder, num_classes, hp.mgn_reduction_dim, tuple(hp.mgn_parts), hp.mgn_pool)
        else:
            self.head = BNNeck(self.encoder.embed_dim, num_classes)
            if hp.center_loss_weight > 0:
                self.center_loss = CenterLoss(num_classes, self.encoder.embed_dim)
        self.hparams.num_classes = num_classes

    def build_metric(self) -> ReIDMetric:
        hp = self.hparams
        return ReIDMetric(metric=hp.metric, rerank=hp.rerank, k1=hp.k1, k2=hp.k2, lambda_value=hp.lambda_value,
                          ties=hp.ties)

    def size_from_data(self, stage: str) -> None:
        self.count_from_data("num_classes", self.head.num_classes if self.head is not None else None,
                             self._build_head, check=stage == "fit")

    def setup(self, stage: str) -> None:
        if self.data_spec is not None:
            self.check_image_size(self.data_spec, self.hparams.encoder)
        self.size_from_data(stage)

    def forward(self, images: Tensor) -> Tensor:
        """Evaluation embedding of a batch of images (flip-averaged when ``flip_test``)."""
        feats = self._embed(images)
        if self.hparams.flip_test:
            feats = (feats + self._embed(images.flip(-1))) / 2
        return feats

    def _embed(self, images: Tensor) -> Tensor:
        if isinstance(self.head, MGN):
            return self.head(images)
        feats = self.encoder(images)
        return self.head.bn(feats) if self.hparams.neck_feat == "after" else feats

    def query_features(self, batch: dict[str, Any]) -> Tensor:
        return self(batch["image"])

    gallery_features = query_features

    def update_metric(self, metric: ReIDMetric, feats: Tensor, batch: dict[str, Any], is_query: bool) -> None:
        metric.update(feats, batch["pid"], batch["camid"], is_query, batch["index"])

    def evaluate_features(self, query_feats: Tensor, gallery_feats: Tensor, query: dict[str, Tensor],
                          gallery: dict[str, Tensor]) -> dict[str, float]:
        return reid_evaluate(query_feats, gallery_feats, query["pids"], gallery["pids"], query["camids"],
                             gallery["camids"], metric=self.hparams.metric, ties=self.hparams.ties)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hp, pids = self.hparams, batch["pid"]
        if isinstance(self.head, MGN):
            out = self.head.forward_train(batch["image"])
            id_loss, tri_loss = mgn_losses(out, pids, self.triplet, hp.label_smoothing)
            logits = out["logits"][0]
        else:
            feats = self.encoder(batch["image"])
            _, logits = self.head(feats)
            id_loss = F.cross_entropy(logits, pids, label_smoothing=hp.label_smoothing)
            tri_loss = self.triplet(feats, pids).loss
        loss = hp.id_loss_weight * id_loss + hp.triplet_loss_weight * tri_loss
        logs = {"train/id_loss": id_loss, "train/triplet_loss": tri_loss}
        if self.center_loss is not None:
            center_loss = self.center_loss(feats, pids)
            loss = loss + hp.center_loss_weight * center_loss
            logs["train/center_loss"] = center_loss
        acc = (logits.argmax(1) == pids).float().mean()
        self.log_dict({"train/loss": loss, **logs, "train/acc": acc}, prog_bar=True, batch_size=len(pids))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """With ``center_lr``: Bag of Tricks' centre step, ``c -= center_lr * grad / center_loss_weight``.

        The gradient is the accumulated one of this optimizer step (DDP-averaged, unscaled under AMP); a
        non-finite one (an AMP overflow step, which the optimizer skips too) moves nothing. The centres' gradient
        is then cleared, so the main optimizer leaves them alone.
        """
        hp = self.hparams
        if self.center_loss is None or hp.center_lr is None:
            return
        centers = self.center_loss.centers
        if centers.grad is None:
            return
        with torch.no_grad():
            step = centers.grad * (hp.center_lr / hp.center_loss_weight)
            centers.sub_(torch.where(torch.isfinite(step).all(), step, torch.zeros_like(step)))
        centers.grad = None
