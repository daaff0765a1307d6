"""Text-to-image retrieval metrics against an independent implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pedlightning.errors import EvaluationError
from pedlightning.metrics import RetrievalMetric, retrieval_evaluate


def reference(qf, gf, q_pids, g_pids, ranks=(1, 5, 10), ties="gallery_order"):
    """Every query sorts the whole gallery by cosine similarity (no camera filtering); ties as `reid_evaluate`'s
    rules: the stable sort keeps gallery order, the others sort negatives before / after tied positives."""
    qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gf = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    sim = qf.astype(np.float64) @ gf.astype(np.float64).T
    aps, inps, firsts = [], [], []
    for i in range(len(qf)):
        positive = g_pids == q_pids[i]
        order = {"gallery_order": lambda: np.argsort(-sim[i], kind="stable"),
                 "pessimistic": lambda: np.lexsort((positive, -sim[i])),
                 "optimistic": lambda: np.lexsort((~positive, -sim[i]))}[ties]()
        match = positive[order]
        if not match.any():
            continue
        hit_ranks = np.flatnonzero(match) + 1
        aps.append(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks))
        inps.append(len(hit_ranks) / hit_ranks[-1])
        firsts.append(hit_ranks[0])
    out = {"mAP": np.mean(aps), "mINP": np.mean(inps), "num_valid_queries": len(aps)}
    out.update({f"rank{k}": np.mean(np.array(firsts) <= k) for k in ranks})
    return out


def captions_and_images(seed=0, num_ids=40, dim=24):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    img_pids = np.repeat(np.arange(num_ids), rng.integers(1, 5, num_ids))
    txt_pids = np.concatenate([np.repeat(img_pids, 2), [num_ids + 7]])  # two captions per image + one orphan
    imgs = centres[img_pids] + 1.0 * rng.normal(size=(len(img_pids), dim))
    txts = centres[txt_pids % num_ids] + 1.3 * rng.normal(size=(len(txt_pids), dim))
    return txts.astype(np.float32), imgs.astype(np.float32), txt_pids, img_pids


def test_matches_reference_both_directions():
    txts, imgs, tp, ip = captions_and_images()
    expected = reference(txts, imgs, tp, ip)
    result = retrieval_evaluate(txts, imgs, tp, ip, block_size=17)
    assert 0.2 < expected["mAP"] < 0.95 and expected["num_valid_queries"] == len(tp) - 1  # orphan skipped
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key
    assert result["num_valid_queries"] == expected["num_valid_queries"]
    i2t = retrieval_evaluate(imgs, txts, ip, tp, ranks=(1, 3))
    expected = reference(imgs, txts, ip, tp, ranks=(1, 3))
    assert {k: pytest.approx(v, abs=1e-9) for k, v in expected.items()} == i2t


@pytest.mark.parametrize("ties", ["pessimistic", "gallery_order", "optimistic"])
def test_tie_rules_match_reference_on_quantised_features(ties):
    """Unit vectors +-e_i and (+-1/2, +-1/2, +-1/2, +-1/2): every similarity is an exact multiple of 1/4 in any
    precision and summation order, so ties are exact and many."""
    rng = np.random.default_rng(3)
    signs = np.array(np.meshgrid(*[[-0.5, 0.5]] * 4)).reshape(4, -1).T
    units = np.concatenate([np.eye(4), -np.eye(4), signs]).astype(np.float32)
    imgs, txts = units[rng.integers(0, len(units), 120)], units[rng.integers(0, len(units), 60)]
    ip, tp = rng.integers(0, 8, 120), rng.integers(0, 8, 60)
    expected = reference(txts, imgs, tp, ip, ties=ties)
    result = retrieval_evaluate(txts, imgs, tp, ip, ties=ties, block_size=11)
    for key in ("rank1", "rank5", "mAP", "mINP"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key
    if ties != "gallery_order":
        assert result["mAP"] != retrieval_evaluate(txts, imgs, tp, ip, ties="gallery_order")["mAP"]


def test_metric_class_reports_its_tie_rule():
    assert RetrievalMetric().description == \
        "cosine similarity, ties: pessimistic (a positive tied with negatives ranks after them)"
    assert "ties: gallery_order (tied items keep their gallery order" in RetrievalMetric(ties="gallery_order").description
    with pytest.raises(EvaluationError, match="ties must be one of 'pessimistic', 'gallery_order', 'optimistic'"):
        RetrievalMetric(ties="stable")


def test_perfect_case():
    imgs = np.eye(5, dtype=np.float32)
    txts = np.repeat(np.eye(5, dtype=np.float32), 2, axis=0) + 0.05
    result = retrieval_evaluate(txts, imgs, np.repeat(np.arange(5), 2), np.arange(5))
    assert result == {"rank1": 1.0, "rank5": 1.0, "rank10": 1.0, "mAP": 1.0, "mINP": 1.0, "num_valid_queries": 10}


def test_no_camera_filtering_and_no_valid_query():
    # identical features, same "camera": still a rank-1 hit for retrieval
    result = retrieval_evaluate(np.ones((1, 3)), np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]), [4], [4, 5])
    assert result["rank1"] == 1.0
    with pytest.raises(EvaluationError, match="No query identity"):
        retrieval_evaluate(np.ones((2, 3)), np.ones((2, 3)), [1, 2], [3, 4])


def test_metric_class_with_image_to_text_and_padding_duplicates():
    txts, imgs, tp, ip = captions_and_images(seed=1)
    metric = RetrievalMetric(image_to_text=True)
    img_order = np.r_[np.arange(len(imgs)), [0, 1]]
    txt_order = np.r_[np.arange(len(txts))[::-1], [2]]
    for chunk in np.array_split(img_order, 3):
        metric.update(torch.from_numpy(imgs[chunk]), torch.from_numpy(ip[chunk]), False, torch.from_numpy(chunk))
    for chunk in np.array_split(txt_order, 4):
        metric.update(torch.from_numpy(txts[chunk]), torch.from_numpy(tp[chunk]), True, torch.from_numpy(chunk))
    result = metric.compute()
    t2i, i2t = retrieval_evaluate(txts, imgs, tp, ip), retrieval_evaluate(imgs, txts, ip, tp)
    assert result == {**t2i, **{f"i2t_{k}": v for k, v in i2t.items()}}
