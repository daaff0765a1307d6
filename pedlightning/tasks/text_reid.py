"""TextReIDModule: text-to-image person search with a CLIP dual encoder (the IRRA baseline without MLM)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from pedlightning.errors import ConfigError
from pedlightning.losses import clip_contrastive, sdm_loss
from pedlightning.metrics import RetrievalMetric, TieRule, retrieval_evaluate
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.text import TextEncoder, TextEncoderConfig
from pedlightning.optim import Schedule
from pedlightning.tasks.retrieval import RetrievalTask


class TextReIDModule(RetrievalTask):
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

    With a timm ``image_encoder`` (e.g. a reID, PersonMAE or VAL-PAT checkpoint as its ``pretrained``) in place of
    CLIP's image tower, a linear layer (``image_proj``) projects its feature to the text embedding width.
    Evaluation: every caption queries the image gallery by cosine similarity
    (:class:`pedlightning.metrics.RetrievalMetric`: R1/R5/R10, mAP, mINP). Which split validation uses is the
    datamodule's ``model_selection``; the module states it at fit start and on every validation summary
    (IRRA's public code validates, and keeps its best epoch, on the test split by default).

    Args:
        image_encoder: the image tower (:class:`~pedlightning.models.encoders.ImageEncoderConfig`):
            ``open_clip:ViT-B-16`` = CLIP's visual tower (``open_clip:clip_tiny_test`` for tests), or a timm / preset
            name; ``img_size`` must match the data; ``pretrained`` = a local open_clip / OpenAI CLIP checkpoint
            (visual part, position embeddings resized) or any checkpoint :class:`ImageEncoder` reads.
        text_encoder: the text tower (:class:`~pedlightning.models.text.TextEncoderConfig`: open_clip config or
            preset ``name``, ``context_length`` (must match the data's tokenizer), ``pretrained`` (the text part of a
            CLIP checkpoint, or of a VAL-PAT checkpoint), ``model_cfg``).
        num_classes: training identities of the ID classifier; ``None`` takes the datamodule's ``num_classes``
            in ``setup`` (then stored in the hyper-parameters, so checkpoints rebuild it).
        sdm_weight, id_weight, itc_weight: loss weights. Defaults: IRRA's SDM + ID (Assumption: ITC off, as
            IRRA's best configuration; MLM not implemented).
        logit_scale: fixed multiplier of the cosine similarities in SDM and ITC (IRRA: 1 / 0.02 = 50).
        report_chance: also evaluate random features on the test split, logged as ``test/chance_*``.
        ties: how an image of the caption's identity and another at exactly the same similarity are ranked (see
            :mod:`pedlightning.metrics.ranking`): ``pessimistic`` (default: the match after the others, the lowest
            score any order gives, independent of gallery order), ``gallery_order`` (tied images keep their
            gallery order, a stable sort: what IRRA's evaluation gives where its ``torch.argsort`` keeps ties in
            order) or ``optimistic`` (the match first). Continuous float32 features rarely tie; quantised or
            bf16 features tie often. The rule used is printed with the results.
        optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio: see :class:`TaskModule`; the
            defaults follow IRRA (Adam, weight decay 4e-5, 5 warm-up epochs, cosine to 0).
        optimization: the other options of :class:`TaskModule` by name. IRRA's parameter groups (its
            ``build_optimizer``) are ``lr_multipliers: {classifier: 5.0}`` (5x for the randomly initialised
            layers; add ``image_proj`` when it is a new Linear), ``bias_lr_factor: 2.0``,
            ``no_decay_names: ["*bias*"]`` with ``decay_1d_params: true`` (biases undecayed, norm weights and
            embeddings decayed) and ``warmup_start_factor: 0.1``; ``configs/text_reid/*_clip.yaml`` set them.
            Defaults: one lr for every parameter, no decay on biases and norms.

    ``test_time_options``: ``ties`` and ``report_chance`` (the chance baseline of a test run).
    """

    test_time_options: ClassVar[tuple[str, ...]] = ("ties", "report_chance")
    part_names = ("text", "image")
    query_is_text = True
    eval_title = "text-to-image"

    def __init__(self, image_encoder: ImageEncoderConfig = ImageEncoderConfig(
                     name="open_clip:ViT-B-16", img_size=(384, 128), drop_path_rate=0.0),
                 text_encoder: TextEncoderConfig = TextEncoderConfig(), num_classes: int | None = None,
                 sdm_weight: float = 1.0, id_weight: float = 1.0, itc_weight: float = 0.0, logit_scale: float = 50.0,
                 report_chance: bool = True, ties: TieRule = "pessimistic",
                 optimizer: OptimizerCallable = torch.optim.Adam, weight_decay: float = 4e-5,
                 lr_schedule: Schedule = "cosine", warmup_epochs: float = 5.0, min_lr_ratio: float = 0.0,
                 **optimization: Any):
        super().__init__(optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio, **optimization)
        self.save_hyperparameters(ignore=["optimizer"])
        if min(sdm_weight, id_weight, itc_weight) < 0 or sdm_weight + id_weight + itc_weight == 0:
            raise ConfigError(f"loss weights must be >= 0 with at least one > 0, got sdm_weight={sdm_weight}, "
                              f"id_weight={id_weight}, itc_weight={itc_weight}")
        self.image_encoder = self.build_image_encoder(image_encoder)
        self.text_encoder = TextEncoder.from_config(text_encoder)
        self.embed_dim = self.text_encoder.embed_dim
        # CLIP's visual tower ends in its own projection to the joint space; any other encoder needs one.
        self.image_proj: nn.Module = nn.Identity() if self.image_encoder.is_open_clip else \
            nn.Linear(self.image_encoder.embed_dim, self.embed_dim)
        if self.image_encoder.is_open_clip and self.image_encoder.embed_dim != self.embed_dim:
            raise ConfigError(f"the CLIP image tower embeds to {self.image_encoder.embed_dim} dims but the text tower "
                              f"to {self.embed_dim}: use towers of one CLIP model")
        self.classifier: nn.Linear | None = None
        if num_classes is not None:
            self._build_classifier(num_classes)
        self.init_evaluation(report_chance)

    def build_metric(self) -> RetrievalMetric:
        return RetrievalMetric(ties=self.hparams.ties)

    def _build_classifier(self, num_classes: int) -> None:
        """IRRA's shared ID classifier: weights N(0, 0.001^2), bias 0."""
        self.hparams.num_classes = num_classes
        if self.hparams.id_weight == 0:
            return
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def setup(self, stage: str) -> None:
        hp, spec, task = self.hparams, self.data_spec, type(self).__name__
        if spec is not None:
            self.check_image_size(spec, hp.image_encoder)
            spec.check_equal("context_length", self.text_encoder.context_length, task)
        self.size_from_data(stage)

    def size_from_data(self, stage: str) -> None:
        hp, spec, task = self.hparams, self.data_spec, type(self).__name__
        n = spec.num_classes if spec is not None else None
        if hp.num_classes is None:
            if n is None and hp.id_weight > 0:
                raise ConfigError(f"{task}: the ID loss needs num_classes: pass model.init_args.num_classes, use a "
                                  "datamodule whose data states its identities, or set id_weight: 0")
            if n is not None:
                self._build_classifier(n)
        elif stage == "fit" and spec is not None:
            spec.check_equal("num_classes", hp.num_classes, task)

    @property
    def selection_split(self) -> str:
        """The split validation runs on: the data's ``model_selection`` (``val`` without one)."""
        spec = self.data_spec
        return (spec.model_selection if spec is not None else None) or "val"

    def on_fit_start(self) -> None:
        if self.selection_split == "test":
            rank_zero_warn("TextReIDModule: model_selection='test': val/* metrics are computed on the TEST split; "
                           "checkpoints selected on them are selected on the test set.")
        else:
            rank_zero_info(f"TextReIDModule: val/* metrics are computed on the {self.selection_split} split.")

    def encode_image(self, images: Tensor) -> Tensor:
        """Global image feature in the joint space, ``(B, embed_dim)`` (unnormalised)."""
        return self.image_proj(self.image_encoder(images))

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Global text feature (end-of-text token) in the joint space, ``(B, embed_dim)`` (unnormalised)."""
        return self.text_encoder(tokens)

    def matching_losses(self, image_feats: Tensor, text_feats: Tensor, pids: Tensor) -> dict[str, Tensor]:
        """The enabled matching terms, unweighted: ``sdm``, ``itc`` (both exact under DDP) and ``id``."""
        hp = self.hparams
        losses: dict[str, Tensor] = {}
        if hp.sdm_weight > 0:
            losses["sdm"] = sdm_loss(image_feats, text_feats, pids, hp.logit_scale, gather=True)
        if hp.itc_weight > 0:
            losses["itc"] = clip_contrastive(image_feats, text_feats, hp.logit_scale, gather=True)
        if hp.id_weight > 0:
            image_logits, text_logits = self.classifier(image_feats), self.classifier(text_feats)
            losses["id"] = (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2
        return losses

    def weighted_sum(self, losses: dict[str, Tensor]) -> Tensor:
        """``sum_k weight_k * loss_k`` over the given terms (weights: ``<name>_weight`` hyper-parameters)."""
        return sum(getattr(self.hparams, f"{name}_weight") * value for name, value in losses.items())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, texts = self.encode_image(batch["image"]), self.encode_text(batch["tokens"])
        losses = self.matching_losses(images, texts, batch["pid"])
        loss = self.weighted_sum(losses)
        self.log_dict({"train/loss": loss, **{f"train/{k}_loss": v for k, v in losses.items()}}, prog_bar=True,
                      batch_size=len(images))
        return loss

    def query_features(self, batch: dict[str, Any]) -> Tensor:
        return self.encode_text(batch["tokens"])

    def gallery_features(self, batch: dict[str, Any]) -> Tensor:
        return self.encode_image(batch["image"])

    def evaluate_features(self, query_feats: Tensor, gallery_feats: Tensor, query: dict[str, Tensor],
                          gallery: dict[str, Tensor]) -> dict[str, float]:
        return retrieval_evaluate(query_feats, gallery_feats, query["pids"], gallery["pids"], ties=self.hparams.ties)

    def describe_evaluation(self, prefix: str) -> str:
        if prefix != "val":
            return ""
        split = self.selection_split
        return f" (on the {split.upper() if split == 'test' else split} split)"
