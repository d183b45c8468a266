"""Everything a run is built from, in one :class:`Run`: device, data, model (with its DDP wrapper),
loaders, optimiser, schedule, precision, objective and the paths of the output folder.

Defaults follow the original (docs/model.md §9): AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight
decay 0.05 on every parameter) and its per-epoch LR multipliers. The original's ``head`` Linear
is never used in forward; it is frozen so DDP does not wait for its gradients.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointError, load_checkpoint
from ..data import (
    AudioDataset,
    ManifestError,
    ResumableSampler,
    apply_aliases,
    check_labels,
    classes_from_items,
    collate,
    is_multi_label,
    read_class_aliases,
    read_class_list,
    read_dataset,
    split_by_fold,
)
from ..model import HTSAT, create_model
from .config import TrainConfig, TrainingError
from .distributed import Dist, worker_ignores_sigterm
from .objective import Mixup, Objective
from .sampling import BalancedSampler, class_members, resolve_sampler
from .schedule import make_lr_lambda
from .state import seed_everything

__all__ = ["Paths", "Run", "build_run"]


@dataclass
class Paths:
    out: str

    def __post_init__(self) -> None:
        self.last = os.path.join(self.out, "last.pt")
        self.best = os.path.join(self.out, "best.pt")
        self.classes = os.path.join(self.out, "classes.txt")
        self.config = os.path.join(self.out, "train_config.json")
        self.bad_files = os.path.join(self.out, "bad_files.txt")
        self.top = os.path.join(self.out, "top")  # --keep-top checkpoints


class Logger:
    """Messages from rank 0, and from every rank when they concern that rank."""

    def __init__(self, fn: Callable[[str], None] | None, d: Dist):
        self.fn = fn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.d = d

    def __call__(self, msg: str, all_ranks: bool = False) -> None:
        if self.d.main:
            self.fn(msg)
        elif all_ranks:
            self.fn(f"[rank {self.d.rank}] {msg}")


@dataclass
class Run:
    cfg: TrainConfig
    dist: Dist
    log: Logger
    paths: Paths
    device: torch.device
    classes: list[str]
    multi_label: bool
    core: HTSAT  # the model itself
    model: torch.nn.Module  # what the loop calls: core, or its DDP wrapper
    params: list[torch.nn.Parameter]
    train_ds: AudioDataset
    sampler: ResumableSampler
    steps_per_epoch: int
    val_ds: AudioDataset | None
    val_loader: DataLoader | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    amp_dtype: torch.dtype | None
    scaler: Any | None
    objective: Objective
    meta: dict  # what last.pt records about the run; resume checks classes/batch_size/world_size/seed

    @property
    def out(self) -> str:
        return self.paths.out

    @property
    def metric_name(self) -> str | None:
        """The validation metric that picks best.pt."""
        if self.val_loader is None:
            return None
        return "val_mAP" if self.multi_label else "val_accuracy"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loader(self, ds: AudioDataset, sampler: ResumableSampler, drop_last: bool = False) -> DataLoader:
        g = torch.Generator()  # keeps DataLoader from drawing its base seed from the global RNG
        g.manual_seed(self.cfg.seed)
        workers = self.cfg.num_workers
        return DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            drop_last=drop_last,
            pin_memory=self.device.type == "cuda",
            generator=g,
            persistent_workers=False,
            worker_init_fn=worker_ignores_sigterm if workers > 0 else None,
        )


def pick_device(cfg: TrainConfig, d: Dist) -> torch.device:
    if cfg.device:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", d.local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 autocast needs a CUDA device; use --precision bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_data(cfg: TrainConfig):
    """Training items, validation items (or None) and the class list."""
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
        classes = classes_from_items(items, val_items=val_items)
    check_labels(items, classes)
    if val_items is not None:
        check_labels(val_items, classes)
    return items, val_items, classes


def _init_weights(model: HTSAT, path: str, drop_head: str, log: Logger) -> None:
    drop = {"yes": True, "no": False}.get(drop_head)
    if drop is None:  # auto: keep the head unless the class count differs
        try:
            report = load_checkpoint(model, path, drop_head=False)
        except CheckpointError as e:
            if "drop_head=True" not in str(e):
                raise
            report = load_checkpoint(model, path, drop_head=True)
    else:
        report = load_checkpoint(model, path, drop_head=drop)
    log(f"initialised from {path}: {report}")


def build_model(cfg: TrainConfig, d: Dist, device: torch.device, classes: list[str], will_resume: bool, log: Logger):
    """(core model, what the loop calls: core or DDP(core))."""
    seed_everything(cfg.seed)  # identical initial weights on every rank
    overrides = dict(cfg.model_overrides)
    overrides.pop("num_classes", None)
    model = create_model(cfg.model, num_classes=len(classes), backend=cfg.backend, **overrides)
    model.use_spec_augment = cfg.specaugment
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Module):
        for p in head.parameters():
            p.requires_grad_(False)
    if cfg.init_checkpoint and not will_resume:
        _init_weights(model, cfg.init_checkpoint, cfg.init_drop_head, log)
    model.to(device)
    if d.enabled and cfg.sync_bn:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log("warning: --sync-bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); using per-process BatchNorm")
    if not d.enabled:
        return model, model
    ddp_kwargs: dict = dict(find_unused_parameters=cfg.find_unused_parameters)
    if device.type == "cuda":
        ddp_kwargs.update(device_ids=[device.index], output_device=device.index)
    return model, torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def build_run(cfg: TrainConfig, d: Dist, paths: Paths, log: Logger) -> Run:
    device = pick_device(cfg, d)
    items, val_items, classes = load_data(cfg)
    if cfg.keep_top and not val_items:
        raise TrainingError("--keep-top needs validation data (--val-manifest or --val-fold) to rank the epochs")
    multi_label = is_multi_label(items)
    will_resume = cfg.resume and os.path.exists(paths.last)
    core, model = build_model(cfg, d, device, classes, will_resume, log)
    mcfg = core.config
    loss_kind = cfg.loss if cfg.loss != "auto" else ("ce" if mcfg.loss_type == "clip_ce" else "bce")
    if loss_kind == "ce" and multi_label:
        bad = next(it for it in items if len(it.labels) != 1)
        raise ManifestError(
            f"single-label training (cross-entropy, loss_type clip_ce) needs exactly one label per clip, but "
            f"{bad.where()} ({os.path.basename(bad.path)}) has {len(bad.labels)}; use a clip_bce model or --loss bce"
        )
    mixup = Mixup(cfg.mixup == "on" or (cfg.mixup == "auto" and multi_label), cfg.mixup_alpha, cfg.mixup_labels)

    clip_seconds = cfg.clip_seconds if cfg.clip_seconds is not None else mcfg.clip_seconds
    clip_samples = int(round(clip_seconds * mcfg.sample_rate))
    if core.num_frames(clip_samples) > mcfg.max_frames:
        raise ValueError(f"clip_seconds {clip_seconds} is longer than one model image ({mcfg.max_frames} frames)")
    common: dict[str, Any] = dict(
        pad=cfg.pad, on_error=cfg.on_bad_file, silence_db=cfg.silence_db, seed=cfg.seed, cache=cfg.cache_audio
    )
    train_ds = AudioDataset(items, classes, mcfg.sample_rate, clip_samples, train=True, crop=cfg.crop, **common)
    sampler_kind = resolve_sampler(cfg.sampler, multi_label, classes)
    shard = dict(seed=cfg.seed, num_replicas=d.world, rank=d.rank, drop_last=cfg.drop_last)
    if sampler_kind == "balanced":
        members = class_members(items, classes)
        empty = [c for c, m in zip(classes, members) if not m]
        if empty:
            log(f"warning: balanced sampler: {len(empty)} class(es) without a training clip are never drawn: {empty[:5]}")
        sampler: ResumableSampler = BalancedSampler(members, len(train_ds), **shard)
        log("sampler: balanced (the original's class-balanced queue)")  # the shuffle is the unannounced default
    else:
        sampler = ResumableSampler(len(train_ds), shuffle=True, **shard)
    per_rank = sampler.num_samples
    steps_per_epoch = per_rank // cfg.batch_size if cfg.drop_last else math.ceil(per_rank / cfg.batch_size)
    if steps_per_epoch == 0:
        raise ManifestError(f"{cfg.manifest}: {len(train_ds)} clips give no full batch of {cfg.batch_size} per process")

    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    lr_fn = make_lr_lambda(cfg.lr_schedule, steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
    amp_dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    meta = {
        "classes": classes,
        "batch_size": cfg.batch_size,
        "world_size": d.world,
        "seed": cfg.seed,
        "sampler": sampler_kind,
        "train_config": {"train": cfg.to_json(), "model": mcfg.to_dict(), "classes": classes, "world_size": d.world},
    }
    run = Run(
        cfg=cfg, dist=d, log=log, paths=paths, device=device, classes=classes, multi_label=multi_label, core=core, model=model,
        params=params, train_ds=train_ds, sampler=sampler, steps_per_epoch=steps_per_epoch, val_ds=None, val_loader=None,
        optimizer=optimizer, scheduler=scheduler, amp_dtype=amp_dtype, scaler=scaler, objective=Objective(loss_kind, mixup),
        meta=meta,
    )  # fmt: skip
    if val_items:
        run.val_ds = AudioDataset(val_items, classes, mcfg.sample_rate, clip_samples, train=False, crop="start", **common)
        run.val_loader = run.loader(
            run.val_ds, ResumableSampler(len(run.val_ds), shuffle=False, num_replicas=d.world, rank=d.rank)
        )
    return run
