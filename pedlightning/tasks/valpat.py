"""VALPATModule: pedestrian pre-training from images, captions and attributes (VAL-PAT, arXiv 2304.05554).

Three objectives on one image encoder (the paper has no public code; every choice it leaves open is a
constructor argument marked "Assumption"):

- self-supervised contrastive learning, MoCo v2 style (He et al. 2020; Chen et al. 2020): a momentum key encoder
  with a 2-layer projection MLP on both towers, a queue of negatives, InfoNCE;
- image-text contrastive learning: CLIP's symmetric InfoNCE (Radford et al. 2021) between the projected image
  feature and the text tower's feature, with a learnable temperature;
- multi-attribute classification: a linear + BatchNorm head (Jia et al. 2021) with the positive-ratio weighted BCE.

``L = w_ssl L_ssl + w_itc L_itc + w_attr L_attr`` (``w_ssl = 1`` in the paper's formulation); a weight of 0
removes its term *and its parameters*, so every ablation is a config and DDP never sees an unused parameter.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from pedlightning.data.tokenizer import tokenizer_name
from pedlightning.errors import ConfigError
from pedlightning.losses import (
    all_gather_nograd,
    clip_contrastive,
    global_batch,
    info_nce,
    weighted_bce,
)
from pedlightning.models.encoders import ImageEncoderConfig, config_from
from pedlightning.models.heads import AttributeHead
from pedlightning.models.moco import (
    EncoderWithProjection,
    MoCoQueue,
    ProjectionMLP,
    grouped_forward,
    has_batchnorm,
    shuffled_forward,
)
from pedlightning.models.momentum import MomentumEncoder
from pedlightning.models.text import TextEncoder, TextEncoderConfig
from pedlightning.optim import Schedule
from pedlightning.tasks.base import TaskModule

__all__ = ["VALPATModule"]

TERMS = ("ssl", "itc", "attr")
# What a cumulative count in the `sample_counts` buffer counts, in its order.
COUNTS = ("samples", "no_caption", "no_attributes")


class VALPATModule(TaskModule):
    """VAL-PAT pre-training on LUPerson-TA.

    Batches (from the LUPerson-TA datamodule): ``view_q``, ``view_k`` ``(B, 3, H, W)``, two augmented views of
    each image (MoCo's query and key); ``tokens`` ``(B, context_length)``, one caption per image; ``has_caption``
    ``(B,)`` bool; ``attributes`` ``(B, A)`` in {0, 1}; ``has_attributes`` ``(B,)`` bool. Samples without a
    caption (attributes) are masked out of the ITC (ATTR) term and counted over every rank: per epoch in
    ``train/no_caption_count`` / ``train/no_attributes_count`` and in a line printed at the end of every epoch;
    the whole run's ``[samples, without caption, without attributes]`` in the ``sample_counts`` buffer
    (checkpointed, so a resumed run keeps counting).

    The image encoder is ``self.encoder`` (an :class:`~pedlightning.models.encoders.ImageEncoder`, keys
    ``encoder.model.*``) and the text tower ``self.text_encoder``, so ``pretrained:`` of ReIDModule,
    AttributeModule and TextReIDModule loads them from a VAL-PAT checkpoint.

    Args:
        encoder: the image encoder. Default ResNet-50 at 256x128 with its ImageNet last stride 2 (MoCo / LUP
            pre-train the plain ResNet; fine-tuning may switch to stride 1, the weights are the same).
        text_encoder: the text tower (open_clip config, context length, local ``pretrained`` CLIP checkpoint).
            Built only when ``itc_weight > 0``.
        ssl_weight, itc_weight, attr_weight: term weights; 0 switches a term and its parameters off.
            Assumption: 1, 1, 1 (the paper gives no weights). At least one must be > 0.
        projection_dim, projection_hidden_dim: MoCo v2's MLP, ``in -> hidden -> 128`` (hidden None = the
            encoder width: 2048 -> 2048 -> 128 for ResNet-50).
        queue_size: MoCo's K (65,536).
        temperature: InfoNCE temperature of the SSL term, 0.2 = MoCo v2's (MoCo v1 used 0.07).
        momentum, momentum_final, momentum_schedule: the key encoder's EMA (MoCo: 0.999, constant).
        shuffle_bn: MoCo's shuffling BN for the key encoder (He et al. 2020, Sec. 3.3), see
            :func:`pedlightning.models.moco.shuffled_forward`. Skipped when the encoder has no BatchNorm (ViT).
        bn_group_size: BatchNorm statistics are computed over groups of this many samples, queries in
            consecutive groups, keys in groups of the batch shuffled across every rank; None = one group per
            process (exactly MoCo's multi-GPU shuffle). On one process that single group cannot separate a query
            from its key, so the default, 32, is MoCo v2's per-GPU batch (256 over 8 GPUs): one process with a
            batch of 256 then computes BN like MoCo on 8 GPUs. The per-process batch must divide by it.
        shuffle_seed: seed of the queue's initial noise and of the BN shuffle, drawn from
            ``(shuffle_seed, global_step, batch_idx)`` (identical on every rank, reproducible on resume).
        itc_temperature: initial temperature of the ITC term (CLIP: 0.07, learnt as ``log(1 / T)``).
        itc_max_logit_scale: cap of ``1 / T`` (CLIP: 100).
        multimodal_view: the batch key whose image feeds ITC and ATTR. Assumption: ``view_q``, so one encoder
            forward serves all three terms (the paper does not say which augmentation the text and attribute
            terms see); name another key (e.g. a weakly augmented ``image``) to spend one more forward.
        num_attributes: ``None`` takes the data's ``num_attributes`` in ``setup``.
        positive_ratio: per-attribute training positive ratio for the weighted BCE; ``None`` takes the data's.
        weighted_attr_loss: weight the BCE by the positive ratio (Jia et al.); off = plain BCE.
        optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio: see :class:`TaskModule`.
            Assumption: AdamW by default; ``configs/valpat/pretrain_luperson_ta_r50.yaml`` uses MoCo v2's SGD.
        optimization: the other options of :class:`TaskModule` by name (``warmup_start_factor``,
            ``lr_milestones_epochs``, ``lr_gamma``, ``lr_multipliers``, ``bias_lr_factor``, ``no_decay_names``,
            ``decay_1d_params``). MoCo v2 and v3 decay every parameter (one optimizer over
            ``model.parameters()``): ``no_decay_names: []`` with ``decay_1d_params: true``, as
            ``configs/valpat/pretrain_luperson_ta_*.yaml`` set them. Defaults: no decay on biases and norms.

    Both encoders start from random weights by design (``from_scratch_encoders``: no warning for a pre-training
    without ``pretrained``). Assumption: the image encoder as LUP's MoCo v2 on LUPerson; the paper does not say
    whether the text tower starts from CLIP (``text_encoder.pretrained`` loads it).
    """

    from_scratch_encoders = ("encoder", "text_encoder")

    def __init__(self, encoder: ImageEncoderConfig = ImageEncoderConfig(name="resnet50", drop_path_rate=0.0,
                                                                        last_stride=2),
                 text_encoder: TextEncoderConfig = TextEncoderConfig(),
                 ssl_weight: float = 1.0, itc_weight: float = 1.0, attr_weight: float = 1.0,
                 projection_dim: int = 128, projection_hidden_dim: int | None = None, queue_size: int = 65536,
                 temperature: float = 0.2, momentum: float = 0.999, momentum_final: float | None = None,
                 momentum_schedule: Literal["constant", "linear", "cosine"] = "constant", shuffle_bn: bool = True,
                 bn_group_size: int | None = 32, shuffle_seed: int = 0, itc_temperature: float = 0.07,
                 itc_max_logit_scale: float = 100.0, multimodal_view: str = "view_q",
                 num_attributes: int | None = None, positive_ratio: list[float] | None = None,
                 weighted_attr_loss: bool = True,
                 optimizer: OptimizerCallable = torch.optim.AdamW, weight_decay: float = 1e-4,
                 lr_schedule: Schedule = "cosine", warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0,
                 **optimization: Any):
        super().__init__(optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio, **optimization)
        self.save_hyperparameters(ignore=["optimizer"])
        weights = {"ssl": ssl_weight, "itc": itc_weight, "attr": attr_weight}
        if min(weights.values()) < 0 or max(weights.values()) == 0:
            raise ConfigError(f"VAL-PAT term weights must be >= 0 with at least one > 0, got {weights}")
        if temperature <= 0 or itc_temperature <= 0:
            raise ConfigError(f"temperatures must be > 0, got temperature={temperature}, "
                              f"itc_temperature={itc_temperature}")
        if bn_group_size is not None and bn_group_size < 1:
            raise ConfigError(f"bn_group_size must be >= 1 or null, got {bn_group_size}")
        self.weights = weights
        self.encoder = self.build_image_encoder(encoder)
        dim = self.encoder.embed_dim
        self._bn_shuffle = shuffle_bn and has_batchnorm(self.encoder)

        self.projection: ProjectionMLP | None = None
        self.key_encoder: MomentumEncoder | None = None
        self.queue: MoCoQueue | None = None
        if ssl_weight > 0:
            self.projection = ProjectionMLP(dim, projection_hidden_dim, projection_dim)
            self.key_encoder = MomentumEncoder(EncoderWithProjection(self.encoder, self.projection), momentum,
                                               momentum_final, momentum_schedule)
            self.queue = MoCoQueue(projection_dim, queue_size, seed=shuffle_seed)

        self.text_encoder: TextEncoder | None = None
        self.image_proj: nn.Linear | None = None
        self.logit_scale: nn.Parameter | None = None
        if itc_weight > 0:
            self.text_encoder = TextEncoder.from_config(text_encoder)
            self.image_proj = nn.Linear(dim, self.text_encoder.embed_dim)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / itc_temperature)))

        self.attr_head: AttributeHead | None = None
        if attr_weight > 0 and num_attributes is not None:
            self._build_attribute_head(num_attributes)
        self.register_buffer("sample_counts", torch.zeros(len(COUNTS), dtype=torch.long))
        self._epoch_counts = torch.zeros(len(COUNTS), dtype=torch.long)
        self._warned_groups = False

    # ----------------------------------------------------------------- construction from the data
    def _build_attribute_head(self, num_attributes: int) -> None:
        ratio = self.hparams.positive_ratio
        if ratio is not None and len(ratio) != num_attributes:
            raise ConfigError(f"model.positive_ratio has {len(ratio)} entries but num_attributes is {num_attributes}")
        self.attr_head = AttributeHead(self.encoder.embed_dim, num_attributes)
        self.register_buffer("positive_ratio", torch.full((num_attributes,), float("nan")) if ratio is None
                             else torch.tensor(ratio, dtype=torch.float32))
        self.hparams.num_attributes = num_attributes

    def setup(self, stage: str) -> None:
        """Check the data against the model (image size, tokens) and take the attribute facts from it."""
        hp, spec, task = self.hparams, self.data_spec, type(self).__name__
        if spec is not None:
            self.check_image_size(spec, hp.encoder)
            if self.text_encoder is not None:
                spec.check_equal("context_length", self.text_encoder.context_length, task)
                text_name = config_from(TextEncoderConfig, hp.text_encoder)["name"]
                spec.check_equal("tokenizer", tokenizer_name(text_name), task)
        if self.weights["attr"] == 0:
            return
        if self.attr_head is None:
            if spec is None:
                raise ConfigError(f"{task} needs num_attributes for the attribute term: pass "
                                  "model.init_args.num_attributes, use a pedlightning datamodule, or set "
                                  "attr_weight: 0")
            self._build_attribute_head(spec.require("num_attributes", task))
        elif spec is not None:
            spec.check_equal("num_attributes", self.attr_head.num_attributes, task)
        if spec is not None and spec.positive_ratio is not None and torch.isnan(self.positive_ratio).any():
            self.positive_ratio.copy_(torch.as_tensor(spec.positive_ratio, dtype=torch.float32))
        if stage == "fit" and hp.weighted_attr_loss and torch.isnan(self.positive_ratio).any():
            raise ConfigError("weighted_attr_loss needs the training positive ratio per attribute: pass "
                              "model.init_args.positive_ratio, use a datamodule whose data states it, or set "
                              "weighted_attr_loss: false")

    # ----------------------------------------------------------------- the model
    def forward(self, images: Tensor) -> Tensor:
        """The image encoder's feature (what transfers)."""
        return self.encoder(images)

    def student(self) -> EncoderWithProjection:
        """The query tower (encoder + projection) the key encoder follows; references, no new parameters."""
        return EncoderWithProjection(self.encoder, self.projection)

    def _group_size(self, batch_size: int) -> int | None:
        size = self.hparams.bn_group_size if self._bn_shuffle else None
        one_group = size is None or size >= batch_size
        world = self.trainer.world_size if self._trainer is not None else 1
        if one_group and self._bn_shuffle and world == 1 and not self._warned_groups:
            self._warned_groups = True
            rank_zero_warn(f"VALPATModule: shuffled BN with one BatchNorm group of {batch_size} samples on one "
                           "process cannot keep a query and its positive key in different BN statistics; set "
                           "model.init_args.bn_group_size below the batch size (MoCo v2: 32)")
        return size

    def _term_input(self, batch: dict[str, Any], key: str, term: str) -> Tensor:
        if key not in batch:
            raise ConfigError(f"the {term} term needs `{key}` in every training batch; the batch has {sorted(batch)} "
                              f"(use the LUPerson-TA datamodule, or set {term}_weight: 0)")
        return batch[key]

    def compute_losses(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Tensor]:
        """The unweighted terms that are switched on (``ssl``, ``itc``, ``attr``); enqueues this step's keys."""
        hp = self.hparams
        losses: dict[str, Tensor] = {}
        feats = None
        if self.queue is not None:
            view_q, view_k = self._term_input(batch, "view_q", "ssl"), self._term_input(batch, "view_k", "ssl")
            group = self._group_size(len(view_q))
            feats = grouped_forward(self.encoder, view_q, group)
            query = self.projection(feats)
            if self._bn_shuffle:
                step = self.global_step if self._trainer is not None else 0
                keys = shuffled_forward(self.key_encoder, view_k, group, (hp.shuffle_seed, step, batch_idx))
            else:
                keys = self.key_encoder(view_k)
            losses["ssl"] = info_nce(query, keys.detach(), self.queue.negatives(), hp.temperature)
            self.queue.enqueue(keys)
        has_caption = self._term_input(batch, "has_caption", "itc").bool() if self.text_encoder is not None else None
        has_attributes = (self._term_input(batch, "has_attributes", "attr").bool() if self.attr_head is not None
                          else None)
        seen = self._count(batch, has_caption, has_attributes)
        if self.text_encoder is None and self.attr_head is None:
            return losses
        if feats is None or hp.multimodal_view != "view_q":
            feats = self.encoder(self._term_input(batch, hp.multimodal_view, "itc" if self.text_encoder else "attr"))
        if has_caption is not None:
            image = self.image_proj(feats)
            text = self.text_encoder(self._term_input(batch, "tokens", "itc"))
            if seen["captioned"] > 0:
                scale = self.logit_scale.exp().clamp(max=hp.itc_max_logit_scale)
                losses["itc"] = clip_contrastive(image[has_caption], text[has_caption], scale)
            else:
                losses["itc"] = self._zero(image, text, self.logit_scale)
        if has_attributes is not None:
            logits = self.attr_head(feats)
            targets = self._term_input(batch, "attributes", "attr")
            ratio = self.positive_ratio if hp.weighted_attr_loss else None
            if seen["annotated"] > 0:
                losses["attr"] = self._attribute_loss(logits[has_attributes], targets[has_attributes], ratio)
            else:
                losses["attr"] = self._zero(logits)
        return losses

    @staticmethod
    def _attribute_loss(logits: Tensor, targets: Tensor, ratio: Tensor | None) -> Tensor:
        """This rank's share of the weighted BCE averaged over every rank's annotated samples (exact under DDP:
        ranks with more annotated samples weigh more, as in one process)."""
        batch = global_batch(logits)
        if len(logits) == 0:  # other ranks have annotated samples; this one adds nothing
            return logits.sum() * 0.0
        return weighted_bce(logits, targets, ratio) * len(logits) * batch.row_weight

    @staticmethod
    def _zero(*graph: Tensor) -> Tensor:
        """A zero loss that keeps every parameter behind ``graph`` in the backward pass (DDP expects a gradient for
        each), for a term no rank has a sample for."""
        return sum(t.sum() for t in graph) * 0.0

    def _count(self, batch: dict[str, Any], has_caption: Tensor | None,
               has_attributes: Tensor | None) -> dict[str, int]:
        """Count this step's samples and those each masked term leaves out, over every rank (one collective).

        The counts are global, hence equal on every rank (DDP's buffer broadcast leaves them unchanged); they add
        up in ``sample_counts`` (the run) and in the epoch's counts. Returns the step's global numbers.
        """
        n = batch_size(batch)
        missing = [0 if m is None else int((~m).sum()) for m in (has_caption, has_attributes)]
        local = torch.tensor([[n, *missing]], dtype=torch.long, device=self.sample_counts.device)
        total = all_gather_nograd(local).sum(0)
        self.sample_counts += total
        self._epoch_counts += total.cpu()
        seen, no_caption, no_attributes = total.tolist()
        return {"samples": seen, "captioned": seen - no_caption, "annotated": seen - no_attributes}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch, batch_idx)
        loss = sum(self.weights[name] * value for name, value in losses.items())
        n = batch_size(batch)
        self.log_dict({"train/loss": loss, **{f"train/{k}_loss": v for k, v in losses.items()}}, prog_bar=True,
                      batch_size=n)
        if self.logit_scale is not None:
            self.log("train/itc_logit_scale", self.logit_scale.exp().detach(), batch_size=n)
        return loss

    # ----------------------------------------------------------------- momentum encoder and counts
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The key encoder's EMA, once per optimizer step (skipped between accumulated micro-batches)."""
        if self.key_encoder is None:
            return
        used = self.key_encoder.update(self.student(), self.global_step, self.total_steps)
        if used is not None:
            self.log("train/key_momentum", used, batch_size=1)

    def on_train_epoch_start(self) -> None:
        self._epoch_counts.zero_()

    def on_train_epoch_end(self) -> None:
        """Log and print how many samples (over every rank) each masked term left out this epoch."""
        seen, no_caption, no_attributes = self._epoch_counts.tolist()
        # identical on every rank: "max" over ranks is the value itself
        self.log_dict({"train/no_caption_count": float(no_caption), "train/no_attributes_count": float(no_attributes)},
                      sync_dist=True, reduce_fx="max")
        parts = []
        if self.text_encoder is not None:
            parts.append(f"{no_caption} without a caption (masked out of ITC)")
        if self.attr_head is not None:
            parts.append(f"{no_attributes} without attributes (masked out of ATTR)")
        if parts:
            rank_zero_info(f"VAL-PAT epoch {self.current_epoch}: {seen} samples, " + ", ".join(parts))


def batch_size(batch: dict[str, Any]) -> int:
    """Rows of a batch dict: the length of its first tensor."""
    return next(len(v) for v in batch.values() if isinstance(v, Tensor))
