"""Torch datasets over parser records: load the image, apply the transform, return a dict."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from pedlightning.data.records import AttributeImage, CaptionedImage, PersonImage
from pedlightning.errors import DatasetLayoutError

Record = PersonImage | AttributeImage | CaptionedImage


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB; an unreadable file raises a DatasetLayoutError that names it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise DatasetLayoutError(f"cannot read image {path}: {err}") from err


class RecordDataset(Dataset):
    """Images of a list of records. Each item is a dict with ``image``, ``index`` and the record's fields.

    ``index`` is the position in ``records``; evaluation metrics use it to drop the duplicates that
    distributed samplers add when they pad the last batch.
    """

    def __init__(self, records: Sequence[Record], transform: Callable[[Image.Image], Any] | None = None):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = load_rgb(record.path)
        item = {k: v for k, v in asdict(record).items() if k != "captions"}
        item["image"] = self.transform(image) if self.transform is not None else image
        item["index"] = index
        if isinstance(record, AttributeImage):
            item["labels"] = torch.tensor(record.labels, dtype=torch.float32)
        return item
