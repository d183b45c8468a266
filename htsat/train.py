"""Training: the original recipe (spec section 9) on any CSV manifest or ESC-50 folder, on one CPU,
one GPU or many GPUs through ``torchrun`` (DDP), with checkpoints that survive a kill.

Defaults follow the original: AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.05 on
every parameter), the original per-epoch LR multipliers (warm-up 0.02/0.05/0.1, peak 1e-4, ...),
gradient clipping at norm 1.0, SpecAugment, mixup with Beta(0.5, 0.5) per clip and unmixed labels
for multi-label data. Departures, all on purpose: the clip-level BCE is computed with logits
(``binary_cross_entropy_with_logits`` on ``clipwise_logits``, the same loss, AMP-safe), bf16
autocast on GPUs (the front end stays in fp32 inside the model), and the original's unused
``head`` Linear is frozen (it never receives a gradient; freezing keeps DDP from waiting on it).

Nothing is lost when a run dies: ``<out>/last.pt`` is written atomically every
``checkpoint_every`` steps and at every epoch end, and holds the model, optimiser, scheduler,
epoch and position inside the epoch, the RNG states of every rank and the metric history.
``resume=True`` continues from it and reaches the same state as an uninterrupted run (bit-exact on
CPU with ``num_workers=0``; the data order and random crops are functions of (seed, epoch, index),
independent of worker processes).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .audio import DEFAULT_SILENCE_DB
from .data import (
    AudioDataset,
    ManifestError,
    apply_aliases,
    ResumableSampler,
    check_labels,
    classes_from_items,
    collate,
    is_multi_label,
    read_class_aliases,
    read_class_list,
    read_dataset,
    split_by_fold,
    write_class_list,
)

__all__ = ["TrainConfig", "TrainingError", "train", "original_lr_multiplier", "make_lr_lambda"]

CHECKPOINT_VERSION = 1


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, too many bad files, inconsistent resume)."""


@dataclass
class TrainConfig:
    # data
    manifest: str
    out: str
    val_manifest: Optional[str] = None
    val_fold: Optional[str] = None  # hold out this fold of the manifest for validation
    classes: Optional[str] = None  # class list file; default: from the dataset
    data_root: Optional[str] = None
    clip_seconds: Optional[float] = None  # default: the model's clip_seconds (10 s)
    pad: str = "tile"  # short clips: tile | zeros | repeatpad
    crop: str = "random"  # long clips in training: random | start | center
    on_bad_file: str = "skip"  # skip (replace and count) | stop
    max_bad_files: Optional[int] = None  # stop when more files than this were bad
    silence_db: Optional[float] = DEFAULT_SILENCE_DB  # silent-only files are bad; None keeps them
    cache_audio: bool = False
    num_workers: int = 0
    # model
    model: str = "htsat-audioset"
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"
    init_checkpoint: Optional[str] = None
    init_drop_head: str = "auto"  # auto (drop on class-count mismatch) | yes | no
    # optimisation (spec section 9)
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: str = "original"  # original | cosine | constant
    warmup_epochs: Optional[float] = None  # original: 3 (its three warm-up steps); cosine/constant: 0
    min_lr_ratio: float = 0.0  # cosine floor
    grad_clip: float = 1.0  # 0 disables
    loss: str = "auto"  # auto (from the model's loss_type) | bce | ce
    mixup: str = "auto"  # auto (multi-label data only, as the original) | on | off
    mixup_alpha: float = 0.5
    mixup_labels: bool = False  # the original does not mix labels
    specaugment: bool = True
    drop_last: bool = False
    # runtime
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    device: Optional[str] = None
    seed: int = 0
    sync_bn: bool = False
    find_unused_parameters: bool = False
    on_nan: str = "stop"  # stop | skip (drop the step)
    checkpoint_every: int = 0  # steps; 0: only at epoch ends
    resume: bool = False
    stop_after_steps: Optional[int] = None  # simulate a kill: return after this global step, no final checkpoint
    progress: Optional[bool] = None  # None: when stderr is a TTY
    log: Optional[Callable[[str], None]] = None
    record_indices: bool = False  # write <out>/indices_rank<r>.json (sample order per epoch; for tests)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("log", None)
        d["betas"] = list(d["betas"])
        return d


