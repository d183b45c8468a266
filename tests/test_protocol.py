"""The paper's evaluation protocol (issue 15): scikit-learn metrics, checkpoint averaging, the
class-balanced sampler, the test-time roll ensemble and ``htsat evaluate``."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

skm = pytest.importorskip("sklearn.metrics")

from htsat.training.metrics import (  # noqa: E402
    average_precision,
    d_prime,
    labelled_rows,
    mean_average_precision,
    multilabel_metrics,
    singlelabel_metrics,
)

# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_multilabel_metrics_equal_sklearn_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n, c = 80, 7
    targets = (rng.random((n, c)) < 0.25).astype(np.float32)
    targets[:, 0] = 1  # one class positive everywhere: AP defined, AUC not
    targets[:, 1] = 0  # one class without positives: left out of both
    scores = np.round(rng.random((n, c)), 1)  # ties
    m = multilabel_metrics(scores, targets)
    keep = targets.sum(axis=1) > 0
    y, s = targets[keep], scores[keep]
    ap = skm.average_precision_score(y[:, [0, *range(2, c)]], s[:, [0, *range(2, c)]], average=None)
    auc = skm.roc_auc_score(y[:, 2:], s[:, 2:], average=None)
    assert m["mAP"] == pytest.approx(np.mean(ap))
    assert m["mAUC"] == pytest.approx(np.mean(auc))
    assert m["dprime"] == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(np.mean(auc)))
    assert m["clips"] == int(keep.sum()) and m["clips_without_labels"] == int((~keep).sum())
    assert m["classes_without_positives"] == 1 and m["classes_without_negatives"] == 1
    assert math.isnan(m["per_class_ap"][1]) and math.isnan(m["per_class_auc"][1]) and math.isnan(m["per_class_auc"][0])
    assert m["per_class_ap"][3] == pytest.approx(skm.average_precision_score(y[:, 3], s[:, 3]))
    # every class with positives and negatives: exactly the original's np.mean(sklearn(average=None))
    full = targets[:, 2:]
    keep2 = full.sum(axis=1) > 0
    m2 = multilabel_metrics(scores[:, 2:], full)
    assert m2["mAP"] == pytest.approx(np.mean(skm.average_precision_score(full[keep2], scores[keep2, 2:], average=None)))
    assert m2["mAUC"] == pytest.approx(np.mean(skm.roc_auc_score(full[keep2], scores[keep2, 2:], average=None)))


def test_multilabel_metrics_hand_computed():
    # class 0: positives score 0.9 and 0.4, negatives 0.8 and 0.1 -> ranking +,-,+,-
    #   AP = (1/2)*1 + (1/2)*(2/3) = 5/6; AUC = pairs (pos>neg): (0.9>0.8, 0.9>0.1, 0.4>0.1) = 3/4
    # class 1: its positive 0.7 is above every negative -> AP 1, AUC 1
    # class 2: every score tied at 0.5, 2 positives of 4 -> AP 1/2, AUC 1/2
    # the fifth clip has no label: dropped, as the original's eval set drops it
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.4, 0.7, 0.5], [0.1, 0.3, 0.5], [0.95, 0.99, 0.5]])
    targets = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 0, 1], [0, 0, 0]])
    m = multilabel_metrics(scores, targets)
    assert m["clips"] == 4 and m["clips_without_labels"] == 1
    assert m["per_class_ap"][0] == pytest.approx(5 / 6)
    assert m["per_class_auc"][0] == pytest.approx(3 / 4)
    assert m["per_class_ap"][1] == pytest.approx(1.0) and m["per_class_auc"][1] == pytest.approx(1.0)
    assert m["per_class_ap"][2] == pytest.approx(0.5) and m["per_class_auc"][2] == pytest.approx(0.5)  # all tied
    assert m["mAP"] == pytest.approx((5 / 6 + 1 + 0.5) / 3)
    assert m["mAUC"] == pytest.approx((0.75 + 1 + 0.5) / 3)
    assert m["dprime"] == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(0.75))


def test_d_prime_formula():
    assert d_prime(0.5) == 0.0
    assert d_prime(0.9) == pytest.approx(math.sqrt(2) * 1.2815515655446004)
    assert d_prime(1.0) == math.inf and math.isnan(d_prime(float("nan")))


def test_no_positive_anywhere_is_nan_and_labelled_rows():
    scores = np.random.default_rng(0).random((6, 3))
    m = multilabel_metrics(scores, np.zeros((6, 3)), drop_unlabelled=False)
    assert math.isnan(m["mAP"]) and math.isnan(m["mAUC"]) and m["classes_without_positives"] == 3
    assert labelled_rows(np.array([[0, 1], [0, 0], [1, 1]])).tolist() == [0, 2]
    assert math.isnan(average_precision(np.zeros(4), np.arange(4.0)))
    assert mean_average_precision(scores, np.eye(6, 3)) == pytest.approx(
        np.mean(skm.average_precision_score(np.eye(6, 3), scores, average=None))
    )


def test_singlelabel_metrics_equal_sklearn():
    rng = np.random.default_rng(1)
    scores = rng.random((50, 4))
    y = rng.integers(0, 4, 50)
    m = singlelabel_metrics(scores, np.eye(4)[y])
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, scores.argmax(1)))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, scores.argmax(1), labels=range(4)).tolist()
    hand = singlelabel_metrics(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1]))
    assert hand["accuracy"] == pytest.approx(2 / 3) and hand["confusion_matrix"] == [[1, 0], [1, 1]]
