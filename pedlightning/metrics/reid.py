"""Person re-identification evaluation: mAP, mINP and CMC under the Market-1501 / DukeMTMC / MSMT17 protocol."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pedlightning.errors import EvaluationError
from pedlightning.metrics.ranking import (
    DistanceMetric,
    SampleMetric,
    TieRule,
    as_features,
    as_labels,
    check_ranks,
    check_ties,
    describe_ties,
    feature_distance,
    prepare_features,
    rank_queries,
)
from pedlightning.metrics.reranking import KReciprocalReranker


def reid_evaluate(
    query_feats: Any,
    gallery_feats: Any,
    query_pids: Any,
    gallery_pids: Any,
    query_camids: Any,
    gallery_camids: Any,
    *,
    metric: DistanceMetric = "cosine",
    ranks: Sequence[int] = (1, 5, 10),
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    block_size: int | None = None,
    ties: TieRule = "pessimistic",
) -> dict[str, float]:
    """Evaluate query features against a gallery as the community eval code does (torchreid, fast-reid).

    For each query, gallery images with the query's identity AND camera are removed (the same shot seen by the same
    camera is not a re-identification); other same-camera images stay. Distractors (e.g. Market-1501 pid 0) are
    ordinary negatives; junk images (pid -1) must be dropped when parsing. Queries with no remaining match are
    skipped. Accepts torch tensors or numpy arrays; features are ranked in float32.

    Args:
        metric: 'cosine' (L2-normalised features, the usual choice for ViT/CLIP features) or 'euclidean' (features
            as given; normalise them first for the BNNeck convention).
        ranks: CMC ranks to report as `rank{k}`.
        rerank: k-reciprocal re-ranking (Zhong et al., CVPR 2017) with k1, k2 and lambda_value (paper defaults).
        block_size: queries ranked at once; None derives it from a 256 MiB budget.
        ties: how a positive and a negative at equal distance are ordered: "pessimistic" (the positive after, the
            default: the lowest score any order gives, independent of gallery order), "gallery_order" (as a stable
            sort) or "optimistic" (the positive first). See `pedlightning.metrics.ranking`.

    Returns:
        `mAP`, `mINP`, `rank{k}` as fractions in [0, 1], and `num_valid_queries`.

    Raises:
        EvaluationError: malformed inputs, or no query has a valid match (see the message for the single-camera trap).
    """
    ranks, ties = check_ranks(ranks), check_ties(ties)
    q, g = as_features(query_feats, "query_feats"), as_features(gallery_feats, "gallery_feats")
    g = g.to(q.device)
    q_pids = as_labels(query_pids, "query_pids", len(q), q.device)
    g_pids = as_labels(gallery_pids, "gallery_pids", len(g), q.device)
    q_cams = as_labels(query_camids, "query_camids", len(q), q.device)
    g_cams = as_labels(gallery_camids, "gallery_camids", len(g), q.device)
    if rerank:
        distance = KReciprocalReranker(*prepare_features(q, g, metric), k1=k1, k2=k2, lambda_value=lambda_value)
    else:
        distance = feature_distance(q, g, metric)
    result = rank_queries(distance, q_pids, g_pids, q_cams, g_cams, block_size=block_size, ties=ties)
    if result.num_valid == 0:
        raise EvaluationError(_no_valid_query_message(q_pids, g_pids, q_cams, g_cams))
    return {**result.summary(ranks), "num_valid_queries": result.num_valid}


def _no_valid_query_message(q_pids: Tensor, g_pids: Tensor, q_cams: Tensor, g_cams: Tensor) -> str:
    in_gallery = torch.isin(q_pids, g_pids)
    cams = sorted(set(q_cams.unique().tolist()) | set(g_cams.unique().tolist()))
    head = f"No query has a valid match in the gallery ({len(q_pids)} queries, {len(g_pids)} gallery images, " \
           f"camera ids {cams[:10]}{' ...' if len(cams) > 10 else ''})."
    if not in_gallery.any():
        return f"{head} None of the query identities appears in the gallery: check that query and gallery come " \
               "from the same split and use the same identity labels."
    return (f"{head} {int(in_gallery.sum())} queries have their identity in the gallery, but every such gallery image "
            "shares the query's camera id, and the reID protocol removes gallery images with the query's identity "
            "AND camera. This is the usual trap of custom datasets where all images carry one camera id. Give images "
            "distinct camera ids (e.g. one per camera, video or recording session), so that each query identity has "
            "gallery images from another camera.")


class ReIDMetric(SampleMetric):
    """reID evaluation over a whole test set, exact under DDP (see `reid_evaluate` for the protocol and options).

    `update(features, pids, camids, is_query, indices)` collects samples; `indices` are dataset indices (unique
    within the query set and within the gallery set) used to drop the duplicates DistributedSampler padding adds.
    `compute()` returns the `reid_evaluate` dict; `description` says how it was computed (distance, tie rule,
    re-ranking), for the line that reports the numbers.
    """

    def __init__(self, metric: DistanceMetric = "cosine", ranks: Sequence[int] = (1, 5, 10), rerank: bool = False,
                 k1: int = 20, k2: int = 6, lambda_value: float = 0.3, block_size: int | None = None,
                 ties: TieRule = "pessimistic", **kwargs: Any):
        super().__init__(("features", "pids", "camids", "is_query"), **kwargs)
        self.options = dict(metric=metric, ranks=check_ranks(ranks), rerank=rerank, k1=k1, k2=k2,
                            lambda_value=lambda_value, block_size=block_size, ties=check_ties(ties))

    @property
    def description(self) -> str:
        o = self.options
        rerank = f"k-reciprocal re-ranking (k1={o['k1']}, k2={o['k2']}, lambda={o['lambda_value']})" \
            if o["rerank"] else "no re-ranking"
        return f"{o['metric']} distance, {describe_ties(o['ties'])}, {rerank}"

    def update(self, features: Tensor, pids: Tensor, camids: Tensor, is_query: bool | Tensor,
               indices: Tensor) -> None:
        features = torch.as_tensor(features)
        if features.ndim != 2:
            raise EvaluationError(f"ReIDMetric.update: features must be (batch, dim), got {tuple(features.shape)}")
        n = len(features)
        is_query = torch.as_tensor(is_query, dtype=torch.bool, device=self.device).expand(n)
        self._append(indices, n, features=features, pids=torch.as_tensor(pids, device=self.device).long(),
                     camids=torch.as_tensor(camids, device=self.device).long(), is_query=is_query)

    def compute(self) -> dict[str, float]:
        s = self.samples(key_extra="is_query", check=("pids", "camids"))
        q, g = s["is_query"], ~s["is_query"]
        if not q.any() or not g.any():
            raise EvaluationError(f"ReIDMetric needs query and gallery samples, got {int(q.sum())} query and "
                                  f"{int(g.sum())} gallery samples")
        f = s["features"]
        return reid_evaluate(f[q], f[g], s["pids"][q], s["pids"][g], s["camids"][q], s["camids"][g], **self.options)
