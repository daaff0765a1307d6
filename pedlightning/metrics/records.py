"""Plain records that evaluation hands on: below tasks (which fill them) and callbacks (which draw them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RankListInputs:
    """The queries and gallery of the last test run, features in dataset order, for rank-list drawing."""

    query_feats: torch.Tensor
    gallery_feats: torch.Tensor
    query_pids: torch.Tensor
    gallery_pids: torch.Tensor
    query_camids: torch.Tensor | None
    gallery_camids: torch.Tensor | None
    query_items: list[str]
    gallery_paths: list[str]
    query_is_text: bool = False
