"""Training transforms split in two: per image the cheap part, per batch the tensor work; and the decoding they use.

Per image, a loader worker only decodes, resizes and flips (torchvision's decoders and uint8 resize kernels: PIL's
pixels in about a third of PIL's time for person crops) and draws the random parameters. The float work (uint8 ->
float, normalisation, the pad + crop shift, random erasing) happens in the loader's collate function, written
straight into the batch tensor, one slot at a time while it is in the CPU cache. That removes per image the PIL ->
float conversions, the separate normalisation pass, the per-image float tensors and the float copy of collation;
the batch is the same (within one intensity level of the PIL pipeline, from rounding in the resize).

A batched transform returns :class:`Deferred` values for its image keys; :func:`collate_deferred` (the collate
function of loaders over such transforms) finishes them with the transform and collates every other key with
``default_collate``. Called on one image outside a loader, the transforms return finished tensors.

With ``finish_on_device`` (a datamodule argument), the collate function stops at the resized uint8 batch
(:func:`pack_images`) and the datamodule's ``on_after_batch_transfer`` shifts, converts, normalises and erases it on
the GPU (:func:`finish_batch`). The float work is about half of a float loader's time (see
``benchmarks/data_throughput.py``): the shifted copy, the normalisation, the erasing noise, and four bytes per value
written into fresh shared memory, which the kernel faults in page by page, then pinned and transferred; uint8 is a
quarter of those bytes.
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

__all__ = ["FINISH_KEY", "Deferred", "PlacedImage", "collate_deferred", "decode_rgb", "erase_masked", "finish_batch",
           "finish_images", "pack_images", "pil_to_tensor", "random_erase_box", "resize", "shift_batch"]


class Finisher(Protocol):
    finish_on_device: bool
    """Collate with :meth:`pack` (finished later by :func:`finish_batch`) instead of :meth:`finish`."""

    def finish(self, values: list[Any]) -> torch.Tensor:
        """The batch tensor of ``values`` (one :attr:`Deferred.value` per sample)."""

    def pack(self, values: list[Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The batch of ``values`` as :func:`pack_images` leaves it for :func:`finish_batch`."""


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
           interpolation: F2.InterpolationMode = F2.InterpolationMode.BICUBIC, flip: bool = False,
           chw: bool = True) -> torch.Tensor:
    """Antialiased (bicubic) resize of a uint8 CHW tensor (optionally of its ``(top, left, h, w)`` crop) to ``size``,
    mirrored horizontally with ``flip``.

    torchvision's uint8 kernels give PIL's bicubic pixels (equal when enlarging, within a few levels when
    shrinking) at about a third of PIL's time. Bicubic calls the kernel through ``interpolate``, as
    ``F2.resize`` does (the same pixels), without its per-call Python work. The kernel works channels-last, the
    layout ``decode_image`` returns. With ``chw`` the result is contiguous CHW, which the kernel writes itself,
    cheaper than torch's uint8 -> float copy from channels-last into a CHW float batch; ``chw=False`` keeps
    channels-last (for uint8 batches stored so). A crop stays a view (the kernel reads strided input). The flip is
    done on the smaller of the crop and the output: the kernel's weights are mirror-symmetric, so resizing the
    mirrored crop gives exactly the mirrored resize.
    """
    if box is not None:
        top, left, h, w = box
        image = image[:, top:top + h, left:left + w]
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if flip and height * width <= size[0] * size[1]:
        image, flip = image.flip(-1), False
    if (height, width) == tuple(size):
        out = image
    elif interpolation == F2.InterpolationMode.BICUBIC and image.dtype == torch.uint8:
        batch = image.unsqueeze(0)
        if not chw and image.stride(0) == 1:  # channels innermost: a decoded image or a crop of one
            batch = batch.contiguous(memory_format=torch.channels_last)  # a crop: copied (cheap; the kernel would)
            # A batch of one is ambiguous to the kernel, which then writes CHW (pytorch#68430); these strides are not.
            batch = batch.as_strided(batch.shape, (image.numel(), 1, width * image.shape[0], image.shape[0]))
        out = torch.nn.functional.interpolate(batch, size=[int(size[0]), int(size[1])], mode="bicubic",
                                              align_corners=False, antialias=True)[0]
    else:
        out = F2.resize(image, list(size), interpolation=interpolation, antialias=True)
    out = out.contiguous() if chw else out
    return out.flip(-1) if flip else out


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
    """(output rows, input rows) of a shift by ``shift`` pixels (``|shift| < length``) along an axis of ``length``."""
    if shift >= 0:
        return slice(0, length - shift), slice(shift, length)
    return slice(-shift, length), slice(0, length + shift)


