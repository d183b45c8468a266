"""``htsat evaluate``: clip-level evaluation of a checkpoint on a manifest, as the original tests.

Scores are the model's ``clipwise_output`` on each clip fitted to ``clip_seconds`` (start crop,
short clips tiled: the training defaults). With ``--ensemble-rolls N`` every clip is passed N
times, the waveform rolled left cumulatively by 100*(i+1) samples after pass i (shifts 0, 100,
300, ..., 4500 for N = 10), and the outputs averaged: the original's AudioSet test-time ensemble.

Multi-label data: mAP, mAUC, d-prime and per-class AP/AUC over the clips with at least one
label (:mod:`htsat.training.metrics`); single-label data: accuracy and the confusion matrix.
Written to the output folder: ``metrics.json``, ``per_class.csv`` (or ``confusion_matrix.csv``),
with ``--save-scores`` ``scores.npy``/``targets.npy``, and with ``--plot`` ``per_class_ap.png``
(per-class accuracy for single-label data).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np
import torch

from .audio import DEFAULT_SILENCE_DB
from .checkpoint import FORMAT, CheckpointError, model_from_checkpoint, read_checkpoint
from .data import (
    AudioDataset,
    ManifestError,
    apply_aliases,
    check_labels,
    collate,
    is_multi_label,
    read_class_aliases,
    read_class_list,
    read_dataset,
    split_by_fold,
)

__all__ = ["roll_shifts", "ensemble_scores", "evaluate_checkpoint", "add_parser", "run"]

ROLL_STEP = 100  # samples; the original's time_shifting(100 * (i + 1))


def roll_shifts(rolls: int) -> list[int]:
    """The total left shift of each pass: 0, 100, 300, 600, ... (cumulative 100*(i+1))."""
    out, total = [], 0
    for i in range(rolls):
        out.append(total)
        total += ROLL_STEP * (i + 1)
    return out


@torch.no_grad()
def ensemble_scores(model: torch.nn.Module, waveform: torch.Tensor, rolls: int = 1, key: str = "clipwise_output") -> torch.Tensor:
    """Mean of ``model(waveform)[key]`` over ``rolls`` passes with the waveform rolled left
    cumulatively by 100*(i+1) samples after pass i (the original's test-time ensemble)."""
    if rolls < 1:
        raise ValueError(f"ensemble rolls must be >= 1, got {rolls}")
    total = None
    wave = waveform
    for i in range(rolls):
        out = model(wave)[key].float()
        total = out if total is None else total + out
        wave = torch.roll(wave, -ROLL_STEP * (i + 1), dims=-1)
    return total / rolls


def _classes(obj: dict, num_classes: int, classes_file: str | None) -> tuple[list[str], dict]:
    if classes_file:
        names, aliases = read_class_list(classes_file), read_class_aliases(classes_file)
    elif isinstance(obj.get("classes"), (list, tuple)):
        names, aliases = list(obj["classes"]), {}
    elif num_classes == 527:
        names, aliases = read_class_list("audioset"), read_class_aliases("audioset")
    else:
        raise ManifestError("the checkpoint holds no class list: give one with --classes")
    if len(names) != num_classes:
        raise ManifestError(f"{classes_file or 'the checkpoint'}: {len(names)} classes for a model with {num_classes}")
    return names, aliases


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    return x


def _check_finite(scores: np.ndarray, checkpoint, paths: list[str]) -> None:
    """Metrics of NaN scores mean nothing (argmax of NaN is class 0; sklearn refuses them): stop, naming the checkpoint."""
    bad = ~np.isfinite(scores).all(axis=1)
    if bad.any():
        raise CheckpointError(
            f"{os.fspath(checkpoint)}: the model outputs NaN or infinite scores (first on {paths[int(np.argmax(bad))]}): "
            "a diverged or damaged checkpoint? no metrics computed"
        )


def _check_finite_weights(model: torch.nn.Module, checkpoint) -> None:
    """A checkpoint with NaN or infinite weights (a diverged run) is refused before any audio is decoded."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{os.fspath(checkpoint)}: NaN or infinite weights in {', '.join(bad[:3])}{more}: a diverged or damaged "
            "checkpoint? no metrics computed"
        )


def _check_event_labels(events_path: str, ref: dict, known: list[str], class_map: str | None) -> None:
    """Reference labels the detections can never have score F1 0 silently: refuse them, as the clip-level path does."""
    labels = sorted({ev[2] for evs in ref.values() for ev in evs} - set(known))
    if labels:
        where = f"targets of the class map {class_map}" if class_map else f"classes of the model ({len(known)})"
        fix = "add them to the class map" if class_map else "give --class-map to map model classes onto them"
        shown = ", ".join(map(repr, labels[:10])) + (f" (and {len(labels) - 10} more)" if len(labels) > 10 else "")
        raise ManifestError(f"{events_path}: {len(labels)} reference label(s) {shown} not among the {where}; {fix}")


def evaluate_checkpoint(
    checkpoint: str,
    manifest: str,
    *,
    model_name: str | None = None,
    classes_file: str | None = None,
    data_root: str | None = None,
    fold: str | None = None,
    task: str = "auto",
    ensemble_rolls: int = 1,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str | None = None,
    backend: str = "auto",
    pad: str = "tile",
    log=None,
) -> dict[str, Any]:
    """Scores, targets and metrics of ``checkpoint`` on ``manifest`` (a CSV manifest or an ESC-50
    folder; ``fold``: only the clips of that fold)."""
    if ensemble_rolls < 1:
        raise ValueError(f"--ensemble-rolls must be >= 1, got {ensemble_rolls}")
    obj = read_checkpoint(checkpoint)
    model = model_from_checkpoint(obj, name=model_name if obj.get("format") != FORMAT else None, backend=backend,
                                  source=checkpoint)  # fmt: skip
    _check_finite_weights(model, checkpoint)
    cfg = model.config
    classes, aliases = _classes(obj, cfg.num_classes, classes_file)
    items, _ = read_dataset(manifest, root=data_root)
    if fold is not None:
        _, items = split_by_fold(items, fold)
    items = apply_aliases(items, aliases)
    check_labels(items, classes)
    multi = is_multi_label(items) if task == "auto" else task == "multi-label"
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    clip_samples = int(round(cfg.clip_seconds * cfg.sample_rate))
    ds = AudioDataset(items, classes, cfg.sample_rate, clip_samples, train=False, crop="start", pad=pad,
                      silence_db=DEFAULT_SILENCE_DB)  # fmt: skip
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    scores, targets, index, bad = [], [], [], []
    for batch in loader:
        bad += batch["bad"]
        keep = batch["valid"]
        if not keep.any():
            continue
        out = ensemble_scores(model, batch["waveform"][keep].to(dev), ensemble_rolls).cpu().numpy()
        _check_finite(out, checkpoint, [items[i].path for i in batch["index"][keep].tolist()])
        scores.append(out)
        targets.append(batch["target"][keep].numpy())
        index += batch["index"][keep].tolist()
    if not scores:
        raise ManifestError(f"{manifest}: no readable clip to evaluate ({len(bad)} bad)")
    s, t = np.concatenate(scores), np.concatenate(targets)
    from .training.metrics import multilabel_metrics, singlelabel_metrics

    if multi:
        metrics = multilabel_metrics(s, t, drop_unlabelled=True)
    else:
        if (t.sum(axis=1) != 1).any():
            raise ManifestError(f"{manifest}: single-label evaluation needs exactly one label per clip; use --task multi-label")
        metrics = singlelabel_metrics(s, t, len(classes))
    summary = {
        "checkpoint": os.fspath(checkpoint),
        "manifest": os.fspath(manifest),
        "fold": fold,
        "task": "multi-label" if multi else "single-label",
        "ensemble_rolls": ensemble_rolls,
        "roll_shifts": roll_shifts(ensemble_rolls),
        "bad_files": bad,
        **metrics,
        "class_names": classes,
    }
    return {"metrics": summary, "scores": s, "targets": t, "paths": [items[i].path for i in index]}


def write_outputs(result: dict[str, Any], out: str, *, plot: bool = False, save_scores: bool = False) -> list[str]:
    """metrics.json, per_class.csv / confusion_matrix.csv [, scores.npy, targets.npy, per_class_ap.png]."""
    os.makedirs(out, exist_ok=True)
    m = result["metrics"]
    written = [os.path.join(out, "metrics.json")]
    with open(written[0], "w", encoding="utf-8") as f:
        json.dump(_finite_or_none(m), f, indent=1, allow_nan=False)
    t = result["targets"]
    names = m["class_names"]
    if m["task"] == "multi-label":
        path = os.path.join(out, "per_class.csv")
        keep = t.sum(axis=1) > 0
        positives = t[keep].sum(axis=0).astype(int)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["class", "positives", "ap", "auc"])
            for c, name in enumerate(names):
                ap, auc = m["per_class_ap"][c], m["per_class_auc"][c]
                w.writerow([name, positives[c], "" if math.isnan(ap) else f"{ap:.6f}", "" if math.isnan(auc) else f"{auc:.6f}"])
    else:
        path = os.path.join(out, "confusion_matrix.csv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *names])
            for name, row in zip(names, m["confusion_matrix"]):
                w.writerow([name, *row])
    written.append(path)
    if save_scores:
        for key in ("scores", "targets"):
            written.append(os.path.join(out, f"{key}.npy"))
            np.save(written[-1], result[key])
    if plot:
        written.append(_plot(m, os.path.join(out, "per_class_ap.png")))
    return written


def _plot(m: dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = m["class_names"]
    if m["task"] == "multi-label":
        values, title, ylabel = np.array(m["per_class_ap"], dtype=float), f"per-class AP (mAP {m['mAP']:.4f})", "AP"
    else:
        cm = np.array(m["confusion_matrix"], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.diag(cm) / cm.sum(axis=1)
        title, ylabel = f"per-class accuracy (accuracy {m['accuracy']:.4f})", "accuracy"
    order = [i for i in np.argsort(-np.nan_to_num(values, nan=-1.0)) if not math.isnan(values[i])]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(order) + 2), 4))
    ax.bar(range(len(order)), values[order], width=1.0 if len(order) > 60 else 0.8)
    ax.set(title=title, ylabel=ylabel, xlabel="class (sorted)", ylim=(0, 1), xlim=(-0.5, max(len(order), 1) - 0.5))
    if len(order) <= 60:
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([names[i] for i in order], rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    e = sub.add_parser(
        "evaluate",
        help="clip-level metrics of a checkpoint on a manifest (mAP/mAUC/d-prime or accuracy), as the original tests",
        description="Evaluate a checkpoint on a manifest or ESC-50 folder: mAP, mAUC, d-prime and per-class AP for multi-label "
        "data (clips with at least one label), accuracy and a confusion matrix for single-label data; JSON + CSV.",
    )
    e.add_argument("--manifest", help="CSV manifest (path,labels[,fold]) or ESC-50 folder (clip-level evaluation)")
    e.add_argument("--checkpoint", help="checkpoint (ours, averaged, or an original .ckpt)")
    e.add_argument("--model", help="preset or JSON config for checkpoints without one (default htsat-audioset)")
    e.add_argument("--classes", help="class list (default: saved in the checkpoint, or AudioSet's 527)")
    e.add_argument("--data-root", help="base folder for relative audio paths (default: the manifest's folder)")
    e.add_argument("--fold", help="evaluate only this fold of the manifest (e.g. the held-out ESC-50 fold)")
    e.add_argument(
        "--task",
        choices=("auto", "multi-label", "single-label"),
        default="auto",
        help="auto: single-label when every clip has exactly one label (default: auto)",
    )
    e.add_argument(
        "--ensemble-rolls",
        type=int,
        default=1,
        metavar="N",
        help="test-time ensemble: N passes rolled by 100*(i+1) samples, averaged (the original: 10 on AudioSet)",
    )
    e.add_argument("-o", "--out", help="output folder (default: eval_<manifest name>)")
    e.add_argument("--plot", action="store_true", help="also write per_class_ap.png (matplotlib)")
    e.add_argument("--save-scores", action="store_true", help="also write scores.npy and targets.npy")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    e.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    e.add_argument("--backend", default="auto", choices=("auto", "reference", "fused"))
    s = e.add_argument_group("sound event detection (instead of --manifest)")
    s.add_argument("--events", metavar="REF.tsv", help="reference events (DCASE TSV: filename onset offset event_label)")
    s.add_argument("--predicted", metavar="EST.tsv", help="score these events instead of running --checkpoint")
    s.add_argument("--audio-dir", help="folder of the files REF names (default: REF's folder)")
    s.add_argument("--class-map", help="CSV/TSV source,target: map model classes onto the reference labels (max over sources)")
    s.add_argument("--threshold", type=float, default=0.5, help="framewise probability threshold")
    s.add_argument("--median-filter", type=int, default=1, metavar="FRAMES", help="median filter of the binary activity")
    s.add_argument("--t-collar", type=float, default=0.2, help="event-based onset collar (s)")
    s.add_argument("--percentage-of-length", type=float, default=0.2, help="event-based offset collar, fraction of length")
    s.add_argument("--segment", type=float, default=1.0, help="segment-based resolution (s)")


def _summary_line(m: dict[str, Any]) -> str:
    if m["task"] == "multi-label":
        return (f"mAP {m['mAP']:.4f}  mAUC {m['mAUC']:.4f}  d-prime {m['dprime']:.4f}  over {m['clips']} clips "
                f"({m['clips_without_labels']} without labels left out), {m['classes'] - m['classes_without_positives']} "
                f"of {m['classes']} classes with positives")  # fmt: skip
    return f"accuracy {m['accuracy']:.4f} over {m['clips']} clips"


def run(args) -> int:
    if args.batch_size < 1 or args.num_workers < 0:
        raise ValueError("--batch-size must be >= 1 and --num-workers >= 0")
    if bool(args.manifest) == bool(args.events):
        raise ValueError("give --manifest (clip-level) or --events (sound event detection)")
    if args.events:
        return _run_events(args)
    if not args.checkpoint:
        raise ValueError("--checkpoint is required with --manifest")
    result = evaluate_checkpoint(
        args.checkpoint, args.manifest, model_name=args.model, classes_file=args.classes, data_root=args.data_root,
        fold=args.fold, task=args.task, ensemble_rolls=args.ensemble_rolls, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, backend=args.backend,
    )  # fmt: skip
    stem = os.path.splitext(os.path.basename(os.path.normpath(args.manifest)))[0]
    out = args.out or f"eval_{stem}"
    written = write_outputs(result, out, plot=args.plot, save_scores=args.save_scores)
    m = result["metrics"]
    if m["bad_files"]:
        print(f"htsat: warning: {len(m['bad_files'])} unreadable clip(s) left out", flush=True)
    print(_summary_line(m))
    print("wrote " + ", ".join(written))
    return 0


def _run_events(args) -> int:
    from . import sed

    ref = sed.read_events(args.events)
    if args.predicted:
        est = sed.read_events(args.predicted)
    elif args.checkpoint:
        if args.median_filter < 1:
            raise ValueError("--median-filter must be >= 1 frames")
        obj = read_checkpoint(args.checkpoint)
        model = model_from_checkpoint(obj, name=args.model if obj.get("format") != FORMAT else None, backend=args.backend,
                                      source=args.checkpoint)  # fmt: skip
        _check_finite_weights(model, args.checkpoint)
        classes, _ = _classes(obj, model.config.num_classes, args.classes)
        class_map = sed.read_class_map(args.class_map) if args.class_map else None
        _check_event_labels(args.events, ref, sorted(class_map) if class_map else classes, args.class_map)
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(dev)
        est = sed.detect_events_with_model(
            model, classes, sorted(ref), args.audio_dir or os.path.dirname(os.path.abspath(args.events)),
            class_map=class_map, threshold=args.threshold, median_filter=args.median_filter, device=dev,
        )  # fmt: skip
    else:
        raise ValueError("--events needs --predicted EST.tsv or --checkpoint")
    event = sed.event_based_metrics(ref, est, t_collar=args.t_collar, percentage_of_length=args.percentage_of_length)
    segment = sed.segment_based_metrics(ref, est, segment=args.segment)
    out = args.out or f"eval_{os.path.splitext(os.path.basename(args.events))[0]}"
    os.makedirs(out, exist_ok=True)
    summary = {"events": args.events, "predicted": args.predicted, "checkpoint": args.checkpoint, "threshold": args.threshold,
               "median_filter": args.median_filter, "class_map": args.class_map, "event_based": event,
               "segment_based": segment}  # fmt: skip
    written = [os.path.join(out, "sed_metrics.json"), os.path.join(out, "sed_per_class.csv")]
    with open(written[0], "w", encoding="utf-8") as f:
        json.dump(_finite_or_none(summary), f, indent=1, allow_nan=False)
    with open(written[1], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "event_f1", "event_precision", "event_recall", "segment_f1"])
        for lab, m in event["per_class"].items():
            w.writerow(
                [
                    lab,
                    *(f"{m[k]:.6f}" if not math.isnan(m[k]) else "" for k in ("f1", "precision", "recall")),
                    f"{segment['per_class'][lab]['f1']:.6f}" if not math.isnan(segment["per_class"][lab]["f1"]) else "",
                ]
            )
    if not args.predicted:
        written.append(os.path.join(out, "predicted_events.tsv"))
        sed.write_events(written[-1], est)
    print(f"event-based F1 macro {event['macro_f1']:.4f} micro {event['overall']['f1']:.4f}; "
          f"segment-based F1 macro {segment['macro_f1']:.4f} micro {segment['overall']['f1']:.4f}")  # fmt: skip
    print("wrote " + ", ".join(written))
    return 0
