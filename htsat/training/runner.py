"""``train(cfg)``: take the output folder, build the run, start or resume it, train the epochs."""

from __future__ import annotations

import json
import os

from .config import TrainConfig, TrainingError
from .distributed import Dist, TermFlag, all_gather_objects, setup_distributed, teardown_distributed
from .loop import EpochEnd, end_epoch, epoch_row, run_epoch
from .outputs import OutputLock, remove_stale_temporaries, write_text
from .setup import Logger, Paths, Run, build_run
from .state import TrainState, load_last, repair_outputs, restore, seed_everything, write_run_files

__all__ = ["train"]


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary dict (final metrics, paths, steps, the model).

    Under ``torchrun`` (WORLD_SIZE > 1) it joins the process group itself (NCCL on GPUs, gloo on
    CPUs), shards the data by rank and averages gradients with DDP. The output folder is locked
    for the run: a second run on the same ``out`` stops with an error naming the first.
    """
    cfg.validate()
    d = setup_distributed(cfg.device)
    lock = OutputLock(cfg.out)
    try:
        with TermFlag() as term:
            log = Logger(cfg.log, d)
            paths = Paths(cfg.out)
            _take_folder(cfg, d, lock, paths, log)
            run = build_run(cfg, d, paths, log)
            state = _start(run)
            return _train_epochs(run, state, term)
    finally:
        lock.release()
        teardown_distributed(d)


def _take_folder(cfg: TrainConfig, d: Dist, lock: OutputLock, paths: Paths, log: Logger) -> None:
    """Rank 0 creates and locks the folder and removes what a killed run left half-written; every
    rank raises if that failed."""
    error = None
    if d.main:
        try:
            try:
                os.makedirs(cfg.out, exist_ok=True)
            except OSError as exc:
                raise TrainingError(f"cannot create the output folder {cfg.out}: {exc.strerror}") from exc
            warning = lock.acquire()
            if warning:
                log(warning)
            for path in remove_stale_temporaries(cfg.out):
                log(f"removed {path}, left by an interrupted write")
            if os.path.exists(paths.last) and not cfg.resume:
                raise TrainingError(f"{paths.last} exists: pass --resume to continue that run, or choose another --out")
        except TrainingError as exc:
            if not d.enabled:
                raise
            error = str(exc)
    errors = all_gather_objects(d, error)
    if errors[0] is not None:
        raise TrainingError(errors[0])


def _start(run: Run) -> TrainState:
    cfg, d = run.cfg, run.dist
    if cfg.resume and os.path.exists(run.paths.last):
        ck = load_last(run)
        state = restore(run, ck)
        repair_outputs(run, state, ck)
        run.log(
            f"resumed {run.paths.last}: epoch {state.epoch}, step {state.step_in_epoch} of {run.steps_per_epoch}, "
            f"global step {state.global_step}"
        )
    else:
        if cfg.resume:
            run.log(f"--resume: no checkpoint in {cfg.out}, starting a new run")
        seed_everything(cfg.seed + 1000003 * d.rank)  # augmentation streams differ per rank
        state = TrainState()
        write_run_files(run)
    n_params = sum(p.numel() for p in run.params)
    amp = "fp32" if run.amp_dtype is None else str(run.amp_dtype).replace("torch.", "")
    val = f" / validating on {len(run.val_ds)}" if run.val_ds else ""
    run.log(
        f"training {run.core.config.name} ({n_params / 1e6:.2f}M trainable) on {len(run.train_ds)} clips"
        f"{val}, {len(run.classes)} classes, {'multi' if run.multi_label else 'single'}-label, loss {run.objective.loss_kind}, "
        f"mixup {'on' if run.objective.mixup.enabled else 'off'}, {d.world} process(es) on {run.device}, {amp}, "
        f"{run.steps_per_epoch} steps/epoch, backend {cfg.backend}"
    )
    return state


def _train_epochs(run: Run, state: TrainState, term: TermFlag) -> dict:
    cfg = run.cfg
    indices_log: dict = {}
    end = EpochEnd(complete=True)
    while state.epoch < cfg.epochs:
        indices = indices_log.setdefault(state.epoch, []) if cfg.record_indices else None
        end = run_epoch(run, state, term, indices)
        if not end.complete:
            break
        end_epoch(run, state, epoch_row(run, state))
    if cfg.record_indices:
        write_text(
            os.path.join(cfg.out, f"indices_rank{run.dist.rank}.json"), json.dumps({str(k): v for k, v in indices_log.items()})
        )
    if run.dist.main and not end.stopped and state.bad_files:
        write_text(run.paths.bad_files, "".join(m + "\n" for m in state.bad_files))
    return {
        "out": cfg.out,
        "last_checkpoint": run.paths.last,
        "best_checkpoint": run.paths.best if os.path.exists(run.paths.best) else None,
        "epochs": state.epoch,
        "global_step": state.global_step,
        "history": state.history,
        "best": state.best,
        "bad_files": list(state.bad_files),
        "nan_steps": state.nan_steps,
        "stopped": end.stopped,
        "interrupted": end.interrupted,
        "rank": run.dist.rank,
        "world_size": run.dist.world,
        "model": run.core,
    }
