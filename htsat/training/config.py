"""The settings of a training run: one dataclass whose fields carry their help text, choices and
command-line spelling, so the ``htsat train`` parser, the validation of API calls and the saved
``train_config.json`` all come from one declaration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

from htsat_kernels import BACKENDS

from ..audio import DEFAULT_SILENCE_DB

__all__ = ["TrainConfig", "TrainingError", "add_arguments", "config_from_args", "HelpFormatter", "DEFAULT_NUM_WORKERS"]

DEFAULT_NUM_WORKERS = min(4, os.cpu_count() or 1)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, too many bad files, inconsistent resume, an
    output folder in use or not writable)."""


def _model_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a model config field), got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def option(default: Any = MISSING, help: str = "", *, group: str, factory: Callable[[], Any] | None = None, **cli: Any):
    """A TrainConfig field with its command-line metadata. ``cli`` keys: choices, flag (the
    option string; default ``--name-with-dashes``), aliases, metavar, parse (argparse ``type``),
    nargs, append (repeatable flag collected into a list), to_value (list/namespace value ->
    field value), hidden (in the parser but not in --help), cli=False (API only),
    record=False (left out of train_config.json: it steers this session, not the run)."""
    metadata = {"help": help, "group": group, **cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Settings of a run. Each field's metadata holds its help text, choices and flag: ``htsat
    train`` is generated from them (:func:`add_arguments`), so a default is stated here only."""

    # data
    manifest: str = option(
        group="data",
        aliases=("--esc50",),
        help=("CSV with columns path,labels[,fold] (labels separated by ';'), or an ESC-50 folder (meta/esc50.csv + audio/)"),
    )
    out: str = option(group="data", help="output folder (checkpoints, metrics, class list)")
    val_manifest: str | None = option(None, "validation manifest (or ESC-50 folder)", group="data")
    val_fold: str | None = option(None, "hold out this fold of --manifest for validation", group="data")
    cv: int | None = option(
        None,
        "K-fold cross-validation: train K runs into <out>/fold<f>, each holding out one of the first K folds "
        "(ESC-50: --cv 5), and write <out>/cv_summary.json/.csv with the mean and std",
        group="data",
        metavar="K",
    )
    classes: str | None = option(
        None,
        group="data",
        help=("class list file (.txt one per line, .csv with display_name/label column, or .json); default: from the data"),
    )
    data_root: str | None = option(None, "base folder for relative audio paths (default: the manifest's folder)", group="data")
    clip_seconds: float | None = option(None, "training clip length (default: the model's clip_seconds)", group="data")
    pad: str = option("tile", "how short clips are filled", group="data", choices=("tile", "zeros", "repeatpad"))
    crop: str = option("random", "how long clips are cut in training", group="data", choices=("random", "start", "center"))
    on_bad_file: str = option(
        "skip", "unreadable/empty/silent files: skip and count, or stop", group="data", choices=("skip", "stop")
    )
    max_bad_files: int | None = option(None, "stop once more files than this were bad", group="data")
    silence_db: float | None = option(
        DEFAULT_SILENCE_DB,
        "files whose peak is at or below this dBFS are bad ('none' keeps them)",
        group="data",
        parse=_optional_float,
    )
    cache_audio: bool = option(False, "keep decoded clips in memory (useful with --num-workers 0)", group="data")
    num_workers: int = option(DEFAULT_NUM_WORKERS, "data loader worker processes", group="data")
    # model
    model: str = option(
        "htsat-audioset", "preset name (htsat-audioset, htsat-esc50, htsat-scv2) or JSON config file", group="model"
    )
    model_overrides: dict[str, Any] = option(
        group="model",
        factory=dict,
        flag="--set",
        append=True,
        parse=_model_override,
        metavar="KEY=VALUE",
        to_value=dict,
        help="override a model config field (JSON value), e.g. --set drop_path_rate=0.2",
    )
    backend: str = option("auto", "op implementations", group="model", choices=BACKENDS)
    init_checkpoint: str | None = option(None, "start from these weights (original .ckpt, state_dict or ours)", group="model")
    init_drop_head: str = option(
        "auto",
        "drop head/tscam_conv of --init-checkpoint (auto: when the class count differs)",
        group="model",
        choices=("auto", "yes", "no"),
    )
    # optimisation (docs/model.md §9)
    epochs: int = option(100, "number of epochs", group="optimisation")
    batch_size: int = option(32, "per process", group="optimisation")
    lr: float = option(1e-3, "base learning rate (the original schedule multiplies it, peak 0.1x)", group="optimisation")
    weight_decay: float = option(0.05, "AdamW weight decay (on every parameter, as the original)", group="optimisation")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas", group="optimisation", nargs=2, parse=float, to_value=tuple)
    eps: float = option(1e-8, "AdamW eps", group="optimisation")
    lr_schedule: str = option(
        "original", "learning-rate schedule", group="optimisation", choices=("original", "cosine", "constant")
    )
    warmup_epochs: float | None = option(
        None, "warm-up length (original: 3 epochs, scalable; cosine/constant: 0)", group="optimisation"
    )
    min_lr_ratio: float = option(0.0, "cosine floor as a fraction of --lr", group="optimisation")
    grad_clip: float = option(1.0, "max gradient norm, 0 disables", group="optimisation")
    loss: str = option(
        "auto", "auto: ce for loss_type clip_ce, else bce (with logits)", group="optimisation", choices=("auto", "bce", "ce")
    )
    mixup: str = option(
        "auto",
        "auto: on for multi-label data (the original's AudioSet recipe)",
        group="optimisation",
        choices=("auto", "on", "off"),
    )
    mixup_alpha: float = option(0.5, "mixup weights are drawn from Beta(alpha, alpha) per clip", group="optimisation")
    mixup_labels: bool = option(False, "mix the targets too (the original does not)", group="optimisation")
    specaugment: bool = option(True, "disable SpecAugment", group="optimisation", flag="--no-specaug")
    sampler: str = option(
        "auto",
        "training order: balanced (the original's AudioSet queue: shuffle the class ids, draw one clip of each, "
        "repeat; an epoch = as many draws as clips), shuffle; auto: balanced for multi-label data with the "
        "AudioSet classes (--classes audioset), else shuffle",
        group="optimisation",
        choices=("auto", "balanced", "shuffle"),
    )
    drop_last: bool = option(False, "drop the last incomplete batch of every epoch", group="optimisation")
    # runtime
    precision: str = option(
        "auto", "auto: bf16 autocast on GPUs, fp32 on CPU", group="runtime", choices=("auto", "fp32", "bf16", "fp16")
    )
    device: str | None = option(
        None, "cpu, cuda, cuda:1 (default: the local GPU under torchrun, else cuda if present, else cpu)", group="runtime"
    )
    seed: int = option(0, "seed of the weights, the data order and every augmentation", group="runtime")
    sync_bn: bool = option(False, "SyncBatchNorm under DDP (the original sets sync_batchnorm)", group="runtime")
    find_unused_parameters: bool = option(False, "DDP find_unused_parameters", group="runtime")
    on_nan: str = option("stop", "a non-finite loss stops the run or drops the step", group="runtime", choices=("stop", "skip"))
    checkpoint_every: int = option(
        0, "also write last.pt every STEPS steps (0: epoch ends only)", group="runtime", metavar="STEPS"
    )
    keep_top: int = option(
        0,
        "keep the K best epochs by the validation metric as <out>/top/epoch-E_METRIC-V.pt (the original keeps 20; "
        "average them with htsat average <out>/top -o avg.pt); 0: off",
        group="runtime",
        metavar="K",
    )
    resume: bool = option(False, "continue from <out>/last.pt (starts fresh when there is none)", group="runtime", record=False)
    stop_after_steps: int | None = option(
        None, "stop after this global step without a final checkpoint (simulates a kill)", group="runtime"
    )
    progress: bool | None = option(
        None,
        "progress bar even when stderr is not a terminal (default: when it is one)",
        group="runtime",
        negative="--no-progress",
        negative_help="no progress bar",
        record=False,
    )
    log: Callable[[str], None] | None = option(
        None, "where messages go (default: stderr)", group="runtime", cli=False, record=False
    )
    record_indices: bool = option(
        False, "write <out>/indices_rank<r>.json (sample order per epoch; for tests)", group="runtime", hidden=True
    )

    def validate(self) -> None:
        """ValueError naming the field for a value outside its choices or range (API calls; the CLI
        parser already refuses them)."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {tuple(choices)}, got {value!r}")
        if self.batch_size < 1 or self.epochs < 0:
            raise ValueError("batch_size must be >= 1 and epochs >= 0")
        if self.cv is not None and self.cv < 1:
            raise ValueError(f"cv must be >= 1, got {self.cv}")
        if self.keep_top < 0:
            raise ValueError(f"keep_top must be >= 0, got {self.keep_top}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    def to_json(self) -> dict:
        """The run's settings as written to train_config.json (session-only fields left out)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("record", True)}
        return json.loads(json.dumps(d))  # tuples -> lists, a deep copy


# ----------------------------------------------------------------------------------------------
# the command line, generated from the fields
# ----------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where it says something: not for switches, unset options, or help that
    states its own default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, []) or "default" in text:
            return text
        return super()._get_help_string(action) or text


def _cli_fields():
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]


def _base_type(annotation: Any) -> Any:
    """int for ``int`` and ``Optional[int]``; None for containers (their metadata says how to parse)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # Optional[int] and int | None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if annotation in (int, float, str, bool) else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per TrainConfig field to ``parser``, grouped as the fields are."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    for f in _cli_fields():
        md = f.metadata
        group = groups.get(md["group"]) or groups.setdefault(md["group"], parser.add_argument_group(md["group"]))
        flags = [md.get("flag", "--" + f.name.replace("_", "-")), *md.get("aliases", ())]
        kw: dict[str, Any] = {"dest": f.name, "help": argparse.SUPPRESS if md.get("hidden") else md["help"]}
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        kind = _base_type(hints[f.name])
        if default is MISSING:
            kw["required"] = True
        elif md.get("append"):
            kw.update(action="append", default=[])
        else:
            kw["default"] = default
        if kind is bool and "negative" in md:  # tri-state: --x / --no-x / neither (None)
            group.add_argument(
                md["negative"],
                dest=f.name,
                action="store_false",
                default=default,
                help=argparse.SUPPRESS if md.get("hidden") else md.get("negative_help", f"no {f.name.replace('_', ' ')}"),
            )
            kw["action"] = "store_true"
        elif kind is bool:
            kw["action"] = "store_false" if default else "store_true"
        else:
            kw["type"] = md.get("parse", kind)
            for key in ("choices", "metavar", "nargs"):
                if key in md:
                    kw[key] = md[key]
        group.add_argument(*flags, **kw)


def config_from_args(args: argparse.Namespace, **extra: Any) -> TrainConfig:
    """The TrainConfig of parsed ``htsat train`` arguments."""
    values = {}
    for f in _cli_fields():
        value = getattr(args, f.name)
        convert = f.metadata.get("to_value")
        values[f.name] = convert(value) if convert is not None and value is not None else value
    values.update(extra)
    return TrainConfig(**values)