# ----------------------------------------------------------------------------------------------
# learning-rate schedules
# ----------------------------------------------------------------------------------------------

_WARMUP = (0.02, 0.05, 0.1)


def original_lr_multiplier(epoch: int) -> float:
    """The original lr_foo (spec section 9): multiplier on the base LR for an integer epoch."""
    if epoch < 3:
        return _WARMUP[epoch]
    if epoch <= 10:
        return 0.1
    if epoch <= 20:
        return 0.05
    if epoch <= 30:
        return 0.02
    return max(0.02 * 0.98**epoch, 0.03)


def make_lr_lambda(schedule: str, steps_per_epoch: int, total_epochs: int, warmup_epochs: Optional[float] = None, min_ratio: float = 0.0):
    """Multiplier of the base LR as a function of the optimiser step (LambdaLR over steps).

    ``original``: the original's per-epoch multipliers; ``warmup_epochs`` stretches or shrinks its
    three warm-up epochs (the author suggests scaling the warm-up to the dataset size), later
    epochs follow the original table shifted accordingly. ``cosine``: linear warm-up, then cosine
    decay to ``min_ratio``. ``constant``: linear warm-up, then 1.
    """
    spe = max(1, int(steps_per_epoch))
    if schedule == "original":
        w = 3.0 if warmup_epochs is None else float(warmup_epochs)

        def fn(step: int) -> float:
            e = step / spe
            if e < w:
                return _WARMUP[min(2, int(3 * e / w))]
            return original_lr_multiplier(3 + int(math.floor(e - w + 1e-9)))

        return fn
    w_steps = (0.0 if warmup_epochs is None else float(warmup_epochs)) * spe
    total = max(1, total_epochs * spe)
    if schedule == "constant":
        return lambda step: min(1.0, (step + 1) / w_steps) if w_steps > 0 else 1.0
    if schedule == "cosine":

        def cos(step: int) -> float:
            if w_steps > 0 and step < w_steps:
                return (step + 1) / w_steps
            t = min(1.0, (step - w_steps) / max(1.0, total - w_steps))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        return cos
    raise ValueError(f"unknown lr schedule {schedule!r} (original, cosine, constant)")


# ----------------------------------------------------------------------------------------------
# distributed helpers
# ----------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_hint: Optional[str]) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True, False)
    if world <= 1:
        return _Dist()
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but torch.distributed is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_hint is None or device_hint.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, True, True)


def _all_gather_objects(d: _Dist, obj) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def _all_reduce(d: _Dist, t: torch.Tensor, op=None) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------------------------
# RNG state (stored as plain Python values + tensors: loadable with weights_only=True)
# ----------------------------------------------------------------------------------------------


def _get_rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


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


