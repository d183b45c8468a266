"""Validation metrics: mAP as in the original's AudioSet evaluation, accuracy for single-label data."""

from __future__ import annotations

import numpy as np

__all__ = ["average_precision", "mean_average_precision"]


def average_precision(target: np.ndarray, score: np.ndarray) -> float:
    """Average precision of one class, sum over thresholds of (R_n - R_n-1) * P_n: the definition
    of sklearn.metrics.average_precision_score (ties in the scores form one threshold)."""
    order = np.argsort(-score, kind="mergesort")
    y, s = target[order] > 0, score[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last].astype(np.float64)
    if tps[-1] == 0:
        return float("nan")
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Macro average precision over the classes that have at least one positive (NaN if none);
    the mAP of the original's AudioSet evaluation."""
    cols = np.nonzero(targets.sum(axis=0) > 0)[0]
    if len(cols) == 0:
        return float("nan")
    return float(np.mean([average_precision(targets[:, c], scores[:, c]) for c in cols]))
