"""Load public and our own checkpoints into timm / open_clip models, reporting every key.

One path serves every layout: read the file safely (`weights_only=True`), unwrap the container
(`{"state_dict": ...}` of Lightning, `{"model": ...}` of MAE), drop wrapper prefixes (`module.` of DDP,
`_orig_mod.` of `torch.compile`), select the sub-model's prefix, resize position embeddings to the model's
token grid, and copy what fits. Nothing is dropped silently: the `LoadReport` lists what was loaded,
resized, skipped for a shape mismatch, missing, unexpected, or ignored because it lies outside the prefix.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from pedlightning.errors import CheckpointError

__all__ = [
    "LoadReport",
    "PosEmbedSpec",
    "apply_state_dict",
    "clip_visual_prefix",
    "find_prefix",
    "infer_source_grid",
    "is_torchscript",
    "hub_cache_dir",
    "load_pretrained",
    "read_state_dict",
    "resample_pos_embed",
    "resolve_pretrained",
    "select_prefix",
]

_logger = logging.getLogger(__name__)

# Containers a checkpoint may wrap its tensors in: Lightning ("state_dict"), MAE / DeiT ("model").
_CONTAINER_KEYS = ("state_dict", "model")
# Wrapper segments that say nothing about the model: DDP and torch.compile.
_WRAPPER_PREFIX = "module."
_COMPILE_SEGMENT = "_orig_mod."
# Prefixes preferred, in this order, when several prefixes match equally many keys. Our task modules keep the
# image encoder (an ImageEncoder, whose timm / open_clip model is `.model`) at `encoder` (reID, attributes,
# PersonMAE, VAL-PAT) or `image_encoder` (text search, LCR2S), and a TextEncoder at `text_encoder`; momentum copies
# (`teacher.module.model.`, a MoCo key encoder) hold the same keys and must lose the tie to the trained encoder.
_KNOWN_PREFIXES = (
    "", "encoder.model.", "image_encoder.model.", "text_encoder.model.", "visual.", "model.", "encoder.",
    "backbone.", "visual.trunk.",
)
#: `pretrained:` values with these prefixes name published weights, found in the local caches (never downloaded).
TIMM_WEIGHTS = "timm:"
OPEN_CLIP_WEIGHTS = "open_clip:"
# A model's position-embedding layout: (token grid (h, w), number of leading prefix positions (CLS) outside it).
PosEmbedSpec = tuple[tuple[int, int], int]


@dataclass
class LoadReport:
    """What happened to every key when a checkpoint was loaded.

    `loaded` includes `resized` keys. `skipped`: in both, shapes differ and cannot be resized (e.g. a classifier).
    `missing`: model keys absent from the checkpoint. `unexpected`: checkpoint keys (under the selected prefix)
    the model does not have. `ignored`: checkpoint keys outside the selected prefix (a momentum teacher, a
    decoder, a head). `notes`: key -> what was done (grid change, shape mismatch).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    path: str = ""
    prefix: str = ""

    def summary(self, max_keys: int = 8) -> str:
        def keys(names: list[str]) -> str:
            shown = [f"{k} ({self.notes[k]})" if k in self.notes else k for k in names[:max_keys]]
            more = f", ... (+{len(names) - max_keys})" if len(names) > max_keys else ""
            return ", ".join(shown) + more

        lines = [f"Loaded {len(self.loaded)} tensors from {self.path or '<state dict>'} (prefix {self.prefix!r})"]
        for name in ("resized", "skipped", "missing", "unexpected", "ignored"):
            names = getattr(self, name)
            if names:
                lines.append(f"  {name} ({len(names)}): {keys(names)}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat `{key: tensor}` dict without running pickled code.

    Regular files are read with `torch.load(weights_only=True)`, `.safetensors` files (the Hugging Face hub's)
    with safetensors. TorchScript archives (OpenAI's original CLIP `.pt` files) are read with `torch.jit.load`,
    which restores TorchScript code and tensors but never unpickles arbitrary Python objects. Containers (`state_dict`, `model`) are unwrapped, and the `module.`
    (DDP) and `_orig_mod.` (torch.compile) wrapper segments are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    if path.suffix == ".safetensors":  # the format of the Hugging Face hub (timm, open_clip); holds tensors only
        from safetensors.torch import load_file

        try:
            return _flatten(load_file(str(path)), path)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"Cannot read safetensors file {path}: {err}") from err
    if is_torchscript(path):
        _logger.info("%s is a TorchScript archive (e.g. OpenAI CLIP); reading it with torch.jit.load", path)
        try:
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
            raise CheckpointError(f"Cannot read TorchScript checkpoint {path}: {err}") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            if unsafe:
                raise CheckpointError(
                    f"Checkpoint {path} contains a Python object ({unsafe.group(1)}) that "
                    f"torch.load(weights_only=True) refuses to unpickle. If you trust the file, re-save only its "
                    f"tensors, e.g. "
                    f"torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth')"
                ) from err
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
            reason = detail.group(1) if detail else (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(
                f"Cannot read {path} as a PyTorch checkpoint (not written by torch.save, or truncated): {reason}"
            ) from err
    return _flatten(obj, path)


def hub_cache_dir() -> str:
    """The Hugging Face hub cache as the environment says now: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
    huggingface_hub's default (`~/.cache/huggingface/hub`)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve_pretrained(spec: str | Path) -> str:
    """The local file a `pretrained:` value names. Nothing is downloaded.

    - a path: returned as it is;
    - `timm:<model>.<tag>` (e.g. `timm:vit_base_patch16_224.augreg_in21k_ft_in1k`; without `.<tag>`, timm's
      default tag): timm's published weights, from the Hugging Face hub cache
      (`<hub cache>/models--timm--<model>.<tag>`, file `model.safetensors` or `pytorch_model.bin`), else from
      torch hub's `checkpoints/` folder for weights timm still takes from a URL;
    - `open_clip:<model>/<tag>` (e.g. `open_clip:ViT-B-16/openai`): open_clip's published weights, from the hub
      cache (`open_clip_model.safetensors` or `open_clip_pytorch_model.bin`), else OpenAI's `.pt` in `~/.cache/clip`.

    Weights absent from the cache raise a `CheckpointError` naming the repository, the file, the cache folder and
    the `hf download` command that fetches them on a machine with internet access.
    """
    spec = str(spec)
    if spec.startswith(TIMM_WEIGHTS):
        return _timm_weights(spec[len(TIMM_WEIGHTS):], spec)
    if spec.startswith(OPEN_CLIP_WEIGHTS):
        return _open_clip_weights(spec[len(OPEN_CLIP_WEIGHTS):], spec)
    return spec


def _from_hub_cache(repo: str, filenames: list[str]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir())
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _not_cached(spec: str, repo: str | None, filenames: list[str], url_file: str | None) -> CheckpointError:
    where = []
    if repo:
        where.append(f"{' or '.join(filenames)} of the Hugging Face repository {repo} in the hub cache "
                     f"{hub_cache_dir()}")
    if url_file:
        where.append(url_file)
    fetch = (f"`hf download {repo} {filenames[0]}` (huggingface_hub's CLI; older versions: `huggingface-cli "
             f"download ...`), which stores it in that cache; copy the cache folder here or point HF_HOME / "
             f"HF_HUB_CACHE at it" if repo else f"the file to {url_file}")
    return CheckpointError(f"pretrained {spec!r} is not on this machine: looked for {' and for '.join(where)}. "
                           f"pedlightning never downloads weights; on a machine with internet access fetch {fetch}")


def _timm_weights(name: str, spec: str) -> str:
    import timm
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as err:  # a known model with an unknown tag
        cfg, reason = None, str(err)
    else:
        reason = "not a timm model with published weights"
    if cfg is None:
        tags = timm.list_pretrained(name.split(".")[0] + ".*")
        raise CheckpointError(f"pretrained {spec!r}: {reason}; its weights are e.g. "
                              f"{[TIMM_WEIGHTS + t for t in tags[:8]] or 'none'} (timm.list_pretrained lists all)")
    repo = cfg.hf_hub_id
    filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    found = _from_hub_cache(repo, filenames) if repo else None
    url_file = None
    if found is None and cfg.url and not cfg.url.endswith(".npz"):
        import torch.hub

        url_file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url.split("?")[0]))
        found = url_file if os.path.isfile(url_file) else None
    if found is None:
        raise _not_cached(spec, repo, filenames, url_file)
    return found


def _open_clip_weights(name: str, spec: str) -> str:
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    model, _, tag = name.partition("/")
    cfg = open_clip.get_pretrained_cfg(model, tag) if tag else {}
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise CheckpointError(f"pretrained {spec!r}: expected open_clip:<model>/<tag> with a published tag; "
                              f"{model!r} has {[f'{OPEN_CLIP_WEIGHTS}{model}/{t}' for t in tags[:8]] or 'none'}")
    repo, filenames = None, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        filenames = [filename] if filename else filenames
    found = _from_hub_cache(repo, filenames) if repo else None
    url_file = None
    if found is None and cfg.get("url"):
        url_file = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        found = url_file if os.path.isfile(url_file) else None
    if found is None:
        raise _not_cached(spec, repo, filenames, url_file)
    return found


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (a zip holding `constants.pkl`), e.g. OpenAI's original CLIP `.pt`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _flatten(obj: object, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"Checkpoint {path} holds a {type(obj).__name__}, expected a state dict (a mapping)")
    for key in _CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        key = str(key).replace(_COMPILE_SEGMENT, "")
        state[key[len(_WRAPPER_PREFIX):] if key.startswith(_WRAPPER_PREFIX) else key] = value
    if not state:
        raise CheckpointError(
            f"Checkpoint {path} holds no tensors; found keys {sorted(map(str, obj))[:8]} "
            f"(expected a state dict, or one under {list(_CONTAINER_KEYS)})"
        )
    return state


def select_prefix(keys: list[str], model_keys: set[str]) -> str:
    """The prefix under which the checkpoint stores the model's keys.

    Every dot-boundary split of every checkpoint key whose tail is a model key votes for its head; the prefix
    with most votes wins, ties broken by `_KNOWN_PREFIXES` order (so a student `encoder.model.` beats a momentum
    `teacher.module.model.`), then by length. Returns "" when nothing matches.
    """
    votes: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_keys:
                votes[".".join(parts[:i]) + "." if i else ""] += 1
    if not votes:
        return ""

    return min(votes, key=lambda prefix: (-votes[prefix], *_preference(prefix)))


def _preference(prefix: str) -> tuple[int, int]:
    known = _KNOWN_PREFIXES.index(prefix) if prefix in _KNOWN_PREFIXES else len(_KNOWN_PREFIXES)
    return known, len(prefix)


def find_prefix(keys: list[str], marker: str, companion: str | None = None) -> str | None:
    """The prefix of the sub-model that owns the key `marker` (e.g. `token_embedding.weight`), or None.

    Candidates are the heads of keys `<head>marker` (cut at a dot boundary) that also hold `<head>companion`
    when given. Several candidates (a trained tower and its momentum copy) are ranked as in `select_prefix`.
    """
    present = set(keys)
    heads = [k[: -len(marker)] for k in keys if k == marker or k.endswith("." + marker)]
    heads = [h for h in heads if companion is None or h + companion in present]
    return min(heads, key=_preference) if heads else None


def clip_visual_prefix(keys: list[str]) -> str | None:
    """The prefix of an open_clip / OpenAI CLIP ViT visual tower (`visual.` in a CLIP state dict,
    `image_encoder.model.` in a text-search checkpoint), found by its `class_embedding` and `conv1`; else None."""
    return find_prefix(keys, "class_embedding", companion="conv1.weight")


def infer_source_grid(num_tokens: int, target_grid: tuple[int, int]) -> tuple[int, int]:
    """Token grid (h, w) of a checkpoint's position embedding with `num_tokens` patch positions.

    Assumption: a square grid when `num_tokens` is a perfect square (public ImageNet/CLIP checkpoints); else
    the factorisation with the target grid's width (pedestrian crops keep a 128-px width: 16x8 <-> 24x8);
    else the factorisation whose aspect ratio is closest to the target's (e.g. TransReID's 21x10 stride-12 grid).
    Pass `source_grid` to `resample_pos_embed` when the checkpoint's grid is known otherwise.
    """
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        return side, side
    pairs = [(h, num_tokens // h) for h in range(1, num_tokens + 1) if num_tokens % h == 0]
    same_width = [p for p in pairs if p[1] == target_grid[1]]
    if same_width:
        return same_width[0]
    aspect = math.log(target_grid[0] / target_grid[1])
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - aspect))


def resample_pos_embed(
    posemb: Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int,
    source_grid: tuple[int, int] | None = None,
) -> tuple[Tensor, tuple[int, int]]:
    """Resize a position embedding `(1, prefix + h*w, D)` or `(prefix + h*w, D)` to `grid`.

    Bicubic interpolation with anti-aliasing over the 2-D grid (timm's `resample_abs_pos_embed`); prefix
    tokens (CLS) are kept as they are. Returns the resized tensor and the source grid used.
    """
    from timm.layers import resample_abs_pos_embed

    batched = posemb.ndim == 3
    posemb = posemb if batched else posemb.unsqueeze(0)
    num_patches = posemb.shape[1] - num_prefix_tokens
    source_grid = tuple(source_grid) if source_grid else infer_source_grid(num_patches, grid)
    if source_grid[0] * source_grid[1] != num_patches:
        raise CheckpointError(f"Position embedding has {num_patches} patch positions, not a {source_grid} grid")
    out = resample_abs_pos_embed(
        posemb, new_size=list(grid), old_size=list(source_grid), num_prefix_tokens=num_prefix_tokens
    )
    return (out if batched else out[0]), source_grid


def apply_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    pos_embeds: Mapping[str, PosEmbedSpec] | None = None,
    strict: bool = False,
    path: str = "",
    prefix: str = "",
    ignored: list[str] | None = None,
) -> LoadReport:
    """Copy `state_dict` (already in the model's key names) into `model`, resizing the listed position embeddings.

    `pos_embeds` maps a model key to its `(grid, num_prefix_tokens)`. Raises `CheckpointError` when no key
    matches, or, with `strict`, when any key is missing, unexpected or skipped; the model is unchanged then.
    """
    target = model.state_dict()
    pos_embeds = pos_embeds or {}
    report = LoadReport(path=path, prefix=prefix, ignored=list(ignored or []))
    to_load: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        if value.shape != want and key in pos_embeds and value.shape[-1] == want[-1]:
            grid, num_prefix = pos_embeds[key]
            resized, source_grid = resample_pos_embed(value, grid, num_prefix)
            if resized.shape == want:
                value = resized
                report.resized.append(key)
                report.notes[key] = f"grid {source_grid[0]}x{source_grid[1]} -> {grid[0]}x{grid[1]}"
        if value.shape != want:
            report.skipped.append(key)
            report.notes[key] = f"checkpoint {tuple(value.shape)} vs model {tuple(want)}"
            continue
        to_load[key] = value
        report.loaded.append(key)
    report.missing = [k for k in target if k not in state_dict]

    where = path or "the state dict"
    if not to_load and report.skipped:
        shapes = "; ".join(f"{k}: {report.notes[k]}" for k in report.skipped[:5])
        raise CheckpointError(
            f"No tensor of {where} fits {type(model).__name__}: the keys match but every shape differs "
            f"({len(report.skipped)} tensors, e.g. {shapes}); is it another architecture or width?"
        )
    if not to_load:
        raise CheckpointError(
            f"No tensor of {where} fits {type(model).__name__}: expected keys like {list(target)[:5]}, "
            f"found {list(state_dict)[:5]} (prefix {prefix!r}; pass `prefix=` to select another sub-model)"
        )
    if strict and (report.missing or report.unexpected or report.skipped):
        raise CheckpointError(f"Strict loading of {where} failed:\n{report.summary()}")
    model.load_state_dict(to_load, strict=False)
    return report


def load_pretrained(
    model: nn.Module, path: str, *, strict: bool = False, prefix: str | None = None
) -> LoadReport:
    """Load a checkpoint file into a timm model (`ImageEncoder.model`) and report every key.

    Layouts: a plain timm state dict; MAE's `{"model": ...}`; a Lightning checkpoint of our modules
    (`encoder.model.<timm key>` or `image_encoder.model.<timm key>`; momentum copies, decoders, heads and text
    towers are ignored); DDP `module.`; open_clip / OpenAI CLIP visual towers (`visual.*`, or an open_clip
    ImageEncoder's `image_encoder.model.*`, converted by timm's own ViT `checkpoint_filter_fn`; build the model as
    a timm CLIP ViT, e.g. `vit_base_patch16_clip_224`, for a key-for-key match).
    `prefix` overrides the auto-detected sub-model prefix. Position embeddings are resized to the model's token
    grid (rectangular or overlapping-stride); see `infer_source_grid` for how the source grid is found.
    `path` may also name published weights in the local cache (`timm:<model>.<tag>`, `open_clip:<model>/<tag>`;
    see `resolve_pretrained`).
    """
    path = resolve_pretrained(path)
    state = read_state_dict(path)
    model_keys = set(model.state_dict())
    clip_prefix = clip_visual_prefix(list(state)) if prefix is None else None
    if clip_prefix is not None:
        selected, ignored = _convert_clip_visual(state, clip_prefix, model, path)
        prefix = clip_prefix
    else:
        if prefix is None:
            prefix = select_prefix(list(state), model_keys)
        elif prefix and not prefix.endswith("."):
            prefix += "."
        selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        ignored = [k for k in state if not k.startswith(prefix)]
        if not selected:
            raise CheckpointError(f"No key of {path} starts with prefix {prefix!r}; found {list(state)[:5]}")
    report = apply_state_dict(
        model, selected, pos_embeds=_timm_pos_embeds(model), strict=strict, path=str(path), prefix=prefix,
        ignored=ignored,
    )
    rank_zero_info(report.summary())
    return report


def _timm_pos_embeds(model: nn.Module) -> dict[str, PosEmbedSpec]:
    pos_embed = getattr(model, "pos_embed", None)
    if not isinstance(pos_embed, Tensor) or not hasattr(model, "patch_embed"):
        return {}
    num_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    return {"pos_embed": (tuple(model.patch_embed.grid_size), num_prefix)}


def _convert_clip_visual(
    state: Mapping[str, Tensor], clip_prefix: str, model: nn.Module, path: str
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a CLIP visual tower to timm ViT keys with timm's `checkpoint_filter_fn`.

    The position embedding is taken out before the call and resized by `apply_state_dict`, because timm's own
    resampling assumes a square source grid for checkpoints it has no metadata for.
    """
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if not isinstance(model, VisionTransformer):
        raise CheckpointError(
            f"{path} holds a CLIP ViT visual tower; it loads only into a timm VisionTransformer, "
            f"not {type(model).__name__}"
        )
    visual = {"visual." + k[len(clip_prefix):]: v for k, v in state.items() if k.startswith(clip_prefix)}
    ignored = [k for k in state if not k.startswith(clip_prefix)]
    posemb = visual.pop("visual.positional_embedding", None)
    converted = checkpoint_filter_fn(visual, model)
    if posemb is not None:
        converted["pos_embed"] = posemb.unsqueeze(0)
    if "head.weight" in converted and "head.weight" not in model.state_dict():
        # CLIP's image projection (`visual.proj`) has no place in an encoder built with num_classes=0.
        del converted["head.weight"], converted["head.bias"]
        ignored.append(clip_prefix + "proj")
    return converted, ignored
