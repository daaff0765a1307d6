"""CLIP's towers from open_clip, built offline at pedestrian input sizes (e.g. 384x128).

`TextEncoder` is CLIP's text transformer alone (Radford et al. 2021, Sec. 2.4): token ids -> the projected
end-of-text feature. CLIP's visual tower is an `ImageEncoder` named `open_clip:<config>`
(`pedlightning.models.encoders`). `build_clip` builds the whole CLIP model; `load_clip_pretrained` loads an
open_clip state dict or OpenAI checkpoint into CLIP or into one of its towers.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Literal

import open_clip
from lightning.pytorch.utilities import rank_zero_info
from open_clip.model import _build_text_tower, _build_vision_tower
from open_clip.transformer import QuickGELU, TextTransformer, VisionTransformer
from torch import Tensor, nn

from pedlightning.errors import CheckpointError, ConfigError
from pedlightning.models.checkpoint import (
    LoadReport,
    PosEmbedSpec,
    apply_state_dict,
    clip_visual_prefix,
    find_prefix,
    is_torchscript,
    read_state_dict,
    resolve_pretrained,
    select_prefix,
)
from pedlightning.models.encoders import config_from, no_checkpoint_as_none

__all__ = [
    "CLIP_PRESETS",
    "ClipTower",
    "TextEncoder",
    "TextEncoderConfig",
    "build_clip",
    "build_text_tower",
    "build_visual_tower",
    "clip_config",
    "load_clip_pretrained",
]

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
# Top-level CLIP keys that belong to neither text tower: the visual tower and the contrastive temperature.
_NOT_TEXT = ("visual", "logit_scale", "logit_bias")
#: What `load_clip_pretrained` loads into: the whole CLIP model, its visual tower or its text tower.
ClipTower = Literal["clip", "visual", "text"]


def clip_config(model_name: str = "ViT-B-16", model_cfg: dict | None = None) -> dict:
    """A copy of the open_clip model config `model_name` (an open_clip name or a preset), or of `model_cfg`."""
    if model_cfg is None:
        preset = CLIP_PRESETS.get(model_name)
        model_cfg = preset[0] if preset else open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ConfigError(f"Unknown CLIP model {model_name!r}: not an open_clip config nor in {list(CLIP_PRESETS)}")
    return copy.deepcopy(model_cfg)


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
    cfg = clip_config(model_name, model_cfg)
    cfg["vision_cfg"] = {**cfg.get("vision_cfg", {}), "image_size": tuple(image_size)}
    cfg["text_cfg"] = {**cfg.get("text_cfg", {}), "context_length": context_length}
    model_class = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    model = model_class(**cfg)
    report = load_clip_pretrained(model, pretrained) if pretrained else None
    return model, report


def build_visual_tower(
    model_name: str = "ViT-B-16", image_size: tuple[int, int] = (384, 128), model_cfg: dict | None = None
) -> VisionTransformer:
    """CLIP's ViT visual tower alone, built as open_clip builds it inside CLIP (same modules, same keys)."""
    cfg = clip_config(model_name, model_cfg)
    vision_cfg = {**cfg.get("vision_cfg", {}), "image_size": tuple(image_size)}
    visual = _build_vision_tower(cfg["embed_dim"], vision_cfg, cfg.get("quick_gelu", False))
    if not isinstance(visual, VisionTransformer):
        raise ConfigError(f"CLIP model {model_name!r} has a {type(visual).__name__} visual tower; only ViT towers "
                          f"can be an open_clip ImageEncoder")
    return visual


def build_text_tower(
    model_name: str = "ViT-B-16", context_length: int = 77, model_cfg: dict | None = None
) -> TextTransformer:
    """CLIP's text transformer alone, built as open_clip builds it inside CLIP (same modules, same keys)."""
    cfg = clip_config(model_name, model_cfg)
    text_cfg = {**cfg.get("text_cfg", {}), "context_length": context_length}
    text = _build_text_tower(cfg["embed_dim"], text_cfg, cfg.get("quick_gelu", False))
    if not isinstance(text, TextTransformer):
        raise ConfigError(f"CLIP model {model_name!r} has a {type(text).__name__} text tower; only open_clip's "
                          f"TextTransformer is supported")
    return text


