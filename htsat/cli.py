"""The ``htsat`` command: ``htsat train ...``, ``htsat predict ...`` and ``htsat embed ...`` (also ``python -m htsat``).

Multi-GPU: ``torchrun --nproc_per_node N -m htsat train ...`` runs the same command under DDP.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

from htsat_kernels import BACKENDS

from .inference_output import EMBED_FORMATS, PREDICT_FORMATS, format_for
from .sharding import Shards, leftover_parts, parts_folder, remove_parts
from .training.config import HelpFormatter as TrainHelpFormatter
from .training.config import add_arguments as add_train_arguments

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="htsat", description="HTS-AT audio tagging and sound event detection: training and inference."
    )
    sub = p.add_subparsers(dest="command", metavar="{train,predict,embed}")
    sub.required = True

    # ------------------------------------------------------------------ train
    t = sub.add_parser(
        "train",
        help="train or fine-tune a model (torchrun --nproc_per_node N -m htsat train ... for DDP)",
        description="Train or fine-tune HTS-AT. Defaults follow the original recipe (docs/model.md §9).",
        formatter_class=TrainHelpFormatter,
    )
    add_train_arguments(t)  # one option per TrainConfig field: flags, help and defaults live there

    # ------------------------------------------------------------------ predict / embed
    q = sub.add_parser(
        "predict",
        help="tag audio files (top-k labels) and detect events (--framewise)",
        description="Top-k labels of audio files of any length, and with --framewise the detected events. Inputs: files, "
        "folders (recursive), glob patterns, @list.txt files. Results are written one file at a time as they are done.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_input_arguments(q)
    q.add_argument("--labels", help="class names file (default: saved in the checkpoint, or AudioSet's 527)")
    q.add_argument("--top-k", type=int, default=5)
    q.add_argument("--framewise", action="store_true", help="also report events (onset, offset, label, score)")
    q.add_argument("--threshold", type=float, default=0.5, help="framewise probability threshold for events")
    q.add_argument(
        "--merge-gap", type=float, default=0.0, help="merge events of one class separated by at most this many seconds"
    )
    q.add_argument("--min-duration", type=float, default=0.0, help="drop events shorter than this (seconds)")
    q.add_argument("-o", "--output", help="write results to this file (format from its extension) instead of stdout")
    q.add_argument(
        "--format",
        choices=PREDICT_FORMATS,
        help="table, jsonl, json, csv (file, rank, label, score) or tsv (DCASE events; implies --framewise); "
        "default: from -o's extension, else table",
    )
    q.add_argument("--json", action="store_true", help="same as --format json")
    _add_run_arguments(q)

    e = sub.add_parser(
        "embed",
        help="embeddings of audio files (latent_output, or clap_embedding for CLAP presets)",
        description="One embedding per audio file (any length: windows averaged) for a retrieval index. Inputs: files, "
        "folders (recursive), glob patterns, @list.txt files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_input_arguments(e)
    e.add_argument(
        "--embedding",
        choices=("latent_output", "clap_embedding"),
        default="latent_output",
        help="the pooled HTS-AT features, or the normalised CLAP joint-space embedding (clap-htsat-* checkpoints)",
    )
    e.add_argument("-o", "--output", help="write to this file: .npy (+ .files.txt), .npz (embeddings, files), .jsonl, .json")
    e.add_argument("--format", choices=EMBED_FORMATS, help="default: from -o's extension, else jsonl")
    _add_run_arguments(e)
    _add_protocol_parsers(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    return p


def _add_input_arguments(q) -> None:
    q.add_argument("files", nargs="+", help="audio files, folders (searched recursively), glob patterns or @list.txt files")
    q.add_argument(
        "--checkpoint",
        help="our checkpoint (from htsat train), an original HTS-AT .ckpt, a CLAP one, or a name of `htsat models` "
        "(required unless --onnx is given)",
    )
    q.add_argument(
        "--model",
        help="preset or JSON config for checkpoints without a saved config (htsat-audioset when left out; "
        "must agree with a saved one)",
    )


def _add_run_arguments(q) -> None:
    q.add_argument(
        "--short-clips",
        choices=("tile", "stretch", "zeros"),
        default="tile",
        help="clips shorter than clip_seconds: tile them (as in training), stretch (the original) or zero-pad "
        "(CLAP presets always repeat-pad, their own rule)",
    )
    q.add_argument("--allow-silent", action="store_true", help="process silent-only files instead of reporting them")
    q.add_argument("--batch-size", type=int, default=16, help="windows of clip_seconds per forward, across files")
    q.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="worker processes (0: all in the main process). On CPU each runs the whole pipeline on its own files "
        "(default: one per core); on GPU they decode and resample while the model runs (default: min(4, cores - 1))",
    )
    q.add_argument(
        "--worker-stage",
        choices=("audio", "mel", "model"),
        help="what the workers compute: audio (decode, resample), mel (and the log-mel) or model (and the model; CPU "
        "only). Default: model on CPU, audio on GPU",
    )
    q.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    q.add_argument("--backend", default="auto", choices=BACKENDS)
    q.add_argument(
        "--runtime",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="torch (the fastest on CPU too: python -m bench --cpu-runtimes), or onnxruntime (CPU; the model exported "
        "to ONNX into the cache on first use, or --onnx FILE; needs the onnx extra)",
    )
    q.add_argument("--onnx", help="an ONNX file from `htsat export` to run (implies --runtime onnxruntime)")
    q.add_argument("--quantize", choices=("int8",), help="onnxruntime: the export dynamically quantized to int8")
    q.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU",
    )
    q.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    q.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in -o (a stopped or killed run's) and compute only the files missing there "
        "or failed (jsonl, json, csv, npy, npz)",
    )


def _add_protocol_parsers(sub) -> None:
    """htsat average / htsat evaluate (issue 15), htsat models / htsat download (issue 16): their parsers live
    with their code."""
    from . import average, evaluate, export, pretrained

    average.add_parser(sub)
    evaluate.add_parser(sub)
    pretrained.add_parsers(sub)
    export.add_parser(sub)


def _run_protocol(args) -> int:
    from . import average, evaluate, export, pretrained

    runners = {
        "average": average.run,
        "evaluate": evaluate.run,
        "models": pretrained.run,
        "download": pretrained.run,
        "export": export.run,
    }
    return runners[args.command](args)


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
    print(
        f"{len(res['folds'])}-fold {res['metric']}: best {res['best_mean']:.4f} +- {res['best_std']:.4f}, "
        f"last {res['last_mean']:.4f} +- {res['last_std']:.4f} ({cfg.out}/cv_summary.json)"
    )
    return 0


def _default_workers(device) -> int:
    cores = os.cpu_count() or 1
    return min(cores, 8) if device.type == "cpu" else min(4, max(0, cores - 1))


def _check_run_args(args) -> None:
    for name in ("batch_size", "num_workers") + (("top_k",) if args.command == "predict" else ()):
        if getattr(args, name) is None:
            continue
        low = 0 if name == "num_workers" else 1
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the results done so far are written, then the run stops."""


