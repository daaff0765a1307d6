"""The image encoder every task shares: a timm ViT or CNN, or CLIP's visual tower, mapping images to one vector."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import timm
import torch
from lightning.pytorch.utilities import rank_zero_warn
from timm.layers import DropPath, PatchEmbed, to_2tuple
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pedlightning.errors import ConfigError
from pedlightning.models.checkpoint import LoadReport, load_pretrained

if TYPE_CHECKING:
    from pedlightning.models.text import TextEncoderConfig

__all__ = ["ImageEncoder", "ImageEncoderConfig", "OPEN_CLIP_PREFIX", "OverlappingPatchEmbed", "PRESETS",
           "SUGGESTED_WEIGHTS", "config_from", "is_tiny_preset", "warn_if_untrained"]

#: Encoder names starting with this build CLIP's visual tower from open_clip: `open_clip:ViT-B-16`.
OPEN_CLIP_PREFIX = "open_clip:"

# Tiny models for tests and demos: name -> (timm model name, timm kwargs).
PRESETS: dict[str, tuple[str, dict]] = {
    "vit_tiny_test": ("vit_tiny_patch16_224", dict(depth=2, embed_dim=64, num_heads=2)),
    "resnet_tiny_test": ("resnet10t", dict(channels=(16, 32, 64, 128), stem_width=8)),
}


@dataclass
class ImageEncoderConfig:
    """How to build an :class:`ImageEncoder`: one name for each knob, used by every task and by `export-encoder`.

    The fields are `ImageEncoder`'s arguments (documented there); tasks store it as a plain dict in their
    hyper-parameters, and :meth:`ImageEncoder.from_config` accepts either form.
    """

    name: str = "vit_base_patch16_224"
    img_size: tuple[int, int] = (256, 128)
    stride_size: int | None = None
    drop_path_rate: float = 0.1
    last_stride: int = 1
    pretrained: str | None = None
    model_kwargs: dict | None = None

    def __post_init__(self) -> None:
        size = tuple(self.img_size) if isinstance(self.img_size, (list, tuple)) else ()
        if len(size) != 2:
            raise ConfigError(f"img_size must be (height, width), got {self.img_size!r}")
        self.img_size = (int(size[0]), int(size[1]))
        self.pretrained = no_checkpoint_as_none(self.pretrained)


def no_checkpoint_as_none(path: str | None) -> str | None:
    """``None`` for "no checkpoint": jsonargparse (4.53) turns a command-line ``...pretrained=null`` of a nested
    dataclass field into the string ``"None"``, which would otherwise be read as a file name."""
    return None if path in (None, "", "None", "null") else path


_Config = TypeVar("_Config")


def config_from(cls: type[_Config], cfg: Any, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fields of dataclass `cls` given as an instance or a dict (checkpoints store dicts), `overrides` on top.

    Unknown keys raise a `ConfigError` naming them and the valid fields.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    if isinstance(cfg, cls):
        values = {name: getattr(cfg, name) for name in names}
    elif isinstance(cfg, Mapping):
        values = dict(cfg)
    else:
        raise ConfigError(f"expected a {cls.__name__} or a dict of its fields, got {type(cfg).__name__}")
    values.update(overrides or {})
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; the fields are {names}")
    return dataclasses.asdict(cls(**values))


#: Published weights the paper recipes start from, by architecture: the `pretrained:` value to suggest.
SUGGESTED_WEIGHTS: dict[str, str] = {
    # TransReID's ImageNet-21k -> 1k ViT-B/16 (its jx_vit_base_p16_224-80ecf9dd.pth; normalise with 0.5)
    "vit_base_patch16_224": "timm:vit_base_patch16_224.orig_in21k_ft_in1k",
    # torchvision's ImageNet ResNet-50, the Bag-of-Tricks / fast-reid backbone
    "resnet50": "timm:resnet50.tv_in1k",
    "open_clip:ViT-B-16": "open_clip:ViT-B-16/openai",
    "ViT-B-16": "open_clip:ViT-B-16/openai",
}
_warned_untrained: set[tuple[str, str, str]] = set()


def is_tiny_preset(name: str) -> bool:
    """True for the tiny test/demo models (`vit_tiny_test`, `resnet_tiny_test`, `[open_clip:]clip_tiny_test`)."""
    base = name[len(OPEN_CLIP_PREFIX):] if name.startswith(OPEN_CLIP_PREFIX) else name
    if base in PRESETS:
        return True
    from pedlightning.models.text import CLIP_PRESETS  # imports open_clip (slow): only for non-timm presets

    return base in CLIP_PRESETS


def warn_if_untrained(config: ImageEncoderConfig | TextEncoderConfig | Mapping[str, Any], source: str, *,
                      synthetic: bool, role: str = "encoder") -> bool:
    """Warn (rank zero, once per model, data and role) that a real model will be trained from random weights.

    It warns when `config.pretrained` is None, the model is not a tiny preset and the data is not synthetic:
    a ViT-B or ResNet-50 fine-tuned from scratch on a reID-sized dataset lands far below the published numbers,
    and nothing else would say why. Every task calls it when training starts (`TaskModule.warn_untrained_encoders`)
    for the encoders its recipe starts from pre-trained weights; pre-training tasks that start from scratch by design
    (PersonMAE, VAL-PAT) leave theirs out. `source` names the data (a `DataSpec.source`); `role` the config key
    (e.g. `image_encoder`).
    Returns whether it warned now.
    """
    values = dict(config) if isinstance(config, Mapping) else dataclasses.asdict(config)
    name = str(values.get("name"))
    if no_checkpoint_as_none(values.get("pretrained")) is not None or synthetic or is_tiny_preset(name):
        return False
    key = (name, source, role)
    if key in _warned_untrained:
        return False
    _warned_untrained.add(key)
    suggestion = SUGGESTED_WEIGHTS.get(name)
    example = f", e.g. `{role}.pretrained: {suggestion}`" if suggestion else \
        " to a timm:<model>.<tag> or open_clip:<model>/<tag> name, or to a local checkpoint file"
    rank_zero_warn(f"{role} {name!r} has no pretrained weights ({role}.pretrained is null): it will be trained FROM "
                   f"RANDOM INITIALISATION on {source}. The published recipes start from pre-trained weights; "
                   f"from scratch, expect results far below them. Set {role}.pretrained{example}.")
    return True


class OverlappingPatchEmbed(PatchEmbed):
    """Patch embedding whose kernel (patch size) is larger than its stride: TransReID's overlapping patches.

    He et al. 2021, "TransReID", Sec. 3.2: with patch P and stride S < P the grid is
    `((H - P) // S + 1, (W - P) // S + 1)`, e.g. 21x10 for 256x128, P=16, S=12.
    """

    def __init__(self, *args, stride: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        self.stride = to_2tuple(stride)
        self.proj.stride = self.stride
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(self.img_size)

    def _init_img_size(self, img_size):
        stride = getattr(self, "stride", None)
        if stride is None or img_size is None:
            return super()._init_img_size(img_size)
        img_size = to_2tuple(img_size)
        grid = tuple((s - p) // st + 1 for s, p, st in zip(img_size, self.patch_size, stride))
        return img_size, grid, grid[0] * grid[1]

    def feat_ratio(self, as_scalar=True):
        return max(self.stride) if as_scalar else self.stride

    def dynamic_feat_size(self, img_size):
        return tuple((s - p) // st + 1 for s, p, st in zip(img_size, self.patch_size, self.stride))


class ImageEncoder(nn.Module):
    """One feature per image: the CLS token of a timm ViT, the pooled map of a timm CNN, or CLIP's image embedding.

    Args:
        name: timm model name (e.g. `vit_base_patch16_224`, `resnet50`, or a CLIP-layout
            `vit_base_patch16_clip_224` for CLIP weights), a tiny preset (`vit_tiny_test`, `resnet_tiny_test`), or
            `open_clip:<config or preset>` (`open_clip:ViT-B-16`, `open_clip:clip_tiny_test`): CLIP's ViT visual
            tower (Radford et al. 2021) from open_clip, whose output is the projected image embedding of
            `CLIP.encode_image` (the CLS token after `ln_post`, times `proj`).
        img_size: input (H, W); ViT position embeddings are sized for it. Default 256x128, the reID standard.
        stride_size: ViT patch stride; below the patch size it gives TransReID's overlapping patches (12).
            None = non-overlapping patches.
        drop_path_rate: stochastic depth (Huang et al. 2016), rising linearly over the blocks to this rate, as timm
            does. 0.1 follows TransReID's ViT-B recipe. open_clip's towers have none of their own; here it drops
            each residual branch after its layer scale (Assumption: timm's placement; CLIP and IRRA train with 0).
        last_stride: stride of a ResNet's last stage. 1 is the "Bag of Tricks" (Luo et al. 2019) / fast-reid
            choice, doubling the final map (16x8 at 256x128); 2 keeps the ImageNet network. Ignored by ViTs.
        pretrained: path of a local checkpoint (timm, MAE, open_clip/OpenAI CLIP visual, or our Lightning
            checkpoints; see `pedlightning.models.checkpoint.load_pretrained`), or published weights by name, read
            from the local Hugging Face / timm / CLIP caches and never downloaded: `timm:<model>.<tag>` (e.g.
            `timm:vit_base_patch16_224.augreg_in21k_ft_in1k`) or `open_clip:<model>/<tag>` (e.g.
            `open_clip:ViT-B-16/openai`); see `pedlightning.models.checkpoint.resolve_pretrained`. The report is
            logged and kept in `pretrained_report`.
        model_kwargs: extra timm keyword arguments; they override the preset's. For `open_clip:` names, an
            open_clip model config dict (embed_dim, vision_cfg, ...) that replaces the named one.

    Attributes: `model` (the timm model or open_clip `VisionTransformer`; state-dict keys are `model.<its key>`),
    `embed_dim` (for open_clip the projection width), `is_vit` (a timm ViT: `forward_tokens`,
    `model.patch_embed`), `is_open_clip`, `patch_grid` (ViT token grid (h, w), else None), `num_prefix_tokens`
    (CLS/register tokens, 0 for CNNs), `pretrained_report`.
    """

    def __init__(
        self,
        name: str = "vit_base_patch16_224",
        img_size: tuple[int, int] = (256, 128),
        stride_size: int | None = None,
        drop_path_rate: float = 0.1,
        last_stride: int = 1,
        pretrained: str | None = None,
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        self.is_open_clip = name.startswith(OPEN_CLIP_PREFIX)
        self.pretrained_report: LoadReport | None = None
        if self.is_open_clip:
            self._build_open_clip(name[len(OPEN_CLIP_PREFIX):], img_size, stride_size, drop_path_rate, pretrained,
                                  model_kwargs)
            return
        timm_name, kwargs = PRESETS.get(name, (name, {}))
        kwargs = {**kwargs, **(model_kwargs or {})}
        self.is_vit = issubclass(_model_class(timm_name), VisionTransformer)
        if self.is_vit:
            kwargs["img_size"] = tuple(img_size)
            if stride_size is not None:
                kwargs["embed_layer"] = functools.partial(OverlappingPatchEmbed, stride=stride_size)
        elif stride_size is not None:
            raise ConfigError(f"stride_size applies to ViTs only; {name!r} is a CNN")
        self.model = timm.create_model(
            timm_name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs
        )
        if not self.is_vit and last_stride != 2:
            set_last_stride(self.model, last_stride, name)
        self.embed_dim: int = self.model.num_features
        self.patch_grid: tuple[int, int] | None = tuple(self.model.patch_embed.grid_size) if self.is_vit else None
        self.num_prefix_tokens: int = self.model.num_prefix_tokens if self.is_vit else 0
        if pretrained:
            self.pretrained_report = load_pretrained(self.model, pretrained)

    def _build_open_clip(self, config: str, img_size: tuple[int, int], stride_size: int | None,
                         drop_path_rate: float, pretrained: str | None, model_cfg: dict | None) -> None:
        from pedlightning.models.text import (  # open_clip imports slowly
            build_visual_tower,
            load_clip_pretrained,
        )

        if stride_size is not None:
            raise ConfigError(f"stride_size applies to timm ViTs only, not to the open_clip tower {config!r}")
        self.model = build_visual_tower(config, tuple(img_size), model_cfg)
        _add_stochastic_depth(self.model.transformer, drop_path_rate)
        self.is_vit = False
        self.embed_dim = self.model.output_dim
        self.patch_grid = tuple(self.model.grid_size)
        self.num_prefix_tokens = 1
        if pretrained:
            self.pretrained_report = load_clip_pretrained(self.model, pretrained, tower="visual")

    @classmethod
    def from_config(cls, cfg: ImageEncoderConfig | dict, **overrides: Any) -> ImageEncoder:
        """Build from an :class:`ImageEncoderConfig` or its dict (checkpoint hyper-parameters), `overrides` on top
        (e.g. `drop_path_rate=0.0, pretrained=None` to rebuild an exported encoder)."""
        return cls(**config_from(ImageEncoderConfig, cfg, overrides))

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, embed_dim): the CLS token after the final norm (ViT), the pooled map (CNN), or the
        projected CLIP image embedding (open_clip)."""
        return self.model(images)

    def forward_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_prefix_tokens + h*w, embed_dim), every token after the final norm (timm ViT only)."""
        if self.is_open_clip:
            raise ConfigError("forward_tokens needs a timm ViT; for CLIP's tokens build the timm CLIP-layout ViT "
                              "(e.g. vit_base_patch16_clip_224), which loads the same open_clip weights")
        if not self.is_vit:
            raise ConfigError(f"forward_tokens needs a ViT encoder; {type(self.model).__name__} is a CNN")
        return self.model.forward_features(images)


def _add_stochastic_depth(transformer: nn.Module, rate: float) -> None:
    """Stochastic depth for open_clip's residual blocks: each residual branch's output (after `ls_1` / `ls_2`)
    passes a timm `DropPath`, the rate rising linearly from 0 at the first block to `rate` at the last.

    The `DropPath` is attached to the layer-scale module and applied by a forward hook, so state-dict keys stay
    open_clip's (pretrained weights and exports are unchanged) and a momentum copy can switch it off.
    """
    if rate <= 0:
        return
    if not getattr(transformer, "batch_first", True):
        raise ConfigError("drop_path_rate > 0 needs open_clip's batch-first transformer")
    blocks = list(transformer.resblocks)
    for i, block in enumerate(blocks):
        block_rate = rate * i / max(1, len(blocks) - 1)
        if block_rate == 0:
            continue
        for layer_scale in (block.ls_1, block.ls_2):
            layer_scale.drop_path = DropPath(block_rate)
            layer_scale.register_forward_hook(_drop_residual)


def _drop_residual(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return module.drop_path(output)


def _model_class(timm_name: str) -> type:
    if not timm.is_model(timm_name):
        raise ConfigError(
            f"Unknown image encoder {timm_name!r}: not a timm model nor one of the presets {sorted(PRESETS)}"
        )
    with torch.device("meta"):
        return type(timm.create_model(timm_name, pretrained=False))


def set_last_stride(model: nn.Module, stride: int, name: str) -> None:
    """Set the stride of a ResNet's last stage (its first block's strided convs and avg-pool downsample)."""
    stage = getattr(model, "layer4", None)
    if stride != 1 or not isinstance(stage, nn.Sequential):
        raise ConfigError(
            f"last_stride={stride} is not supported for {name!r}: use 1 on a ResNet-style model (one with a "
            f"`layer4` stage), or 2 to keep the network's own strides"
        )
    block = stage[0]
    for child_name, module in list(block.named_modules()):
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
        elif isinstance(module, nn.AvgPool2d) and module.stride in (2, (2, 2)):
            parent, _, attr = child_name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, attr, nn.Identity())
