"""Per-sample transforms of LUPerson-style data: :class:`~pedlightning.data.records.PersonSample` -> dict of tensors.

The LUPerson datamodules take the transform as an argument: PersonMAE's RegionA/RegionB pairs (an
:class:`ImageTransform`, which looks at the image only) or VAL-PAT's two MoCo views + caption + attributes
(a :class:`SampleTransform` that reads the annotation too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from pedlightning.data.records import PersonSample

__all__ = ["ImageTransform", "SampleTransform", "as_sample_transform"]


class SampleTransform:
    """``PersonSample -> dict``; ``uses_annotations`` tells the reader whether to parse the ``.json`` member."""

    uses_annotations: bool = True

    def __call__(self, sample: PersonSample) -> dict[str, Any]:
        raise NotImplementedError


class ImageTransform(SampleTransform):
    """A transform of the image alone; callable on a :class:`PersonSample` or directly on a PIL image."""

    uses_annotations = False

    def __call__(self, sample: PersonSample | Image.Image) -> dict[str, Any]:
        return self.apply(sample.image if isinstance(sample, PersonSample) else sample)

    def apply(self, image: Image.Image) -> dict[str, Any]:
        raise NotImplementedError


class _ImageFunction(ImageTransform):
    def __init__(self, fn: Callable[[Image.Image], dict[str, Any]]):
        self.fn = fn

    def apply(self, image: Image.Image) -> dict[str, Any]:
        return self.fn(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fn!r})"


def as_sample_transform(transform: SampleTransform | Callable[[Image.Image], dict[str, Any]]) -> SampleTransform:
    """``transform`` itself when it is a :class:`SampleTransform`; any other callable is taken as an image
    transform (PIL image -> dict)."""
    if isinstance(transform, SampleTransform):
        return transform
    if not callable(transform):
        raise TypeError(f"a sample transform must be callable, got {type(transform).__name__}")
    return _ImageFunction(transform)
