"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017)
in bounded memory.

The textbook implementation holds several (Nq + Ng)^2 matrices: 35 GB each for MSMT17. Every quantity of the method
is local, though: the k-reciprocal sets need only each image's k1 + 1 nearest neighbours; the encodings V (Eq. 8-9)
are sparse (a few dozen non-zeros per row); local query expansion (Eq. 11) averages k2 sparse rows; the Jaccard
distance (Eq. 10/12) of a query to every gallery image only involves the gallery rows sharing a non-zero column with
it. So this module keeps neighbour lists and sparse rows, and produces the final distance (Eq. 13) one block of
queries at a time: peak memory is the features plus O(N * k1^2) plus one block.

Re-ranking many images takes a while (about 20 s for 10,000 on 2 CPU cores, minutes for MSMT17), so from
:data:`PROGRESS_MIN_IMAGES` images on it reports its progress on stderr, on rank zero only (every rank of a DDP run
computes the same distances): a start and an end line, and on a terminal a bar per phase, updated per block.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import Tensor

from pedlightning.data.progress import Bar, announce, is_rank_zero
from pedlightning.errors import EvaluationError
from pedlightning.metrics.ranking import (
    BLOCK_MEMORY_BYTES,
    DistanceMetric,
    as_features,
    auto_block_size,
    expand_ranges,
    prepare_features,
)

_PAIR_BUDGET = BLOCK_MEMORY_BYTES // 48
"""Query/gallery pairs sharing a non-zero column handled at once in the Jaccard step (about 48 bytes each)."""

PROGRESS_MIN_IMAGES = 10_000
"""Re-ranking of at least this many query + gallery images reports its progress (see the module docstring)."""


