"""reID evaluation against an independent per-query implementation, hand-made cases, and re-ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pedlightning.errors import EvaluationError, PedLightningError
from pedlightning.metrics import ReIDMetric, k_reciprocal_distance, reid_evaluate

KEYS = ("mAP", "mINP", "rank1", "rank5", "rank10")


def reference_eval(dist, q_pids, g_pids, q_cams, g_cams, ranks=(1, 5, 10), ties="pessimistic"):
    """Classic Market-1501 evaluation (torchreid's eval_market1501), one query at a time.

    Ties: "pessimistic" sorts a negative before a tied positive, "optimistic" after it, "gallery_order" sorts the
    distances with a stable sort (what torchreid's np.argsort gives when it happens to be stable)."""
    aps, inps, cmcs = [], [], []
    for i in range(len(q_pids)):
        keep = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
        d, match = dist[i][keep], g_pids[keep] == q_pids[i]
        order = {"pessimistic": lambda: np.lexsort((match, d)), "optimistic": lambda: np.lexsort((~match, d)),
                 "gallery_order": lambda: np.argsort(d, kind="stable")}[ties]()
        match = match[order].astype(np.float64)
        if not match.any():
            continue
        hits = match.cumsum()
        aps.append((hits / np.arange(1, len(match) + 1) * match).sum() / match.sum())
        inps.append(match.sum() / (np.flatnonzero(match)[-1] + 1))
        cmc = np.minimum(hits, 1)
        cmcs.append(np.pad(cmc, (0, max(0, max(ranks) - len(cmc))), mode="edge")[: max(ranks)])
    cmc = np.mean(cmcs, axis=0)
    out = {"mAP": np.mean(aps), "mINP": np.mean(inps), "num_valid_queries": len(aps)}
    out.update({f"rank{k}": cmc[k - 1] for k in ranks})
    return out


def cosine_dist(q, g):
    q = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    g = g.astype(np.float64) / np.linalg.norm(g, axis=1, keepdims=True)
    return -q @ g.T


def synthetic_reid(seed=0, num_ids=60, num_cams=4, dim=32, noise=1.2, num_query=150, num_gallery=900,
                   num_distractors=120, single_camera_ids=3):
    """Identity centres + noise; several cameras; distractors (pid 0) only in the gallery; the last
    `single_camera_ids` identities have all their images in camera 0, so their queries have no valid match."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids + 1, dim))
    q_pids = rng.integers(1, num_ids + 1, num_query)
    g_pids = np.concatenate([rng.integers(1, num_ids + 1, num_gallery - num_distractors),
                             np.zeros(num_distractors, dtype=np.int64)])
    q_cams, g_cams = rng.integers(0, num_cams, num_query), rng.integers(0, num_cams, num_gallery)
    single = np.arange(num_ids + 1 - single_camera_ids, num_ids + 1)
    q_cams[np.isin(q_pids, single)], g_cams[np.isin(g_pids, single)] = 0, 0
    qf = centres[q_pids] + noise * rng.normal(size=(num_query, dim))
    gf = centres[g_pids] + noise * rng.normal(size=(num_gallery, dim))
    gf[g_pids == 0] = 2 * rng.normal(size=(num_distractors, dim))
    return qf.astype(np.float32), gf.astype(np.float32), q_pids, g_pids, q_cams, g_cams


def assert_same(result, expected, tol=1e-6):
    for key in KEYS:
        assert result[key] == pytest.approx(expected[key], abs=tol), key
    assert result["num_valid_queries"] == expected["num_valid_queries"]


def test_matches_reference_on_random_data():
    qf, gf, qp, gp, qc, gc = synthetic_reid()
    expected = reference_eval(cosine_dist(qf, gf), qp, gp, qc, gc)
    assert 0.2 < expected["mAP"] < 0.9 and expected["num_valid_queries"] < len(qp)  # non-trivial, some skipped
    result = reid_evaluate(qf, gf, qp, gp, qc, gc)
    assert_same(result, expected)
    assert set(result) == {*KEYS, "num_valid_queries"}


def tied_case(seed=1):
    """Small-integer features: exact, heavily tied squared distances."""
    rng = np.random.default_rng(seed)
    qf, gf = rng.integers(0, 3, (80, 4)).astype(np.float32), rng.integers(0, 3, (400, 4)).astype(np.float32)
    qp, gp = rng.integers(0, 12, 80), rng.integers(0, 12, 400)
    qc, gc = rng.integers(0, 3, 80), rng.integers(0, 3, 400)
    return qf, gf, qp, gp, qc, gc


@pytest.mark.parametrize("ties", ["pessimistic", "gallery_order", "optimistic"])
def test_matches_reference_with_many_ties(ties):
    qf, gf, qp, gp, qc, gc = tied_case()
    dist = ((qf[:, None].astype(np.float64) - gf[None]) ** 2).sum(-1)
    expected = reference_eval(dist, qp, gp, qc, gc, ties=ties)
    assert_same(reid_evaluate(qf, gf, qp, gp, qc, gc, metric="euclidean", block_size=7, ties=ties), expected)


def test_tie_rules_are_ordered_and_differ_on_tied_features():
    qf, gf, qp, gp, qc, gc = tied_case(seed=2)
    low, mid, high = (reid_evaluate(qf, gf, qp, gp, qc, gc, metric="euclidean", ties=t)
                      for t in ("pessimistic", "gallery_order", "optimistic"))
    for key in KEYS:
        assert low[key] <= mid[key] <= high[key], key
    assert low["mAP"] < mid["mAP"] < high["mAP"] and high["rank1"] - low["rank1"] > 0.05
    # continuous features have no ties: every rule gives the same numbers
    qf, gf, qp, gp, qc, gc = synthetic_reid()
    assert reid_evaluate(qf, gf, qp, gp, qc, gc, ties="optimistic") == reid_evaluate(qf, gf, qp, gp, qc, gc)


@pytest.mark.parametrize("ties, ap, first", [("pessimistic", (1 / 4 + 2 / 5) / 2, 4),
                                             ("gallery_order", (1 / 3 + 2 / 5) / 2, 3),
                                             ("optimistic", (1 / 2 + 2 / 5) / 2, 2)])
def test_tie_rules_by_hand(ties, ap, first):
    # squared distances: 1 (neg), 1 (pos), 1 (neg), 4 (pos), 0.25 (neg)
    result = reid_evaluate([[0.0]], [[1.0], [1.0], [1.0], [2.0], [0.5]], [1], [9, 1, 9, 1, 9], [0], [1] * 5,
                           metric="euclidean", ranks=(1, 2, 3, 4), ties=ties)
    assert result["mAP"] == pytest.approx(ap) and result["mINP"] == pytest.approx(2 / 5)
    assert [result[f"rank{k}"] for k in (1, 2, 3, 4)] == [float(first <= k) for k in (1, 2, 3, 4)]
    # the only positive comes first in the gallery and ties with the negative after it (distances 1, 1, 4)
    result = reid_evaluate([[5.0]], [[6.0], [4.0], [7.0]], [2], [2, 9, 9], [0], [1, 1, 1], metric="euclidean",
                           ranks=(1,), ties=ties)
    assert result["mAP"] == (0.5 if ties == "pessimistic" else 1.0)


def test_constant_features_score_worst_case_not_perfect():
    result = reid_evaluate(np.ones((2, 4)), np.ones((4, 4)), [1, 2], [1, 2, 3, 3], [0, 0], [1, 1, 1, 1],
                           ranks=(1, 4))
    # each query has one positive, tied with all 4 gallery items -> ranked last
    assert result["mAP"] == 0.25 and result["rank1"] == 0.0 and result["rank4"] == 1.0


def test_perfect_ranking_gives_ones():
    qf = np.eye(4, dtype=np.float32)
    gf = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0) + 0.01
    result = reid_evaluate(qf, gf, [1, 2, 3, 4], np.repeat([1, 2, 3, 4], 3), [0] * 4, [1] * 12)
    assert all(result[k] == 1.0 for k in KEYS) and result["num_valid_queries"] == 4


def test_same_camera_removal_changes_rank1():
    # gallery: a same-id same-camera copy (removed), a negative, then the cross-camera match
    qf = np.array([[1.0, 0.0]])
    gf = np.array([[1.0, 0.01], [1.0, 0.2], [1.0, 0.5]])
    result = reid_evaluate(qf, gf, [7], [7, 3, 7], [0], [0, 1, 2], ranks=(1, 2))
    assert result["rank1"] == 0.0 and result["rank2"] == 1.0
    assert result["mAP"] == pytest.approx(0.5) and result["mINP"] == pytest.approx(0.5)
    # the same gallery in another camera is a rank-1 hit
    result = reid_evaluate(qf, gf, [7], [7, 3, 7], [0], [5, 1, 2], ranks=(1, 2))
    assert result["rank1"] == 1.0 and result["mAP"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["mINP"] == pytest.approx(2 / 3)


def test_query_without_valid_match_is_skipped():
    qf = np.array([[1.0, 0.0], [0.0, 1.0]])
    gf = np.array([[1.0, 0.1], [0.0, 1.0], [0.7, 0.7]])
    # query 2's only match is in its own camera -> skipped; query 1 is a perfect hit
    result = reid_evaluate(qf, gf, [1, 2], [1, 2, 9], [0, 0], [1, 0, 1])
    assert result["num_valid_queries"] == 1 and result["mAP"] == 1.0 and result["rank1"] == 1.0


def test_no_valid_query_explains_single_camera_trap():
    qf, gf, qp, gp, _, _ = synthetic_reid(num_distractors=0)
    with pytest.raises(EvaluationError, match="distinct camera ids") as info:
        reid_evaluate(qf, gf, qp, gp, np.zeros(len(qp)), np.zeros(len(gp)))
    assert isinstance(info.value, PedLightningError) and isinstance(info.value, ValueError)
    assert "same camera" in str(info.value) or "camera id" in str(info.value)
    with pytest.raises(EvaluationError, match="None of the query identities"):
        reid_evaluate(qf, gf, qp + 1000, gp, np.zeros(len(qp)), np.ones(len(gp)))


def test_euclidean_on_normalised_features_equals_cosine():
    qf, gf, qp, gp, qc, gc = synthetic_reid(seed=2)
    qn, gn = qf / np.linalg.norm(qf, axis=1, keepdims=True), gf / np.linalg.norm(gf, axis=1, keepdims=True)
    cosine = reid_evaluate(qf, gf, qp, gp, qc, gc)
    assert_same(reid_evaluate(qn, gn, qp, gp, qc, gc, metric="euclidean"), cosine)


def test_block_size_and_input_types_do_not_change_results():
    qf, gf, qp, gp, qc, gc = synthetic_reid(seed=3)
    base = reid_evaluate(qf, gf, qp, gp, qc, gc)
    for block_size in (1, 7, 1000):
        assert reid_evaluate(qf, gf, qp, gp, qc, gc, block_size=block_size) == base
    tensors = [torch.from_numpy(a) for a in (qf, gf, qp, gp, qc, gc)]
    assert reid_evaluate(*tensors) == base
    # bf16 features are ranked in float32 (close to, not equal to, the float32 result)
    low = reid_evaluate(tensors[0].bfloat16(), tensors[1].bfloat16(), *tensors[2:])
    assert low["mAP"] == pytest.approx(base["mAP"], abs=0.02)


@pytest.mark.parametrize("bad, match", [
    (dict(gallery_pids=np.zeros(3)), "gallery_pids must be a 1-D array with 900 entries"),
    (dict(query_feats=np.full((150, 32), np.nan)), "query_feats contains NaN"),
    (dict(gallery_feats=np.zeros((900, 8))), "dimension"),
    (dict(metric="manhattan"), "metric must be"),
    (dict(block_size=0), "block_size"),
    (dict(ranks=(0,)), "ranks"),
    (dict(ties="random"), "ties must be one of"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    qf, gf, qp, gp, qc, gc = synthetic_reid()
    args = dict(query_feats=qf, gallery_feats=gf, query_pids=qp, gallery_pids=gp, query_camids=qc, gallery_camids=gc)
    args.update(bad)
    with pytest.raises(EvaluationError, match=match):
        reid_evaluate(**args)


def test_metric_class_equals_function_and_drops_padding_duplicates():
    qf, gf, qp, gp, qc, gc = synthetic_reid(seed=4)
    expected = reid_evaluate(qf, gf, qp, gp, qc, gc)
    metric = ReIDMetric()
    # gallery first, in two batches; then queries, with the first 5 queries repeated (sampler padding)
    metric.update(torch.from_numpy(gf[:500]), torch.from_numpy(gp[:500]), torch.from_numpy(gc[:500]), False,
                  torch.arange(500))
    metric.update(torch.from_numpy(gf[500:]), torch.from_numpy(gp[500:]), torch.from_numpy(gc[500:]), False,
                  torch.arange(500, len(gf)))
    order = np.r_[np.arange(len(qf))[::-1], np.arange(5)]
    metric.update(torch.from_numpy(qf[order]).bfloat16().float(), torch.from_numpy(qp[order]),
                  torch.from_numpy(qc[order]), torch.ones(len(order), dtype=torch.bool), torch.from_numpy(order))
    result = metric.compute()
    # queries went through bf16, so compare to the function on the same features
    qb = torch.from_numpy(qf).bfloat16().float()
    assert result == reid_evaluate(qb, gf, qp, gp, qc, gc)
    assert result["mAP"] == pytest.approx(expected["mAP"], abs=0.02)
    assert metric.description == "cosine distance, ties: pessimistic (a positive tied with negatives ranks after " \
        "them), no re-ranking"
    assert ReIDMetric(metric="euclidean", rerank=True, ties="optimistic").description == \
        "euclidean distance, ties: optimistic (a positive tied with negatives ranks before them), k-reciprocal " \
        "re-ranking (k1=20, k2=6, lambda=0.3)"
    conflicting_pid = torch.tensor([qp[0] + 1000])
    metric.update(torch.from_numpy(qf[:1]), conflicting_pid, torch.tensor([qc[0]]), True, torch.tensor([0]))
    with pytest.raises(EvaluationError, match="same index have different pids"):
        metric.compute()


# ------------------------------------------------------------------------------------------------ re-ranking


def textbook_rerank(qf, gf, k1, k2, lam):
    """Dense k-reciprocal re-ranking written from the paper's equations, all (N, N) matrices in float64."""
    x = np.concatenate([qf, gf]).astype(np.float64)
    n, nq = len(x), len(qf)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    d = d / d.max(axis=1, keepdims=True)
    order = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i, k):
        return [j for j in order[i, : k + 1] if i in order[j, : k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        members = set(r)
        for c in r:
            rc = reciprocal(c, int(np.around(k1 / 2)))
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                members |= set(rc)
        idx = sorted(members)
        w = np.exp(-d[i, idx])
        v[i, idx] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[order[i, :k2]].mean(0) for i in range(n)])
    jaccard = np.array([[1 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum() for j in range(nq, n)]
                        for i in range(nq)])
    return (1 - lam) * jaccard + lam * d[:nq, nq:]


@pytest.mark.parametrize("k1, k2, lam, metric", [(20, 6, 0.3, "cosine"), (7, 1, 0.5, "euclidean"),
                                                  (5, 3, 0.0, "euclidean")])
def test_rerank_equals_dense_textbook(k1, k2, lam, metric):
    qf, gf, *_ = synthetic_reid(seed=5, num_ids=12, dim=8, noise=0.8, num_query=30, num_gallery=110,
                                num_distractors=10)
    ours = k_reciprocal_distance(qf, gf, metric=metric, k1=k1, k2=k2, lambda_value=lam).numpy()
    if metric == "cosine":
        qf, gf = qf / np.linalg.norm(qf, axis=1, keepdims=True), gf / np.linalg.norm(gf, axis=1, keepdims=True)
    expected = textbook_rerank(qf, gf, k1, k2, lam)
    assert 0.05 < expected.std()  # jaccard terms are not all 1
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_rerank_promotes_the_reciprocal_match():
    # q's nearest image n belongs to a tight cluster B that does not see q; q's true matches A see q back
    q = np.array([[0.0, 0.0]])
    a = np.array([[1.0, 0.05], [1.0, -0.05], [1.05, 0.0]])
    b = np.array([[0.0, 1.3], [0.05, 1.35], [-0.05, 1.35]])
    gallery = np.concatenate([a, [[0.0, 0.8]], b])
    pids, cams = [1, 1, 1, 2, 2, 2, 2], [1, 2, 3, 1, 2, 3, 1]
    args = (q, gallery, [1], pids, [0], cams)
    plain = reid_evaluate(*args, metric="euclidean", ranks=(1,))
    reranked = reid_evaluate(*args, metric="euclidean", ranks=(1,), rerank=True, k1=3, k2=1)
    assert plain["rank1"] == 0.0 and plain["mAP"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    assert reranked["rank1"] == 1.0 and reranked["mAP"] == 1.0
    dist = k_reciprocal_distance(q, gallery, metric="euclidean", k1=3, k2=1)[0]
    assert dist[:3].max() < dist[3:].min()


def test_rerank_block_sizes_agree_and_bad_k_is_explained():
    qf, gf, qp, gp, qc, gc = synthetic_reid(seed=6, num_query=40, num_gallery=200, num_distractors=20)
    a = reid_evaluate(qf, gf, qp, gp, qc, gc, rerank=True)
    b = reid_evaluate(qf, gf, qp, gp, qc, gc, rerank=True, block_size=3)
    assert a == b and a["mAP"] != reid_evaluate(qf, gf, qp, gp, qc, gc)["mAP"]
    with pytest.raises(EvaluationError, match="k1"):
        reid_evaluate(qf, gf, qp, gp, qc, gc, rerank=True, k1=0)


@pytest.mark.parametrize("k1, k2, num_gallery", [(20, 6, 9), (6, 14, 9), (30, 30, 4)])
def test_rerank_small_gallery_uses_the_neighbours_that_exist(k1, k2, num_gallery):
    """Fewer than k1 + 1 (or k2) images: the textbook's slices stop at what exists; ours clamps and warns."""
    qf, gf, *_ = synthetic_reid(seed=7, num_ids=3, dim=6, num_query=4, num_gallery=num_gallery, num_distractors=1)
    n = len(qf) + len(gf)
    with pytest.warns(UserWarning, match=rf"k1 = {k1} .* only {n} query \+ gallery images; using "
                                         rf"k1 = {min(k1, n - 1)}, k2 = {min(k2, n)}"):
        ours = k_reciprocal_distance(qf, gf, metric="euclidean", k1=k1, k2=k2).numpy()
    expected = textbook_rerank(qf, gf, k1, k2, 0.3)
    assert expected.std() > 0.01
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
