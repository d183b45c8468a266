"""The training loop: :func:`train_step` (one batch), :func:`run_epoch`, :func:`evaluate`, and
:func:`end_epoch`, which records the epoch in the files of the output folder in a kill-safe order.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import TrainingError
from .distributed import TermFlag, all_gather_objects, all_reduce, all_reduce_min
from .keep_top import prune_top, update_top, write_top
from .metrics import mean_average_precision, multilabel_metrics
from .outputs import fault_point, write_metrics
from .setup import Run
from .state import TrainState, save_best, save_last

__all__ = ["train_step", "run_epoch", "evaluate", "end_epoch", "EpochEnd"]


def record_bad_files(run: Run, state: TrainState, messages: list[str]) -> None:
    for m in messages:
        if m not in state.bad_files:
            state.bad_files.append(m)
            run.log(f"warning: skipping bad file {m}", all_ranks=True)
    limit = run.cfg.max_bad_files
    if limit is not None and len(state.bad_files) > limit:
        raise TrainingError(f"{len(state.bad_files)} bad files, more than --max-bad-files {limit}; last: {messages[-1]}")


def _skip_step(run: Run, state: TrainState, msg: str, *, can_stop: bool, all_ranks: bool) -> None:
    """A non-finite loss or gradient: stop the run (--on-nan stop) or drop this step's update."""
    if can_stop and run.cfg.on_nan == "stop":
        raise TrainingError(msg + " (use --on-nan skip to drop such steps)")
    run.log(f"warning: {msg}; step skipped", all_ranks=all_ranks)
    state.nan_steps += 1
    run.optimizer.zero_grad(set_to_none=True)


def train_step(run: Run, state: TrainState, batch: dict[str, Any], term: TermFlag) -> tuple[torch.Tensor, bool]:
    """Forward, backward and update on one batch; the scheduler and counters advance in
    :func:`run_epoch`. Returns the loss and whether any rank asked to stop (SIGTERM)."""
    wave = batch["waveform"].to(run.device, non_blocking=True)
    target = batch["target"].to(run.device, non_blocking=True)
    lam = run.objective.mixup.draw(wave.shape[0], run.device)
    with run.autocast():
        out = run.model(wave, mixup_lambda=lam)
    loss = run.objective.loss(out["clipwise_logits"], target, lam)
    # one collective per step: every rank agrees on "loss finite" and on "stop requested"
    flags = torch.stack(
        [torch.isfinite(loss.detach()).float(), torch.tensor(-1.0 if term.requested else 0.0, device=loss.device)]
    )
    all_reduce_min(run.dist, flags)
    stop_requested = bool(flags[1] < 0)
    where = f"epoch {state.epoch + 1}, step {state.step_in_epoch + 1} (global step {state.global_step + 1})"
    if not bool(flags[0].item()):
        files = [os.path.basename(run.train_ds.items[i].path) for i in batch["source_index"].tolist()[:8]]
        _skip_step(
            run, state, f"non-finite loss at {where}; clips in the batch: {', '.join(files)}", can_stop=True, all_ranks=True
        )
        return loss.detach(), stop_requested

    scaler = run.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    state.epoch_loss_sum += float(loss.detach())
    state.epoch_loss_n += 1
    if run.cfg.grad_clip and run.cfg.grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip)
        if not bool(torch.isfinite(gnorm)):  # with fp16 the scaler skips such steps itself and lowers its scale
            _skip_step(run, state, f"non-finite gradient norm at {where}", can_stop=scaler is None, all_ranks=False)
            if scaler is not None:
                scaler.update()
            return loss.detach(), stop_requested
    if scaler is not None:
        scaler.step(run.optimizer)
        scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), stop_requested


def _progress_bar(run: Run, state: TrainState):
    show = run.cfg.progress if run.cfg.progress is not None else sys.stderr.isatty()
    if not (show and run.dist.main):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return None
    return tqdm(
        total=run.steps_per_epoch,
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch + 1}/{run.cfg.epochs}",
        unit="step",
        dynamic_ncols=True,
        leave=True,
    )


@dataclass
class EpochEnd:
    """How run_epoch ended: the epoch is complete, or the run stops inside it."""

    complete: bool
    stopped: bool = False  # stop_after_steps
    interrupted: bool = False  # SIGTERM


