"""RegionA / RegionB sampling for PersonMAE (arXiv 2311.04496, Sec. 3: "two regions from the given image").

RegionA (the encoder's input) and RegionB (the prediction target) are two random resized crops of one
image. The decoder is asked for RegionB's patches at RegionB's patch centres expressed in RegionA's patch
coordinates; :func:`region_b_positions` computes them from the two crop boxes the transform returns.

Coordinates: a box is ``(top, left, height, width)`` as fractions of the (possibly flipped) source image.
Patch coordinates of RegionA put the centre of patch ``(i, j)`` at ``(i, j)``, the convention of the 2D
sin-cos position embedding, so RegionB = RegionA maps every RegionB patch onto itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from pedlightning.data.transforms.batched import (
    NUMBER_ROWS,
    Deferred,
    PlacedImage,
    finish_images,
    pack_images,
    pil_to_tensor,
)
from pedlightning.data.transforms.reid import IMAGENET_MEAN, IMAGENET_STD
from pedlightning.data.transforms.samples import ImageTransform
from pedlightning.errors import ConfigError


def sample_crop(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                rng: random.Random, attempts: int = 10) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, h, w)`` in pixels (torchvision's procedure).

    The area is uniform in ``scale`` times the image area; the aspect (width / height) is log-uniform in
    ``ratio`` times *the image's* aspect. Assumption: relative aspects keep crops of tall person images tall,
    whereas torchvision's absolute 3/4..4/3 would squash a 1:2 pedestrian into a square. When ``attempts``
    draws do not fit, the whole image is returned.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = (width / height) * math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return 0, 0, height, width


def region_b_positions(box_a: torch.Tensor, box_b: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Centres of RegionB's patches in RegionA's patch coordinates: ``(..., gh * gw, 2)`` as (row, col).

    ``box_a`` and ``box_b`` are ``(..., 4)`` boxes ``(top, left, height, width)`` in source-image fractions;
    patches are in row-major order, the order of a ViT's tokens. Positions outside ``[0, gh-1] x [0, gw-1]``
    are RegionB parts that RegionA does not contain.
    """
    gh, gw = int(grid[0]), int(grid[1])
    dtype = box_b.dtype if box_b.is_floating_point() else torch.float32
    rows = (torch.arange(gh, dtype=dtype, device=box_b.device) + 0.5) / gh
    cols = (torch.arange(gw, dtype=dtype, device=box_b.device) + 0.5) / gw
    v, u = torch.meshgrid(rows, cols, indexing="ij")
    v, u = v.reshape(-1), u.reshape(-1)
    a = box_a.to(dtype).unsqueeze(-2)
    b = box_b.to(dtype).unsqueeze(-2)
    y = b[..., 0] + v * b[..., 2]  # source-image fractions
    x = b[..., 1] + u * b[..., 3]
    row = (y - a[..., 0]) / a[..., 2] * gh - 0.5
    col = (x - a[..., 1]) / a[..., 3] * gw - 0.5
    return torch.stack([row, col], dim=-1)


class RegionPairTransform(ImageTransform):
    """PIL image (or the image of a PersonSample) -> ``{"region_a", "region_b", "box_a", "box_b"}`` for PersonMAE.

    Args:
        img_size: ``[height, width]`` both regions are resized to (the encoder's input size).
        scale: range of a region's area as a fraction of the image (Assumption: 0.4-1.0; MAE uses 0.2-1.0
            for one crop, but two crops that small rarely overlap enough for RegionA to predict RegionB).
        ratio: range of a region's aspect relative to the image's aspect (see :func:`sample_crop`).
        same_region: RegionB = RegionA (ablation: plain MAE reconstruction of the input region).
        flip_prob: probability of a horizontal flip. Assumption: the flip is applied to the source image, so
            both regions share it; flipping one region alone would mirror the content *inside* each target
            patch, which no position can express.
        interpolation: resize filter (bicubic, as MAE).
        mean, std: normalisation of both regions.
        rng: random source; ``None`` = the ``random`` module, which PyTorch seeds in every loader worker.
        defer: return the regions as :class:`~pedlightning.data.transforms.batched.Deferred` values, resized and
            normalised per batch by ``collate_deferred`` (what the LUPerson datamodule's loaders do). Off: each
            call returns finished tensors.
        finish_on_device: deferred regions are collated into batches of the decoded uint8 image that
            :func:`~pedlightning.data.transforms.batched.finish_batch` crops, resizes and normalises after the
            transfer to the GPU, with the same pixels.

    Takes a PIL image or a CHW uint8 tensor (what the LUPerson readers decode for it, ``reads_tensors``).
    """

    reads_tensors = True

    def __init__(self, img_size: Sequence[int] = (256, 128), scale: Sequence[float] = (0.4, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), same_region: bool = False, flip_prob: float = 0.5,
                 interpolation: TF.InterpolationMode = TF.InterpolationMode.BICUBIC,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 rng: random.Random | None = None, defer: bool = False, finish_on_device: bool = False):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(f"region scale must satisfy 0 < min <= max <= 1, got {list(scale)}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"region ratio must satisfy 0 < min <= max, got {list(ratio)}")
        self.size = [int(img_size[0]), int(img_size[1])]
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.same_region = same_region
        self.flip_prob = flip_prob
        self.interpolation = interpolation
        self.mean, self.std = list(mean), list(std)
        self.rng = rng
        self.defer, self.finish_on_device = defer, finish_on_device

    def apply(self, image: Image.Image | torch.Tensor) -> dict[str, torch.Tensor | Deferred]:
        """Boxes are in the frame of the flipped image; a flipped region is cut from the mirrored box of the
        original and flipped (the same pixels, without flipping the whole image; see :func:`resize`)."""
        rng = self.rng or random
        pixels = image if isinstance(image, torch.Tensor) else pil_to_tensor(image)
        height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
        flip = rng.random() < self.flip_prob
        crop_a = sample_crop(height, width, self.scale, self.ratio, rng)
        crop_b = crop_a if self.same_region else sample_crop(height, width, self.scale, self.ratio, rng)
        out: dict[str, torch.Tensor | Deferred] = {}
        placed = None
        for name, (top, left, h, w) in (("a", crop_a), ("b", crop_b)):
            if placed is None or crop_b is not crop_a:
                box = (top, width - left - w if flip else left, h, w)
                placed = PlacedImage(pixels, box=box, size=tuple(self.size), flip=flip,
                                     interpolation=self.interpolation)
            out[f"region_{name}"] = Deferred(self, placed) if self.defer else self.finish([placed])[0]
            box_fractions = (top / height, left / width, h / height, w / width)
            out[f"box_{name}"] = Deferred(NUMBER_ROWS, box_fractions) if self.defer else torch.tensor(box_fractions)
        return out

    def finish(self, values: list[PlacedImage]) -> torch.Tensor:
        return finish_images(values, self.mean, self.std)

    def pack(self, values: list[PlacedImage]) -> tuple[torch.Tensor, dict]:
        return pack_images(values, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"same_region={self.same_region}, flip_prob={self.flip_prob})")
