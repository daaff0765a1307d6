"""PersonMAEModule: masked-autoencoder pre-training for person reID (Hu et al., arXiv 2311.04496, IEEE TMM 2024).

RegionA (block-masked) is encoded from its visible patches only; decoders predict the *whole* RegionB, at
pixel level (per-patch-normalised pixels) and at feature level (patch features of a momentum teacher run on
the unmasked RegionB). The paper has no public code; every choice it leaves open is a constructor argument
whose docstring says so, most following BootMAE (Dong et al., ECCV 2022), whose public code several PersonMAE
authors wrote: capped BEiT blocks, the teacher's last-block tokens before its final norm as the feature
target, a non-affine LayerNorm on prediction and target, no stochastic depth while pre-training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from pedlightning.data.transforms.regions import region_b_positions
from pedlightning.errors import ConfigError
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.mae_decoder import (
    PosEmbedType,
    RegionDecoder,
    grid_positions,
    sincos_pos_embed_2d,
)
from pedlightning.models.masking import (
    MaskGenerator,
    MaskType,
    forward_visible,
    visible_indices,
)
from pedlightning.models.momentum import MomentumEncoder, MomentumSchedule
from pedlightning.optim import Schedule
from pedlightning.tasks.base import TaskModule, encoder_config

LossType = Literal["pixel_feature", "pixel", "feature"]
FeatureLayer = Literal["last_block", "final_norm"]
FeatureNorm = Literal["both", "target", "none"]
LossPatches = Literal["all", "masked"]


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, patch * patch * C)`` in token (row-major) order, MAE's layout."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: Sequence[int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = patches.shape[0]
    x = patches.reshape(b, grid[0], grid[1], patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid[0] * patch, grid[1] * patch)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` target: each patch minus its mean over its own values, over ``sqrt(var + eps)``."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def hidden_region_b_patches(mask: torch.Tensor, query_pos: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``(B, N)``: True for RegionB patches the encoder did not see, the patches ``loss_patches="masked"`` counts.

    Assumption (the paper only defines the whole-RegionB loss): a RegionB patch counts as seen when its centre
    (``query_pos``, in RegionA's patch coordinates) rounds to a *visible* RegionA patch; patches whose centre
    falls on a masked RegionA patch or outside RegionA are hidden. With RegionB = RegionA the centres are the
    integer grid positions, so the hidden patches are exactly the masked ones (MAE's and BootMAE's loss).
    """
    gh, gw = int(grid[0]), int(grid[1])
    idx = torch.round(query_pos).long()
    rows, cols = idx[..., 0], idx[..., 1]
    inside = (rows >= 0) & (rows < gh) & (cols >= 0) & (cols < gw)
    flat = rows.clamp(0, gh - 1) * gw + cols.clamp(0, gw - 1)
    seen = inside & ~torch.gather(mask, 1, flat)
    return ~seen


