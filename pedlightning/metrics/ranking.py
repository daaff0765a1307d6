"""Block-wise ranking core shared by person reID and text-to-image retrieval, and the sample bookkeeping that makes
the metric classes exact under DDP.

Every query ranks the whole gallery by distance. AP, CMC and INP only need the rank of each positive, so a block of
queries is sorted once (values only) and the rank of every positive is read off by binary search: no per-query Python
loop, and nothing of size (queries x gallery) lives beyond one block. MSMT17 (11,659 x 82,161) would need 3.8 GB for
its float32 distance matrix alone.

Ties (`TieRule`, default "pessimistic"): a positive whose distance equals a negative's can be ranked after it
("pessimistic": the lowest score any order of the tied items gives, and independent of gallery order, so degenerate
constant features score worst-case instead of an arbitrary order-dependent value), in gallery order ("gallery_order":
what a stable sort of the distances gives, e.g. `np.argsort(kind="stable")`) or before it ("optimistic": the highest
score). The reference codes (torchreid's and fast-reid's `np.argsort`, IRRA's `torch.argsort`) use unstable sorts:
on AVX-512 CPUs numpy and torch sort tied values in no defined order, so their results on tied inputs lie between
"optimistic" and "pessimistic" and match "gallery_order" only where their sort happens to be stable. Exact float32
ties are not rare (thousands of tied pairs in a Market-size matrix of continuous features), but there the rule moves
the metrics by less than 1e-7; binarised or coarsely quantised features tie constantly: Market-size features
binarised by sign score mAP 0.1073 / 0.1095 / 0.1115 and rank-1 0.285 / 0.297 / 0.307 under pessimistic /
gallery_order / optimistic (benchmarks/reid_eval.py --tie-demo).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from pedlightning.errors import EvaluationError

DistanceMetric = Literal["cosine", "euclidean"]
TieRule = Literal["pessimistic", "gallery_order", "optimistic"]
TIE_RULES: dict[str, str] = {
    "pessimistic": "a positive tied with negatives ranks after them",
    "gallery_order": "tied items keep their gallery order (a stable sort)",
    "optimistic": "a positive tied with negatives ranks before them",
}
"""Each tie rule with the one-line description that `describe_ties` reports next to the metrics."""
DistanceFn = Callable[[int, int], Tensor]
"""`distance(start, stop)` -> a new (stop - start, num_gallery) float32 tensor of distances of queries start..stop;
smaller = closer. `rank_queries` overwrites it in place."""

BLOCK_MEMORY_BYTES = 256 * 2**20
"""Memory one query block may use when `block_size` is None (distances and their sorted copy)."""
_BYTES_PER_PAIR = 8


def auto_block_size(num_gallery: int, bytes_per_pair: int = _BYTES_PER_PAIR) -> int:
    """Queries per block so that one block stays within `BLOCK_MEMORY_BYTES`."""
    return max(1, BLOCK_MEMORY_BYTES // (bytes_per_pair * max(num_gallery, 1)))


def as_features(x: Any, name: str) -> Tensor:
    """A detached float32 (N, D) tensor with finite values; bf16/fp16 create ties, so ranking is always float32."""
    t = torch.as_tensor(x).detach()
    if t.ndim != 2 or t.shape[0] == 0:
        raise EvaluationError(f"{name} must be a non-empty 2-D (num_samples, dim) array, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise EvaluationError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.float()
    low, high = torch.aminmax(t)  # one pass, and NaN propagates: cheaper than isfinite(t).all() on a gallery
    if not (torch.isfinite(low) and torch.isfinite(high)):
        bad = int((~torch.isfinite(t)).any(1).sum())
        raise EvaluationError(f"{name} contains NaN or infinite values in {bad} of {len(t)} rows")
    return t


def as_labels(x: Any, name: str, length: int, device: torch.device) -> Tensor:
    """An int64 vector of `length` integer labels (identities, cameras)."""
    t = torch.as_tensor(x).detach()
    if t.ndim != 1 or len(t) != length:
        raise EvaluationError(f"{name} must be a 1-D array with {length} entries (one per feature row), "
                              f"got shape {tuple(t.shape)}")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise EvaluationError(f"{name} must hold integer labels, got non-integer values of dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def prepare_features(query: Tensor, gallery: Tensor, metric: DistanceMetric) -> tuple[Tensor, Tensor]:
    """Check the metric and dimensions; cosine L2-normalises, euclidean keeps the features as given."""
    if query.shape[1] != gallery.shape[1]:
        raise EvaluationError(f"query features have dimension {query.shape[1]} but gallery features have "
                              f"{gallery.shape[1]}")
    if metric == "cosine":
        return F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    if metric == "euclidean":
        return query, gallery
    raise EvaluationError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def feature_distance(query: Tensor, gallery: Tensor, metric: DistanceMetric = "cosine") -> DistanceFn:
    """Distances for ranking, computed per query block.

    cosine: the negated cosine similarity of L2-normalised features (negation is exact, `1 - s` would round distinct
    similarities into ties). euclidean: the squared Euclidean distance of the features as given (same order as the
    distance, without rounding a square root).
    """
    q, g = prepare_features(query, gallery, metric)
    if metric == "cosine":
        g_neg = g.neg_()  # a fresh normalised copy, negated in place
        return lambda start, stop: torch.mm(q[start:stop], g_neg.T)
    q_sq, g_sq = (q * q).sum(1), (g * g).sum(1)
    return lambda start, stop: torch.addmm(g_sq[None], q[start:stop], g.T, alpha=-2).add_(q_sq[start:stop, None])


@dataclass(frozen=True)
class RankingResult:
    """Per-query results of the queries that have at least one positive, in query order.

    `first_hit` is the 1-based rank of the first positive; `num_skipped` counts queries without any positive.
    """

    average_precision: Tensor
    inverse_negative_penalty: Tensor
    first_hit: Tensor
    num_skipped: int

    @property
    def num_valid(self) -> int:
        return len(self.first_hit)

    def summary(self, ranks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
        """mAP, mINP and CMC rank-k as fractions in [0, 1] (NaN when no query is valid)."""
        out = {"mAP": _mean(self.average_precision), "mINP": _mean(self.inverse_negative_penalty)}
        for k in ranks:
            out[f"rank{k}"] = _mean((self.first_hit <= k).double())
        return out


def _mean(x: Tensor) -> float:
    return float(x.mean()) if len(x) else float("nan")


def check_ties(ties: str) -> TieRule:
    if ties not in TIE_RULES:
        raise EvaluationError(f"ties must be one of {', '.join(map(repr, TIE_RULES))}, got {ties!r}")
    return ties  # type: ignore[return-value]


def describe_ties(ties: TieRule) -> str:
    """The tie rule in words, for the line that reports the metrics."""
    return f"ties: {ties} ({TIE_RULES[check_ties(ties)]})"


def check_ranks(ranks: Sequence[int]) -> tuple[int, ...]:
    ranks = tuple(ranks)
    if not ranks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ranks):
        raise EvaluationError(f"ranks must be a non-empty list of positive integers, got {ranks!r}")
    return ranks


def rank_queries(
    distance: DistanceFn,
    query_labels: Tensor,
    gallery_labels: Tensor,
    query_groups: Tensor | None = None,
    gallery_groups: Tensor | None = None,
    *,
    block_size: int | None = None,
    ties: TieRule = "pessimistic",
) -> RankingResult:
    """Rank the gallery for every query and score the ranks of its positives, one block of queries at a time.

    A gallery item is a positive when its label equals the query's. With groups (reID cameras), a positive that also
    shares the query's group is excluded from the ranking altogether (Market-1501/MSMT17 protocol); negatives of the
    same group stay. AP (mean precision at each positive), CMC (rank of the first positive) and INP (Ye et al.,
    "Deep Learning for Person Re-identification: A Survey", TPAMI 2021, Eq. 8: number of positives / rank of the
    hardest positive) are computed per query; queries with no positive are skipped and counted. `ties` orders a
    positive and a negative at equal distance (see the module docstring).
    """
    ties = check_ties(ties)
    num_query, num_gallery = len(query_labels), len(gallery_labels)
    if (query_groups is None) != (gallery_groups is None):
        raise EvaluationError("query_groups and gallery_groups must be given together")
    if block_size is None:
        block_size = auto_block_size(num_gallery)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise EvaluationError(f"block_size must be a positive integer or None, got {block_size!r}")
    by_label = _LabelIndex(gallery_labels)
    ap, inp, first, skipped = [], [], [], 0
    for start in range(0, num_query, block_size):
        stop = min(start + block_size, num_query)
        dist = distance(start, stop).float()
        if dist.shape != (stop - start, num_gallery):
            raise EvaluationError(f"distance block has shape {tuple(dist.shape)}, "
                                  f"expected {(stop - start, num_gallery)}")
        rows, cols = by_label.positives(query_labels[start:stop])
        if query_groups is not None:
            excluded = query_groups[start:stop][rows] == gallery_groups[cols]
            dist[rows[excluded], cols[excluded]] = float("inf")  # sorts after every ranked item
            rows, cols = rows[~excluded], cols[~excluded]
        block_ap, block_inp, block_first, block_skipped = _score_block(dist, rows, cols, ties)
        ap.append(block_ap)
        inp.append(block_inp)
        first.append(block_first)
        skipped += block_skipped
    return RankingResult(torch.cat(ap).cpu(), torch.cat(inp).cpu(), torch.cat(first).cpu(), skipped)


def expand_ranges(starts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """For ranges [start, start + count): (which range, position) of every element, in order."""
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    offset = torch.arange(len(owner), device=counts.device) - (counts.cumsum(0) - counts)[owner]
    return owner, starts[owner] + offset


class _LabelIndex:
    """Gallery positions grouped by label: lists each query's positives without a (queries x gallery) comparison."""

    def __init__(self, gallery_labels: Tensor):
        self.order = torch.argsort(gallery_labels, stable=True)
        self.labels, self.counts = torch.unique_consecutive(gallery_labels[self.order], return_counts=True)
        self.starts = self.counts.cumsum(0) - self.counts

    def positives(self, query_labels: Tensor) -> tuple[Tensor, Tensor]:
        """(query row, gallery position) of every same-label pair, sorted by row."""
        slot = torch.searchsorted(self.labels, query_labels).clamp_max(len(self.labels) - 1)
        counts = torch.where(self.labels[slot] == query_labels, self.counts[slot], 0)
        rows, pos = expand_ranges(self.starts[slot], counts)
        return rows, self.order[pos]


