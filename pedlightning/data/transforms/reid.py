"""The TransReID / strong-baseline reID augmentation: resize, flip, pad + crop, normalise, random erasing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_train_transform(size: Sequence[int] = (256, 128), flip_prob: float = 0.5, padding: int = 10,
                          erasing_prob: float = 0.5, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Training pipeline of Luo et al. "Bag of Tricks" as used by TransReID.

    Random erasing fills with per-pixel normal noise (TransReID's ``mode='pixel'``) after normalisation.
    """
    size = tuple(size)
    steps: list = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
    if flip_prob > 0:
        steps.append(T.RandomHorizontalFlip(flip_prob))
    if padding > 0:
        steps += [T.Pad(padding), T.RandomCrop(size)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if erasing_prob > 0:
        steps.append(T.RandomErasing(p=erasing_prob, value="random"))
    return T.Compose(steps)


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
