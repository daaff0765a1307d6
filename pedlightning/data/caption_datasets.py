"""Torch datasets for text-to-image person search: one item per caption, all captions tokenised once up front."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from pedlightning.data.datasets import RecordDataset, Substitutes
from pedlightning.data.faults import ImageFaults
from pedlightning.data.records import CaptionedImage
from pedlightning.data.tokenizer import Tokenize
from pedlightning.errors import ConfigError


def flatten_captions(records: Sequence[CaptionedImage]) -> tuple[list[str], list[int]]:
    """Every caption of ``records`` in record order, and the position of each caption's image in ``records``.

    This order numbers the text queries of an evaluation (``CaptionDataset``'s ``index``, ``DataSpec.eval_items``).
    """
    captions = [c for r in records for c in r.captions]
    image_indices = [i for i, r in enumerate(records) for _ in r.captions]
    return captions, image_indices


class CaptionDataset(Dataset):
    """Every caption of every record as its own item: ``tokens`` (L,), ``pid``, ``index``, ``image_index``.

    This is the query side of text-to-image evaluation (each caption queries the image gallery).
    ``index`` numbers the captions in record order (the metrics use it to drop distributed padding);
    ``image_index`` is the position of the caption's image in ``records``; :attr:`captions` holds the texts
    in ``index`` order, for rank lists.

    Args:
        records: the split's images with their captions.
        tokenizer: maps a list of strings to a LongTensor ``(N, context_length)`` (:func:`pedlightning.data.tokenizer.build_tokenizer`).
    """

    def __init__(self, records: Sequence[CaptionedImage], tokenizer: Tokenize):
        self.records = list(records)
        self.tokenizer = tokenizer
        self.captions, self.image_indices = flatten_captions(self.records)
        self.pids = [self.records[i].pid for i in self.image_indices]
        self.tokens = self.tokenize_all()

    def __len__(self) -> int:
        return len(self.captions)

    def tokenize_all(self, chunk: int = 1024) -> torch.Tensor:
        """Every caption's tokens, ``(N, context_length)`` int32, made once here: tokenizing in every loader worker
        and epoch costs about as much python time per sample as decoding the image (int32: vocabularies are far
        below 2**31, and half the memory of int64 in every worker)."""
        parts = []
        for start in range(0, len(self.captions), chunk):
            texts = self.captions[start:start + chunk]
            tokens = self.tokenizer(texts)
            if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] != len(texts):
                raise ConfigError(f"the tokenizer must map a list of N strings to a tensor (N, context_length); "
                                  f"got {type(tokens).__name__} {getattr(tokens, 'shape', '')} for {len(texts)} "
                                  "captions")
            parts.append(tokens.to(torch.int32))
        return torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.int32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tokens": self.tokens[index].long(), "pid": self.pids[index], "index": index,
                "image_index": self.image_indices[index]}


class ImageCaptionDataset(CaptionDataset):
    """Training pairs: one item per caption, with its image (``image``, ``path``) added to the caption item.

    An image with two captions is seen twice per epoch, once with each caption (IRRA, and every
    CUHK-PEDES baseline since Li et al. 2017, train on one sample per caption). Under ``faults`` with the
    ``skip`` policy, a caption whose image is unreadable is replaced by a caption of another image of the same
    identity (the whole pair is replaced, so caption and image still match).
    """

    def __init__(self, records: Sequence[CaptionedImage], tokenizer: Tokenize,
                 transform: Callable[[Image.Image], Any] | None = None, faults: ImageFaults | None = None):
        super().__init__(records, tokenizer)
        self.images = RecordDataset(self.records, transform, faults)
        self.substitutes = Substitutes(len(self.captions), self.pids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index, image = self.images.readable(index, self.substitutes, self.image_indices.__getitem__)
        item = super().__getitem__(index)
        transform = self.images.transform
        item.update(image=transform(image) if transform is not None else image,
                    path=self.records[item["image_index"]].path)
        return item
