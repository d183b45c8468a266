"""The ``htsat`` command: ``htsat train ...`` and ``htsat predict ...`` (also ``python -m htsat``).

Multi-GPU: ``torchrun --nproc_per_node N -m htsat train ...`` runs the same command under DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _model_override(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a model config field), got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _optional_float(text: str):
    return None if text.lower() in ("none", "off") else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="htsat", description="HTS-AT audio tagging and sound event detection: training and inference.")
    sub = p.add_subparsers(dest="command", metavar="{train,predict}")
    sub.required = True

    # ------------------------------------------------------------------ train
    t = sub.add_parser(
        "train",
        help="train or fine-tune a model (torchrun --nproc_per_node N -m htsat train ... for DDP)",
        description="Train or fine-tune HTS-AT. Defaults follow the original recipe (spec section 9).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = t.add_argument_group("data")
    g.add_argument("--manifest", "--esc50", dest="manifest", required=True,
                   help="CSV with columns path,labels[,fold] (labels separated by ';'), or an ESC-50 folder (meta/esc50.csv + audio/)")
    g.add_argument("--val-manifest", help="validation manifest (or ESC-50 folder)")
    g.add_argument("--val-fold", help="hold out this fold of --manifest for validation")
    g.add_argument("--classes", help="class list file (.txt one per line, .csv with display_name/label column, or .json); default: from the data")
    g.add_argument("--data-root", help="base folder for relative audio paths (default: the manifest's folder)")
    g.add_argument("--clip-seconds", type=float, help="training clip length (default: the model's clip_seconds)")
    g.add_argument("--pad", choices=("tile", "zeros", "repeatpad"), default="tile", help="how short clips are filled")
    g.add_argument("--crop", choices=("random", "start", "center"), default="random", help="how long clips are cut in training")
    g.add_argument("--on-bad-file", choices=("skip", "stop"), default="skip", help="unreadable/empty/silent files: skip and count, or stop")
    g.add_argument("--max-bad-files", type=int, help="stop once more files than this were bad")
    g.add_argument("--silence-db", type=_optional_float, default=-80.0, help="files whose peak is at or below this dBFS are bad ('none' keeps them)")
    g.add_argument("--cache-audio", action="store_true", help="keep decoded clips in memory (useful with --num-workers 0)")
    g.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader worker processes")

    g = t.add_argument_group("model")
    g.add_argument("--model", default="htsat-audioset", help="preset name (htsat-audioset, htsat-esc50, htsat-scv2) or JSON config file")
    g.add_argument("--set", dest="overrides", action="append", type=_model_override, default=[], metavar="KEY=VALUE",
                   help="override a model config field (JSON value), e.g. --set drop_path_rate=0.2")
    g.add_argument("--backend", default="auto", choices=("auto", "reference", "fused"), help="op implementations")
    g.add_argument("--init-checkpoint", help="start from these weights (original .ckpt, state_dict or ours)")
    g.add_argument("--init-drop-head", choices=("auto", "yes", "no"), default="auto",
                   help="drop head/tscam_conv of --init-checkpoint (auto: when the class count differs)")

    g = t.add_argument_group("optimisation")
    g.add_argument("--out", required=True, help="output folder (checkpoints, metrics, class list)")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=32, help="per process")
    g.add_argument("--lr", type=float, default=1e-3, help="base learning rate (the original schedule multiplies it, peak 0.1x)")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--eps", type=float, default=1e-8)
    g.add_argument("--lr-schedule", choices=("original", "cosine", "constant"), default="original")
    g.add_argument("--warmup-epochs", type=float, help="warm-up length (original: 3 epochs, scalable; cosine/constant: 0)")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 disables")
    g.add_argument("--loss", choices=("auto", "bce", "ce"), default="auto", help="auto: ce for loss_type clip_ce, else bce (with logits)")
    g.add_argument("--mixup", choices=("auto", "on", "off"), default="auto", help="auto: on for multi-label data (the original's AudioSet recipe)")
    g.add_argument("--mixup-alpha", type=float, default=0.5)
    g.add_argument("--mixup-labels", action="store_true", help="mix the targets too (the original does not)")
    g.add_argument("--no-specaug", dest="specaugment", action="store_false", help="disable SpecAugment")
    g.add_argument("--drop-last", action="store_true", help="drop the last incomplete batch of every epoch")

    g = t.add_argument_group("runtime")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="auto: bf16 autocast on GPUs, fp32 on CPU")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: the local GPU under torchrun, else cuda if present, else cpu)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP (the original sets sync_batchnorm)")
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP find_unused_parameters")
    g.add_argument("--on-nan", choices=("stop", "skip"), default="stop", help="a non-finite loss stops the run or drops the step")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS", help="also write last.pt every STEPS steps (0: epoch ends only)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (starts fresh when there is none)")
    g.add_argument("--stop-after-steps", type=int, help="stop after this global step without a final checkpoint (simulates a kill)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    g.add_argument("--progress", dest="progress", action="store_true", help="progress bar even when stderr is not a terminal")
    g.add_argument("--record-indices", action="store_true", help=argparse.SUPPRESS)

    # ------------------------------------------------------------------ predict
    q = sub.add_parser(
        "predict",
        help="tag audio files (top-k labels) and detect events (--framewise)",
        description="Top-k labels of audio files of any length, and with --framewise the detected events.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    q.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, ...)")
    q.add_argument("--checkpoint", required=True, help="our checkpoint (from htsat train) or an original HTS-AT .ckpt")
    q.add_argument("--model", help="preset or JSON config for original checkpoints (default htsat-audioset)")
    q.add_argument("--labels", help="class names file (default: saved in the checkpoint, or AudioSet's 527)")
    q.add_argument("--top-k", type=int, default=5)
    q.add_argument("--framewise", action="store_true", help="also report events (onset, offset, label, score)")
    q.add_argument("--threshold", type=float, default=0.5, help="framewise probability threshold for events")
    q.add_argument("--merge-gap", type=float, default=0.0, help="merge events of one class separated by at most this many seconds")
    q.add_argument("--min-duration", type=float, default=0.0, help="drop events shorter than this (seconds)")
    q.add_argument("--short-clips", choices=("tile", "stretch", "zeros"), default="tile",
                   help="clips shorter than clip_seconds: tile them (as in training), stretch (the original) or zero-pad")
    q.add_argument("--allow-silent", action="store_true", help="predict silent-only files instead of reporting them")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    q.add_argument("--backend", default="auto", choices=("auto", "reference", "fused"))
    q.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    return p


def _err(msg: str) -> None:
    print(f"htsat: error: {msg}", file=sys.stderr, flush=True)


def _run_train(args) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(
        manifest=args.manifest, out=args.out, val_manifest=args.val_manifest, val_fold=args.val_fold, classes=args.classes,
        data_root=args.data_root, clip_seconds=args.clip_seconds, pad=args.pad, crop=args.crop, on_bad_file=args.on_bad_file,
        max_bad_files=args.max_bad_files, silence_db=args.silence_db, cache_audio=args.cache_audio, num_workers=args.num_workers,
        model=args.model, model_overrides=dict(args.overrides), backend=args.backend, init_checkpoint=args.init_checkpoint,
        init_drop_head=args.init_drop_head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, betas=tuple(args.betas), eps=args.eps, lr_schedule=args.lr_schedule,
        warmup_epochs=args.warmup_epochs, min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip, loss=args.loss,
        mixup=args.mixup, mixup_alpha=args.mixup_alpha, mixup_labels=args.mixup_labels, specaugment=args.specaugment,
        drop_last=args.drop_last, precision=args.precision, device=args.device, seed=args.seed, sync_bn=args.sync_bn,
        find_unused_parameters=args.find_unused_parameters, on_nan=args.on_nan, checkpoint_every=args.checkpoint_every,
        resume=args.resume, stop_after_steps=args.stop_after_steps, progress=args.progress, record_indices=args.record_indices,
    )
    summary = train(cfg)
    if summary.get("interrupted"):
        return 143
    if summary["rank"] == 0:
        final = summary["history"][-1] if summary["history"] else {}
        shown = {k: v for k, v in final.items() if k.startswith("val_") or k in ("epoch", "train_loss")}
        state = "stopped early" if summary["stopped"] else "done"
        print(f"{state}: {summary['global_step']} steps, checkpoint {summary['last_checkpoint']}"
              + (f", best {summary['best_checkpoint']} ({summary['best']['metric']} {summary['best']['value']:.4f})" if summary["best"] else "")
              + (f", last epoch {json.dumps(shown)}" if shown else "")
              + (f", {len(summary['bad_files'])} bad file(s) skipped (see {os.path.join(summary['out'], 'bad_files.txt')})" if summary["bad_files"] else ""))
    return 0


def _run_predict(args) -> int:
    from .predict import Predictor, format_results

    predictor = Predictor.from_checkpoint(
        args.checkpoint, name=args.model, backend=args.backend, device=args.device, labels_file=args.labels,
        short_clips=args.short_clips, silence_db=None if args.allow_silent else -80.0, precision=args.precision,
    )
    results = predictor.predict_files(
        args.files, on_error=lambda p, e: _err(str(e)), top_k=args.top_k, framewise=args.framewise, threshold=args.threshold,
        merge_gap=args.merge_gap, min_duration=args.min_duration,
    )
    if args.json:
        print(json.dumps(results, indent=2, allow_nan=False))  # NaN is not JSON; the predictor never yields one
    else:
        print(format_results(results, threshold=args.threshold if args.framewise else None))
    failed = sum("error" in r for r in results)
    if failed:
        _err(f"{failed} of {len(results)} file(s) failed")
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .audio import AudioError
    from .data import ManifestError

    known = [AudioError, ManifestError, OSError, ValueError]  # OSError messages name the file
    try:
        from .train import TrainingError

        known.append(TrainingError)
    except ImportError:  # pragma: no cover
        pass
    try:
        if args.command == "train":
            return _run_train(args)
        return _run_predict(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except tuple(known) as e:
        if os.environ.get("HTSAT_DEBUG"):
            raise
        _err(" ".join(str(e).split("\n")))  # one line, whatever the library's message holds
        return 1
