"""``pedlightning export-encoder``: the pre-trained image encoder of a checkpoint as a plain timm state dict.

    pedlightning export-encoder runs/personmae_luperson/checkpoints/last.ckpt personmae_vitb.pth

The output is ``{timm key: tensor}`` (``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``, ``blocks.0...``),
loadable with ``timm.create_model(name, img_size=(256, 128)).load_state_dict(...)`` or by TransReID /
fast-reid style code; decoders and the momentum teacher are left out (``--which teacher`` exports the teacher).
Works for every task with an image encoder (ReID, attributes, PersonMAE, VAL-PAT under ``encoder``; text search and
LCR2S under ``image_encoder``). When the checkpoint records its encoder description (our Lightning checkpoints do),
the export is checked by loading it strictly into a freshly built encoder of that architecture, and a sidecar
``<output>.json`` records what rebuilding it needs without guessing: the architecture, input size, patch size and
stride, normalisation mean/std, feature width and the source checkpoint (see :func:`encoder_sidecar`);
:func:`load_exported_encoder` rebuilds the :class:`~pedlightning.models.encoders.ImageEncoder` from the two files.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from pedlightning.errors import CheckpointError
from pedlightning.inference import ENCODER_KEYS, encoder_config_of
from pedlightning.models.checkpoint import read_state_dict
from pedlightning.models.encoders import PRESETS, ImageEncoder

WHICH = ("student", "teacher")
#: version tag of the sidecar layout written by :func:`encoder_sidecar`.
SIDECAR_FORMAT = "pedlightning-encoder/1"


def default_prefix(state: dict[str, torch.Tensor], hparams: dict, which: str) -> str:
    """``<encoder>.model.`` of the checkpoint's task, or the momentum teacher's copy of it."""
    if which == "teacher":  # PersonMAE's EMA teacher, or VAL-PAT's MoCo key encoder
        key_encoder = "key_encoder.module.encoder.model."
        return key_encoder if any(k.startswith(key_encoder) for k in state) else "teacher.module.model."
    for key in ENCODER_KEYS:
        if key in hparams or any(k.startswith(f"{key}.model.") for k in state):
            return f"{key}.model."
    return "encoder.model."


def extract_encoder(state: dict[str, torch.Tensor], prefix: str, path: str = "") -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, with the prefix removed."""
    encoder = {k[len(prefix):]: v.clone() for k, v in state.items() if k.startswith(prefix)}
    if not encoder:
        heads = sorted({k.split(".")[0] + "." for k in state})
        raise CheckpointError(f"{path or 'the checkpoint'} has no key under {prefix!r}; its top-level prefixes are "
                              f"{heads[:10]} (pass --prefix)")
    return encoder


def verify_export(encoder: dict[str, torch.Tensor], config: dict) -> ImageEncoder:
    """An :class:`ImageEncoder` built from the checkpoint's encoder description, with ``encoder`` loaded strictly."""
    model = ImageEncoder.from_config(config, drop_path_rate=0.0, pretrained=None)
    try:
        model.model.load_state_dict(encoder, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"the exported encoder does not match {config['name']}: {err}") from err
    return model


def encoder_sidecar(encoder: ImageEncoder, config: dict, ckpt: dict[str, Any], source: str,
                    which: str) -> dict[str, Any]:
    """What rebuilding an exported encoder needs: ``encoder_config`` (for :meth:`ImageEncoder.from_config`) and,
    spelled out for other code, the timm model and kwargs, input size, patch size/stride, normalisation and width.

    ``mean``/``std`` are the checkpoint datamodule's; None when it records none (then they are unknown, and the
    sidecar says so rather than guess).
    """
    data = ckpt.get("datamodule_hyper_parameters") or {}
    name = config["name"]
    timm_name, preset_kwargs = PRESETS.get(name, (name, {}))
    patch = stride = None
    if encoder.is_vit:
        patch = list(encoder.model.patch_embed.patch_size)
        stride = list(encoder.model.patch_embed.proj.stride)
    elif encoder.is_open_clip:
        patch = list(encoder.model.conv1.kernel_size)
        stride = list(encoder.model.conv1.stride)
    rebuild = {**config, "pretrained": None, "drop_path_rate": 0.0}
    return {
        "format": SIDECAR_FORMAT,
        "architecture": name,
        "timm_model": None if encoder.is_open_clip else timm_name,
        "model_kwargs": {**preset_kwargs, **(config.get("model_kwargs") or {})},
        "img_size": list(config["img_size"]),
        "patch_size": patch,
        "patch_stride": stride,
        "last_stride": None if encoder.is_vit or encoder.is_open_clip else config.get("last_stride"),
        "mean": list(data["mean"]) if data.get("mean") is not None else None,
        "std": list(data["std"]) if data.get("std") is not None else None,
        "feature_dim": encoder.embed_dim,
        "source_checkpoint": os.path.abspath(source),
        "which": which,
        "encoder_config": rebuild,
    }


def sidecar_path(weights: str) -> str:
    """``<weights>.json``: the sidecar beside an exported file."""
    return f"{weights}.json"


def load_exported_encoder(weights: str, sidecar: str | None = None) -> ImageEncoder:
    """The :class:`ImageEncoder` of an ``export-encoder`` output, rebuilt from its sidecar and loaded strictly."""
    sidecar = sidecar or sidecar_path(weights)
    if not os.path.isfile(sidecar):
        raise CheckpointError(f"no sidecar {sidecar} beside {weights}: export it again with `pedlightning "
                              "export-encoder` (without --prefix)")
    with open(sidecar) as f:
        meta = json.load(f)
    if meta.get("format") != SIDECAR_FORMAT or "encoder_config" not in meta:
        raise CheckpointError(f"{sidecar} is not a {SIDECAR_FORMAT} sidecar (format {meta.get('format')!r})")
    return verify_export(read_state_dict(weights), meta["encoder_config"]).eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pedlightning export-encoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Lightning checkpoint of a pedlightning module (e.g. PersonMAE)")
    parser.add_argument("output", help="file to write (torch.save of a {key: tensor} dict)")
    parser.add_argument("--which", choices=WHICH, default="student",
                        help="the trained encoder (student, default) or the momentum teacher / key encoder")
    parser.add_argument("--prefix", default=None, help="export the keys under this prefix instead")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    state = read_state_dict(args.checkpoint)  # raises a clear error for an unreadable file
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    hparams = ckpt.get("hyper_parameters") or {}
    prefix = args.prefix if args.prefix is not None else default_prefix(state, hparams, args.which)
    if prefix and not prefix.endswith("."):
        prefix += "."
    encoder = extract_encoder(state, prefix, args.checkpoint)
    config = encoder_config_of(hparams)
    checked = verify_export(encoder, config) if config is not None and args.prefix is None else None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(encoder, args.output)
    params = sum(v.numel() for v in encoder.values())
    note = ""
    if checked is not None:
        with open(sidecar_path(args.output), "w") as f:
            json.dump(encoder_sidecar(checked, config, ckpt, args.checkpoint, args.which), f, indent=2)
        note = f", loads strictly into {config['name']}; sidecar {sidecar_path(args.output)}"
    print(f"wrote {len(encoder)} tensors ({params / 1e6:.2f} M values) from {prefix!r} to {args.output}{note}")
