"""Use a trained checkpoint outside Lightning: reID features, attribute probabilities, text-search features.

    from pedlightning.inference import FeatureExtractor

    extractor = FeatureExtractor.from_checkpoint("runs/market1501_vitb/checkpoints/last.ckpt", device="cuda")
    feats = extractor(["q/0001_c1.jpg", "g/0002_c3.jpg"])          # (2, D), the features `predict` writes
    text = extractor.encode_text(["a man in a red jacket"])         # text-search checkpoints only

The checkpoint's own preprocessing is restored (input size, normalisation mean/std: the ViT recipes normalise with
0.5, the others with ImageNet's statistics, CLIP with OpenAI's; a wrong guess gives wrong features without any
error), read from the datamodule hyper-parameters Lightning stores in the checkpoint. The features are computed by
the task's own evaluation method (reID: ``query_features``, with the checkpoint's ``flip_test`` and ``neck_feat``;
text search: ``gallery_features`` / ``query_features``; attributes: the sigmoid of the logits), so they are the
numbers ``pedlightning predict`` writes for the same images.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from PIL import Image
from torch import Tensor, nn

from pedlightning.errors import CheckpointError, ConfigError, DatasetLayoutError

__all__ = ["ENCODER_KEYS", "FeatureExtractor", "ImageEmbedding", "Preprocessing", "checkpoint_preprocessing",
           "encoder_config_of", "list_images", "load_task", "read_checkpoint"]

#: hyper-parameter names under which tasks describe their image encoder, in lookup order.
ENCODER_KEYS = ("encoder", "image_encoder")
#: file suffixes `list_images` takes from a folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OutputKind = Literal["features", "probs"]


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation transform of a checkpoint: bicubic resize to ``img_size`` (H, W), then normalise.

    ``origin`` says where mean/std came from (the checkpoint's datamodule, or the caller).
    """

    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str

    def transform(self) -> Any:
        """The datamodules' own test transform with these values (PIL RGB image -> normalised tensor)."""
        from pedlightning.data.transforms import build_test_transform

        return build_test_transform(self.img_size, self.mean, self.std)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint of a pedlightning task, read with ``weights_only=True``."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot read {path} as a Lightning checkpoint: {first}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        keys = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a Lightning checkpoint of a pedlightning task: expected the keys "
                              f"'state_dict' and 'hyper_parameters', found {keys}")
    return ckpt


def encoder_config_of(hparams: dict[str, Any]) -> dict[str, Any] | None:
    """The image encoder description (an ``ImageEncoderConfig`` dict) in a task's hyper-parameters, or None."""
    return next((hparams[k] for k in ENCODER_KEYS if isinstance(hparams.get(k), dict)), None)


def checkpoint_preprocessing(ckpt: dict[str, Any], path: str = "the checkpoint", mean: Sequence[float] | None = None,
                             std: Sequence[float] | None = None) -> Preprocessing:
    """The checkpoint's evaluation preprocessing; ``mean``/``std`` given here replace the recorded ones.

    The input size is the encoder's ``img_size``; mean/std are the datamodule hyper-parameters Lightning saved in
    the checkpoint (``datamodule_hyper_parameters``). A checkpoint trained with a datamodule that records no
    mean/std needs them passed: guessing would give wrong features silently.
    """
    data = ckpt.get("datamodule_hyper_parameters") or {}
    encoder = encoder_config_of(ckpt.get("hyper_parameters") or {})
    size = encoder.get("img_size") if encoder else data.get("img_size")
    if size is None:
        raise CheckpointError(f"{path} records no input size (no encoder img_size in its hyper-parameters and no "
                              "datamodule img_size)")
    if encoder and data.get("img_size") is not None and list(data["img_size"]) != list(size):
        raise CheckpointError(f"{path}: the encoder takes img_size={list(size)} but the datamodule produced "
                              f"{list(data['img_size'])}")
    origin = "the caller"
    if mean is None or std is None:
        if data.get("mean") is None or data.get("std") is None:
            raise CheckpointError(
                f"{path} does not record its normalisation (no mean/std in datamodule_hyper_parameters; it was "
                "trained with a datamodule that does not save them): pass the values it was trained with, e.g. "
                "--mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 (ViT recipes) or the ImageNet statistics --mean 0.485 0.456 "
                "0.406 --std 0.229 0.224 0.225")
        origin = "the checkpoint's datamodule"
    mean = tuple(float(m) for m in (mean if mean is not None else data["mean"]))
    std = tuple(float(s) for s in (std if std is not None else data["std"]))
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"mean and std need 3 values (RGB), got mean={list(mean)}, std={list(std)}")
    return Preprocessing((int(size[0]), int(size[1])), mean, std, origin)


