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

With ``finish_on_device`` (a datamodule argument), a loader worker only decodes: the collate function packs the
decoded uint8 images at their own sizes (:func:`pack_images`) with what was drawn for them, and the datamodule's
``on_after_batch_transfer`` crops, resizes, flips, shifts, converts, normalises and erases the batch on the GPU
(:func:`finish_batch`), with the same pixels (:func:`resize_batch`). The resize is most of a worker's time for person
crops (enlarged 2x per side for a 256x128 input) and the float work most of the rest (see
``benchmarks/data_throughput.py``); and a decoded Market-1501 image is a sixteenth of the bytes of its float input.
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

__all__ = ["DEVICE_INTERPOLATIONS", "FINISH_KEY", "NUMBER_ROWS", "Deferred", "NumberRows", "PlacedImage",
           "collate_deferred", "decode_rgb", "erase_masked", "finish_batch", "finish_images", "pack_images",
           "pil_to_tensor", "random_erase_box", "resize", "resize_batch", "resize_weights"]


class Finisher(Protocol):
    finish_on_device: bool
    """Collate with :meth:`pack` (finished later by :func:`finish_batch`) instead of :meth:`finish`."""

    def finish(self, values: list[Any]) -> torch.Tensor:
        """The batch tensor of ``values`` (one :attr:`Deferred.value` per sample)."""

    def pack(self, values: list[Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The batch of ``values`` as :func:`pack_images` leaves it for :func:`finish_batch`."""


@dataclass(slots=True)
class Deferred:
    """A per-sample value that ``finisher.finish`` turns into a batch tensor, with the values of the batch."""

    finisher: Finisher
    value: Any


class NumberRows:
    """The finisher of per-sample tuples of numbers: one float32 ``(N, k)`` tensor per batch (a tensor per sample
    and their stacking cost more than the rest of a sample's collation)."""

    finish_on_device = False

    def finish(self, values: list[Sequence[float]]) -> torch.Tensor:
        rows = _empty((len(values), len(values[0])), torch.float32)
        return rows.copy_(torch.tensor(values, dtype=torch.float32))

    def pack(self, values: list[Sequence[float]]) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError("number rows are finished where they are collated")


NUMBER_ROWS = NumberRows()


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
           interpolation: F2.InterpolationMode = F2.InterpolationMode.BICUBIC, flip: bool = False) -> torch.Tensor:
    """Antialiased (bicubic) resize of a uint8 CHW tensor (optionally of its ``(top, left, h, w)`` crop) to ``size``,
    mirrored horizontally with ``flip``; the result is contiguous CHW.

    torchvision's uint8 kernels give PIL's bicubic pixels (equal when enlarging, within a few levels when
    shrinking) at about a third of PIL's time. Bicubic calls the kernel through ``interpolate``, as
    ``F2.resize`` does (the same pixels), without its per-call Python work. The kernel reads channels-last input
    (the layout ``decode_image`` returns; a crop stays a view) and writes the CHW result itself, cheaper than
    torch's uint8 -> float copy from channels-last into a CHW float batch. The flip is done on the smaller of the
    crop and the output: the kernel's weights are mirror-symmetric, so resizing the mirrored crop gives exactly
    the mirrored resize.
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
        out = torch.nn.functional.interpolate(image.unsqueeze(0), size=[int(size[0]), int(size[1])], mode="bicubic",
                                              align_corners=False, antialias=True)[0]
    else:
        out = F2.resize(image, list(size), interpolation=interpolation, antialias=True)
    out = out.contiguous()
    return out.flip(-1) if flip else out


DEVICE_INTERPOLATIONS = {F2.InterpolationMode.BICUBIC: "bicubic", F2.InterpolationMode.BILINEAR: "bilinear"}
"""The filters :func:`resize_batch` applies; images to be resized with another are resized in the loader worker."""


@dataclass(slots=True)
class PlacedImage:
    """An RGB image (CHW uint8), how it is resized, and how it lands in its batch slot.

    ``box`` ``(top, left, height, width)``: the crop of ``pixels`` that is resized to ``size`` (``None``: all of
    ``pixels``; ``size`` ``None``: ``pixels`` already are the output), with ``interpolation``, then mirrored with
    ``flip`` (see :func:`resize`). ``shift`` ``(dy, dx)``: output pixel ``(y, x)`` shows resized pixel
    ``(y + dy, x + dx)`` (zeros outside), the effect of zero padding followed by a crop. ``erase``:
    ``(top, left, height, width)`` of a region that random erasing fills with N(0, 1) noise after normalisation,
    or ``None``. The resize waits for :func:`finish_images` (in the loader worker) or :func:`finish_batch` (on the
    device, ``finish_on_device``). Not frozen: a frozen dataclass takes three times as long to make, per image.
    """

    pixels: torch.Tensor
    shift: tuple[int, int] = (0, 0)
    erase: tuple[int, int, int, int] | None = None
    box: tuple[int, int, int, int] | None = None
    size: tuple[int, int] | None = None
    flip: bool = False
    interpolation: F2.InterpolationMode = F2.InterpolationMode.BICUBIC

    @property
    def height(self) -> int:
        return int(self.size[0] if self.size is not None else self.pixels.shape[-2])

    @property
    def width(self) -> int:
        return int(self.size[1] if self.size is not None else self.pixels.shape[-1])

    @property
    def source_box(self) -> tuple[int, int, int, int]:
        return self.box or (0, 0, int(self.pixels.shape[-2]), int(self.pixels.shape[-1]))

    def resized(self) -> PlacedImage:
        """This image with ``pixels`` resized (and flipped) to the output size."""
        if self.size is None:
            return self
        pixels = resize(self.pixels, self.size, self.box, self.interpolation, self.flip)
        return PlacedImage(pixels, self.shift, self.erase)


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
    """The normalised float batch ``(N, 3, H, W)`` of ``images`` (all of one output size), resized, shifted and
    erased.

    Each slot is resized, converted and normalised on its own, while it is in the CPU cache.
    """
    batch = _empty((len(images), 3, images[0].height, images[0].width), torch.float32)
    scale, offset = _affine(mean, std)
    for slot, image in zip(batch, images):
        image = image.resized()
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
    images as decoded, in a uint8 canvas ``(N, 3, H_max, W_max)`` stored channels-last (the layout ``decode_image``
    returns, so each row is one contiguous copy), each in its top-left corner, and ``mean``, ``std``, the output
    ``size``, the ``interpolation``, the crop boxes ``(N, 4)``, the flips ``(N,)`` (0 / 1), the shifts ``(N, 2)`` and
    the erasing boxes ``(N, 4)`` ``(top, left, h, w)`` (``h = w = 0``: none).

    The canvas outside each image is left unwritten: :func:`resize_weights` gives it weight zero. Images whose
    interpolation :func:`resize_batch` lacks (not in :data:`DEVICE_INTERPOLATIONS`) are resized here.
    """
    images = [image if image.interpolation in DEVICE_INTERPOLATIONS else image.resized() for image in images]
    size, mode = (images[0].height, images[0].width), images[0].interpolation
    for image in images:
        if (image.height, image.width) != size or image.interpolation != mode:
            raise ValueError(f"images of one batch must share an output size and interpolation: "
                             f"{(image.height, image.width)} {image.interpolation.value} vs {size} {mode.value}")
    shapes = {tuple(image.pixels.shape) for image in images}
    height, width = max(shape[-2] for shape in shapes), max(shape[-1] for shape in shapes)
    # One allocation for the canvas and the per-image numbers: a worker hands each storage over on its own (shared
    # memory, a file descriptor, a round trip), which costs more than the copies below.
    pixels_bytes = -(-len(images) * height * width * 3 // 8) * 8
    buffer = _empty((pixels_bytes + len(images) * 11 * 8,), torch.uint8)
    batch = buffer[:len(images) * height * width * 3].view(len(images), height, width, 3)
    if len(shapes) == 1:  # one size (Market-1501's 128x64): one copy of all, channels innermost
        torch.stack([image.pixels.permute(1, 2, 0) for image in images], out=batch)
    else:
        for slot, image in zip(batch, images):
            slot[:image.pixels.shape[-2], :image.pixels.shape[-1]].copy_(image.pixels.permute(1, 2, 0))
    numbers = buffer[pixels_bytes:].view(torch.int64).view(len(images), 11)
    numbers.copy_(torch.tensor([(*image.source_box, image.flip and image.size is not None, *image.shift,
                                 *(image.erase or (0, 0, 0, 0))) for image in images], dtype=torch.int64))
    params = {"mean": tuple(mean), "std": tuple(std), "size": size, "interpolation": DEVICE_INTERPOLATIONS[mode],
              "box": numbers[:, 0:4], "flip": numbers[:, 4], "shift": numbers[:, 5:7], "erase": numbers[:, 7:11]}
    return batch.permute(0, 3, 1, 2), params


def finish_batch(batch: Any) -> Any:
    """Finish the :func:`pack_images` keys of a collated batch where it is (on the GPU: after the transfer), in
    place; any other batch is returned as it is.

    The result equals :func:`finish_images`' exactly (the same resized pixels, see :func:`resize_batch`; float32,
    shifted with zero padding, normalised by the same multiply-add), except that the erasing noise comes from the
    generator of the batch's device, in the process that calls this (the datamodules' ``on_after_batch_transfer``:
    Lightning's main process, seeded by ``seed_everything``), not from the loader worker's. On a GPU everything
    is batched (no host round trip); on the CPU erasing draws noise for the regions alone.
    """
    packed = batch.pop(FINISH_KEY, None) if isinstance(batch, dict) else None
    for key, params in (packed or {}).items():
        device = batch[key].device
        pixels = resize_batch(batch[key], params["box"].to(device), params["flip"].to(device),
                              params["shift"].to(device), params["size"], params["interpolation"])
        channels = pixels.shape[1]
        scale, offset = _affine(params["mean"], params["std"], (1, channels, 1, 1), device)
        images = pixels.to(torch.float32).mul_(scale).add_(offset)
        boxes = params["erase"].to(device)
        if device.type == "cpu":
            for slot, (top, left, h, w) in zip(images, boxes.tolist()):
                if h and w:
                    slot[:, top:top + h, left:left + w] = torch.randn(channels, h, w)
        else:
            images = erase_masked(images, boxes)
        batch[key] = images
    return batch


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """The antialiasing kernels of PIL and torch: bilinear = triangle, bicubic = Keys' cubic with a = -0.5."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros((), dtype=x.dtype, device=x.device)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, out: int, canvas: int, flip: torch.Tensor,
                   shift: torch.Tensor, interpolation: str = "bicubic") -> tuple[torch.Tensor, torch.Tensor]:
    """The integer weights ``(N, out, canvas)`` and their precisions ``(N,)`` with which torch's uint8 antialiased
    resize maps the span ``[start, start + length)`` of an axis of ``canvas`` pixels onto ``out`` pixels, per image,
    then mirrors the output (``flip``) and shifts it (output ``i`` reads resized ``i + shift``; zero rows outside).

    torch computes the weights as PIL does (``_compute_indices_int16_weights_aa``): output ``i`` is centred at
    ``c = scale * (i + 0.5)`` with ``scale = length / out``; the kernel has support ``s = k * max(scale, 1)``
    (``k`` = 2 for bicubic, 1 for bilinear) and reads input ``j`` from ``floor(c - s + 0.5)`` (at least 0) up to
    ``floor(c + s + 0.5)`` (at most ``length``) with weight ``filter((j - c + 0.5) / max(scale, 1))``, normalised to
    sum 1, in double. Then they become int16: the precision ``p`` is the largest below 22 for which
    ``round(max weight * 2^(p + 1))`` stays below 2^15, and each weight is rounded half away from zero at
    ``2^p``. Weights outside the span, and of shifted-out rows, are zero.
    """
    n, dt = start.shape[0], torch.float64
    scale = length.to(dt) / out
    support = (2.0 if interpolation == "bicubic" else 1.0) * scale.clamp(min=1)
    position = torch.arange(out, device=start.device).view(1, out) + shift.view(n, 1)
    index = torch.where(flip.view(n, 1).bool(), out - 1 - position, position).to(dt)
    centre = scale.view(n, 1) * (index + 0.5)
    first = (centre - support.view(n, 1) + 0.5).floor().clamp(min=0)
    stop = torch.minimum((centre + support.view(n, 1) + 0.5).floor(), length.to(dt).view(n, 1))
    j = torch.arange(canvas, device=start.device, dtype=dt).view(1, 1, canvas) - start.to(dt).view(n, 1, 1)
    weights = _filter((j - centre.unsqueeze(-1) + 0.5) / scale.clamp(min=1).view(n, 1, 1), interpolation)
    used = (j >= first.unsqueeze(-1)) & (j < stop.unsqueeze(-1)) & ((position >= 0) & (position < out)).unsqueeze(-1)
    weights = torch.where(used, weights, torch.zeros((), dtype=dt, device=start.device))
    total = weights.sum(-1, keepdim=True)
    weights = torch.where(total != 0, weights / total, weights)
    largest = weights.amax(dim=(1, 2))
    precision = torch.full_like(largest, 22)
    for p in range(21, -1, -1):  # the first p whose successor overflows int16
        precision = torch.where((0.5 + largest * 2.0 ** (p + 1)).floor() >= 2 ** 15, p, precision)
    scaled = weights * (2.0 ** precision).view(n, 1, 1)
    return torch.where(scaled < 0, (scaled - 0.5).ceil(), (scaled + 0.5).floor()), precision


def resize_batch(canvas: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, shifts: torch.Tensor,
                 size: Sequence[int], interpolation: str = "bicubic") -> torch.Tensor:
    """Crop, resize, mirror and shift each image of a uint8 canvas ``(N, C, H, W)`` at once: image ``i``'s box
    ``boxes[i]`` ``(top, left, h, w)`` resized to ``size`` with antialiasing, mirrored if ``flips[i]``, shifted by
    ``shifts[i]`` (:class:`PlacedImage`'s pad + crop). Returns float64 ``(N, C, *size)`` holding integer pixels.

    Exactly :func:`resize`'s pixels followed by the shift, on any device: torch's uint8 kernels compute each pass
    (horizontal, then vertical) as ``clamp((sum_j w_j * x_j + 2^(p-1)) >> p, 0, 255)`` with the int16 weights
    ``w`` of :func:`resize_weights`; here each pass is one batched matrix product of those integer weights with the
    integer pixels, in float64. Every product and partial sum is an integer below 2^53 (|w| < 2^15, x < 2^8,
    a few hundred taps), so float64 holds them exactly and the sum does not depend on the order in which the GEMM
    adds; ``floor((sum + 2^(p-1)) / 2^p)`` is then the arithmetic shift. Identity spans (same size, no shift) give
    weight ``2^p`` on one pixel, which returns it unchanged, as torch's copy does.
    """
    n, _, height, width = canvas.shape
    no_flip = torch.zeros_like(flips)
    wy, py = resize_weights(boxes[:, 0], boxes[:, 2], int(size[0]), height, no_flip, shifts[:, 0], interpolation)
    wx, px = resize_weights(boxes[:, 1], boxes[:, 3], int(size[1]), width, flips, shifts[:, 1], interpolation)

    def rounded(sums: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
        one = (2.0 ** precision).view(n, 1, 1, 1)
        return ((sums + one / 2) / one).floor().clamp_(0, 255)

    pixels = rounded(canvas.to(torch.float64) @ wx.transpose(1, 2).unsqueeze(1), px)  # (N, C, H, out W)
    return rounded(wy.unsqueeze(1) @ pixels, py)


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
    packed for :func:`finish_batch` when the finisher has ``finish_on_device`` set, and that the keys holding
    Python ints (identity, camera, index) become rows of one int64 tensor: one storage for a loader worker to hand
    over instead of one per key (the values and dtype are ``default_collate``'s)."""
    deferred = [k for k, v in items[0].items() if isinstance(v, Deferred)]
    integers = [k for k, v in items[0].items() if type(v) is int and all(type(item[k]) is int for item in items)]
    rest = set(deferred) | set(integers)
    batch = default_collate([{k: v for k, v in item.items() if k not in rest} for item in items])
    if integers:
        rows = _empty((len(integers), len(items)), torch.int64)
        rows.copy_(torch.tensor([[item[k] for item in items] for k in integers], dtype=torch.int64))
        batch.update(zip(integers, rows))
    for key in deferred:
        finisher = items[0][key].finisher
        values = [item[key].value for item in items]
        if getattr(finisher, "finish_on_device", False):
            batch[key], batch.setdefault(FINISH_KEY, {})[key] = finisher.pack(values)
        else:
            batch[key] = finisher.finish(values)
    return {k: batch[k] for k in (*items[0], FINISH_KEY) if k in batch}  # the items' key order, as default_collate