def _write_metrics(out: str, history: List[dict]) -> None:
    path_json = os.path.join(out, "metrics.jsonl")
    tmp = path_json + ".tmp"
    with open(tmp, "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path_json)
    keys: List[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    path_csv = os.path.join(out, "metrics.csv")
    tmp = path_csv + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow(row)
    os.replace(tmp, path_csv)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return None
    return tqdm


def _pick_device(cfg: TrainConfig, d: _Dist) -> torch.device:
    if cfg.device:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", d.local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
    return torch.device("cpu")


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    p = cfg.precision
    if p == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if p == "fp32":
        return None
    if p == "bf16":
        return torch.bfloat16
    if p == "fp16":
        if device.type != "cuda":
            raise TrainingError("fp16 autocast needs a CUDA device; use --precision bf16 or fp32")
        return torch.float16
    raise ValueError(f"unknown precision {p!r} (auto, fp32, bf16, fp16)")


class _Logger:
    def __init__(self, cfg: TrainConfig, d: _Dist):
        self.fn = cfg.log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.d = d

    def __call__(self, msg: str, all_ranks: bool = False) -> None:
        if self.d.main:
            self.fn(msg)
        elif all_ranks:
            self.fn(f"[rank {self.d.rank}] {msg}")


def _load_data(cfg: TrainConfig):
    items, classes = read_dataset(cfg.manifest, root=cfg.data_root)
    aliases = {}
    if cfg.classes:
        classes = read_class_list(cfg.classes)
        aliases = read_class_aliases(cfg.classes)
    val_items = None
    if cfg.val_fold is not None:
        items, val_items = split_by_fold(items, cfg.val_fold)
    if cfg.val_manifest:
        if val_items is not None:
            raise ManifestError("give either a validation manifest or a validation fold, not both")
        val_items, val_classes = read_dataset(cfg.val_manifest, root=cfg.data_root)
        if classes is None and val_classes is not None:
            classes = val_classes
    items = apply_aliases(items, aliases)
    if val_items is not None:
        val_items = apply_aliases(val_items, aliases)
    if classes is None:
        classes = classes_from_items(list(items) + list(val_items or []))
    check_labels(items, classes)
    if val_items is not None:
        check_labels(val_items, classes)
    return items, val_items, classes


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary dict (final metrics, paths, steps).

    Under ``torchrun`` (WORLD_SIZE > 1) it joins the process group itself (NCCL on GPUs, gloo on
    CPUs), shards the data by rank and averages gradients with DDP.
    """
    import htsat
    from .checkpoint import load_checkpoint, save_checkpoint

    d = _setup_distributed(cfg.device)
    try:
        with _TermFlag() as term:
            return _train(cfg, d, htsat, load_checkpoint, save_checkpoint, term)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _worker_ignores_sigterm(worker_id: int) -> None:
    """A SIGTERM sent to the whole process group must not kill the loader workers before the main
    process has finished its step and saved; they exit with their parent."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _TermFlag:
    """SIGTERM (a scheduler pre-empting the job, torchrun shutting down) asks the loop to save a
    checkpoint after the current step and leave; a second SIGTERM terminates at once."""

    def __init__(self):
        self.requested = False
        self._prev = None

    def _handler(self, signum, frame):
        import signal

        if self.requested:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.requested = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
        return False


def _train(cfg: TrainConfig, d: _Dist, htsat, load_checkpoint, save_checkpoint, term: _TermFlag) -> dict:
    log = _Logger(cfg, d)
    device = _pick_device(cfg, d)
    for name, value, allowed in (
        ("on_bad_file", cfg.on_bad_file, ("skip", "stop")),
        ("on_nan", cfg.on_nan, ("stop", "skip")),
        ("mixup", cfg.mixup, ("auto", "on", "off")),
        ("loss", cfg.loss, ("auto", "bce", "ce")),
        ("init_drop_head", cfg.init_drop_head, ("auto", "yes", "no")),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if cfg.batch_size < 1 or cfg.epochs < 0:
        raise ValueError("batch_size must be >= 1 and epochs >= 0")
    os.makedirs(cfg.out, exist_ok=True)
    last_path = os.path.join(cfg.out, "last.pt")
    best_path = os.path.join(cfg.out, "best.pt")

    # ---------------- data ----------------
    items, val_items, classes = _load_data(cfg)
    multi_label = is_multi_label(items)

    # ---------------- model ----------------
    _seed_everything(cfg.seed)  # identical initial weights on every rank
    overrides = dict(cfg.model_overrides)
    overrides.pop("num_classes", None)
    model = htsat.create_model(cfg.model, num_classes=len(classes), backend=cfg.backend, **overrides)
    mcfg = model.config
    loss_kind = cfg.loss if cfg.loss != "auto" else ("ce" if mcfg.loss_type == "clip_ce" else "bce")
    if loss_kind == "ce" and multi_label:
        bad = next(it for it in items if len(it.labels) != 1)
        raise ManifestError(
            f"single-label training (cross-entropy, loss_type clip_ce) needs exactly one label per clip, but "
            f"{bad.where()} ({os.path.basename(bad.path)}) has {len(bad.labels)}; use a clip_bce model or --loss bce"
        )
    use_mixup = cfg.mixup == "on" or (cfg.mixup == "auto" and multi_label)
    if not cfg.specaugment:
        model.spec_augment = lambda x: x  # instance attribute shadows the method
    # the original's head Linear(C, C) is never used in forward: freeze it so DDP does not wait for its grads
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Module):
        for p in head.parameters():
            p.requires_grad_(False)

    if cfg.init_checkpoint and not (cfg.resume and os.path.exists(last_path)):
        drop = {"yes": True, "no": False}.get(cfg.init_drop_head)
        if drop is None:
            try:
                report = load_checkpoint(model, cfg.init_checkpoint, drop_head=False)
            except htsat.CheckpointError as e:
                if "drop_head=True" not in str(e):
                    raise
                report = load_checkpoint(model, cfg.init_checkpoint, drop_head=True)
        else:
            report = load_checkpoint(model, cfg.init_checkpoint, drop_head=drop)
        log(f"initialised from {cfg.init_checkpoint}: {report}")

    model.to(device)
    if d.enabled and cfg.sync_bn:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log("warning: --sync-bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); using per-process BatchNorm")
    core = model
    if d.enabled:
        ddp_kwargs = dict(find_unused_parameters=cfg.find_unused_parameters)
        if device.type == "cuda":
            ddp_kwargs.update(device_ids=[device.index], output_device=device.index)
        model = torch.nn.parallel.DistributedDataParallel(core, **ddp_kwargs)

    # ---------------- data loaders ----------------
    clip_seconds = cfg.clip_seconds if cfg.clip_seconds is not None else mcfg.clip_seconds
    clip_samples = int(round(clip_seconds * mcfg.sample_rate))
    if core.num_frames(clip_samples) > mcfg.max_frames:
        raise ValueError(f"clip_seconds {clip_seconds} is longer than one model image ({mcfg.max_frames} frames)")
    on_error = "stop" if cfg.on_bad_file == "stop" else "skip"
    train_ds = AudioDataset(
        items, classes, mcfg.sample_rate, clip_samples, train=True, pad=cfg.pad, crop=cfg.crop, on_error=on_error,
        silence_db=cfg.silence_db, seed=cfg.seed, cache=cfg.cache_audio,
    )
    sampler = ResumableSampler(len(train_ds), shuffle=True, seed=cfg.seed, num_replicas=d.world, rank=d.rank, drop_last=cfg.drop_last)
    per_rank = sampler.num_samples
    steps_per_epoch = per_rank // cfg.batch_size if cfg.drop_last else math.ceil(per_rank / cfg.batch_size)
    if steps_per_epoch == 0:
        raise ManifestError(f"{cfg.manifest}: {len(train_ds)} clips give no full batch of {cfg.batch_size} per process")

    def make_loader(ds, smp, bs):
        g = torch.Generator()  # keeps DataLoader from drawing its base seed from the global RNG
        g.manual_seed(cfg.seed)
        return DataLoader(
            ds, batch_size=bs, sampler=smp, num_workers=cfg.num_workers, collate_fn=collate, drop_last=cfg.drop_last and ds is train_ds,
            pin_memory=device.type == "cuda", generator=g, persistent_workers=False,
            worker_init_fn=_worker_ignores_sigterm if cfg.num_workers > 0 else None,
        )

    val_ds = val_loader = None
    if val_items:
        val_ds = AudioDataset(
            val_items, classes, mcfg.sample_rate, clip_samples, train=False, pad=cfg.pad, crop="start", on_error=on_error,
            silence_db=cfg.silence_db, seed=cfg.seed, cache=cfg.cache_audio,
        )
        val_sampler = ResumableSampler(len(val_ds), shuffle=False, num_replicas=d.world, rank=d.rank)
        val_loader = make_loader(val_ds, val_sampler, cfg.batch_size)

    # ---------------- optimiser & schedule (spec section 9) ----------------
    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    lr_fn = make_lr_lambda(cfg.lr_schedule, steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
    amp_dtype = _autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    # ---------------- state / resume ----------------
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "best": None, "bad_files": [], "nan_steps": 0,
             "epoch_loss_sum": 0.0, "epoch_loss_n": 0, "epoch_clips": 0, "epoch_time": 0.0}
    state_keys = tuple(state)
    run_meta = {"classes": classes, "batch_size": cfg.batch_size, "world_size": d.world, "seed": cfg.seed}
    if os.path.exists(last_path) and not cfg.resume:
        raise TrainingError(f"{last_path} exists: pass --resume to continue that run, or choose another --out")
    if cfg.resume and os.path.exists(last_path):
        ck = torch.load(last_path, map_location="cpu", weights_only=True)
        ts = ck.get("train_state")
        if ts is None or ts.get("version") != CHECKPOINT_VERSION:
            raise TrainingError(f"{last_path} is not a training checkpoint of this version; cannot resume")
        for key in ("classes", "batch_size", "world_size", "seed"):
            if ts["meta"].get(key) != run_meta[key]:
                raise TrainingError(
                    f"cannot resume {last_path}: {key} differs (checkpoint {ts['meta'].get(key)!r}, now {run_meta[key]!r}); "
                    "the data order would not match"
                )
        if ck["config"] != mcfg.to_dict():
            diff = sorted(k for k in mcfg.to_dict() if ck["config"].get(k) != mcfg.to_dict()[k])
            raise TrainingError(f"cannot resume {last_path}: model config differs in {diff}")
        load_checkpoint(core, ck)
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if scaler is not None and ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        for k in state_keys:
            state[k] = ts[k]
        rng = ts["rng"]
        _set_rng_state(rng[d.rank], device)
        log(f"resumed {last_path}: epoch {state['epoch']}, step {state['step_in_epoch']} of {steps_per_epoch}, global step {state['global_step']}")
    else:
        if cfg.resume:
            log(f"--resume: no checkpoint in {cfg.out}, starting a new run")
        _seed_everything(cfg.seed + 1000003 * d.rank)  # augmentation streams differ per rank
        if d.main:
            write_class_list(classes, os.path.join(cfg.out, "classes.txt"))
            with open(os.path.join(cfg.out, "train_config.json"), "w") as f:
                json.dump({"train": cfg.to_json(), "model": mcfg.to_dict(), "classes": classes, "world_size": d.world}, f, indent=1)

    log(
        f"training {mcfg.name} ({sum(p.numel() for p in params) / 1e6:.2f}M trainable) on {len(train_ds)} clips"
        f"{f' / validating on {len(val_ds)}' if val_ds else ''}, {len(classes)} classes, "
        f"{'multi' if multi_label else 'single'}-label, loss {loss_kind}, mixup {'on' if use_mixup else 'off'}, "
        f"{d.world} process(es) on {device}, {'fp32' if amp_dtype is None else str(amp_dtype).replace('torch.', '')}, "
        f"{steps_per_epoch} steps/epoch, backend {cfg.backend}"
    )

    def save(path: str) -> None:
        rng_all = _all_gather_objects(d, _get_rng_state(device))
        if not d.main:
            return
        ts = {
            "version": CHECKPOINT_VERSION,
            "meta": run_meta,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_all,
            **{k: state[k] for k in state_keys},
        }
        save_checkpoint(core, path, classes=classes, train_state=ts)

    def save_best(metric_name: str) -> None:
        if d.main:
            save_checkpoint(core, best_path, classes=classes, metrics=state["history"][-1], best_metric=metric_name)

    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    seen_bad = set(state["bad_files"])
    indices_log: Dict[int, List[int]] = {}
    stopped = interrupted = False

    def record_bad(messages: List[str]) -> None:
        for m in messages:
            if m not in seen_bad:
                seen_bad.add(m)
                state["bad_files"].append(m)
                log(f"warning: skipping bad file {m}", all_ranks=True)
        if cfg.max_bad_files is not None and len(seen_bad) > cfg.max_bad_files:
            raise TrainingError(f"{len(seen_bad)} bad files, more than --max-bad-files {cfg.max_bad_files}; last: {messages[-1]}")

    def compute_loss(logits: torch.Tensor, target: torch.Tensor, lam: Optional[torch.Tensor]) -> torch.Tensor:
        logits = logits.float()
        if lam is not None and cfg.mixup_labels:
            lam_ = lam.view(-1, 1)
            target = lam_ * target + (1 - lam_) * target.flip(0)
        if loss_kind == "bce":
            return F.binary_cross_entropy_with_logits(logits, target)
        if lam is not None and cfg.mixup_labels:
            return F.cross_entropy(logits, target)
        return F.cross_entropy(logits, target.argmax(dim=1))

    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext

    # ---------------- epochs ----------------
    while state["epoch"] < cfg.epochs and not stopped:
        epoch = state["epoch"]
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        sampler.set_start(state["step_in_epoch"] * cfg.batch_size)
        loader = make_loader(train_ds, sampler, cfg.batch_size)
        model.train()
        if cfg.record_indices:
            indices_log.setdefault(epoch, [])
        t0 = time.perf_counter()
        clips = 0  # this session, for clips/s
        bar = None
        if progress and d.main and _tqdm() is not None:
            bar = _tqdm()(total=steps_per_epoch, initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", dynamic_ncols=True, leave=True)
        for batch in loader:
            if batch["bad"]:
                record_bad(batch["bad"])
            if cfg.record_indices:
                indices_log[epoch] += batch["index"].tolist()
            wave = batch["waveform"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            B = wave.shape[0]
            lam = None
            if use_mixup:
                lam = torch.from_numpy(np.random.beta(cfg.mixup_alpha, cfg.mixup_alpha, size=B).astype(np.float32)).to(device)
            with autocast():
                out = model(wave, mixup_lambda=lam)
            loss = compute_loss(out["clipwise_logits"], target, lam)
            # one collective per step: every rank agrees on "loss finite" and on "stop requested"
            flags = torch.stack([torch.isfinite(loss.detach()).float(), torch.tensor(-1.0 if term.requested else 0.0, device=loss.device)])
            _all_reduce(d, flags, dist.ReduceOp.MIN if d.enabled else None)
            finite, term_all = flags[0], flags[1]
            step_label = f"epoch {epoch + 1}, step {state['step_in_epoch'] + 1} (global step {state['global_step'] + 1})"
            ok = bool(finite.item())
            if not ok:
                files = [os.path.basename(train_ds.items[i].path) for i in batch["source_index"].tolist()[:8]]
                msg = f"non-finite loss at {step_label}; clips in the batch: {', '.join(files)}"
                if cfg.on_nan == "stop":
                    raise TrainingError(msg + " (use --on-nan skip to drop such steps)")
                log(f"warning: {msg}; step skipped", all_ranks=True)
                state["nan_steps"] += 1
                optimizer.zero_grad(set_to_none=True)
            else:
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                gnorm = None
                if cfg.grad_clip and cfg.grad_clip > 0:
                    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if gnorm is not None and not bool(torch.isfinite(gnorm)):
                    msg = f"non-finite gradient norm at {step_label}"
                    if cfg.on_nan == "stop" and scaler is None:
                        raise TrainingError(msg + " (use --on-nan skip to drop such steps)")
                    log(f"warning: {msg}; step skipped")
                    state["nan_steps"] += 1
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.update()
                else:
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state["epoch_loss_sum"] += float(loss.detach())
                state["epoch_loss_n"] += 1
            with warnings.catch_warnings():  # a skipped first step would warn "scheduler before optimizer"
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()  # the schedule follows steps (epochs), skipped or not, like the original's per-epoch LambdaLR
            clips += B
            state["epoch_clips"] += B
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            if bar is not None:
                dt = max(1e-9, time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", clips_s=f"{clips * d.world / dt:.1f}")
            if cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0:
                state["epoch_time"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                clips = 0
                save(last_path)
            if cfg.stop_after_steps is not None and state["global_step"] >= cfg.stop_after_steps:
                stopped = True
                break
            if float(term_all) < 0:  # some rank got SIGTERM: save where we are and leave
                save(last_path)
                log(f"terminated (SIGTERM) at global step {state['global_step']}: saved {last_path}; continue with --resume")
                stopped = interrupted = True
                break
        if bar is not None:
            bar.close()
        if stopped:
            if not interrupted:
                log(f"stopping after global step {state['global_step']} (stop_after_steps)")
            break
        train_time = state["epoch_time"] + time.perf_counter() - t0
        stats = torch.tensor([state["epoch_loss_sum"], state["epoch_loss_n"], state["epoch_clips"]], dtype=torch.float64)
        if d.enabled:
            stats = stats.to(device) if device.type == "cuda" else stats
            _all_reduce(d, stats)
            stats = stats.cpu()
        row = {
            "epoch": epoch + 1,
            "global_step": state["global_step"],
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": float(stats[0] / max(1.0, float(stats[1]))),
            "train_clips": int(stats[2]),
            "clips_per_s": float(stats[2]) / max(1e-9, train_time),
            "bad_files": len(seen_bad),
        }
        if val_loader is not None:
            res = _evaluate(core, val_loader, val_ds, d, device, autocast, loss_kind, multi_label)
            val_bad = res.pop("_bad")
            if val_bad:
                record_bad(val_bad)
            row.update(res)
            row["bad_files"] = len(seen_bad)
        state["history"].append(row)
        state["epoch"] = epoch + 1
        state["step_in_epoch"] = 0
        state.update(epoch_loss_sum=0.0, epoch_loss_n=0, epoch_clips=0, epoch_time=0.0)
        metric_name = ("val_mAP" if multi_label else "val_accuracy") if val_loader is not None else None
        improved = False
        if metric_name and row.get(metric_name) is not None and not math.isnan(row[metric_name]):
            if state["best"] is None or row[metric_name] > state["best"]["value"]:
                state["best"] = {"metric": metric_name, "value": row[metric_name], "epoch": epoch + 1}
                improved = True
        save(last_path)
        if improved:
            save_best(metric_name)
        if d.main:
            _write_metrics(cfg.out, state["history"])
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()]
        log(", ".join(parts))

    if cfg.record_indices:
        with open(os.path.join(cfg.out, f"indices_rank{d.rank}.json"), "w") as f:
            json.dump({str(k): v for k, v in indices_log.items()}, f)
    if d.main and not stopped and state["bad_files"]:
        with open(os.path.join(cfg.out, "bad_files.txt"), "w") as f:
            f.write("".join(m + "\n" for m in state["bad_files"]))
    return {
        "out": cfg.out,
        "last_checkpoint": last_path,
        "best_checkpoint": best_path if os.path.exists(best_path) else None,
        "epochs": state["epoch"],
        "global_step": state["global_step"],
        "history": state["history"],
        "best": state["best"],
        "bad_files": list(state["bad_files"]),
        "nan_steps": state["nan_steps"],
        "stopped": stopped,
        "interrupted": interrupted,
        "rank": d.rank,
        "world_size": d.world,
        "model": core,
    }


@torch.no_grad()
def _evaluate(model, loader, ds, d: _Dist, device, autocast, loss_kind: str, multi_label: bool) -> dict:
    """Validation loss, accuracy (single-label data) and mAP over the whole set (all ranks gathered)."""
    model.eval()
    idx, targets, logits_all, bad = [], [], [], []
    for batch in loader:
        bad += batch["bad"]
        keep = batch["valid"]
        if not keep.any():
            continue
        wave = batch["waveform"][keep].to(device)
        with autocast():
            out = model(wave)
        logits = out["clipwise_logits"].float().cpu()
        idx.append(batch["index"][keep])
        logits_all.append(logits)
        targets.append(batch["target"][keep])
    model.train()
    local = (
        torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long),
        torch.cat(logits_all) if logits_all else torch.zeros(0, len(ds.classes)),
        torch.cat(targets) if targets else torch.zeros(0, len(ds.classes)),
        bad,
    )
    gathered = _all_gather_objects(d, local)
    index = torch.cat([g[0] for g in gathered])
    logits = torch.cat([g[1] for g in gathered])
    target = torch.cat([g[2] for g in gathered])
    all_bad = sorted({m for g in gathered for m in g[3]})
    # DistributedSampler-style padding repeats a few clips: keep each index once
    order = {}
    for pos, i in enumerate(index.tolist()):
        order.setdefault(i, pos)
    sel = torch.tensor(sorted(order.values()), dtype=torch.long)
    logits, target = logits[sel], target[sel]
    res: Dict[str, Any] = {"val_clips": int(len(sel)), "val_bad_files": len(all_bad), "_bad": all_bad}
    if len(sel) == 0:
        return res
    if loss_kind == "bce":
        res["val_loss"] = float(F.binary_cross_entropy_with_logits(logits, target))
        probs = torch.sigmoid(logits)
    else:
        res["val_loss"] = float(F.cross_entropy(logits, target.argmax(dim=1))) if not multi_label else float("nan")
        probs = torch.softmax(logits, dim=1)
    if not multi_label:
        res["val_accuracy"] = float((probs.argmax(dim=1) == target.argmax(dim=1)).float().mean())
    res["val_mAP"] = mean_average_precision(probs.numpy(), target.numpy())
    return res
