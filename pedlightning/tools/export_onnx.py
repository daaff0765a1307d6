"""``pedlightning export-onnx``: a checkpoint's image side as ONNX with a dynamic batch, checked against PyTorch.

    pedlightning export-onnx --ckpt runs/market1501_vitb/checkpoints/last.ckpt --out market_vitb.onnx

The graph is the task's test-time image output (:class:`pedlightning.inference.ImageEmbedding`): reID features with
the checkpoint's ``neck_feat`` (before/after the BNNeck) and ``flip_test``; text search, the joint-space image
feature; attributes, the probabilities. Input ``images``: ``(batch, 3, H, W)`` float32, already resized and
normalised; output ``features`` (or ``probs``). ``<out>.json`` records the input size, mean/std and output width,
so a consumer preprocesses as training did. After export the graph runs in onnxruntime on seeded random batches
(sizes ``--check-batch-sizes``) and the largest difference to PyTorch is printed; above ``--atol`` the command
fails. Needs ``onnx``, ``onnxscript`` (torch's exporter) and ``onnxruntime``: ``pip install "pedlightning[onnx]"``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from collections.abc import Sequence

import torch

from pedlightning.errors import ConfigError, PedLightningError
from pedlightning.inference import ImageEmbedding, checkpoint_preprocessing, load_task, read_checkpoint

#: what the exporter and the check import, and the pip names that provide them.
REQUIRED = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}
INPUT_NAME = "images"


class ExportMismatchError(PedLightningError):
    """The exported graph does not reproduce the PyTorch model within the tolerance."""


#: Assumption: the torch.export-based exporter with `dynamic_shapes` and `ONNXProgram.save(external_data=...)`
#: as used here is torch >= 2.6's (tested with 2.13).
MIN_TORCH = (2, 6)


def require_onnx() -> None:
    """A ConfigError naming what to install when an ONNX package is missing, or when torch is too old."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise ConfigError(f"export-onnx needs torch >= {'.'.join(map(str, MIN_TORCH))} (its torch.export-based "
                          f"ONNX exporter); this is torch {torch.__version__}")
    missing = []
    for module, package in REQUIRED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ConfigError(f"export-onnx needs {', '.join(missing)}: pip install \"pedlightning[onnx]\" "
                          f"(or pip install {' '.join(REQUIRED.values())})")


def export(model: torch.nn.Module, img_size: Sequence[int], out: str, output_name: str = "features",
           opset: int | None = None) -> None:
    """Write ``model`` (images -> one tensor) as ONNX with a dynamic batch dimension (torch.export-based exporter).

    Weights are stored inside the ``.onnx`` file (no external data file), which holds for models under ONNX's
    2 GB protobuf limit (a ViT-L is 1.2 GB in float32).
    """
    example = torch.randn(2, 3, *img_size)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=[output_name], dynamic_shapes={"images": {0: batch}},
                                opset_version=opset, verbose=False)
    program.save(out, external_data=False)


def compare(model: torch.nn.Module, onnx_path: str, img_size: Sequence[int], batch_sizes: Sequence[int],
            seed: int = 0) -> dict[int, float]:
    """Largest absolute difference between onnxruntime (CPU) and PyTorch per batch size, on seeded random input."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    diffs = {}
    for size in batch_sizes:
        images = torch.randn(size, 3, *img_size, generator=generator)
        with torch.inference_mode():
            expected = model(images).numpy()
        got = session.run(None, {INPUT_NAME: images.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportMismatchError(f"{onnx_path}: batch {size} gives shape {got.shape}, PyTorch {expected.shape}")
        diffs[size] = float(abs(got - expected).max())
    return diffs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pedlightning export-onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint of a pedlightning task")
    parser.add_argument("--out", required=True, help="the .onnx file to write (and <out>.json beside it)")
    parser.add_argument("--task", default=None, help="task class for checkpoints that do not record it, e.g. "
                                                     "pedlightning.tasks.ReIDModule")
    parser.add_argument("--mean", type=float, nargs=3, default=None,
                        help="normalisation mean for the sidecar; only for checkpoints that do not record theirs")
    parser.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std, as --mean")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--check-batch-sizes", type=int, nargs="+", default=[1, 3],
                        help="batch sizes run in onnxruntime against PyTorch (default: 1 3)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted absolute difference")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (args.mean is None) != (args.std is None):
        raise ConfigError("pass --mean and --std together")
    require_onnx()
    ckpt = read_checkpoint(args.ckpt)
    pre = checkpoint_preprocessing(ckpt, args.ckpt, args.mean, args.std)
    model = ImageEmbedding(load_task(args.ckpt, args.task)).eval()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    export(model, pre.img_size, args.out, output_name=model.kind, opset=args.opset)
    diffs = compare(model, args.out, pre.img_size, args.check_batch_sizes)
    with torch.inference_mode():
        width = model(torch.zeros(1, 3, *pre.img_size)).shape[1]
    meta = {"source_checkpoint": os.path.abspath(args.ckpt), "task": type(model.task).__name__,
            "input": INPUT_NAME, "output": model.kind, "output_dim": int(width), **pre.as_dict(),
            "layout": "float32 (batch, 3, H, W), resized (bicubic) to img_size and normalised with mean/std"}
    if model.kind == "probs":
        names = model.task.hparams.get("attribute_names")
        meta["attribute_names"] = list(names) if names else None
    with open(f"{args.out}.json", "w") as f:
        json.dump(meta, f, indent=2)
    shown = ", ".join(f"batch {b}: {d:.2e}" for b, d in diffs.items())
    print(f"onnxruntime vs PyTorch max |difference|: {shown} (tolerance {args.atol:g})")
    worst = max(diffs.values())
    if worst > args.atol:
        raise ExportMismatchError(f"{args.out} differs from PyTorch by {worst:.3g} > {args.atol:g}: the graph does "
                                  "not reproduce the model (kept for inspection)")
    print(f"wrote {args.out} ({type(model.task).__name__} {model.kind}, input {pre.img_size[0]}x{pre.img_size[1]}, "
          f"dynamic batch) and {args.out}.json")
