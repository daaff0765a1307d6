"""Text-to-image person retrieval metrics (CUHK-PEDES / ICFG-PEDES / RSTPReid protocol): R@k, mAP, mINP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pedlightning.errors import EvaluationError
from pedlightning.metrics.ranking import (
    SampleMetric,
    TieRule,
    as_features,
    as_labels,
    check_ranks,
    check_ties,
    describe_ties,
    feature_distance,
    rank_queries,
)


def retrieval_evaluate(
    query_feats: Any,
    gallery_feats: Any,
    query_pids: Any,
    gallery_pids: Any,
    *,
    ranks: Sequence[int] = (1, 5, 10),
    block_size: int | None = None,
    ties: TieRule = "pessimistic",
) -> dict[str, float]:
    """Cross-modal retrieval by cosine similarity: every query ranks the whole gallery, positives share its identity.

    Text-to-image search (the standard protocol, as in IRRA): queries are caption embeddings, the gallery is the
    image embeddings; no camera filtering. Image-to-text is the same call with the roles swapped (images as queries,
    captions as gallery). Queries with no positive in the gallery are skipped and not counted in
    `num_valid_queries` (IRRA's code would return NaN). `ties` orders a positive and a negative of equal similarity
    (default "pessimistic": the positive after; "gallery_order" as a stable sort; "optimistic"); IRRA's
    `torch.argsort` leaves the order of ties undefined. See `pedlightning.metrics.ranking`.

    Returns:
        `rank{k}`, `mAP`, `mINP` as fractions in [0, 1], and `num_valid_queries`.
    """
    ranks, ties = check_ranks(ranks), check_ties(ties)
    q, g = as_features(query_feats, "query_feats"), as_features(gallery_feats, "gallery_feats")
    g = g.to(q.device)
    q_pids = as_labels(query_pids, "query_pids", len(q), q.device)
    g_pids = as_labels(gallery_pids, "gallery_pids", len(g), q.device)
    result = rank_queries(feature_distance(q, g, "cosine"), q_pids, g_pids, block_size=block_size, ties=ties)
    if result.num_valid == 0:
        raise EvaluationError(f"No query identity appears in the gallery ({len(q)} queries, {len(g)} gallery items): "
                              "check that queries and gallery come from the same split and share identity labels")
    return {**result.summary(ranks), "num_valid_queries": result.num_valid}


class RetrievalMetric(SampleMetric):
    """Text-to-image retrieval over a whole evaluation set, exact under DDP.

    `update(features, pids, is_query, indices)`: queries are caption embeddings (`is_query=True`), the gallery is
    image embeddings; `indices` are dataset indices (unique within captions and within images) used to drop the
    duplicates DistributedSampler padding adds. `compute()` returns the `retrieval_evaluate` dict; with
    `image_to_text=True` also the image-to-text results under `i2t_` keys. `description` says how it was computed
    (the tie rule), for the line that reports the numbers.
    """

    def __init__(self, ranks: Sequence[int] = (1, 5, 10), image_to_text: bool = False,
                 block_size: int | None = None, ties: TieRule = "pessimistic", **kwargs: Any):
        super().__init__(("features", "pids", "is_query"), **kwargs)
        self.ranks, self.image_to_text, self.block_size = check_ranks(ranks), image_to_text, block_size
        self.ties = check_ties(ties)

    @property
    def description(self) -> str:
        return f"cosine similarity, {describe_ties(self.ties)}"

    def update(self, features: Tensor, pids: Tensor, is_query: bool | Tensor, indices: Tensor) -> None:
        features = torch.as_tensor(features)
        if features.ndim != 2:
            raise EvaluationError(f"RetrievalMetric.update: features must be (batch, dim), got "
                                  f"{tuple(features.shape)}")
        is_query = torch.as_tensor(is_query, dtype=torch.bool, device=self.device).expand(len(features))
        self._append(indices, len(features), features=features,
                     pids=torch.as_tensor(pids, device=self.device).long(), is_query=is_query)

    def compute(self) -> dict[str, float]:
        s = self.samples(key_extra="is_query", check=("pids",))
        text, image = s["is_query"], ~s["is_query"]
        if not text.any() or not image.any():
            raise EvaluationError(f"RetrievalMetric needs caption (query) and image (gallery) samples, got "
                                  f"{int(text.sum())} captions and {int(image.sum())} images")
        f, pids = s["features"], s["pids"]
        options = dict(ranks=self.ranks, block_size=self.block_size, ties=self.ties)
        out = retrieval_evaluate(f[text], f[image], pids[text], pids[image], **options)
        if self.image_to_text:
            i2t = retrieval_evaluate(f[image], f[text], pids[image], pids[text], **options)
            out.update({f"i2t_{k}": v for k, v in i2t.items()})
        return out