def _import_class(class_path: str, path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot import the task class {class_path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise CheckpointError(f"{path}: {class_path!r} is not a LightningModule")
    return cls


def load_task(path: str | os.PathLike, task: type[L.LightningModule] | str | None = None,
              map_location: str | torch.device = "cpu") -> L.LightningModule:
    """The task module of a checkpoint, in eval mode.

    Its class is the ``_class_path`` that ``pedlightning fit`` records in the hyper-parameters; a checkpoint
    written by a plain ``Trainer`` has none, so pass ``task`` (the class, or its import path such as
    ``pedlightning.tasks.ReIDModule``). Encoders are rebuilt without their ``pretrained`` initial weights (the
    checkpoint holds the trained ones), so the files a run started from need not exist where it is used.
    """
    path = str(path)
    hparams = read_checkpoint(path)["hyper_parameters"]
    if isinstance(task, str):
        task = _import_class(task, path)
    if task is None:
        if "_class_path" not in hparams:
            raise CheckpointError(f"{path} does not record its task class (it was not written by `pedlightning "
                                  "fit`): pass the task, e.g. --task pedlightning.tasks.ReIDModule")
        task = _import_class(hparams["_class_path"], path)
    # The trained weights are in the checkpoint: the initial weights it was trained from need not exist here.
    untouched = {k: {**hparams[k], "pretrained": None} for k in ("encoder", "image_encoder", "text_encoder")
                 if isinstance(hparams.get(k), dict) and hparams[k].get("pretrained")}
    return task.load_from_checkpoint(path, map_location=map_location, **untouched).eval()


class ImageEmbedding(nn.Module):
    """A task's test-time output for a batch of normalised images, through the task's own methods.

    Retrieval tasks (reID, text search, LCR2S): the image part of their evaluation (reID ``query_features``, with
    its ``flip_test`` / ``neck_feat``; text search ``gallery_features``). Attributes: the sigmoid of the logits
    (``kind == "probs"``). Any other task (pre-training: PersonMAE, VAL-PAT): its ``forward``, the encoder feature.
    This is the module ``export-onnx`` exports.
    """

    def __init__(self, task: L.LightningModule):
        super().__init__()
        from pedlightning.tasks.attributes import AttributeModule

        self.task = task
        self.kind: OutputKind = "probs" if isinstance(task, AttributeModule) else "features"

    def forward(self, images: Tensor) -> Tensor:
        from pedlightning.tasks.retrieval import RetrievalTask

        task = self.task
        if isinstance(task, RetrievalTask):
            batch = {"image": images}
            feats = task.gallery_features(batch) if task.query_is_text else task.query_features(batch)
            return feats.float()
        out = task(images).float()
        return torch.sigmoid(out) if self.kind == "probs" else out


ImageInput = str | os.PathLike | Image.Image | Tensor


class FeatureExtractor:
    """A trained task as a function: images -> features (or attribute probabilities), captions -> features.

    Images may be paths, PIL images or tensors, one or a list (mixed). A float tensor ``(3, H, W)`` or
    ``(B, 3, H, W)`` is taken as network input, already resized and normalised (as torchreid's extractor does); a
    ``uint8`` tensor ``(3, H, W)`` is a raw RGB image and goes through the preprocessing. Outputs are float32 on
    the CPU, in input order.

    Args:
        task: the task module (see :func:`load_task`).
        preprocessing: its evaluation preprocessing (see :func:`checkpoint_preprocessing`).
        device: where the model runs.
        batch_size: images per forward pass.
        tokenizer: ``(open_clip tokenizer name, context_length)`` for :meth:`encode_text`; None for image tasks.
    """

    def __init__(self, task: L.LightningModule, preprocessing: Preprocessing, device: str | torch.device = "cpu",
                 batch_size: int = 64, tokenizer: tuple[str, int] | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.embedding = ImageEmbedding(task).to(self.device).eval()
        self.task = task
        self.preprocessing = preprocessing
        self.transform = preprocessing.transform()
        self.batch_size = batch_size
        self._tokenizer = None
        self.tokenizer_spec = tokenizer

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64,
                        task: type[L.LightningModule] | str | None = None, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None) -> FeatureExtractor:
        """Load ``path`` with its preprocessing; ``task`` for checkpoints without a recorded class, ``mean``/``std``
        to replace (or, where it records none, supply) the checkpoint's normalisation."""
        path = str(path)
        ckpt = read_checkpoint(path)
        preprocessing = checkpoint_preprocessing(ckpt, path, mean, std)
        module = load_task(path, task)
        return cls(module, preprocessing, device, batch_size, tokenizer=_checkpoint_tokenizer(ckpt, module))

    @property
    def kind(self) -> OutputKind:
        """``features`` (reID, text search, pre-training) or ``probs`` (attribute probabilities)."""
        return self.embedding.kind

    @property
    def attribute_names(self) -> list[str] | None:
        """The attribute of each output column of an attribute checkpoint (None for other tasks)."""
        if self.kind != "probs":
            return None
        names = self.task.hparams.get("attribute_names")
        return list(names) if names else [f"attr{i}" for i in range(self.task.head.num_attributes)]

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """``(N, 3, H, W)`` network input of ``images``."""
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image, Tensor)) else list(images)
        parts = [self._one(item) for item in items]
        if not parts:
            raise ConfigError("no images given")
        return torch.cat(parts)

    def _one(self, item: ImageInput) -> Tensor:
        size = self.preprocessing.img_size
        if isinstance(item, Tensor):
            if item.dtype == torch.uint8 and item.ndim == 3:
                from torchvision.transforms.functional import to_pil_image

                return self.transform(to_pil_image(item)).unsqueeze(0)
            batch = item.unsqueeze(0) if item.ndim == 3 else item
            if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, *size) or not batch.is_floating_point():
                raise ConfigError(f"a tensor input must be a normalised float (3, {size[0]}, {size[1]}) or "
                                  f"(B, 3, {size[0]}, {size[1]}) image batch, or a uint8 (3, H, W) image; got "
                                  f"{item.dtype} {tuple(item.shape)}")
            return batch.float()
        if isinstance(item, Image.Image):
            return self.transform(item.convert("RGB")).unsqueeze(0)
        if isinstance(item, (str, os.PathLike)):
            from pedlightning.data.datasets import load_rgb

            if os.path.isdir(item):
                raise ConfigError(f"{item} is a folder: pass its images (pedlightning.inference.list_images)")
            return self.transform(load_rgb(str(item))).unsqueeze(0)
        raise ConfigError(f"cannot read an image from a {type(item).__name__}: pass paths, PIL images or tensors")

    @torch.inference_mode()
    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """Features ``(N, D)`` (or attribute probabilities ``(N, A)``) of ``images``, in order."""
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image, Tensor)) else list(images)
        outputs = []
        for start in range(0, len(items), self.batch_size):
            batch = self.preprocess(items[start:start + self.batch_size])
            for chunk in batch.split(self.batch_size):
                outputs.append(self.embedding(chunk.to(self.device)).cpu())
        if not outputs:
            raise ConfigError("no images given")
        return torch.cat(outputs)

    @torch.inference_mode()
    def encode_text(self, captions: str | Sequence[str]) -> Tensor:
        """Joint-space features ``(N, D)`` of captions, tokenised with the checkpoint's tokenizer (text search)."""
        from pedlightning.data.tokenizer import build_tokenizer

        if self.tokenizer_spec is None:
            raise ConfigError(f"{type(self.task).__name__} has no text tower: caption features need a text-search "
                              "checkpoint (TextReIDModule, LCR2SModule)")
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(*self.tokenizer_spec)
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not captions:
            raise ConfigError("no captions given")
        outputs = [self.task.query_features({"tokens": self._tokenizer(captions[i:i + self.batch_size])
                                             .to(self.device)}).float().cpu()
                   for i in range(0, len(captions), self.batch_size)]
        return torch.cat(outputs)