def _score_block(dist: Tensor, rows: Tensor, cols: Tensor, ties: TieRule) -> tuple[Tensor, Tensor, Tensor, int]:
    """AP, INP and first-hit rank of the queries (rows of `dist`) that have a positive at (rows, cols).

    `rows` must be sorted and, within a row, `cols` ascending (as `_LabelIndex.positives` lists them), so that the
    stable sort below orders tied positives by gallery position.
    """
    num_pos = torch.bincount(rows, minlength=len(dist))
    pos_dist = dist[rows, cols]
    if not torch.isfinite(pos_dist).all():
        raise EvaluationError("distances to positive gallery items are NaN or infinite; check the features")
    width = max(int(num_pos.max()), 1)
    slot = torch.arange(len(rows), device=dist.device) - (num_pos.cumsum(0) - num_pos)[rows]
    pos_sorted = dist.new_full((len(dist), width), float("inf"))
    pos_sorted[rows, slot] = pos_dist
    pos_sorted, order = pos_sorted.sort(dim=1, stable=True)
    # negatives before each positive = (items before it) - (positives before it); excluded items are +inf
    right = ties == "pessimistic"  # count items at the positive's distance as before it
    all_sorted = _sort_rows(dist, in_place=ties != "gallery_order")  # gallery order reads `dist` again
    negatives_before = (torch.searchsorted(all_sorted, pos_sorted, right=right)
                        - torch.searchsorted(pos_sorted, pos_sorted, right=right))
    hit = torch.arange(1, width + 1, device=dist.device, dtype=torch.float64)
    valid = num_pos > 0
    if ties == "gallery_order":
        pos_cols = torch.full_like(pos_sorted, len(dist[0]), dtype=torch.int64)
        pos_cols[rows, slot] = cols
        negatives_before += _tied_negatives_before(dist, all_sorted, pos_sorted, pos_cols.gather(1, order),
                                                   hit[None] <= num_pos[:, None])
    rank = hit + negatives_before.double()  # 1-based rank of the j-th positive
    num_pos, rank = num_pos[valid].double(), rank[valid]
    counted = hit <= num_pos[:, None]
    ap = (hit / rank).where(counted, 0.0).sum(1) / num_pos
    hardest = rank.gather(1, (num_pos.long() - 1)[:, None]).squeeze(1)
    return ap, num_pos / hardest, rank[:, 0].long(), int((~valid).sum())


