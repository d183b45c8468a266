"""``htsat train --cv K``: K-fold cross-validation (ESC-50's protocol: 5 folds, each held out once).

The folds are the first K distinct values of the manifest's ``fold`` column (sorted; ESC-50's
folds 1..5). Fold f trains into ``<out>/fold<f>`` with ``val_fold=f``, one after the other; with
``--resume`` finished folds are kept and an interrupted one continues. ``<out>/cv_summary.json``
and ``cv_summary.csv`` hold each fold's best and last validation metric and their mean and
standard deviation (sample std, n-1; 0 for a single fold). The original reports the accuracy of
the best epoch on the held-out fold, which is also its validation set.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any

from ..data import ManifestError, read_dataset
from .config import TrainConfig
from .outputs import write_text
from .runner import train

__all__ = ["train_cv", "cv_folds"]


def cv_folds(cfg: TrainConfig) -> list[str]:
    items, _ = read_dataset(cfg.manifest, root=cfg.data_root)
    folds = sorted({it.fold for it in items if it.fold is not None}, key=lambda f: (len(f), f))
    if not folds:
        raise ManifestError(f"{cfg.manifest}: no 'fold' column, cannot cross-validate")
    if len(folds) < cfg.cv:
        raise ManifestError(f"{cfg.manifest}: --cv {cfg.cv} needs {cfg.cv} folds, found {len(folds)} ({', '.join(folds)})")
    return folds[: cfg.cv]


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def train_cv(cfg: TrainConfig) -> dict[str, Any]:
    """Train every fold; returns {"folds": [...], "metric", "best_mean", "best_std", "last_mean", "last_std"}."""
    if cfg.val_fold is not None or cfg.val_manifest:
        raise ManifestError("--cv holds out each fold in turn; do not give --val-fold or --val-manifest with it")
    folds = cv_folds(cfg)
    rows, main = [], True
    for fold in folds:
        sub = dataclasses.replace(cfg, cv=None, val_fold=fold, out=os.path.join(cfg.out, f"fold{fold}"))
        summary = train(sub)
        main = summary["rank"] == 0
        if summary["interrupted"] or summary["stopped"]:
            return {"folds": rows, "interrupted": summary["interrupted"], "stopped": True}
        metric = summary["best"]["metric"] if summary["best"] else None
        last = summary["history"][-1] if summary["history"] else {}
        rows.append({
            "fold": fold, "out": sub.out, "metric": metric, "best": summary["best"]["value"] if summary["best"] else None,
            "best_epoch": summary["best"]["epoch"] if summary["best"] else None, "last": last.get(metric) if metric else None,
        })  # fmt: skip
    metric = rows[0]["metric"] if rows else None
    best_mean, best_std = _mean_std([r["best"] for r in rows])
    last_mean, last_std = _mean_std([r["last"] for r in rows])
    result = {"metric": metric, "folds": rows, "best_mean": best_mean, "best_std": best_std, "last_mean": last_mean,
              "last_std": last_std, "stopped": False, "interrupted": False}  # fmt: skip
    if main:
        write_text(os.path.join(cfg.out, "cv_summary.json"), json.dumps(result, indent=1))
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        write_text(os.path.join(cfg.out, "cv_summary.csv"), buf.getvalue())
    return result