def run_epoch(run: Run, state: TrainState, term: TermFlag, indices: list[int] | None = None) -> EpochEnd:
    """Train the rest of the current epoch (from state.step_in_epoch), writing last.pt every
    ``checkpoint_every`` steps and on SIGTERM."""
    cfg = run.cfg
    run.train_ds.set_epoch(state.epoch)
    run.sampler.set_epoch(state.epoch)
    run.sampler.set_start(state.step_in_epoch * cfg.batch_size)
    loader = run.loader(run.train_ds, run.sampler, drop_last=cfg.drop_last)
    run.model.train()
    t0, clips = time.perf_counter(), 0  # clips of this session, for clips/s
    bar = _progress_bar(run, state)
    try:
        for batch in loader:
            if batch["bad"]:
                record_bad_files(run, state, batch["bad"])
            if indices is not None:
                indices += batch["index"].tolist()
            loss, stop_requested = train_step(run, state, batch, term)
            with warnings.catch_warnings():  # a skipped first step would warn "scheduler before optimizer"
                warnings.simplefilter("ignore", UserWarning)
                run.scheduler.step()  # follows steps, skipped or not, like the original's per-epoch LambdaLR
            n = batch["waveform"].shape[0]
            clips += n
            state.epoch_clips += n
            state.step_in_epoch += 1
            state.global_step += 1
            fault_point("step")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss.item():.4f}",
                    lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                    clips_s=f"{clips * run.dist.world / max(1e-9, time.perf_counter() - t0):.1f}",
                )
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                state.epoch_time += time.perf_counter() - t0
                t0, clips = time.perf_counter(), 0
                save_last(run, state)
            if cfg.stop_after_steps is not None and state.global_step >= cfg.stop_after_steps:
                run.log(f"stopping after global step {state.global_step} (stop_after_steps)")
                return EpochEnd(complete=False, stopped=True)
            if stop_requested:  # some rank got SIGTERM: save where we are and leave
                save_last(run, state)
                run.log(
                    f"terminated (SIGTERM) at global step {state.global_step}: saved {run.paths.last}; continue with --resume"
                )
                return EpochEnd(complete=False, stopped=True, interrupted=True)
    finally:
        if bar is not None:
            bar.close()
    state.epoch_time += time.perf_counter() - t0
    return EpochEnd(complete=True)


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Validation loss, accuracy (single-label data), mAP (and for multi-label data mAUC and
    d-prime over the clips with a label, as the original) over the whole set (all ranks gathered);
    ``_bad`` lists the files that could not be read."""
    model, ds, loader = run.core, run.val_ds, run.val_loader
    assert ds is not None and loader is not None, "evaluate() needs validation data"
    model.eval()
    idx, targets, logits_all, bad = [], [], [], []
    for batch in loader:
        bad += batch["bad"]
        keep = batch["valid"]
        if not keep.any():
            continue
        with run.autocast():
            out = model(batch["waveform"][keep].to(run.device))
        idx.append(batch["index"][keep])
        logits_all.append(out["clipwise_logits"].float().cpu())
        targets.append(batch["target"][keep])
    model.train()
    empty = torch.zeros(0, len(ds.classes))
    local = (
        torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long),
        torch.cat(logits_all) if logits_all else empty,
        torch.cat(targets) if targets else empty,
        bad,
    )
    gathered = all_gather_objects(run.dist, local)
    index = torch.cat([g[0] for g in gathered])
    logits = torch.cat([g[1] for g in gathered])
    target = torch.cat([g[2] for g in gathered])
    all_bad = sorted({m for g in gathered for m in g[3]})
    # DistributedSampler-style padding repeats a few clips: keep each index once
    first: dict[int, int] = {}
    for pos, i in enumerate(index.tolist()):
        first.setdefault(i, pos)
    sel = torch.tensor(sorted(first.values()), dtype=torch.long)
    logits, target = logits[sel], target[sel]
    res: dict[str, Any] = {"val_clips": int(len(sel)), "val_bad_files": len(all_bad), "_bad": all_bad}
    if len(sel) == 0:
        return res
    if run.objective.loss_kind == "bce":
        res["val_loss"] = float(F.binary_cross_entropy_with_logits(logits, target))
        probs = torch.sigmoid(logits)
    else:
        res["val_loss"] = float(F.cross_entropy(logits, target.argmax(dim=1))) if not run.multi_label else float("nan")
        probs = torch.softmax(logits, dim=1)
    if not run.multi_label:
        res["val_accuracy"] = float((probs.argmax(dim=1) == target.argmax(dim=1)).float().mean())
        res["val_mAP"] = mean_average_precision(probs.numpy(), target.numpy())
        return res
    # the original's AudioSet metrics, over the clips with at least one label
    m = multilabel_metrics(probs.numpy(), target.numpy(), drop_unlabelled=True)
    res.update(val_mAP=m["mAP"], val_mAUC=m["mAUC"], val_dprime=m["dprime"])
    return res


def epoch_row(run: Run, state: TrainState) -> dict:
    """The metrics row of the epoch just trained (sums over all ranks), with validation."""
    stats = torch.tensor([state.epoch_loss_sum, state.epoch_loss_n, state.epoch_clips], dtype=torch.float64)
    if run.dist.enabled:
        stats = stats.to(run.device) if run.device.type == "cuda" else stats
        all_reduce(run.dist, stats)
        stats = stats.cpu()
    row = {
        "epoch": state.epoch + 1,
        "global_step": state.global_step,
        "lr": run.optimizer.param_groups[0]["lr"],
        "train_loss": float(stats[0] / max(1.0, float(stats[1]))),
        "train_clips": int(stats[2]),
        "clips_per_s": float(stats[2]) / max(1e-9, state.epoch_time),
        "bad_files": len(state.bad_files),
    }
    if run.val_loader is not None:
        res = evaluate(run)
        val_bad = res.pop("_bad")
        if val_bad:
            record_bad_files(run, state, val_bad)
        row.update(res)
        row["bad_files"] = len(state.bad_files)
    return row


def end_epoch(run: Run, state: TrainState, row: dict) -> None:
    """Record a finished epoch. Order matters for a kill at any point: last.pt first (the record
    of the run), then best.pt and the metrics, which are derived from it and which --resume
    rewrites from it when a kill came between."""
    state.history.append(row)
    state.start_next_epoch()
    name = run.metric_name
    improved = False
    value = row.get(name) if name else None
    if value is not None and not math.isnan(value) and (state.best is None or value > state.best["value"]):
        state.best = {"metric": name, "value": value, "epoch": row["epoch"]}
        improved = True
    entered = update_top(state, row, name, run.cfg.keep_top)  # recorded in last.pt before its file exists
    save_last(run, state)
    if improved:
        save_best(run, state)
    if entered is not None:
        write_top(run, state, entered)
    if run.cfg.keep_top:
        prune_top(run, state)
    if run.dist.main:
        write_metrics(run.out, state.history)
    run.log(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