def _tied_negatives_before(dist: Tensor, all_sorted: Tensor, pos_sorted: Tensor, pos_cols: Tensor, counted: Tensor,
                           budget: int = BLOCK_MEMORY_BYTES // 4) -> Tensor:
    """Negatives at the same distance as a positive and earlier in the gallery, per sorted positive slot.

    Only slots with a tied negative are looked at, a bounded number of gallery rows at a time (`budget` bytes): ties
    are sparse in practice, and constant features still fit in memory.
    """
    tied_all = (torch.searchsorted(all_sorted, pos_sorted, right=True)
                - torch.searchsorted(all_sorted, pos_sorted, right=False))
    tied_pos = (torch.searchsorted(pos_sorted, pos_sorted, right=True)
                - torch.searchsorted(pos_sorted, pos_sorted, right=False))
    out = torch.zeros_like(tied_all)
    row, slot = ((tied_all > tied_pos) & counted).nonzero(as_tuple=True)
    positions = torch.arange(dist.shape[1], device=dist.device)
    # tied positives with a smaller gallery position sit just before this slot (stable sort)
    tied_pos_before = slot - torch.searchsorted(pos_sorted[row], pos_sorted[row, slot, None], right=False)[:, 0]
    step = max(1, budget // max(dist.shape[1], 1))
    for start in range(0, len(row), step):
        r, s = row[start:start + step], slot[start:start + step]
        col = pos_cols[r, s]
        earlier = ((dist[r] == pos_sorted[r, s, None]) & (positions < col[:, None])).sum(1)
        out[r, s] = earlier - tied_pos_before[start:start + step]
    return out


def _sort_rows(x: Tensor, in_place: bool = False) -> Tensor:
    """Row-wise sorted values; numpy's SIMD sort is several times faster than torch.sort on CPU. `in_place` sorts
    `x` itself, saving a copy of the block."""
    if x.device.type == "cpu":
        if in_place:
            x.numpy().sort(axis=1)
            return x
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return x.sort(dim=1).values


class SampleMetric(Metric):
    """A Metric that keeps every sample (cat states) keyed by its dataset index.

    DistributedSampler pads the dataset with repeated samples so every rank gets the same count; sum states would
    count those twice (measured: mA 0.500634 vs 0.50052). Gathering the samples with their index lets `samples()`
    keep each one exactly once, in index order, so 1 and N processes see identical inputs. `forward` only
    accumulates: a ranking metric of a single batch is meaningless.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, state_names: Sequence[str], **kwargs: Any):
        super().__init__(**kwargs)
        self._state_names = (*state_names, "indices")
        for name in self._state_names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def forward(self, *args: Any, **kwargs: Any) -> None:
        self.update(*args, **kwargs)

    def _append(self, indices: Any, batch_size: int, **states: Tensor) -> None:
        indices = torch.as_tensor(indices, device=self.device)
        if indices.shape != (batch_size,) or indices.is_floating_point():
            raise EvaluationError(f"{type(self).__name__}.update: indices must be an integer tensor of shape "
                                  f"({batch_size},) (one dataset index per sample), got {indices.dtype} "
                                  f"{tuple(indices.shape)}")
        for name, value in states.items():
            if value.shape[:1] != (batch_size,):
                raise EvaluationError(f"{type(self).__name__}.update: {name} must have {batch_size} rows (one per "
                                      f"sample), got shape {tuple(value.shape)}")
            getattr(self, name).append(value.detach())
        self.indices.append(indices.long())

    def samples(self, key_extra: str | None = None, check: Sequence[str] = ()) -> dict[str, Tensor]:
        """Every state with duplicate samples removed, sorted by (index, key_extra).

        Duplicates must agree on the states named in `check` (labels), else the indices do not identify samples.
        """
        if len(self.indices) == 0:
            raise EvaluationError(f"{type(self).__name__}.compute() called before any update()")
        states = {name: dim_zero_cat(getattr(self, name)) for name in self._state_names}
        key = states["indices"]
        if key_extra is not None:
            key = key * 2 + states[key_extra].long()
        unique, inverse = torch.unique(key, return_inverse=True)
        order = torch.arange(len(key), device=key.device)
        first = torch.full_like(unique, len(key)).scatter_reduce_(0, inverse, order, reduce="amin")
        for name in check:
            if not torch.equal(states[name][first][inverse], states[name]):
                raise EvaluationError(f"{type(self).__name__}: samples with the same index have different {name}; "
                                      "indices must identify dataset samples")
        return {name: value[first] for name, value in states.items()}
