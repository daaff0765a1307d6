"""CLIP image and text towers from open_clip, built offline at pedestrian input sizes (e.g. 384x128)."""

from __future__ import annotations

import copy
import logging
from typing import Callable

import open_clip
from lightning.pytorch.utilities import rank_zero_info
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from pedlightning.errors import ConfigError
from pedlightning.models.checkpoint import (
    LoadReport,
    is_torchscript,
    apply_state_dict,
    read_state_dict,
    select_prefix,
)

__all__ = ["CLIP_PRESETS", "ClipDualEncoder", "build_clip", "load_clip_pretrained", "tokenizer"]

_logger = logging.getLogger(__name__)

# Tiny configs for tests and demos: name -> (open_clip model config, tokenizer name).
CLIP_PRESETS: dict[str, tuple[dict, str]] = {
    "clip_tiny_test": (
        dict(
            embed_dim=64,
            vision_cfg=dict(image_size=224, layers=2, width=64, head_width=32, patch_size=16),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        ),
        "ViT-B-16",
    ),
}
# Metadata tensors in OpenAI's TorchScript CLIP state dict, not parameters.
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


def build_clip(
    model_name: str = "ViT-B-16",
    image_size: tuple[int, int] = (384, 128),
    pretrained: str | None = None,
    context_length: int = 77,
    model_cfg: dict | None = None,
) -> tuple[open_clip.CLIP, LoadReport | None]:
    """Build an open_clip CLIP model from its config (as `open_clip.create_model` does, without downloads).

    `model_name` is an open_clip config (`ViT-B-16`; `ViT-B-16-quickgelu` for OpenAI's weights) or a preset
    (`clip_tiny_test`); `model_cfg` (an open_clip config dict: embed_dim, vision_cfg, text_cfg) replaces it.
    `image_size` (H, W) sets the vision token grid (384x128 -> 24x8, IRRA's setting). Returns the model and
    the load report (None without `pretrained`).
    """
    if model_cfg is None:
        preset = CLIP_PRESETS.get(model_name)
        model_cfg = preset[0] if preset else open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ConfigError(f"Unknown CLIP model {model_name!r}: not an open_clip config nor in {list(CLIP_PRESETS)}")
    cfg = copy.deepcopy(model_cfg)
    cfg["vision_cfg"] = {**cfg.get("vision_cfg", {}), "image_size": tuple(image_size)}
    cfg["text_cfg"] = {**cfg.get("text_cfg", {}), "context_length": context_length}
    model_class = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    model = model_class(**cfg)
    report = load_clip_pretrained(model, pretrained) if pretrained else None
    return model, report


def load_clip_pretrained(model: open_clip.CLIP, path: str, *, strict: bool = False) -> LoadReport:
    """Load an open_clip state dict or OpenAI CLIP checkpoint (TorchScript `.pt` included) into `model`.

    The visual position embedding is resized to the model's (possibly rectangular) grid; open_clip's own
    resize assumes a square target and source. A text position embedding of another context length is
    reported as skipped. OpenAI weights were trained with QuickGELU: a model without it gets a warning.
    """
    state = read_state_dict(path)
    ignored = [k for k in _OPENAI_METADATA if k in state]
    state = {k: v for k, v in state.items() if k not in _OPENAI_METADATA}
    model_state = model.state_dict()
    prefix = select_prefix(list(state), set(model_state))
    ignored += [k for k in state if not k.startswith(prefix)]
    selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "logit_scale" in selected and "logit_scale" in model_state:
        selected["logit_scale"] = selected["logit_scale"].reshape(model_state["logit_scale"].shape)
    pos_embeds = {"visual.positional_embedding": (tuple(model.visual.grid_size), 1)}
    report = apply_state_dict(
        model, selected, pos_embeds=pos_embeds, strict=strict, path=str(path), prefix=prefix, ignored=ignored
    )
    if is_torchscript(path) and not any(isinstance(m, QuickGELU) for m in model.modules()):
        _logger.warning(
            "%s is an OpenAI CLIP checkpoint, trained with QuickGELU, but the model uses GELU: "
            "build it as e.g. 'ViT-B-16-quickgelu' for the original features", path
        )
    rank_zero_info(report.summary())
    return report


def tokenizer(model_name: str = "ViT-B-16", context_length: int = 77) -> Callable[[str | list[str]], Tensor]:
    """open_clip's tokenizer for `model_name`: str | list[str] -> LongTensor (N, context_length).

    CLIP's BPE vocabulary ships inside open_clip, so this works offline. Each text is wrapped in start/end
    tokens, truncated to `context_length`, zero padded.
    """
    name = CLIP_PRESETS[model_name][1] if model_name in CLIP_PRESETS else model_name
    return open_clip.get_tokenizer(name, context_length=context_length)


class ClipDualEncoder(nn.Module):
    """CLIP's image and text towers (Radford et al. 2021), as IRRA (Jiang & Ye, CVPR 2023) uses them.

    `encode_image`: the CLS token after `ln_post`, projected. `encode_text`: the end-of-text token's feature
    after `ln_final` (the highest token id), projected. Both are returned unnormalised; the losses normalise.
    Arguments as `build_clip`; `pretrained_report` keeps the load report.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        image_size: tuple[int, int] = (384, 128),
        pretrained: str | None = None,
        context_length: int = 77,
        model_cfg: dict | None = None,
    ):
        super().__init__()
        self.clip, self.pretrained_report = build_clip(model_name, image_size, pretrained, context_length, model_cfg)
        self.tokenize = tokenizer(model_name, context_length)
        proj = self.clip.text_projection
        self.embed_dim: int = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's learnable temperature as a multiplier: exp of the stored log-scale (init 1/0.07)."""
        return self.clip.logit_scale.exp()

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, embed_dim)."""
        return self.clip.encode_image(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """(B, context_length) token ids -> (B, embed_dim)."""
        return self.clip.encode_text(tokens)