def _place(slot: torch.Tensor, image: PlacedImage) -> None:
    """Write ``image`` into its batch slot (any dtype), shifted, with zeros (black) where the shift uncovers it.

    Both contiguous (the float path), the shift by ``(dy, dx)`` is one contiguous copy of the flattened planes,
    offset by ``dy * width + dx``: it puts every pixel in place except those that wrap into the next row, which
    land in the ``|dx|`` columns that the padding covers anyway. Torch copies a strided window several times
    slower.
    """
    height, width = int(slot.shape[-2]), int(slot.shape[-1])
    if (image.height, image.width) != (height, width):
        raise ValueError(f"images of one batch must share a size: {(image.height, image.width)} vs "
                         f"{(height, width)}")
    (dy, dx), pixels = image.shift, image.pixels
    if (dy, dx) == (0, 0):
        slot.copy_(pixels)
        return
    if abs(dy) >= height or abs(dx) >= width:
        slot.zero_()  # shifted out of the frame: all padding
        return
    (out_y, in_y), (out_x, in_x) = _window(dy, height), _window(dx, width)
    if slot.is_contiguous() and pixels.is_contiguous():
        offset, area = dy * width + dx, height * width
        flat_out, flat_in = slot.view(-1, area), pixels.view(-1, area)
        if offset >= 0:
            flat_out[:, :area - offset].copy_(flat_in[:, offset:])
        else:
            flat_out[:, -offset:].copy_(flat_in[:, :area + offset])
        rows = slice(None)
    else:
        slot[:, out_y, out_x] = pixels[:, in_y, in_x]
        rows = out_y
    # The padding: only the (at most two) strips the shifted image leaves uncovered.
    if dy:
        (slot[:, out_y.stop:] if dy > 0 else slot[:, :out_y.start]).zero_()
    if dx:
        (slot[:, rows, out_x.stop:] if dx > 0 else slot[:, rows, :out_x.start]).zero_()