class PersonMAEModule(TaskModule):
    """PersonMAE pre-training of a ViT: ``L = L_pix + w_feat(t) * L_feat``.

    Batches come from :class:`~pedlightning.data.datamodules.luperson.LUPersonDataModule`: ``region_a``,
    ``region_b`` ``(B, 3, H, W)`` and their crop boxes ``box_a``, ``box_b`` ``(B, 4)``. The RegionA/RegionB
    sampling (crop scale and aspect, the ``same_region`` ablation, flips) is configured there.

    Args:
        encoder: the student ViT (:class:`~pedlightning.models.encoders.ImageEncoderConfig`, ``self.encoder``;
            non-overlapping patches, so ``stride_size`` must stay unset). ``pretrained`` initialises it from a local
            checkpoint. The default has ``drop_path_rate=0``: MAE and BootMAE pre-train without stochastic depth
            (a YAML ``encoder`` block that omits the field keeps this 0).
        mask_type: ``block`` (BEiT block-wise masking, the paper's occlusion-like corruption of RegionA) or
            ``random`` (MAE; ablation).
        mask_ratio: fraction of RegionA's patches hidden from the encoder (Assumption: 0.75, MAE's ratio).
        min_block_patches, max_block_patches, block_aspect: BEiT block parameters (BEiT, BootMAE: 16 to 60 patches
            per block, aspect 0.3 to 1/0.3; ``max_block_patches=None`` = uncapped), see
            :class:`~pedlightning.models.masking.MaskGenerator`.
        mask_seed: masks are drawn from ``(mask_seed, rank, epoch, batch index)``: reproducible and resumable.
        loss_type: ``pixel_feature`` (the paper), ``pixel`` or ``feature`` (ablations).
        loss_patches: which RegionB patches the losses average over: ``all`` (the paper: "predict the whole
            RegionB") or ``masked``, the RegionB patches the encoder did not see (see
            :func:`hidden_region_b_patches`; MAE's loss when RegionB = RegionA). With RegionB = RegionA (the data's
            ``same_region`` ablation) the visible patches are copied from the input, so ``all`` is refused there:
            the first training batch whose every ``box_a`` equals its ``box_b`` raises a ConfigError.
        norm_pix_loss: pixel target = per-patch-normalised pixels of RegionB (the paper; MAE Sec. 4).
        feat_layer: which teacher tokens are the feature target: ``last_block`` = the last transformer block's
            output before the ViT's final LayerNorm (BootMAE's public code, the closest proxy: several PersonMAE
            authors wrote BootMAE) or ``final_norm`` = after it. Assumption: the paper does not say.
        feat_norm: non-affine LayerNorm over the channels of ``both`` prediction and target (BootMAE), of the
            ``target`` only, or ``none``. Assumption: the paper does not say; ``both`` follows BootMAE.
        feat_weight: ``w_feat`` of ``L_feat`` (Assumption: 1.0).
        feat_weight_warmup_epochs: ``w_feat`` ramps linearly from 0 to ``feat_weight`` over this many epochs
            (converted to optimizer steps of the run), so the pixel loss shapes the encoder before the young
            teacher's features count (Assumption: 10).
        decoder_dim, decoder_depth, decoder_heads: decoder size (Assumption: 512 wide, 4 deep, 16 heads; MAE
            uses 8 blocks for 196 tokens, our person grid has 128).
        decoder_pos_embed: query position embedding at continuous positions, ``sincos`` or ``learned``.
        decoder_query_scale: give the decoder queries RegionB's scale in RegionA's frame (the log of RegionB's
            over RegionA's box height and width), see :class:`~pedlightning.models.mae_decoder.RegionDecoder`.
            Assumption: the paper does not say how RegionB's geometry reaches the decoder.
        separate_decoders: one decoder per target (BootMAE) or one shared decoder with two heads.
        encoder_pos_embed: ``sincos`` = fixed 2D sin-cos position embedding in the encoder (MAE), so encoder
            and decoder positions live in the same frame; ``learned`` = timm's learned embedding. Ignored
            (the checkpoint's embedding is kept, trainable) when ``pretrained`` is set.
        teacher_momentum, teacher_momentum_final, teacher_momentum_schedule: EMA momentum of the feature
            teacher, 0.999 -> 0.9999 on a cosine schedule over training (Assumption, BootMAE/BYOL style).
        optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio: see :class:`TaskModule`
            (MAE: AdamW, lr 1.5e-4 * batch / 256, betas (0.9, 0.95), weight decay 0.05, 40 warm-up epochs,
            cosine decay to 0, hence ``min_lr_ratio=0``).
        optimization: the other options of :class:`TaskModule` by name (``warmup_start_factor``,
            ``lr_milestones_epochs``, ``lr_gamma``, ``lr_multipliers``, ``bias_lr_factor``, ``no_decay_names``,
            ``decay_1d_params``). Defaults: warm-up from 0 and no decay on biases and norms (MAE), nor on the
            position embeddings and the class and mask (decoder query) tokens (Assumption: MAE's pre-training code
            decays its tokens, as ``no_decay_names: []`` does).

    ``w_feat`` and the momentum are functions of ``global_step``, so a resumed run continues both exactly.
    The encoder is pre-trained from random weights by design (``from_scratch_encoders``: no warning when
    ``pretrained`` is unset).
    """

    from_scratch_encoders = ("encoder",)

    def __init__(self, encoder: ImageEncoderConfig = ImageEncoderConfig(drop_path_rate=0.0),
                 mask_type: MaskType = "block", mask_ratio: float = 0.75, min_block_patches: int = 16,
                 max_block_patches: int | None = 60,
                 block_aspect: Sequence[float] = (0.3, 1 / 0.3), mask_seed: int = 0,
                 loss_type: LossType = "pixel_feature", loss_patches: LossPatches = "all", norm_pix_loss: bool = True,
                 feat_layer: FeatureLayer = "last_block", feat_norm: FeatureNorm = "both", feat_weight: float = 1.0,
                 feat_weight_warmup_epochs: float = 10.0, decoder_dim: int = 512, decoder_depth: int = 4,
                 decoder_heads: int = 16, decoder_pos_embed: PosEmbedType = "sincos",
                 decoder_query_scale: bool = True, separate_decoders: bool = True,
                 encoder_pos_embed: Literal["sincos", "learned"] = "sincos", teacher_momentum: float = 0.999,
                 teacher_momentum_final: float = 0.9999, teacher_momentum_schedule: MomentumSchedule = "cosine",
                 optimizer: OptimizerCallable = torch.optim.AdamW, weight_decay: float = 0.05,
                 lr_schedule: Schedule = "cosine", warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0,
                 **optimization: Any):
        super().__init__(optimizer, weight_decay, lr_schedule, warmup_epochs, min_lr_ratio, **optimization)
        self.save_hyperparameters(ignore=["optimizer"])
        if loss_type not in ("pixel_feature", "pixel", "feature"):
            raise ConfigError(f"loss_type must be 'pixel_feature', 'pixel' or 'feature', got {loss_type!r}")
        for name, value, allowed in (("loss_patches", loss_patches, ("all", "masked")),
                                     ("feat_layer", feat_layer, ("last_block", "final_norm")),
                                     ("feat_norm", feat_norm, ("both", "target", "none"))):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        self._regions_checked = False
        config = encoder_config(encoder)
        if config.stride_size is not None:
            raise ConfigError(f"PersonMAE needs non-overlapping patches: leave encoder.stride_size unset, got "
                              f"{config.stride_size}")
        img_size = tuple(config.img_size)
        self.encoder = self.build_image_encoder(config)
        vit = self.encoder.model
        if not self.encoder.is_vit:
            raise ConfigError(f"PersonMAE needs a ViT encoder, {config.name!r} is a CNN")
        self.patch = int(vit.patch_embed.patch_size[0])
        if tuple(vit.patch_embed.patch_size) != (self.patch, self.patch):
            raise ConfigError(f"PersonMAE needs square patches, got {tuple(vit.patch_embed.patch_size)}")
        self.grid = tuple(self.encoder.patch_grid)
        if tuple(img_size) != (self.grid[0] * self.patch, self.grid[1] * self.patch):
            raise ConfigError(f"img_size {list(img_size)} must be a multiple of the patch size {self.patch}")
        if encoder_pos_embed == "sincos" and not config.pretrained:
            self._fix_sincos_pos_embed(vit)
        self.masks = MaskGenerator(self.grid, mask_ratio, mask_type, min_block_patches, max_block_patches,
                                   tuple(block_aspect))

        dim, prefix = self.encoder.embed_dim, self.encoder.num_prefix_tokens
        out_dims = {}  # target -> values predicted per RegionB patch
        if loss_type != "feature":
            out_dims["pixel"] = self.patch * self.patch * 3
        if loss_type != "pixel":
            out_dims["feature"] = dim

        def decoder(out_dim: int) -> RegionDecoder:
            return RegionDecoder(dim, out_dim, self.grid, decoder_dim, decoder_depth, decoder_heads,
                                 pos_embed=decoder_pos_embed, num_prefix_tokens=prefix,
                                 query_scale=decoder_query_scale)

        if separate_decoders:
            self.decoders = nn.ModuleDict({k: decoder(v) for k, v in out_dims.items()})
        else:
            self.decoders = nn.ModuleDict({"shared": decoder(sum(out_dims.values()))})
        self.out_dims = out_dims

        self.teacher: MomentumEncoder | None = None
        if "feature" in out_dims:
            self.teacher = MomentumEncoder(self.encoder, teacher_momentum, teacher_momentum_final,
                                           teacher_momentum_schedule)

    @staticmethod
    def _fix_sincos_pos_embed(vit: nn.Module) -> None:
        """Encoder positions = fixed 2D sin-cos at integer patch positions (prefix tokens: zeros), as in MAE."""
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        patches = sincos_pos_embed_2d(grid_positions(vit.patch_embed.grid_size), vit.pos_embed.shape[-1])
        with torch.no_grad():
            vit.pos_embed.zero_()
            vit.pos_embed[0, prefix:] = patches
        vit.pos_embed.requires_grad_(False)

    def setup(self, stage: str) -> None:
        spec = self.data_spec
        if spec is not None:
            self.check_image_size(spec, self.hparams.encoder)

    def optimized_modules(self) -> nn.Module:
        """Student encoder and decoders, under their own names (``lr_multipliers: {decoders: 2.0}`` matches); the
        teacher only follows the student by EMA."""
        return nn.ModuleDict({"encoder": self.encoder, "decoders": self.decoders})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The student's image embedding (what transfers to reID)."""
        return self.encoder(images)

    # ----------------------------------------------------------------- schedules (functions of the step)
    def feat_weight_at(self, step: int) -> float:
        """``w_feat`` after ``step`` optimizer steps: linear ramp to ``feat_weight`` over the warm-up epochs."""
        hp = self.hparams
        warmup = self.epochs_to_steps(hp.feat_weight_warmup_epochs) if self._trainer is not None else 0
        return hp.feat_weight * (min(1.0, step / warmup) if warmup > 0 else 1.0)

    # ----------------------------------------------------------------- the model
    def draw_masks(self, batch_size: int, batch_idx: int) -> torch.Tensor:
        """``(B, N)`` masks seeded by ``(mask_seed, rank, epoch, batch_idx)``."""
        rank = self.global_rank if self._trainer is not None else 0
        epoch = self.current_epoch if self._trainer is not None else 0
        seed = [self.hparams.mask_seed, rank, epoch, batch_idx]
        return self.masks(batch_size, seed=seed).to(self.device)

    def predict_region_b(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoder outputs for every RegionB patch from the visible RegionA patches: ``{target: (B, N, dim)}``."""
        keep = visible_indices(mask)
        tokens = forward_visible(self.encoder.model, batch["region_a"], keep)
        positions = grid_positions(self.grid, tokens.device)
        visible_pos = positions[keep]
        query_pos = region_b_positions(batch["box_a"], batch["box_b"], self.grid)
        scale = (batch["box_b"][:, 2:] / batch["box_a"][:, 2:]).float()  # one RegionB patch in RegionA patches
        if "shared" in self.decoders:
            out = self.decoders["shared"](tokens, visible_pos, query_pos, scale)
            return dict(zip(self.out_dims, out.split(list(self.out_dims.values()), dim=-1)))
        return {k: dec(tokens, visible_pos, query_pos, scale) for k, dec in self.decoders.items()}

    def pixel_target(self, region_b: torch.Tensor) -> torch.Tensor:
        target = patchify(region_b.float(), self.patch)
        return normalize_patches(target) if self.hparams.norm_pix_loss else target

    @torch.no_grad()
    def feature_target(self, region_b: torch.Tensor) -> torch.Tensor:
        """The momentum teacher's patch tokens on the whole RegionB (``feat_layer``), LayerNorm'd (no affine)
        unless ``feat_norm="none"``."""
        teacher = self.teacher.module
        final_norm = self.hparams.feat_layer == "final_norm"
        tokens = forward_visible(teacher.model, region_b, final_norm=final_norm)[:, teacher.num_prefix_tokens:]
        tokens = tokens.float()
        return tokens if self.hparams.feat_norm == "none" else F.layer_norm(tokens, tokens.shape[-1:])

    def feature_prediction(self, pred: torch.Tensor) -> torch.Tensor:
        """The feature decoder's output as compared with the target (non-affine LayerNorm for ``feat_norm="both"``)."""
        pred = pred.float()
        return F.layer_norm(pred, pred.shape[-1:]) if self.hparams.feat_norm == "both" else pred

    def loss_weights(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor | None:
        """``(B, N)`` bool of the RegionB patches the losses count, or None for all of them."""
        if self.hparams.loss_patches == "all":
            return None
        query_pos = region_b_positions(batch["box_a"], batch["box_b"], self.grid)
        return hidden_region_b_patches(mask, query_pos, self.grid)

    def compute_losses(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"pixel": L_pix, "feature": L_feat}`` (those enabled by ``loss_type``): the squared error averaged over
        each counted patch's values, then over the counted patches of the batch (``loss_patches``; MAE's
        ``(loss * mask).sum() / mask.sum()``)."""
        preds = self.predict_region_b(batch, mask)
        counted = self.loss_weights(batch, mask)

        def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            per_patch = (pred - target).pow(2).mean(-1)
            if counted is None:
                return per_patch.mean()
            weights = counted.to(per_patch.dtype)
            return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)

        losses = {}
        if "pixel" in preds:
            losses["pixel"] = mse(preds["pixel"].float(), self.pixel_target(batch["region_b"]))
        if "feature" in preds:
            losses["feature"] = mse(self.feature_prediction(preds["feature"]), self.feature_target(batch["region_b"]))
        return losses

    def check_regions(self, batch: dict[str, torch.Tensor]) -> None:
        """Refuse ``loss_patches="all"`` on RegionB = RegionA data: visible patches would be copied, not predicted."""
        if self.hparams.loss_patches == "all" and torch.equal(batch["box_a"], batch["box_b"]):
            raise ConfigError("PersonMAE: every RegionB of the batch equals its RegionA (the data's same_region=true "
                              "ablation), where loss_patches='all' lets the decoder copy the visible patches; set "
                              "model.init_args.loss_patches: masked")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if not self._regions_checked:  # once per run: the comparison costs a device sync
            self.check_regions(batch)
            self._regions_checked = True
        mask = self.draw_masks(batch["region_a"].shape[0], batch_idx)
        losses = self.compute_losses(batch, mask)
        if self.hparams.loss_type == "pixel_feature":
            w_feat = self.feat_weight_at(self.global_step)
            loss = losses["pixel"] + w_feat * losses["feature"]
            self.log("train/feat_weight", w_feat, batch_size=len(mask))
        else:
            loss = losses[self.hparams.loss_type]
        self.log("train/loss", loss, prog_bar=True, batch_size=len(mask))
        self.log_dict({f"train/loss_{k}": v for k, v in losses.items()}, batch_size=len(mask))
        return loss

    # ----------------------------------------------------------------- the momentum teacher
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EMA update once per optimizer step (the momentum encoder skips accumulated micro-batches)."""
        if self.teacher is None:
            return
        momentum = self.teacher.update(self.encoder, self.global_step, self.total_steps)
        if momentum is not None:
            self.log("train/teacher_momentum", momentum, batch_size=1)

    # ----------------------------------------------------------------- visualisation
    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
        """Normalised images for a reconstruction grid: masked RegionA, RegionB and the pixel prediction.

        With ``norm_pix_loss`` the prediction is per-patch normalised; it is shown with RegionB's own patch
        mean and variance put back (MAE's visualisation). Needs the pixel decoder.
        """
        if "pixel" not in self.out_dims:
            raise ConfigError("reconstruct needs a pixel decoder; loss_type='feature' has none")
        n = batch["region_a"].shape[0]
        mask = self.masks(n, seed=[self.hparams.mask_seed, seed]).to(batch["region_a"].device)
        pred = self.predict_region_b(batch, mask)["pixel"].float()
        if self.hparams.norm_pix_loss:
            target = patchify(batch["region_b"].float(), self.patch)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        a = patchify(batch["region_a"].float(), self.patch)
        a = a.masked_fill(mask.unsqueeze(-1), 0.0)
        return {"masked_a": unpatchify(a, self.patch, self.grid), "region_b": batch["region_b"].float(),
                "prediction": unpatchify(pred, self.patch, self.grid)}
