"""The TransReID / strong-baseline reID augmentation: resize, flip, pad + crop, normalise, random erasing."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from pedlightning.data.transforms.batched import (
    Deferred,
    PlacedImage,
    finish_images,
    pack_images,
    pil_to_tensor,
    random_erase_box,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ReIDTrainTransform:
    """Training pipeline of Luo et al. "Bag of Tricks" as used by TransReID: bicubic resize, horizontal flip,
    zero pad + random crop, normalisation, random erasing with per-pixel N(0, 1) noise after normalisation
    (TransReID's ``mode='pixel'``; torchvision's ``value='random'``).

    Takes a PIL image or a CHW uint8 tensor (what the datasets decode for it: torchvision's decoders and resize
    kernels, with PIL's pixels at a fraction of its time).

    Batched (:mod:`pedlightning.data.transforms.batched`): ``prepare`` draws the flip, crop and erasing parameters
    (from Python's ``random``, which PyTorch seeds per loader worker, as for the region crops), and ``finish``
    applies them to a whole batch (``pack``: the decoded images as they are, for ``finish_on_device``). Calling
    the transform on one image returns its normalised tensor, or with ``defer`` a
    :class:`~pedlightning.data.transforms.batched.Deferred` that ``collate_deferred`` finishes with the rest of the
    batch (what the training loaders of the datamodules do).

    Args:
        size: ``[height, width]`` of the output.
        flip_prob: probability of a horizontal flip.
        padding: zero padding on every side before the random crop back to ``size`` (0: no crop).
        erasing_prob: probability of random erasing.
        mean, std: normalisation.
        defer: return deferred values (for loaders collating with ``collate_deferred``).
        erasing_scale, erasing_ratio: area fraction and aspect (h / w) range of an erased region (the defaults of
            Zhong et al. and of torchvision's ``RandomErasing``).
        finish_on_device: deferred values are collated into batches of the decoded uint8 images that
            :func:`~pedlightning.data.transforms.batched.finish_batch` resizes and finishes after the transfer to
            the GPU, with the same pixels (the erasing noise then comes from the device's generator).
    """

    reads_tensors = True
    """Datasets hand it decoded CHW uint8 tensors (:func:`~pedlightning.data.transforms.batched.decode_rgb`)."""

    def __init__(self, size: Sequence[int] = (256, 128), flip_prob: float = 0.5, padding: int = 10,
                 erasing_prob: float = 0.5, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, defer: bool = False,
                 erasing_scale: Sequence[float] = (0.02, 0.33), erasing_ratio: Sequence[float] = (0.3, 3.3),
                 finish_on_device: bool = False):
        self.size = (int(size[0]), int(size[1]))
        self.defer, self.finish_on_device = defer, finish_on_device
        self.erasing_scale, self.erasing_ratio = tuple(erasing_scale), tuple(erasing_ratio)
        self.flip_prob, self.padding, self.erasing_prob = float(flip_prob), int(padding), float(erasing_prob)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def prepare(self, image: Image.Image | torch.Tensor) -> PlacedImage:
        """Draw this image's augmentation; ``finish`` (or, ``finish_on_device``, the device) resizes, flips, shifts
        and erases."""
        height, width = self.size
        flip = self.flip_prob > 0 and random.random() < self.flip_prob
        shift = (0, 0)
        if self.padding > 0:
            shift = (random.randint(-self.padding, self.padding), random.randint(-self.padding, self.padding))
        erase = None
        if self.erasing_prob > 0 and random.random() < self.erasing_prob:
            erase = random_erase_box(height, width, self.erasing_scale, self.erasing_ratio)
        pixels = image if isinstance(image, torch.Tensor) else pil_to_tensor(image)
        return PlacedImage(pixels, shift, erase, size=self.size, flip=flip)

    def finish(self, values: list[PlacedImage]) -> torch.Tensor:
        return finish_images(values, self.mean, self.std)

    def pack(self, values: list[PlacedImage]) -> tuple[torch.Tensor, dict]:
        return pack_images(values, self.mean, self.std)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor | Deferred:
        prepared = self.prepare(image)
        return Deferred(self, prepared) if self.defer else self.finish([prepared])[0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={list(self.size)}, flip_prob={self.flip_prob}, padding={self.padding}, "
                f"erasing_prob={self.erasing_prob})")


def build_train_transform(size: Sequence[int] = (256, 128), flip_prob: float = 0.5, padding: int = 10,
                          erasing_prob: float = 0.5, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD, defer: bool = False,
                          finish_on_device: bool = False) -> ReIDTrainTransform:
    """Training pipeline of Luo et al. "Bag of Tricks" as used by TransReID (:class:`ReIDTrainTransform`)."""
    return ReIDTrainTransform(size, flip_prob, padding, erasing_prob, mean, std, defer,
                              finish_on_device=finish_on_device)


def build_test_transform(size: Sequence[int] = (256, 128), mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Deterministic evaluation pipeline: resize and normalise."""
    return T.Compose([T.Resize(tuple(size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(mean, std)])


def denormalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Undo :func:`T.Normalize` for visualisation; returns values clamped to [0, 1]."""
    m = torch.tensor(mean, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, device=images.device).view(-1, 1, 1)
    return (images * s + m).clamp(0, 1)
