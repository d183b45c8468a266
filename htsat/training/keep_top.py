"""``--keep-top K``: the K best epochs by the validation metric, as checkpoints in ``<out>/top/``
named ``epoch-EEE_<metric>-V.VVVV.pt`` (the original keeps its top 20 by mAP and averages them:
``htsat average <out>/top -o averaged.pt``).

Kill-safe like best.pt: the list lives in last.pt (``TrainState.top``), which is written first;
the epoch's file follows, then the evicted files go. ``--resume`` (:func:`repair_top`) rewrites
the file of the epoch last.pt was written at the end of, if a kill came between, and removes
files the list no longer names.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from .outputs import remove_stale_temporaries, write_torch

if TYPE_CHECKING:
    from .setup import Run
    from .state import TrainState

__all__ = ["top_file_name", "update_top", "write_top", "prune_top", "repair_top"]


def top_file_name(entry: dict) -> str:
    return f"epoch-{entry['epoch']:03d}_{entry['metric']}-{entry['value']:.4f}.pt"


def update_top(state: TrainState, row: dict, metric: str | None, k: int) -> dict | None:
    """Put the epoch of ``row`` into ``state.top`` if it is among the K best (ties: the earlier
    epoch stays); returns its entry, or None."""
    value = row.get(metric) if metric else None
    if k <= 0 or value is None or math.isnan(value):
        return None
    entry = {"epoch": row["epoch"], "metric": metric, "value": float(value)}
    ranked = sorted([*state.top, entry], key=lambda e: (-e["value"], e["epoch"]))[:k]
    state.top = sorted(ranked, key=lambda e: e["epoch"])
    return entry if entry in state.top else None


def write_top(run: Run, state: TrainState, entry: dict) -> None:
    """The checkpoint of ``entry``'s epoch from the model as it is now (the end of that epoch)."""
    from .state import _payload

    if not run.dist.main:
        return
    os.makedirs(run.paths.top, exist_ok=True)
    row = state.history[entry["epoch"] - 1]
    write_torch(os.path.join(run.paths.top, top_file_name(entry)), _payload(run, classes=run.classes, metrics=row))


def prune_top(run: Run, state: TrainState) -> None:
    """Remove the files of ``<out>/top`` that ``state.top`` does not name."""
    if not run.dist.main or not os.path.isdir(run.paths.top):
        return
    keep = {top_file_name(e) for e in state.top}
    for name in sorted(os.listdir(run.paths.top)):
        if name.endswith(".pt") and name not in keep:
            try:
                os.unlink(os.path.join(run.paths.top, name))
            except FileNotFoundError:
                pass


def repair_top(run: Run, state: TrainState) -> None:
    """After --resume: rewrite the file a kill kept from being written (possible only for the
    epoch last.pt ends), drop evicted files and half-written temporaries."""
    if not run.dist.main:
        return
    if os.path.isdir(run.paths.top):
        remove_stale_temporaries(run.paths.top)
    for entry in state.top:
        if os.path.exists(os.path.join(run.paths.top, top_file_name(entry))):
            continue
        if entry["epoch"] == state.epoch and state.step_in_epoch == 0:
            write_top(run, state, entry)
            run.log(f"rewrote {top_file_name(entry)} in {run.paths.top} from {run.paths.last}")
        else:
            run.log(f"warning: {top_file_name(entry)} is missing from {run.paths.top} and cannot be rebuilt")
    prune_top(run, state)
