"""The caption tokenizer: the one definition every text datamodule and text model uses.

open_clip's CLIP byte-pair encoding (Radford et al. 2021) ships inside the ``open_clip`` package, so it works
offline. Each caption becomes ``[start, tokens..., end, 0...]`` of exactly ``context_length`` ids; a longer
caption is cut and still ends with the end token (CLIP's text tower reads the feature at the end token,
the highest id). The data side owns it (data never imports ``pedlightning.models``); a text model checks its
context length against :attr:`pedlightning.data.spec.DataSpec.context_length`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pedlightning.errors import ConfigError

__all__ = ["TOKENIZER_ALIASES", "CaptionTokenizer", "Tokenize", "build_tokenizer", "tokenizer_name"]

Tokenize = Callable[[list[str]], torch.Tensor]
"""What caption datasets accept: N strings -> LongTensor ``(N, context_length)`` (a :class:`CaptionTokenizer`)."""

TOKENIZER_ALIASES: dict[str, str] = {"clip_tiny_test": "ViT-B-16"}
"""Model presets of pedlightning that are not open_clip configs -> the open_clip config whose tokenizer they use
(the tiny test CLIP has ViT-B-16's 49,408-token vocabulary)."""


def tokenizer_name(name: str) -> str:
    """The open_clip config whose tokenizer ``name`` (an open_clip config or a pedlightning preset) uses.

    Two names with the same ``tokenizer_name`` produce identical tokens.
    """
    import open_clip

    resolved = TOKENIZER_ALIASES.get(name, name)
    if open_clip.get_model_config(resolved) is None:
        raise ConfigError(f"unknown tokenizer {name!r}: expected an open_clip model config (e.g. 'ViT-B-16') or "
                          f"one of the presets {sorted(TOKENIZER_ALIASES)}")
    return resolved


class CaptionTokenizer:
    """``list[str]`` (or one ``str``) -> LongTensor ``(N, context_length)``; picklable for loader workers.

    The open_clip tokenizer is built on first use in each process (pickling it would copy its 2 MB vocabulary
    into every worker).
    """

    def __init__(self, name: str = "ViT-B-16", context_length: int = 77):
        if int(context_length) < 2:
            raise ConfigError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        self.name = name
        self.open_clip_name = tokenizer_name(name)
        self.context_length = int(context_length)
        self._tok: Any = None

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if self._tok is None:
            import open_clip

            self._tok = open_clip.get_tokenizer(self.open_clip_name, context_length=self.context_length)
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._tok(texts, context_length=self.context_length).long()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, context_length={self.context_length})"


def build_tokenizer(name: str = "ViT-B-16", context_length: int = 77) -> CaptionTokenizer:
    """The tokenizer of open_clip config ``name`` (``ViT-B-16``: CLIP's BPE) or preset (``clip_tiny_test``)."""
    return CaptionTokenizer(name, context_length)
