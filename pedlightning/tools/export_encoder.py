"""``pedlightning export-encoder``: the pre-trained image encoder of a checkpoint as a plain timm state dict.

    pedlightning export-encoder runs/personmae_luperson/checkpoints/last.ckpt personmae_vitb.pth

The output is ``{timm key: tensor}`` (``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``, ``blocks.0...``),
loadable with ``timm.create_model(name, img_size=(256, 128)).load_state_dict(...)`` or by TransReID /
fast-reid style code; decoders and the momentum teacher are left out (``--which teacher`` exports the teacher).
Works for every task with an image encoder (ReID, attributes, PersonMAE, VAL-PAT under ``encoder``; text search and
LCR2S under ``image_encoder``). When the checkpoint records its encoder description (our Lightning checkpoints do),
the export is checked by loading it strictly into a freshly built encoder of that architecture.
"""

from __future__ import annotations

import argparse
import os

import torch

from pedlightning.errors import CheckpointError
from pedlightning.models.checkpoint import read_state_dict

#: hyper-parameter names under which tasks describe their image encoder, in lookup order.
ENCODER_KEYS = ("encoder", "image_encoder")
WHICH = ("student", "teacher")


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


def verify_export(encoder: dict[str, torch.Tensor], config: dict) -> str:
    """Load ``encoder`` strictly into an :class:`ImageEncoder` built from the checkpoint's encoder description."""
    from pedlightning.models.encoders import ImageEncoder

    model = ImageEncoder.from_config(config, drop_path_rate=0.0, pretrained=None).model
    try:
        model.load_state_dict(encoder, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"the exported encoder does not match {config['name']}: {err}") from err
    return config["name"]


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
    state = read_state_dict(args.checkpoint)
    hparams = torch.load(args.checkpoint, map_location="cpu", weights_only=True).get("hyper_parameters") or {}
    prefix = args.prefix if args.prefix is not None else default_prefix(state, hparams, args.which)
    if prefix and not prefix.endswith("."):
        prefix += "."
    encoder = extract_encoder(state, prefix, args.checkpoint)
    config = next((hparams[k] for k in ENCODER_KEYS if isinstance(hparams.get(k), dict)), None)
    checked = verify_export(encoder, config) if config is not None and args.prefix is None else None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(encoder, args.output)
    params = sum(v.numel() for v in encoder.values())
    note = f", loads strictly into {checked}" if checked else ""
    print(f"wrote {len(encoder)} tensors ({params / 1e6:.2f} M values) from {prefix!r} to {args.output}{note}")
