"""VAL-PAT's per-sample transform: two MoCo v2 views of the image, one caption, the attribute vector.

The views follow MoCo v2's augmentation (Chen et al. 2020, "Improved Baselines with Momentum Contrastive
Learning", the ``aug_plus`` recipe): random resized crop (scale 0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1)
with probability 0.8, grayscale with probability 0.2, Gaussian blur (sigma 0.1-2) with probability 0.5,
horizontal flip. VAL-PAT (arXiv 2304.05554) pre-trains like LUP (Fu et al., CVPR 2021, MoCo v2 on
LUPerson) but publishes no augmentation details.

Assumption: the crop's aspect ratio is drawn relative to the image's (:func:`~.regions.sample_crop`), so a
tall person crop stays tall at 256x128 instead of being squashed from a square crop; LUP studies person-specific
augmentations, but which of its choices VAL-PAT kept is not public, so every knob is an argument (probability 0
switches a step off) and the defaults are MoCo v2's.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from pedlightning.data.records import PersonSample
from pedlightning.data.tokenizer import build_tokenizer
from pedlightning.data.transforms.regions import sample_crop
from pedlightning.data.transforms.reid import IMAGENET_MEAN, IMAGENET_STD
from pedlightning.data.transforms.samples import SampleTransform
from pedlightning.errors import ConfigError

__all__ = ["MoCoView", "TwoViewCaptionTransform", "draw_caption"]


def draw_caption(seed: int, epoch: int, key: str, num_captions: int) -> int:
    """Which of a sample's ``num_captions`` captions it shows in ``epoch``: a hash of (seed, epoch, key).

    The same on every rank, worker and run (no ``hash()``, no RNG state), so a resumed epoch shows the same
    captions and a different epoch usually another one.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_captions


class MoCoView:
    """PIL image -> one augmented, normalised view ``(3, H, W)`` (MoCo v2's recipe, see the module docstring).

    Args:
        img_size: ``[height, width]`` of the view.
        scale, ratio: random resized crop: area fraction, aspect relative to the image's.
        jitter: ColorJitter (brightness, contrast, saturation, hue); applied with ``jitter_prob``.
        grayscale_prob, blur_prob, blur_sigma, flip_prob: the remaining steps.
        mean, std: normalisation.
    """

    def __init__(self, img_size: Sequence[int] = (256, 128), scale: Sequence[float] = (0.2, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
                 jitter_prob: float = 0.8, grayscale_prob: float = 0.2, blur_prob: float = 0.5,
                 blur_sigma: Sequence[float] = (0.1, 2.0), flip_prob: float = 0.5,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(f"crop scale must satisfy 0 < min <= max <= 1, got {list(scale)}")
        if len(jitter) != 4:
            raise ConfigError(f"jitter is (brightness, contrast, saturation, hue), got {list(jitter)}")
        for name, p in (("jitter_prob", jitter_prob), ("grayscale_prob", grayscale_prob),
                        ("blur_prob", blur_prob), ("flip_prob", flip_prob)):
            if not 0 <= p <= 1:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {p}")
        self.size = [int(img_size[0]), int(img_size[1])]
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.jitter = T.ColorJitter(*jitter)
        self.jitter_prob, self.grayscale_prob, self.blur_prob = jitter_prob, grayscale_prob, blur_prob
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.flip_prob = flip_prob
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        top, left, h, w = sample_crop(height, width, self.scale, self.ratio, random)
        view = TF.resized_crop(image, top, left, h, w, self.size, TF.InterpolationMode.BICUBIC, antialias=True)
        if random.random() < self.jitter_prob:
            view = self.jitter(view)
        if random.random() < self.grayscale_prob:
            view = TF.to_grayscale(view, num_output_channels=3)
        if random.random() < self.blur_prob:
            view = view.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.blur_sigma)))
        if random.random() < self.flip_prob:
            view = TF.hflip(view)
        return TF.normalize(TF.to_tensor(view), self.mean, self.std)


class TwoViewCaptionTransform(SampleTransform):
    """A LUPerson-TA sample -> ``view_q``, ``view_k`` (two :class:`MoCoView` s), ``tokens`` + ``has_caption``,
    ``attributes`` + ``has_attributes`` (VAL-PAT's three objectives).

    The caption is one of the sample's captions, drawn by :func:`draw_caption` from (``seed``, epoch, key).
    A sample without captions gets the tokens of the empty text (start + end token, a valid input for the
    text tower) and ``has_caption=False``; one without attributes a zero vector and ``has_attributes=False``:
    the losses mask them out, the loader never drops them.

    Args:
        view: the MoCo view's arguments (:class:`MoCoView`).
        tokenizer, context_length: :func:`pedlightning.data.tokenizer.build_tokenizer`.
        num_attributes: length of the attribute vector (26 for PA-100K's names).
        seed: caption draws.
    """

    def __init__(self, view: MoCoView | None = None, tokenizer: str = "ViT-B-16", context_length: int = 77,
                 num_attributes: int = 26, seed: int = 0):
        self.view = view or MoCoView()
        self.tokenize = build_tokenizer(tokenizer, context_length)
        self.num_attributes = int(num_attributes)
        self.seed = int(seed)

    def __call__(self, sample: PersonSample) -> dict[str, Any]:
        ann = sample.annotation
        caption = ann.captions[draw_caption(self.seed, sample.epoch, sample.key, len(ann.captions))] \
            if ann.captions else ""
        if ann.attributes is not None and len(ann.attributes) != self.num_attributes:
            raise ConfigError(f"sample {sample.key} has {len(ann.attributes)} attributes, the transform expects "
                              f"{self.num_attributes}")
        attributes = ann.attributes if ann.attributes is not None else (0,) * self.num_attributes
        return {"view_q": self.view(sample.image), "view_k": self.view(sample.image),
                "tokens": self.tokenize([caption])[0], "has_caption": ann.has_captions,
                "attributes": torch.tensor(attributes, dtype=torch.float32), "has_attributes": ann.has_attributes}
