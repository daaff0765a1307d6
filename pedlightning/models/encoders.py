"""The image encoder every task shares: a timm ViT or CNN that maps images to one feature vector."""

from __future__ import annotations

import functools

import timm
import torch
from timm.layers import PatchEmbed, to_2tuple
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pedlightning.errors import ConfigError
from pedlightning.models.checkpoint import LoadReport, load_pretrained

__all__ = ["ImageEncoder", "OverlappingPatchEmbed", "PRESETS"]

# Tiny models for tests and demos: name -> (timm model name, timm kwargs).
PRESETS: dict[str, tuple[str, dict]] = {
    "vit_tiny_test": ("vit_tiny_patch16_224", dict(depth=2, embed_dim=64, num_heads=2)),
    "resnet_tiny_test": ("resnet10t", dict(channels=(16, 32, 64, 128), stem_width=8)),
}


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
    """A timm backbone returning one feature per image: the CLS token for ViTs, the pooled map for CNNs.

    Args:
        name: timm model name (e.g. `vit_base_patch16_224`, `resnet50`, or a CLIP-layout
            `vit_base_patch16_clip_224` for CLIP weights) or a tiny preset (`vit_tiny_test`, `resnet_tiny_test`).
        img_size: input (H, W); ViT position embeddings are sized for it. Default 256x128, the reID standard.
        stride_size: ViT patch stride; below the patch size it gives TransReID's overlapping patches (12).
            None = non-overlapping patches.
        drop_path_rate: stochastic depth. 0.1 follows TransReID's ViT-B recipe.
        last_stride: stride of a ResNet's last stage. 1 is the "Bag of Tricks" (Luo et al. 2019) / fast-reid
            choice, doubling the final map (16x8 at 256x128); 2 keeps the ImageNet network. Ignored by ViTs.
        pretrained: path of a local checkpoint (timm, MAE, open_clip/OpenAI CLIP visual, or our Lightning
            checkpoints); see `pedlightning.models.checkpoint.load_pretrained`. The report is logged and kept in
            `pretrained_report`.
        model_kwargs: extra timm keyword arguments; they override the preset's.

    Attributes: `model` (the timm model; state-dict keys are `model.<timm key>`), `embed_dim`, `is_vit`,
    `patch_grid` (ViT token grid (h, w), else None), `num_prefix_tokens` (CLS/register tokens, 0 for CNNs).
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
            _set_last_stride(self.model, last_stride, name)
        self.embed_dim: int = self.model.num_features
        self.patch_grid: tuple[int, int] | None = tuple(self.model.patch_embed.grid_size) if self.is_vit else None
        self.num_prefix_tokens: int = self.model.num_prefix_tokens if self.is_vit else 0
        self.pretrained_report: LoadReport | None = None
        if pretrained:
            self.pretrained_report = load_pretrained(self.model, pretrained)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, embed_dim): the CLS token after the final norm (ViT) or the pooled map (CNN)."""
        return self.model(images)

    def forward_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_prefix_tokens + h*w, embed_dim), every token after the final norm (ViT only)."""
        if not self.is_vit:
            raise ConfigError(f"forward_tokens needs a ViT encoder; {type(self.model).__name__} is a CNN")
        return self.model.forward_features(images)


def _model_class(timm_name: str) -> type:
    if not timm.is_model(timm_name):
        raise ConfigError(
            f"Unknown image encoder {timm_name!r}: not a timm model nor one of the presets {sorted(PRESETS)}"
        )
    with torch.device("meta"):
        return type(timm.create_model(timm_name, pretrained=False))


def _set_last_stride(model: nn.Module, stride: int, name: str) -> None:
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
