"""What a run must remember to continue exactly: the counters and history (:class:`TrainState`),
the RNG states of every rank, and the files derived from them.

``<out>/last.pt`` is the record of the run. It is written first at every epoch end; ``best.pt``
and the metrics files follow it and are derived from what it holds, so after a kill at any
moment they are either current or one step behind it, never ahead, and ``--resume`` brings them
back in line (:func:`repair_outputs`) before it trains on. Everything in it is plain Python values
and tensors, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint
from .config import TrainingError
from .distributed import all_gather_objects
from .keep_top import repair_top
from .outputs import short_reason, write_json, write_metrics, write_text, write_torch

if TYPE_CHECKING:
    from .setup import Run

__all__ = [
    "CHECKPOINT_VERSION",
    "TrainState",
    "seed_everything",
    "save_last",
    "save_best",
    "load_last",
    "restore",
    "write_run_files",
    "repair_outputs",
]

CHECKPOINT_VERSION = 1


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps done in the current epoch
    global_step: int = 0
    history: list[dict] = field(default_factory=list)  # one metrics row per completed epoch
    best: dict | None = None  # {"metric", "value", "epoch"} of the best epoch so far
    top: list[dict] = field(default_factory=list)  # --keep-top: entries like best's, by epoch
    bad_files: list[str] = field(default_factory=list)
    nan_steps: int = 0
    # sums over the current epoch (a resumed epoch reports the whole epoch)
    epoch_loss_sum: float = 0.0
    epoch_loss_n: int = 0
    epoch_clips: int = 0
    epoch_time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def start_next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum, self.epoch_loss_n, self.epoch_clips, self.epoch_time = 0.0, 0, 0, 0.0


# ----------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------


def get_rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def _payload(run: Run, **extra: Any) -> dict:
    """The layout of htsat.checkpoint.save_checkpoint (loadable by load_checkpoint / htsat predict)."""
    obj = {"format": FORMAT, "version": FORMAT_VERSION, "config": run.core.config.to_dict(), "state_dict": run.core.state_dict()}
    obj.update(extra)
    return obj


_NEWER_STATE_KEYS = ("top",)  # absent from a last.pt of an earlier version: their defaults apply
_TRAIN_STATE_KEYS = (
    "meta",
    "optimizer",
    "scheduler",
    "rng",
    *(f.name for f in dataclasses.fields(TrainState) if f.name not in _NEWER_STATE_KEYS),
)


def save_last(run: Run, state: TrainState) -> None:
    """Write last.pt (all ranks take part: it holds every rank's RNG state)."""
    rng_all = all_gather_objects(run.dist, get_rng_state(run.device))
    if not run.dist.main:
        return
    ts = {
        "version": CHECKPOINT_VERSION,
        "meta": run.meta,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": rng_all,
        **state.to_dict(),
    }
    write_torch(run.paths.last, _payload(run, classes=run.classes, train_state=ts))


def save_best(run: Run, state: TrainState) -> None:
    """best.pt from the model as it is now, which must be the weights of the best epoch."""
    best = state.best
    if run.dist.main and best is not None:
        row = state.history[best["epoch"] - 1]
        write_torch(run.paths.best, _payload(run, classes=run.classes, metrics=row, best_metric=best["metric"]))


def load_last(run: Run) -> dict:
    """last.pt as written by :func:`save_last`, checked against this run's settings."""
    path = run.paths.last
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or overwritten file: torch raises RuntimeError, pickle errors, EOFError...
        raise TrainingError(
            f"cannot resume: {path} is not a readable checkpoint ({short_reason(exc)}); "
            "move it away to start a new run in this folder"
        ) from exc
    ts = ck.get("train_state") if isinstance(ck, dict) else None
    if not isinstance(ts, dict) or ts.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path} is not a training checkpoint of this version; cannot resume")
    missing = [k for k in _TRAIN_STATE_KEYS if k not in ts] + [k for k in ("config", "state_dict") if k not in ck]
    if missing or not isinstance(ts["meta"], dict):
        raise TrainingError(f"{path} is an incomplete training checkpoint (missing {missing or ['meta']}); cannot resume")
    for key in ("classes", "batch_size", "world_size", "seed"):
        if ts["meta"].get(key) != run.meta[key]:
            raise TrainingError(
                f"cannot resume {path}: {key} differs (checkpoint {ts['meta'].get(key)!r}, now {run.meta[key]!r}); "
                "the data order would not match"
            )
    if "sampler" in ts["meta"] and ts["meta"]["sampler"] != run.meta["sampler"]:  # recorded since --sampler exists
        raise TrainingError(
            f"cannot resume {path}: sampler differs (checkpoint {ts['meta']['sampler']!r}, now {run.meta['sampler']!r}); "
            "the data order would not match"
        )
    ours = run.core.config.to_dict()
    if ck.get("config") != ours:
        diff = sorted(k for k in ours if (ck.get("config") or {}).get(k) != ours[k])
        raise TrainingError(f"cannot resume {path}: model config differs in {diff}")
    return ck


