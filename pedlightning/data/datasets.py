"""Torch datasets over parser records: load the image, apply the transform, return a dict.

Unreadable images follow the datamodule's ``on_error`` policy (:class:`~pedlightning.data.faults.ImageFaults`):
under ``fail`` the first one raises an error naming it; under ``skip`` it is named once, counted, and

- in training data (``on_unreadable="substitute"``) replaced by a readable item of the same group (for P x K
  identity batches: another image of the same identity, so the batch keeps P identities x K images; an identity
  with no readable image left gives its slot to the next readable item), so batches keep their shape;
- in evaluation data (``"placeholder"``) replaced by a uniform grey image, so the query/gallery sets keep their
  size and order (metrics align items by index). ``verify_images: true`` drops such files before evaluation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from pedlightning.data.faults import ImageFaults
from pedlightning.data.records import AttributeImage, CaptionedImage, PersonImage
from pedlightning.data.transforms.batched import decode_rgb, pil_to_tensor
from pedlightning.errors import DatasetLayoutError

Record = PersonImage | AttributeImage | CaptionedImage
Unreadable = Literal["substitute", "placeholder"]
PLACEHOLDER_RGB = (124, 116, 104)
"""The placeholder's colour: the ImageNet mean, i.e. zeros after the usual normalisation."""


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB; an unreadable file raises a DatasetLayoutError that names it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetLayoutError(f"cannot read image {path}: {err}") from err


def read_rgb(path: str) -> torch.Tensor:
    """Decode an image file as a CHW uint8 RGB tensor; an unreadable file raises a DatasetLayoutError naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return decode_rgb(data)
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetLayoutError(f"cannot read image {path}: {err}") from err


def reads_tensors(transform: object) -> bool:
    """Whether ``transform`` takes decoded CHW uint8 tensors (the batched training transforms) instead of PIL."""
    return bool(getattr(transform, "reads_tensors", False))


class Substitutes:
    """Where to look for a replacement of an unreadable item: the rest of its group, then every item.

    Both in cyclic order after the item, so the choice is deterministic. ``groups`` (e.g. the pid of every
    item) ``None`` means no groups.
    """

    def __init__(self, num_items: int, groups: Sequence[int] | None = None):
        self.num_items = num_items
        self.groups = None if groups is None else list(groups)
        self._members: dict[int, list[int]] | None = None

    def __call__(self, index: int) -> Iterator[int]:
        if self.groups is not None:
            if self._members is None:  # built on first need, inside the worker that needs it
                self._members = defaultdict(list)
                for i, g in enumerate(self.groups):
                    self._members[g].append(i)
            members = self._members[self.groups[index]]
            at = members.index(index)
            yield from members[at + 1:] + members[:at]
        yield from range(index + 1, self.num_items)
        yield from range(index)


class RecordDataset(Dataset):
    """Images of a list of records. Each item is a dict with ``image``, ``index`` and the record's fields.

    ``index`` is the position in ``records``; evaluation metrics use it to drop the duplicates that
    distributed samplers add when they pad the last batch.

    Args:
        records: the split's records.
        transform: PIL image -> what the item's ``image`` holds.
        faults: the policy and shared record of unreadable files (``None``: an unreadable file raises).
        on_unreadable: under ``skip``, ``substitute`` (training) or ``placeholder`` (evaluation), see the module.
        groups: the group of every record a substitute is first looked for in (the pids of P x K batches).
    """

    def __init__(self, records: Sequence[Record], transform: Callable[[Image.Image], Any] | None = None,
                 faults: ImageFaults | None = None, on_unreadable: Unreadable = "substitute",
                 groups: Sequence[int] | None = None):
        self.records = list(records)
        self.transform = transform
        if faults is not None and faults.num_items != len(self.records):
            raise ValueError(f"faults tracks {faults.num_items} items, the dataset has {len(self.records)}")
        self.faults = faults
        self.on_unreadable = on_unreadable
        self.substitutes = Substitutes(len(self.records), groups)
        self._load = read_rgb if reads_tensors(transform) else load_rgb

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> Image.Image | torch.Tensor | None:
        """The image of record ``index`` (a tensor for a transform that ``reads_tensors``, else PIL); ``None`` when
        it is unreadable under the ``skip`` policy."""
        if self.faults is not None and self.faults.is_bad(index):
            return None
        path = self.records[index].path
        try:
            return self._load(path)
        except DatasetLayoutError as err:
            if self.faults is None:
                raise
            self.faults.record_file(index, path, err.__cause__ or err)
            return None

    def readable(self, index: int, candidates: Callable[[int], Iterator[int]] | None = None,
                 image_of: Callable[[int], int] = int) -> tuple[int, Image.Image | torch.Tensor]:
        """``(index, image)``, or under ``skip`` the first candidate item whose image reads (``image_of`` maps an
        item to its record), or the placeholder image in ``placeholder`` mode."""
        image = self.read(image_of(index))
        if image is not None:
            return index, image
        if self.on_unreadable == "placeholder":
            placeholder = Image.new("RGB", (64, 128), PLACEHOLDER_RGB)
            return index, pil_to_tensor(placeholder) if self._load is read_rgb else placeholder
        for other in (candidates or self.substitutes)(index):
            image = self.read(image_of(other))
            if image is not None:
                return other, image
        raise DatasetLayoutError(f"none of the {len(self.records)} images of this dataset is readable "
                                 f"(the first: {self.records[0].path})")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index, image = self.readable(index)
        record = self.records[index]
        item = {k: v for k, v in vars(record).items() if k != "captions"}  # flat records: no asdict deep copy
        item["image"] = self.transform(image) if self.transform is not None else image
        item["index"] = index
        if isinstance(record, AttributeImage):
            item["labels"] = torch.tensor(record.labels, dtype=torch.float32)
        return item