def _affine(mean: Sequence[float], std: Sequence[float], shape: tuple[int, ...] = (3, 1, 1),
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` with ``pixel * scale + offset = (pixel / 255 - mean) / std``: a multiply and an add,
    not a subtract and a divide (a division costs several multiplications; the results differ by float rounding)."""
    mean64, std64 = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    scale, offset = 1 / (255 * std64), -mean64 / std64
    return tuple(t.to(device=device, dtype=torch.float32).view(shape) for t in (scale, offset))


def finish_images(images: Sequence[PlacedImage], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The normalised float batch ``(N, 3, H, W)`` of ``images`` (all of one size), shifted and erased.

    Each slot is converted and normalised on its own, while it is in the CPU cache.
    """
    batch = _empty((len(images), 3, images[0].height, images[0].width), torch.float32)
    scale, offset = _affine(mean, std)
    for slot, image in zip(batch, images):
        _place(slot, image)
        slot.mul_(scale).add_(offset)
        if image.erase is not None:
            top, left, h, w = image.erase
            slot[:, top:top + h, left:left + w] = torch.randn(3, h, w)  # normal_() on the strided view is ~10x slower
    return batch


FINISH_KEY = "finish_on_device"
"""The batch key under which :func:`pack_images` batches carry what :func:`finish_batch` needs."""


def pack_images(images: Sequence[PlacedImage], mean: Sequence[float],
                std: Sequence[float]) -> tuple[torch.Tensor, dict[str, Any]]:
    """What :func:`finish_images` starts from, left for :func:`finish_batch` to finish after the transfer: the
    resized (and flipped) uint8 batch ``(N, 3, H, W)``, stored channels-last (the layout the resize kernels leave,
    see :func:`resize`), and ``mean``, ``std``, the shifts ``(N, 2)`` and the erasing boxes ``(N, 4)``
    ``(top, left, h, w)`` (``h = w = 0``: none).

    A loader worker then copies each image once, whole (a strided copy of the shifted window costs several
    times more), and hands over a quarter of the bytes of a float batch (shared memory that is faulted in page by
    page, the pinned copy, the host-to-device transfer).
    """
    height, width = images[0].height, images[0].width
    batch = _empty((len(images), height, width, 3), torch.uint8).permute(0, 3, 1, 2)  # channels-last, as resized
    for slot, image in zip(batch, images):
        if (image.height, image.width) != (height, width):
            raise ValueError(f"images of one batch must share a size: {(image.height, image.width)} vs "
                             f"{(height, width)}")
        slot.copy_(image.pixels)
    shifts = torch.tensor([image.shift for image in images], dtype=torch.int64).view(-1, 2)
    boxes = torch.tensor([image.erase or (0, 0, 0, 0) for image in images], dtype=torch.int64).view(-1, 4)
    return batch, {"mean": tuple(mean), "std": tuple(std), "shift": shifts, "erase": boxes}


def finish_batch(batch: Any) -> Any:
    """Finish the :func:`pack_images` keys of a collated batch where it is (on the GPU: after the transfer), in
    place; any other batch is returned as it is.

    The result equals :func:`finish_images`' (float32, shifted with zero padding, normalised, the erased regions
    N(0, 1) noise), except that the noise comes from the generator of the batch's device, in the process that calls
    this (the datamodules' ``on_after_batch_transfer``: Lightning's main process, seeded by ``seed_everything``),
    not from the loader worker's. Shifts and, on a GPU, erasing are batched (a gather, a masked select: no host
    round trip); on the CPU erasing draws noise for the regions alone.
    """
    packed = batch.pop(FINISH_KEY, None) if isinstance(batch, dict) else None
    for key, params in (packed or {}).items():
        pixels = shift_batch(batch[key], params["shift"].to(batch[key].device))
        channels = pixels.shape[1]
        scale, offset = _affine(params["mean"], params["std"], (1, channels, 1, 1), pixels.device)
        images = pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).add_(offset)
        boxes = params["erase"].to(pixels.device)
        if pixels.device.type == "cpu":
            for slot, (top, left, h, w) in zip(images, boxes.tolist()):
                if h and w:
                    slot[:, top:top + h, left:left + w] = torch.randn(channels, h, w)
        else:
            images = erase_masked(images, boxes)
        batch[key] = images
    return batch


def shift_batch(pixels: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``pixels`` ``(N, C, H, W)`` with image ``i`` shifted by ``shifts[i] = (dy, dx)`` (output ``(y, x)`` shows
    input ``(y + dy, x + dx)``, zeros outside: :class:`PlacedImage`'s pad + crop), as one gather."""
    n, _, height, width = pixels.shape
    rows = torch.arange(height, device=pixels.device).view(1, height) + shifts[:, :1]
    cols = torch.arange(width, device=pixels.device).view(1, width) + shifts[:, 1:]
    inside = ((rows >= 0) & (rows < height)).view(n, height, 1) & ((cols >= 0) & (cols < width)).view(n, 1, width)
    index = torch.arange(n, device=pixels.device).view(n, 1, 1)
    moved = pixels[index, :, rows.clamp(0, height - 1).view(n, height, 1), cols.clamp(0, width - 1).view(n, 1, width)]
    return torch.where(inside.unsqueeze(-1), moved, torch.zeros((), dtype=pixels.dtype,
                                                                device=pixels.device)).permute(0, 3, 1, 2)


def erase_masked(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``images`` ``(N, C, H, W)`` with N(0, 1) noise inside each image's box ``(top, left, h, w)`` of ``boxes``
    ``(N, 4)`` (an empty box erases nothing): one noise draw over the batch and a select, no host round trip."""
    n, _, height, width = images.shape
    top, left, h, w = (boxes[:, i].view(n, 1, 1, 1) for i in range(4))
    rows = torch.arange(height, device=images.device).view(1, 1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, 1, width)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return torch.where(inside, torch.randn_like(images), images)


def collate_deferred(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except that :class:`Deferred` values are finished for the batch by their finisher, or
    packed for :func:`finish_batch` when the finisher has ``finish_on_device`` set."""
    deferred = [k for k, v in items[0].items() if isinstance(v, Deferred)]
    batch = default_collate([{k: v for k, v in item.items() if k not in deferred} for item in items])
    for key in deferred:
        finisher = items[0][key].finisher
        values = [item[key].value for item in items]
        if getattr(finisher, "finish_on_device", False):
            batch[key], batch.setdefault(FINISH_KEY, {})[key] = finisher.pack(values)
        else:
            batch[key] = finisher.finish(values)
    return batch