def restore(run: Run, ck: dict) -> TrainState:
    """Model, optimiser, scheduler, scaler and this rank's RNG state from a loaded last.pt."""
    ts = ck["train_state"]
    load_checkpoint(run.core, ck)
    run.optimizer.load_state_dict(ts["optimizer"])
    run.scheduler.load_state_dict(ts["scheduler"])
    if run.scaler is not None and ts.get("scaler"):
        run.scaler.load_state_dict(ts["scaler"])
    state = TrainState(**{f.name: ts[f.name] for f in dataclasses.fields(TrainState) if f.name in ts})
    set_rng_state(ts["rng"][run.dist.rank], run.device)
    return state


# ----------------------------------------------------------------------------------------------
# the files derived from last.pt
# ----------------------------------------------------------------------------------------------


def _classes_text(classes: list[str]) -> str:
    return "".join(c + "\n" for c in classes)  # the format of data.write_class_list / read_class_list


def write_run_files(run: Run) -> None:
    """classes.txt and train_config.json of a new run (before its first last.pt)."""
    if run.dist.main:
        write_text(run.paths.classes, _classes_text(run.classes))
        write_json(run.paths.config, run.meta["train_config"])


def _best_is_current(path: str, row: dict, metric: str) -> bool:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, or cut short by a kill before the atomic writes existed
        return False
    same = json.dumps(ck.get("metrics"), sort_keys=True) == json.dumps(row, sort_keys=True)
    return same and ck.get("best_metric") == metric


def repair_outputs(run: Run, state: TrainState, ck: dict) -> None:
    """After loading last.pt on --resume: rewrite what a kill left behind it. best.pt can be
    rebuilt only from a last.pt written at the end of the best epoch, which is the only last.pt
    that can be ahead of best.pt (best.pt is written right after it)."""
    if not run.dist.main:
        return
    try:
        with open(run.paths.classes, encoding="utf-8") as f:
            classes_ok = f.read() == _classes_text(run.classes)
    except (OSError, UnicodeDecodeError):
        classes_ok = False
    if not classes_ok:
        write_text(run.paths.classes, _classes_text(run.classes))
    recorded = ck["train_state"]["meta"].get("train_config")
    if recorded is not None and not os.path.exists(run.paths.config):
        write_json(run.paths.config, recorded)
    if state.best is not None:
        row = state.history[state.best["epoch"] - 1]
        if not _best_is_current(run.paths.best, row, state.best["metric"]):
            if state.best["epoch"] == state.epoch and state.step_in_epoch == 0:
                save_best(run, state)
                run.log(f"rewrote {run.paths.best} (epoch {state.best['epoch']}) from {run.paths.last}")
            else:
                run.log(
                    f"warning: {run.paths.best} does not hold epoch {state.best['epoch']} and cannot be rebuilt from "
                    f"{run.paths.last}"
                )
    repair_top(run, state)
    if state.history:
        write_metrics(run.out, state.history)
