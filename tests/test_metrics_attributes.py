"""Attribute metrics (PA-100K protocol) against an independent loop implementation and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pedlightning.errors import EvaluationError
from pedlightning.metrics import AttributeMetric, attribute_metrics


def reference(probs, targets, threshold=0.5, unlabelled_predictions="ignore"):
    """Straightforward loops; a ratio with an empty denominator counts as 0 (strong-baseline convention).

    Targets of -1 are unlabelled: skipped per attribute; in the instance sets T never holds them, P holds their
    positive predictions only with unlabelled_predictions="false_positive" (the strong baseline's code)."""
    pred = probs > threshold
    n, a = targets.shape

    def ratio(x, y):
        return x / y if y else 0.0

    pos, neg = [], []
    for j in range(a):
        labelled = targets[:, j] != -1
        t, p = targets[labelled, j] == 1, pred[labelled, j]
        pos.append(ratio(np.sum(t & p), np.sum(t)))
        neg.append(ratio(np.sum(~t & ~p), np.sum(~t)))
    acc, prec, rec = [], [], []
    for i in range(n):
        shown = pred[i] if unlabelled_predictions == "false_positive" else pred[i] & (targets[i] != -1)
        t, p = set(np.flatnonzero(targets[i] == 1)), set(np.flatnonzero(shown))
        acc.append(ratio(len(t & p), len(t | p)))
        prec.append(ratio(len(t & p), len(p)))
        rec.append(ratio(len(t & p), len(t)))
    mp, mr = np.mean(prec), np.mean(rec)
    ma = (np.array(pos) + np.array(neg)) / 2
    return {"mA": ma.mean(), "accuracy": np.mean(acc), "precision": mp, "recall": mr,
            "f1": ratio(2 * mp * mr, mp + mr), "pos": np.array(pos), "neg": np.array(neg), "ma": ma}


def random_case(seed=0, n=300, a=26):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, a)) < rng.uniform(0.05, 0.5, a)).astype(np.int64)
    targets[:5] = 0  # images with no positive attribute
    targets[:, 3] = 0  # an attribute without positives
    targets[:, 4] = 1  # an attribute without negatives
    logits = 2.5 * (2 * targets - 1) + rng.normal(0, 2, (n, a))
    probs = 1 / (1 + np.exp(-logits))
    probs[5:8] = 0.01  # images with no predicted attribute
    return probs, targets


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_matches_reference(threshold):
    probs, targets = random_case()
    expected = reference(probs, targets, threshold)
    result = attribute_metrics(torch.from_numpy(probs).float(), torch.from_numpy(targets), threshold)
    for key in ("mA", "accuracy", "precision", "recall", "f1"):
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key
        assert 0 < result[key] < 1
    per = result["per_attribute"]
    np.testing.assert_allclose(per["pos_recall"].numpy(), expected["pos"], atol=1e-12)
    np.testing.assert_allclose(per["neg_recall"].numpy(), expected["neg"], atol=1e-12)
    np.testing.assert_allclose(per["mA"].numpy(), expected["ma"], atol=1e-12)
    assert per["pos_recall"][3] == 0 and per["neg_recall"][4] == 0


def test_all_negative_predictions_give_zero_precision_not_nan():
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    result = attribute_metrics(np.zeros((3, 3)), targets)
    assert result["precision"] == 0.0 and result["recall"] == 0.0 and result["f1"] == 0.0
    assert result["accuracy"] == 0.0 and result["mA"] == 0.5  # TPR 0, TNR 1 for every attribute


def test_attribute_without_positives():
    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    probs = np.array([[0.9, 0.1], [0.2, 0.7], [0.8, 0.2], [0.1, 0.3]])
    result = attribute_metrics(probs, targets)
    per = result["per_attribute"]
    assert per["pos_recall"].tolist() == [1.0, 0.0]  # no positive target -> 0 by convention, never NaN
    assert per["neg_recall"].tolist() == [1.0, 0.75]
    assert result["mA"] == pytest.approx((1.0 + (0 + 0.75) / 2) / 2)
    # instance 2: P = {1}, T = {} -> precision 0, recall 0 (empty T), accuracy 0; instance 4: P = T = {} -> 0
    assert result["precision"] == pytest.approx(0.5) and result["recall"] == pytest.approx(0.5)
    assert result["accuracy"] == pytest.approx(0.5) and result["f1"] == pytest.approx(0.5)


def test_perfect_predictions_give_ones():
    targets = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]])
    result = attribute_metrics(targets * 0.8 + 0.1, targets)
    assert all(result[k] == 1.0 for k in ("mA", "accuracy", "precision", "recall", "f1"))
    assert bool((result["per_attribute"]["mA"] == 1).all())


