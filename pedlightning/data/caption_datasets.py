"""Torch datasets for text-to-image person search: one item per caption, tokenised on the fly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from pedlightning.data.datasets import RecordDataset
from pedlightning.data.records import CaptionedImage
from pedlightning.errors import ConfigError

Tokenizer = Callable[[list[str]], torch.Tensor]


class CaptionDataset(Dataset):
    """Every caption of every record as its own item: ``tokens`` (L,), ``pid``, ``index``, ``image_index``.

    This is the query side of text-to-image evaluation (each caption queries the image gallery).
    ``index`` numbers the captions in record order (the metrics use it to drop distributed padding);
    ``image_index`` is the position of the caption's image in ``records``; :attr:`captions` holds the texts
    in ``index`` order, for rank lists.

    Args:
        records: the split's images with their captions.
        tokenizer: maps a list of strings to a LongTensor ``(N, context_length)`` (an open_clip tokenizer).
    """

    def __init__(self, records: Sequence[CaptionedImage], tokenizer: Tokenizer):
        self.records = list(records)
        self.tokenizer = tokenizer
        self.image_indices = [i for i, r in enumerate(self.records) for _ in r.captions]
        self.captions = [c for r in self.records for c in r.captions]
        self.pids = [self.records[i].pid for i in self.image_indices]

    def __len__(self) -> int:
        return len(self.captions)

    def tokenize(self, caption: str) -> torch.Tensor:
        tokens = self.tokenizer([caption])
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] != 1:
            raise ConfigError(f"the tokenizer must map a list of N strings to a tensor (N, context_length); "
                              f"got {type(tokens).__name__} {getattr(tokens, 'shape', '')} for one caption")
        return tokens[0].long()

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tokens": self.tokenize(self.captions[index]), "pid": self.pids[index], "index": index,
                "image_index": self.image_indices[index]}


class ImageCaptionDataset(CaptionDataset):
    """Training pairs: one item per caption, with its image (``image``, ``path``) added to the caption item.

    An image with two captions is seen twice per epoch, once with each caption (IRRA, and every
    CUHK-PEDES baseline since Li et al. 2017, train on one sample per caption).
    """

    def __init__(self, records: Sequence[CaptionedImage], tokenizer: Tokenizer,
                 transform: Callable[[Image.Image], Any] | None = None):
        super().__init__(records, tokenizer)
        self.images = RecordDataset(self.records, transform)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        image = self.images[item["image_index"]]
        item.update(image=image["image"], path=image["path"])
        return item