@contextlib.contextmanager
def _sigterm_stops():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _dead_workers_named():
    from .inference import worker_death

    try:
        yield
    except RuntimeError as e:
        died = worker_death(e)
        if died is None:
            raise
        raise died from None


def _progress_bar(total: int, show: bool):
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # an optional nicety: without tqdm the run goes on without a bar
        return None
    return tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True)


def _run_inference(args) -> int:
    from .inference import InputList, expand_inputs
    from .inference_output import check_output
    from .predict import Predictor

    _check_run_args(args)
    predicting = args.command == "predict"
    if predicting:
        fmt = format_for(args.output, "json" if args.json and not args.format else args.format, PREDICT_FORMATS, "table")
        framewise = args.framewise or fmt == "tsv"
    else:
        fmt = format_for(args.output, args.format, EMBED_FORMATS, "jsonl")
        framewise = False
    if not args.checkpoint and not args.onnx:
        raise ValueError("--checkpoint is required (or --onnx FILE from htsat export)")
    to_file = bool(args.output) and args.output != "-"
    if not to_file and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")  # a name that is not UTF-8: its own bytes, as in a file
    if args.resume and not to_file:
        raise ValueError("--resume needs -o FILE: the results to keep are read from it")
    shards = Shards.from_env()  # under torchrun: the files split between ranks, rank 0 writes
    if shards is not None and not to_file:
        raise ValueError("under torchrun, -o FILE is needed: the ranks' results are merged into it")
    # the file list is rank 0's to make (it sends each rank its share): a big archive is listed once
    inputs = expand_inputs(args.files) if shards is None or shards.main else InputList()
    if to_file and (shards is None or shards.main):
        check_output(fmt, args.output, inputs)  # before the model loads (a download, perhaps)
    common = dict(
        device=args.device if shards is None else shards.device(args.device),
        labels_file=getattr(args, "labels", None),
        short_clips=args.short_clips,
        silence_db=None if args.allow_silent else -80.0,
        precision=args.precision,
        batch_size=args.batch_size,
        num_workers=0 if args.num_workers is None else args.num_workers,
        worker_stage=args.worker_stage,
    )
    if args.onnx and not args.checkpoint:
        predictor = Predictor.from_onnx(args.onnx, **common)
    else:
        runtime = "onnxruntime" if args.onnx or args.quantize else args.runtime
        predictor = Predictor.from_checkpoint(
            args.checkpoint,
            name=args.model,
            backend=args.backend,
            runtime=runtime,
            onnx=args.onnx,
            quantize=args.quantize,
            **common,
        )
    if args.num_workers is None:
        predictor.num_workers = (shards.default_workers if shards else _default_workers)(predictor.device)
    if shards is not None:
        shards.join()
        try:
            return _run_inference_files(args, fmt, predicting, framewise, inputs, predictor, shards)
        finally:
            shards.leave()
    return _run_inference_files(args, fmt, predicting, framewise, inputs, predictor, None)