def test_threshold_is_strict():
    result = attribute_metrics(np.array([[0.5, 0.51]]), np.array([[1, 1]]))
    assert result["per_attribute"]["pos_recall"].tolist() == [0.0, 1.0]


def test_unlabelled_targets_and_hard_predictions_by_hand():
    targets = np.array([[1, -1, 0], [-1, 1, 1], [0, 0, -1]])
    preds = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]])  # integer 0/1 predictions
    ignore = attribute_metrics(preds, targets)
    # attribute 0: TPR 1/1, TNR 0/1; attribute 1: 1/1, 1/1; attribute 2: 0/1, 1/1 (one unlabelled image each)
    assert ignore["per_attribute"]["mA"].tolist() == [0.5, 1.0, 0.5] and ignore["mA"] == pytest.approx(2 / 3)
    assert ignore["num_unlabelled"] == 3
    # labelled attributes only: image 0 P = T = {0}; image 1 P = {1}, T = {1, 2}; image 2 P = {0}, T = {}
    assert ignore["precision"] == pytest.approx(2 / 3) and ignore["recall"] == pytest.approx(0.5)
    assert ignore["accuracy"] == pytest.approx(0.5) and ignore["f1"] == pytest.approx(4 / 7)
    counted = attribute_metrics(preds, targets, unlabelled_predictions="false_positive")
    # image 0 P = {0, 1}: precision 1/2, accuracy 1/2; image 2 P = {0, 2}: 0
    assert counted["mA"] == ignore["mA"]
    assert counted["precision"] == pytest.approx(0.5) and counted["recall"] == pytest.approx(0.5)
    assert counted["accuracy"] == pytest.approx(1 / 3) and counted["f1"] == pytest.approx(0.5)
    # bool and float 0/1 predictions read the same as integers
    scalars = {k: v for k, v in ignore.items() if k != "per_attribute"}
    for same in (preds.astype(bool), preds.astype(np.float32), torch.from_numpy(preds)):
        assert {k: v for k, v in attribute_metrics(same, targets).items() if k != "per_attribute"} == scalars


@pytest.mark.parametrize("unlabelled_predictions", ["ignore", "false_positive"])
def test_unlabelled_targets_match_reference(unlabelled_predictions):
    probs, targets = random_case(seed=2)
    targets[np.random.default_rng(3).random(targets.shape) < 0.15] = -1
    expected = reference(probs, targets, unlabelled_predictions=unlabelled_predictions)
    result = attribute_metrics(probs, targets, unlabelled_predictions=unlabelled_predictions)
    for key in ("mA", "accuracy", "precision", "recall", "f1"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key
    np.testing.assert_allclose(result["per_attribute"]["mA"].numpy(), expected["ma"], atol=1e-12)
    assert result["num_unlabelled"] == int((targets == -1).sum())
    other = "ignore" if unlabelled_predictions == "false_positive" else "false_positive"
    assert result["precision"] != attribute_metrics(probs, targets, unlabelled_predictions=other)["precision"]


@pytest.mark.parametrize("probs, targets, match", [
    (np.array([[2.0, -1.0]]), np.array([[1, 0]]), "sigmoid"),
    (np.array([[0.2, 0.7]]), np.array([[1, 2]]), "-1 \\(unlabelled\\)"),
    (np.array([[0, 2]]), np.array([[1, 0]]), "hard 0/1 predictions"),
    (np.array([[0.2, 0.7]]), np.array([[1, 0, 1]]), "same shape"),
])
def test_bad_inputs(probs, targets, match):
    with pytest.raises(EvaluationError, match=match):
        attribute_metrics(probs, targets)


def test_bad_options():
    with pytest.raises(EvaluationError, match="unlabelled_predictions must be"):
        attribute_metrics(np.ones((1, 2)), np.ones((1, 2)), unlabelled_predictions="skip")
    with pytest.raises(EvaluationError, match="threshold"):
        attribute_metrics(np.ones((1, 2)), np.ones((1, 2)), threshold=1.0)


def test_metric_class_drops_padding_duplicates():
    probs, targets = random_case(seed=1, n=50)
    targets[::7, ::3] = -1  # unlabelled targets survive the metric's state
    p, t = torch.from_numpy(probs).float(), torch.from_numpy(targets)
    metric = AttributeMetric()
    order = torch.cat([torch.arange(49, -1, -1), torch.arange(3)])  # reversed, plus 3 padding repeats
    for chunk in order.split(16):
        metric.update(p[chunk], t[chunk], chunk)
    result = metric.compute()
    expected = attribute_metrics(p, t)
    assert {k: v for k, v in result.items() if k != "per_attribute"} == \
        {k: v for k, v in expected.items() if k != "per_attribute"}
    assert torch.equal(result["per_attribute"]["mA"], expected["per_attribute"]["mA"])
