"""Clip-level metrics computed with scikit-learn as the original computes them (its ``evaluate_metric``).

Multi-label (AudioSet): ``average_precision_score`` and ``roc_auc_score`` per class (``average=None``),
averaged with a plain mean into mAP and mAUC; d-prime = sqrt(2) * Phi^-1(mAUC), from the mean AUC
as the original does. Only eval clips with at least one label are scored: the original's eval
dataset drops clips whose target is all zeros (:func:`labelled_rows`).

Classes without a positive among the scored clips: their AP and AUC are undefined. The original
never meets one (every AudioSet class has positives in its eval set); were it to, its
``roc_auc_score`` would raise and its AP would be NaN (scikit-learn of that time; newer versions
return 0 with a warning). Here such a class gets AP = AUC = NaN and is left out of mAP and mAUC; a
class with no negative gets AUC = NaN and is left out of mAUC only. The counts are reported.

Single-label (ESC-50, Speech Commands): ``accuracy_score`` of the argmax and a confusion matrix
(rows: true class, columns: predicted class).
"""

from __future__ import annotations

import importlib
import math
import random
import warnings
from typing import Any

import numpy as np

from .config import TrainingError

__all__ = [
    "average_precision",
    "mean_average_precision",
    "d_prime",
    "labelled_rows",
    "multilabel_metrics",
    "singlelabel_metrics",
]


def _import_keeping_rng(name: str):
    """Import ``name`` leaving the global Python and NumPy RNG states as they were: importing
    scikit-learn / SciPy draws from ``random``, which would make a run whose first validation
    imports them differ from one that imported them earlier (resume must be exact)."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        return importlib.import_module(name)
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _sk():
    try:
        return _import_keeping_rng("sklearn.metrics")
    except ImportError as exc:  # scikit-learn is in the train extra
        raise TrainingError("the metrics need scikit-learn: pip install scikit-learn (or htsat-kernels[train])") from exc


def average_precision(target: np.ndarray, score: np.ndarray) -> float:
    """sklearn.metrics.average_precision_score of one class; NaN when it has no positive."""
    target = np.asarray(target) > 0
    if not target.any():
        return float("nan")
    return float(_sk().average_precision_score(target, np.asarray(score)))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean AP over the classes with at least one positive among these clips (NaN if none)."""
    return multilabel_metrics(scores, targets, drop_unlabelled=False)["mAP"]


def d_prime(auc: float) -> float:
    """sqrt(2) * Phi^-1(auc), the original's d-prime (inf at 1, -inf at 0, NaN for NaN)."""
    if auc is None or math.isnan(auc):
        return float("nan")
    norm = _import_keeping_rng("scipy.stats").norm  # a scikit-learn dependency
    return float(math.sqrt(2.0) * norm.ppf(auc))


def labelled_rows(targets: np.ndarray) -> np.ndarray:
    """Indices of the clips with at least one positive label (the clips the original scores)."""
    return np.nonzero(np.asarray(targets).sum(axis=1) > 0)[0]


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def multilabel_metrics(scores: np.ndarray, targets: np.ndarray, drop_unlabelled: bool = True) -> dict[str, Any]:
    """mAP, mAUC, d-prime and per-class AP/AUC of (N, C) scores against (N, C) 0/1 targets.

    ``drop_unlabelled``: score only the clips with at least one label, as the original does.
    Per-class lists hold NaN for an undefined value (see the module docstring).
    """
    scores = np.asarray(scores, dtype=np.float64)
    y = (np.asarray(targets) > 0).astype(np.int64)
    if scores.shape != y.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {y.shape} must both be (clips, classes)")
    total = len(y)
    if drop_unlabelled:
        rows = labelled_rows(y)
        scores, y = scores[rows], y[rows]
    n, c = y.shape
    ap = np.full(c, np.nan)
    auc = np.full(c, np.nan)
    pos = y.sum(axis=0)
    has_pos = np.nonzero(pos > 0)[0]
    both = np.nonzero((pos > 0) & (pos < n))[0]
    if len(has_pos):
        skm = _sk()
        ap[has_pos] = skm.average_precision_score(y[:, has_pos], scores[:, has_pos], average=None)
        if len(both):
            auc[both] = skm.roc_auc_score(y[:, both], scores[:, both], average=None)
    m_auc = _nanmean(auc)
    return {
        "mAP": _nanmean(ap),
        "mAUC": m_auc,
        "dprime": d_prime(m_auc),
        "clips": int(n),
        "clips_without_labels": int(total - n) if drop_unlabelled else int((y.sum(axis=1) == 0).sum()),
        "classes": int(c),
        "classes_without_positives": int(c - len(has_pos)),
        "classes_without_negatives": int(((pos == n) & (pos > 0)).sum()),
        "per_class_ap": ap.tolist(),
        "per_class_auc": auc.tolist(),
    }


def singlelabel_metrics(scores: np.ndarray, targets: np.ndarray, num_classes: int | None = None) -> dict[str, Any]:
    """Accuracy of the argmax and the confusion matrix; targets are class indices (N,) or one-hot (N, C)."""
    scores = np.asarray(scores)
    t = np.asarray(targets)
    y = t.argmax(axis=1) if t.ndim == 2 else t.astype(np.int64)
    if scores.ndim != 2 or len(y) != len(scores):
        raise ValueError(f"scores {scores.shape} must be (clips, classes) with one target per clip (targets {t.shape})")
    c = num_classes or scores.shape[1]
    pred = scores.argmax(axis=1)
    skm = _sk()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = float(skm.accuracy_score(y, pred)) if len(y) else float("nan")
    cm = skm.confusion_matrix(y, pred, labels=list(range(c))) if len(y) else np.zeros((c, c), dtype=np.int64)
    return {"accuracy": acc, "clips": int(len(y)), "classes": int(c), "confusion_matrix": cm.tolist()}