def _run_inference_files(args, fmt, predicting, framewise, inputs, predictor, shards) -> int:
    from .inference import InferenceError, InputList
    from .inference_output import open_writer, read_done

    to_file = bool(args.output) and args.output != "-"
    writes = shards is None or shards.main  # one writer: rank 0
    threshold = args.threshold if predicting and framewise else None
    failed = hours = 0
    bar = None
    writer = None

    def say(line: str) -> None:  # above the bar while there is one
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    try:
        with (
            _dead_workers_named(),
            _sigterm_stops(),
            open_writer(fmt, args.output, sys.stdout, threshold=threshold, inputs=inputs)
            if writes
            else contextlib.nullcontext() as writer,
        ):
            # the output is locked (and its temporary made): now the files
            todo = None
            if writes:
                done = read_done(fmt, args.output) if args.resume else {}
                if args.resume and to_file:  # what the ranks of a stopped torchrun launch finished
                    done = {**leftover_parts(args.output), **done}
                todo = InputList()
                todo.extend(p for p in inputs if p not in done)
                todo.problems = inputs.problems
                if done:
                    say(f"htsat: resuming: {len(inputs) - len(todo)} of {len(inputs)} file(s) already done")

            def compute(files):
                if predicting:
                    return predictor.iter_files(
                        files,
                        top_k=args.top_k,
                        framewise=framewise,
                        threshold=args.threshold,
                        merge_gap=args.merge_gap,
                        min_duration=args.min_duration,
                    )
                return predictor.embed_files(files, embedding=args.embedding)

            show = sys.stderr.isatty() if args.progress is None else args.progress
            if shards is None:
                results = compute(todo)
            else:
                results = shards.run(todo, args.output, args.resume, compute, show)
                if results is None:  # not rank 0: its results are in its part file
                    return 0
                show = False  # rank 0 showed all ranks' files; writing them is quick
            bar = _progress_bar(len(inputs), show)
            try:
                for path in inputs:
                    r = done.get(path) or next(results)
                    why = writer.refuses(r["file"]) if "error" not in r else None
                    if why is not None:
                        r = {"file": r["file"], "error": why}
                    for w in r.get("warnings", ()):
                        say(f"htsat: warning: {w}")
                    if "error" in r:
                        failed += 1
                        say(f"htsat: error: {r['file']}: {r['error']}")
                    else:
                        hours += r.get("duration", 0.0) / 3600
                    writer.write(r)
                    if bar is not None:
                        bar.set_postfix_str(f"{hours:.2f} h audio, {failed} failed", refresh=False)
                        bar.update(1)
            finally:
                if hasattr(results, "close"):
                    results.close()
        if to_file:
            remove_parts(args.output)  # all in the output now
    except (KeyboardInterrupt, InferenceError):
        if bar is not None:
            bar.close()
            bar = None
        if to_file and writer is not None and writer.published:
            say(f"htsat: {writer.published} result(s) kept in {args.output}; add --resume to the same command to finish")
        elif shards is not None and shards.main:
            say(f"htsat: the ranks' results so far are kept in {parts_folder(args.output)}; add --resume to finish")
        raise
    finally:
        if bar is not None:
            bar.close()
    if failed:
        _err(f"{failed} of {len(inputs)} file(s) failed")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from htsat_kernels.backends import BackendUnavailable

    from .audio import AudioError
    from .data import ManifestError
    from .export import MissingExtraError
    from .inference import InferenceError
    from .training import TrainingError

    known = (
        AudioError,
        ManifestError,
        OSError,
        ValueError,
        BackendUnavailable,
        TrainingError,
        InferenceError,
        MissingExtraError,
    )  # OSError messages name the file
    try:
        if args.command in ("average", "evaluate", "models", "download", "export"):
            return _run_protocol(args)
        if args.command == "train":
            return _run_train(args)
        return _run_inference(args)
    except BrokenPipeError:
        # the reader went away (| head): say so once; stdout now points nowhere so the exit flush is quiet
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        _err("output closed by the reader (broken pipe); stopped")
        return 141
    except Terminated:
        _err("terminated (SIGTERM)")
        return 143
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except known as e:
        if os.environ.get("HTSAT_DEBUG"):
            raise
        _err(" ".join(str(e).split("\n")))  # one line, whatever the library's message holds
        return 1