def _squared_distance(a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
    return torch.addmm(b_sq[None], a, b.T, alpha=-2).add_(a_sq[:, None]).clamp_(min=0)


class KReciprocalReranker:
    """Re-ranked query-to-gallery distances, produced per query block: `reranker(start, stop)` -> (b, Ng) tensor.

    Args:
        query, gallery: float32 features. The original distance d is their squared Euclidean distance, normalised
            by each row's maximum over all Nq + Ng images, as in the authors' feature-based code. Assumption: for
            cosine evaluation pass L2-normalised features (d = 2 - 2 cos).
        k1: neighbours of the k-reciprocal sets R(p, k1) (paper: 20); the expansion uses round(k1 / 2).
        k2: neighbours averaged by local query expansion (paper: 6; 1 disables it). When there are fewer than
            k1 + 1 (or k2) images in all, k1, k2 and round(k1 / 2) are lowered to what exists, with a warning naming
            the values: the authors' code slices its neighbour lists, which does the same silently.
        lambda_value: weight of the original distance in the final distance (paper: 0.3).
        block_size: rows per block of the neighbour search; None picks it from the memory budget.
        progress: report progress on stderr (rank zero only); None: from :data:`PROGRESS_MIN_IMAGES` query +
            gallery images on.

    Ties between neighbour distances are broken by `torch.topk` (the textbook's `np.argsort` breaks them arbitrarily
    too).
    """

    def __init__(self, query: Tensor, gallery: Tensor, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                 block_size: int | None = None, progress: bool | None = None):
        x = torch.cat([query, gallery])
        n = len(x)
        for name, value in (("k1", k1), ("k2", k2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvaluationError(f"re-ranking {name} must be a positive integer, got {value!r}")
        half = round(k1 / 2)
        if max(k1 + 1, k2) > n:  # as the textbook code, whose neighbour-list slices stop at what exists
            clamped = (min(k1, n - 1), min(k2, n), min(half, n - 1))
            warnings.warn(f"re-ranking: k1 = {k1} needs k1 + 1 = {k1 + 1} neighbours and k2 = {k2} needs {k2}, but "
                          f"there are only {n} query + gallery images; using k1 = {clamped[0]}, k2 = {clamped[1]} "
                          f"and round(k1 / 2) = {clamped[2]}", UserWarning, stacklevel=2)
            k1, k2, half = clamped
        if not 0.0 <= lambda_value <= 1.0:
            raise EvaluationError(f"re-ranking lambda_value must lie in [0, 1], got {lambda_value!r}")
        self._report = (n >= PROGRESS_MIN_IMAGES if progress is None else progress) and is_rank_zero()
        self._started = time.perf_counter()
        self._distance_bar: Bar | None = None
        if self._report:
            announce(f"re-ranking {len(query)} queries against {len(gallery)} gallery images (k-reciprocal, k1={k1}, "
                     f"k2={k2}) ...")
        self.num_query, self.lambda_value = len(query), float(lambda_value)
        self._x, self._sq = x, (x * x).sum(1)
        neighbours, row_max = self._neighbours(max(k1 + 1, k2), block_size or auto_block_size(n, 12))
        self._row_max = row_max.clamp_min(torch.finfo(torch.float32).tiny)
        crow, col, val = self._encode(neighbours, k1, half)
        if k2 > 1:
            crow, col, val = _average_rows(crow, col, val, neighbours[:, :k2], report=self._report)
        self._query_crow, self._query_col, self._query_val = crow[: self.num_query + 1], col, val
        self._gallery_by_column(crow, col, val, n)

    def _neighbours(self, k: int, rows: int) -> tuple[Tensor, Tensor]:
        """Each image's k nearest images (itself included, ascending) and its largest distance."""
        x, sq = self._x, self._sq
        neighbours = torch.empty(len(x), k, dtype=torch.int64, device=x.device)
        row_max = torch.empty(len(x), device=x.device)
        bar = Bar(len(x), "re-ranking: neighbours", self._report)
        for start in range(0, len(x), rows):
            d = _squared_distance(x[start:start + rows], x, sq[start:start + rows], sq)
            row_max[start:start + rows] = d.max(1).values
            neighbours[start:start + rows] = d.topk(k, dim=1, largest=False, sorted=True).indices
            bar.update(len(d))
        bar.close()
        return neighbours, row_max

    def _pair_distance(self, row: Tensor, col: Tensor, chunk: int = 8192) -> Tensor:
        """Squared distances of the image pairs (row[i], col[i]), gathered a chunk at a time."""
        dot = torch.cat([(self._x[r] * self._x[c]).sum(1) for r, c in zip(row.split(chunk), col.split(chunk))])
        return (self._sq[row] + self._sq[col] - 2 * dot).clamp_min(0)

    def _encode(self, neighbours: Tensor, k1: int, half: int, rows: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
        """Sparse V (Eq. 7-9): Gaussian-kernel weights over each image's expanded k-reciprocal set, in CSR form.

        `half` is round(k1 / 2), the size of the candidates' own reciprocal sets (Eq. 6)."""
        n = len(neighbours)
        half_ok = torch.cat([_reciprocal(neighbours, half, torch.arange(s, min(s + 4096, n), device=neighbours.device))
                             for s in range(0, n, 4096)])
        cols, vals, lengths = [], [], []
        bar = Bar(n, "re-ranking: encodings", self._report)
        for start in range(0, n, rows):
            idx = torch.arange(start, min(start + rows, n), device=neighbours.device)
            r_idx = neighbours[idx, : k1 + 1]
            r_ok = _reciprocal(neighbours, k1, idx)
            c_idx, c_ok = neighbours[r_idx, : half + 1], half_ok[r_idx]  # R(c, k1/2) of every candidate c
            r_set = torch.where(r_ok, r_idx, -1)
            overlap = ((c_idx[..., None] == r_set[:, None, None, :]).any(-1) & c_ok).sum(-1)
            expand = r_ok & (3 * overlap > 2 * c_ok.sum(-1))  # Eq. 6: |R(c) & R(p)| > 2/3 |R(c)|
            members = torch.cat([torch.where(r_ok, r_idx, n),
                                 torch.where(expand[..., None] & c_ok, c_idx, n).flatten(1)], 1).sort(1).values
            keep = members < n
            keep[:, 1:] &= members[:, 1:] != members[:, :-1]
            local, pos = keep.nonzero(as_tuple=True)
            row, col = idx[local], members[local, pos]
            w = torch.exp(-self._pair_distance(row, col) / self._row_max[row])
            counts = keep.sum(1)
            total = torch.zeros(len(idx), device=w.device).index_add_(0, local, w)
            cols.append(col)
            vals.append(w / total[local])
            lengths.append(counts)
            bar.update(len(idx))
        bar.close()
        crow = torch.zeros(n + 1, dtype=torch.int64, device=neighbours.device)
        crow[1:] = torch.cat(lengths).cumsum(0)
        return crow, torch.cat(cols), torch.cat(vals)

    def _gallery_by_column(self, crow: Tensor, col: Tensor, val: Tensor, n: int) -> None:
        """The gallery rows of V in CSC form, so a query finds the gallery images sharing each non-zero column."""
        start = int(crow[self.num_query])
        g_row = torch.repeat_interleave(torch.arange(len(crow) - 1 - self.num_query, device=col.device),
                                        crow[self.num_query + 1:] - crow[self.num_query:-1])
        g_col, g_val = col[start:], val[start:]
        order = torch.argsort(g_col, stable=True)
        self._g_row, self._g_val = g_row[order], g_val[order]
        self._g_colcount = torch.bincount(g_col, minlength=n)
        self._g_colptr = self._g_colcount.cumsum(0) - self._g_colcount

    def __call__(self, start: int, stop: int) -> Tensor:
        """Eq. 13: (1 - lambda) d_J + lambda d for queries start..stop against the whole gallery."""
        num_gallery = len(self._x) - self.num_query
        if self._report and self._distance_bar is None:
            self._distance_bar = Bar(self.num_query, "re-ranking: distances", unit="query")
        lo, hi = int(self._query_crow[start]), int(self._query_crow[stop])
        e_row = torch.repeat_interleave(torch.arange(stop - start, device=self._x.device),
                                        self._query_crow[start + 1:stop + 1] - self._query_crow[start:stop])
        e_col, e_val = self._query_col[lo:hi], self._query_val[lo:hi]
        counts = self._g_colcount[e_col]
        chunk = torch.div(counts.cumsum(0) - counts, _PAIR_BUDGET, rounding_mode="floor")
        shared = torch.zeros((stop - start) * num_gallery, device=self._x.device)
        begin = 0
        for end in torch.unique_consecutive(chunk, return_counts=True)[1].cumsum(0).tolist():
            # Eq. 12: sum over the columns a query shares with each gallery image of min(V_q, V_g)
            owner, pos = expand_ranges(self._g_colptr[e_col[begin:end]], counts[begin:end])
            entry = owner + begin
            shared.index_add_(0, e_row[entry] * num_gallery + self._g_row[pos],
                              torch.minimum(e_val[entry], self._g_val[pos]))
            begin = end
        shared = shared.view(stop - start, num_gallery)
        jaccard = 1 - shared / (2 - shared)  # rows of V sum to 1, so sum(max) = 2 - sum(min)
        original = _squared_distance(self._x[start:stop], self._x[self.num_query:], self._sq[start:stop],
                                     self._sq[self.num_query:]) / self._row_max[start:stop, None]
        self._reported(start, stop)
        return jaccard.mul_(1 - self.lambda_value).add_(original, alpha=self.lambda_value)

    def _reported(self, start: int, stop: int) -> None:
        """Progress of the distance blocks; the end line once the last query's block is done."""
        if self._distance_bar is None:
            return
        self._distance_bar.update(stop - start)
        if stop >= self.num_query:
            self._distance_bar.close()
            self._distance_bar = None
            self._report = False
            announce(f"re-ranking done in {time.perf_counter() - self._started:.1f} s")


def _reciprocal(neighbours: Tensor, k: int, idx: Tensor) -> Tensor:
    """(len(idx), k + 1) mask: neighbour j of image i is k-reciprocal, i.e. i is among j's k + 1 nearest (Eq. 3)."""
    forward = neighbours[idx, : k + 1]
    return (neighbours[forward, : k + 1] == idx[:, None, None]).any(-1)


def _average_rows(crow: Tensor, col: Tensor, val: Tensor, neighbours: Tensor, rows: int = 4096,
                  report: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Local query expansion (Eq. 11): row i becomes the mean of the rows of its k2 nearest images, in CSR form."""
    n, k2 = neighbours.shape
    lengths = crow[1:] - crow[:-1]
    out_col, out_val, out_len = [], [], []
    bar = Bar(n, "re-ranking: query expansion", report)
    for start in range(0, n, rows):
        nbr = neighbours[start:start + rows].reshape(-1)
        owner, pos = expand_ranges(crow[nbr], lengths[nbr])
        row = torch.div(owner, k2, rounding_mode="floor")
        key, inverse = torch.unique(row * n + col[pos], return_inverse=True)
        summed = torch.zeros(len(key), device=val.device).index_add_(0, inverse, val[pos])
        out_col.append(key % n)
        out_val.append(summed / k2)
        out_len.append(torch.bincount(torch.div(key, n, rounding_mode="floor"), minlength=len(nbr) // k2))
        bar.update(len(nbr) // k2)
    bar.close()
    new_crow = torch.zeros(n + 1, dtype=torch.int64, device=crow.device)
    new_crow[1:] = torch.cat(out_len).cumsum(0)
    return new_crow, torch.cat(out_col), torch.cat(out_val)


def k_reciprocal_distance(query_feats: Tensor, gallery_feats: Tensor, *, metric: DistanceMetric = "cosine",
                          k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> Tensor:
    """The full (Nq, Ng) re-ranked distance matrix; for small sets (evaluation uses the block-wise reranker).

    metric='cosine' L2-normalises the features first; 'euclidean' uses them as given.
    """
    q, g = as_features(query_feats, "query_feats"), as_features(gallery_feats, "gallery_feats")
    q, g = prepare_features(q, g.to(q.device), metric)
    return KReciprocalReranker(q, g, k1=k1, k2=k2, lambda_value=lambda_value)(0, len(q))
