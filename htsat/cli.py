"""The ``htsat`` command: ``htsat train ...`` and ``htsat predict ...`` (also ``python -m htsat``).

Multi-GPU: ``torchrun --nproc_per_node N -m htsat train ...`` runs the same command under DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .training.config import HelpFormatter as TrainHelpFormatter
from .training.config import add_arguments as add_train_arguments

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="htsat", description="HTS-AT audio tagging and sound event detection: training and inference.")
    sub = p.add_subparsers(dest="command", metavar="{train,predict}")
    sub.required = True

    # ------------------------------------------------------------------ train
    t = sub.add_parser(
        "train",
        help="train or fine-tune a model (torchrun --nproc_per_node N -m htsat train ... for DDP)",
        description="Train or fine-tune HTS-AT. Defaults follow the original recipe (spec section 9).",
        formatter_class=TrainHelpFormatter,
    )
    add_train_arguments(t)  # one option per TrainConfig field: flags, help and defaults live there

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
    _add_protocol_parsers(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    return p


def _add_protocol_parsers(sub) -> None:
    """htsat average / htsat evaluate (issue 15): their parsers live with their code."""
    from . import average, evaluate

    average.add_parser(sub)
    evaluate.add_parser(sub)


def _run_protocol(args) -> int:
    from . import average, evaluate

    return {"average": average.run, "evaluate": evaluate.run}[args.command](args)


def _err(msg: str) -> None:
    print(f"htsat: error: {msg}", file=sys.stderr, flush=True)


def _run_train(args) -> int:
    from .training import train
    from .training.config import config_from_args

    cfg = config_from_args(args)
    if cfg.cv:
        return _run_cv(cfg)
    summary = train(cfg)
    if summary.get("interrupted"):
        return 143
    if summary["rank"] == 0:
        final = summary["history"][-1] if summary["history"] else {}
        shown = {k: v for k, v in final.items() if k.startswith("val_") or k in ("epoch", "train_loss")}
        state = "stopped early" if summary["stopped"] else "done"
        parts = [f"{state}: {summary['global_step']} steps, checkpoint {summary['last_checkpoint']}"]
        if summary["best"]:
            parts.append(f"best {summary['best_checkpoint']} ({summary['best']['metric']} {summary['best']['value']:.4f})")
        if shown:
            parts.append(f"last epoch {json.dumps(shown)}")
        if summary["bad_files"]:
            bad_list = os.path.join(summary["out"], "bad_files.txt")
            parts.append(f"{len(summary['bad_files'])} bad file(s) skipped (see {bad_list})")
        print(", ".join(parts))
    return 0


def _run_cv(cfg) -> int:
    from .training.cross_validation import train_cv

    res = train_cv(cfg)
    if res.get("interrupted"):
        return 143
    if res["stopped"]:
        print(f"stopped early after {len(res['folds'])} complete fold(s)")
        return 0
    for r in res["folds"]:
        print(f"fold {r['fold']}: best {r['metric']} {r['best']:.4f} (epoch {r['best_epoch']}), last {r['last']:.4f}")
    print(f"{len(res['folds'])}-fold {res['metric']}: best {res['best_mean']:.4f} +- {res['best_std']:.4f}, "
          f"last {res['last_mean']:.4f} +- {res['last_std']:.4f} ({cfg.out}/cv_summary.json)")
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
        from .training import TrainingError

        known.append(TrainingError)
    except ImportError:  # pragma: no cover
        pass
    try:
        if args.command in ("average", "evaluate"):
            return _run_protocol(args)
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
