"""Training transforms split in two: per image the cheap part, per batch the tensor work; and the decoding they use.

Per image, a loader worker only decodes and resizes (torchvision's decoders and uint8 resize kernels: PIL's pixels
in about a third of PIL's time for person crops) and draws the random parameters. The float work (uint8 -> float,
normalisation, the pad + crop shift, random erasing) happens in the loader's collate function, written straight
into the batch tensor, one slot at a time while it is in the CPU cache. That removes per image the PIL -> float
conversions, the separate normalisation pass, the per-image float tensors and the float copy of collation; the
batch is the same (within one intensity level of the PIL pipeline, from rounding in the resize).

A batched transform returns :class:`Deferred` values for its image keys; :func:`collate_deferred` (the collate
function of loaders over such transforms) finishes them with the transform and collates every other key with
``default_collate``. Called on one image outside a loader, the transforms return finished tensors.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F2

__all__ = ["Deferred", "PlacedImage", "collate_deferred", "decode_rgb", "finish_images", "pil_to_tensor",
           "random_erase_box", "resize"]


class Finisher(Protocol):
    def finish(self, values: list[Any]) -> torch.Tensor:
        """The batch tensor of ``values`` (one :attr:`Deferred.value` per sample)."""


@dataclass(frozen=True)
class Deferred:
    """A per-sample value that ``finisher.finish`` turns into a batch tensor, with the values of the batch."""

    finisher: Finisher
    value: Any


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a CHW uint8 tensor (PIL splits the bands faster than torch transposes pixels)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    planes = bytearray(b"".join(band.tobytes() for band in image.split()))
    return torch.frombuffer(planes, dtype=torch.uint8).view(3, image.height, image.width)


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> CHW uint8 RGB tensor: torchvision's decoders (libjpeg-turbo and libpng, the pixels
    PIL gives), PIL for the formats they lack (BMP). A corrupt or truncated file raises PIL's error."""
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        with Image.open(io.BytesIO(data)) as img:
            return pil_to_tensor(img.convert("RGB"))


def resize(image: torch.Tensor, size: Sequence[int], box: tuple[int, int, int, int] | None = None,
           interpolation: F2.InterpolationMode = F2.InterpolationMode.BICUBIC) -> torch.Tensor:
    """Antialiased (bicubic) resize of a uint8 CHW tensor (optionally of its ``(top, left, h, w)`` crop) to ``size``.

    torchvision's uint8 kernels give PIL's bicubic pixels (equal when enlarging, within a few levels when
    shrinking) at about a third of PIL's time.
    """
    if box is not None:
        top, left, h, w = box
        image = image[:, top:top + h, left:left + w].contiguous()
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F2.resize(image, list(size), interpolation=interpolation, antialias=True)


@dataclass(frozen=True)
class PlacedImage:
    """A resized RGB image (CHW uint8) and how it lands in its batch slot.

    ``shift`` ``(dy, dx)``: output pixel ``(y, x)`` shows input pixel ``(y + dy, x + dx)`` (zeros outside), the
    effect of zero padding followed by a crop. ``erase``: ``(top, left, height, width)`` of a region that random
    erasing fills with N(0, 1) noise after normalisation, or ``None``.
    """

    pixels: torch.Tensor
    shift: tuple[int, int] = (0, 0)
    erase: tuple[int, int, int, int] | None = None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[-2])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[-1])


def random_erase_box(height: int, width: int, scale: Sequence[float] = (0.02, 0.33),
                     ratio: Sequence[float] = (0.3, 3.3), rng: random.Random | None = None,
                     attempts: int = 10) -> tuple[int, int, int, int] | None:
    """A random erasing region ``(top, left, h, w)`` (Zhong et al., AAAI 2020): area uniform in ``scale`` times the
    image area, aspect ``h / w`` log-uniform in ``ratio``; ``None`` when ``attempts`` draws do not fit."""
    rng = rng or random
    area, (low, high) = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(low, high))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if h < height and w < width:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return None


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a loader worker in shared memory, as ``default_collate`` allocates, so handing
    the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def _window(shift: int, length: int) -> tuple[slice, slice]:
    """(output rows, input rows) of a shift by ``shift`` pixels along an axis of ``length``."""
    if abs(shift) >= length:
        return slice(0, 0), slice(0, 0)
    if shift >= 0:
        return slice(0, length - shift), slice(shift, length)
    return slice(-shift, length), slice(0, length + shift)


def finish_images(images: Sequence[PlacedImage], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The normalised float batch ``(N, 3, H, W)`` of ``images`` (all of one size), shifted and erased.

    Each slot is converted and normalised on its own, while it is in the CPU cache.
    """
    height, width = images[0].height, images[0].width
    batch = _empty((len(images), 3, height, width), torch.float32)
    offset = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255
    scale = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255
    for slot, image in zip(batch, images):
        if (image.height, image.width) != (height, width):
            raise ValueError(f"images of one batch must share a size: {(image.height, image.width)} vs "
                             f"{(height, width)}")
        pixels = image.pixels
        if image.shift == (0, 0):
            slot.copy_(pixels)
        else:
            (out_y, in_y), (out_x, in_x) = _window(image.shift[0], height), _window(image.shift[1], width)
            slot[:, out_y, out_x] = pixels[:, in_y, in_x]
            for border in (slot[:, :out_y.start], slot[:, out_y.stop:], slot[:, out_y, :out_x.start],
                           slot[:, out_y, out_x.stop:]):
                border.zero_()  # the padding: only the strips the shifted image leaves uncovered
        slot.sub_(offset).div_(scale)
        if image.erase is not None:
            top, left, h, w = image.erase
            slot[:, top:top + h, left:left + w] = torch.randn(3, h, w)  # normal_() on the strided view is ~10x slower
    return batch


def collate_deferred(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except that :class:`Deferred` values are finished for the batch by their finisher."""
    deferred = [k for k, v in items[0].items() if isinstance(v, Deferred)]
    batch = default_collate([{k: v for k, v in item.items() if k not in deferred} for item in items])
    for key in deferred:
        batch[key] = items[0][key].finisher.finish([item[key].value for item in items])
    return batch