def _checkpoint_tokenizer(ckpt: dict[str, Any], task: L.LightningModule) -> tuple[str, int] | None:
    """The tokenizer the checkpoint was trained with: the datamodule's, else the text tower's own name."""
    from pedlightning.tasks.retrieval import RetrievalTask

    if not (isinstance(task, RetrievalTask) and task.query_is_text):
        return None
    data = ckpt.get("datamodule_hyper_parameters") or {}
    context_length = task.text_encoder.context_length
    name = data.get("tokenizer") or (task.hparams.get("text_encoder") or {}).get("name")
    if name is None:
        raise CheckpointError("the checkpoint names no tokenizer (no datamodule tokenizer, no text_encoder name)")
    return str(name), int(context_length)


def list_images(source: str | os.PathLike) -> list[str]:
    """The images of a folder (recursive, sorted) or of a list file (one path per line).

    Relative paths in a list file are taken from the list file's folder (Assumption: list files travel with their
    images, as MSMT17's ``list_*.txt`` do); blank lines and lines starting with ``#`` are skipped.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise DatasetLayoutError(f"{source} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}, "
                                     "recursively)")
        return paths
    if not source.is_file():
        raise DatasetLayoutError(f"{source} is neither a folder of images nor a list file")
    lines = [line.strip() for line in source.read_text().splitlines()]
    paths = [line if os.path.isabs(line) else str(source.parent / line)
             for line in lines if line and not line.startswith("#")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetLayoutError(f"{source} lists {len(missing)} image(s) that do not exist, e.g. {missing[0]} "
                                 "(relative paths are taken from the list file's folder)")
    if not paths:
        raise DatasetLayoutError(f"{source} lists no images")
    return paths