def load_clip_pretrained(model: nn.Module, path: str, *, strict: bool = False, tower: ClipTower = "clip") -> LoadReport:
    """Load an open_clip state dict or OpenAI CLIP checkpoint (TorchScript `.pt` included) into `model`.

    `tower` says what `model` is: the whole CLIP model (`clip`), its visual tower (`visual`: the keys under the
    checkpoint's visual prefix, e.g. `visual.*`) or its text tower (`text`: the keys beside `token_embedding`,
    without `visual.*` and `logit_scale`). Our own checkpoints work too (`image_encoder.model.*`,
    `text_encoder.model.*`). The visual position embedding is resized to the model's (possibly rectangular) grid;
    open_clip's own resize assumes a square target and source. A text position embedding of another context
    length is reported as skipped. OpenAI weights were trained with QuickGELU: a model without it gets a warning.
    `path` may name published weights in the local cache, e.g. `open_clip:ViT-B-16/openai` (see
    `pedlightning.models.checkpoint.resolve_pretrained`).
    """
    path = resolve_pretrained(path)
    state = read_state_dict(path)
    ignored = [k for k in _OPENAI_METADATA if k in state]
    state = {k: v for k, v in state.items() if k not in _OPENAI_METADATA}
    model_state = model.state_dict()
    prefix = _tower_prefix(list(state), set(model_state), tower, path)
    selected = {}
    for key, value in state.items():
        tail = key[len(prefix):]
        if not key.startswith(prefix) or (tower == "text" and tail.split(".")[0] in _NOT_TEXT):
            ignored.append(key)
        else:
            selected[tail] = value
    if "logit_scale" in selected and "logit_scale" in model_state:
        selected["logit_scale"] = selected["logit_scale"].reshape(model_state["logit_scale"].shape)
    report = apply_state_dict(
        model, selected, pos_embeds=_visual_pos_embeds(model, tower), strict=strict, path=str(path),
        prefix=prefix, ignored=ignored,
    )
    if is_torchscript(path) and not any(isinstance(m, QuickGELU) for m in model.modules()):
        _logger.warning(
            "%s is an OpenAI CLIP checkpoint, trained with QuickGELU, but the model uses GELU: "
            "build it as e.g. 'ViT-B-16-quickgelu' for the original features", path
        )
    rank_zero_info(report.summary())
    return report


def _tower_prefix(keys: list[str], model_keys: set[str], tower: ClipTower, path: str) -> str:
    if tower == "clip":
        return select_prefix(keys, model_keys)
    # The two towers share key names (`transformer.resblocks.*`), so each is found by a key only it has.
    prefix = clip_visual_prefix(keys) if tower == "visual" else find_prefix(keys, "token_embedding.weight")
    if prefix is None:
        marker = "class_embedding and conv1.weight" if tower == "visual" else "token_embedding.weight"
        raise CheckpointError(f"{path} holds no CLIP {tower} tower: no key ends in {marker} "
                              f"(found e.g. {keys[:5]})")
    return prefix


def _visual_pos_embeds(model: nn.Module, tower: ClipTower) -> dict[str, PosEmbedSpec]:
    if tower == "text":
        return {}
    visual = model.visual if tower == "clip" else model
    key = "visual.positional_embedding" if tower == "clip" else "positional_embedding"
    return {key: (tuple(visual.grid_size), 1)} if hasattr(visual, "grid_size") else {}


@dataclass
class TextEncoderConfig:
    """How to build a :class:`TextEncoder`; every task describes its text tower with this one record.

    `name`: an open_clip model config (`ViT-B-16`; `ViT-B-16-quickgelu` for OpenAI's weights) or a preset
    (`clip_tiny_test`). `context_length`: tokens per caption (CLIP: 77; the tokenizer must use the same).
    `pretrained`: a local open_clip / OpenAI CLIP checkpoint or one of our checkpoints (its text tower is loaded),
    or published weights in the local cache by name, `open_clip:<model>/<tag>` (e.g. `open_clip:ViT-B-16/openai`).
    `model_cfg`: an open_clip model config dict (embed_dim, text_cfg, ...) that replaces `name`'s.
    """

    name: str = "ViT-B-16"
    context_length: int = 77
    pretrained: str | None = None
    model_cfg: dict | None = None

    def __post_init__(self) -> None:
        self.pretrained = no_checkpoint_as_none(self.pretrained)


class TextEncoder(nn.Module):
    """CLIP's text transformer (Radford et al. 2021, Sec. 2.4): token ids -> the projected end-of-text feature.

    A causal transformer over the token embeddings; the feature is read after `ln_final` at the end-of-text
    token (the highest id in each row) and projected to the joint space: the numbers of open_clip's
    `CLIP.encode_text` for the same weights, unnormalised. Only the text tower is built (no visual tower).

    Args: as :class:`TextEncoderConfig`. Attributes: `model` (open_clip's `TextTransformer`; state-dict keys
    `model.<CLIP text key>`, e.g. `model.token_embedding.weight`), `embed_dim` (projection width),
    `context_length`, `width` (transformer width), `pretrained_report` (the `LoadReport`, None without weights).
    """

    def __init__(
        self,
        name: str = "ViT-B-16",
        context_length: int = 77,
        pretrained: str | None = None,
        model_cfg: dict | None = None,
    ):
        super().__init__()
        self.model = build_text_tower(name, context_length, model_cfg)
        self.embed_dim: int = self.model.output_dim
        self.context_length: int = self.model.context_length
        self.width: int = self.model.width
        self.pretrained_report: LoadReport | None = None
        if pretrained:
            self.pretrained_report = load_clip_pretrained(self.model, pretrained, tower="text")

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig | dict, **overrides: Any) -> TextEncoder:
        """Build from a :class:`TextEncoderConfig` or its dict (checkpoint hyper-parameters), `overrides` on top."""
        return cls(**config_from(TextEncoderConfig, cfg, overrides))

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, context_length) token ids -> (B, embed_dim) unnormalised joint-space features."""
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ConfigError(f"TextEncoder takes (batch, {self.context_length}) token ids, got shape "
                              f"{tuple(tokens.shape)}: build the tokenizer with context_length={self.context_length}")
        return self.model(tokens)
