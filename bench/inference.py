"""File throughput of ``htsat predict`` (issue 12): many 10 s files through the tiny model.

``python -m bench --inference-files`` writes ``inference_<device>_<date>.json`` to ``--out``: files/s
of a loop that reads each file and calls the model on it alone (what ``htsat predict`` did before)
against the batched path as ``htsat predict`` runs it (``Predictor.iter_files``: windows of many
files per forward; on CPU one DataLoader worker per core, each decoding, resampling, computing the
log-mel by FFT and running the model on its own files; on GPU the workers decode and resample while
the model runs), on each runtime (torch; onnxruntime when installed, CPU only: ``batched-onnxruntime``).
Files are 44.1 kHz mono PCM, so both paths resample to the model's 16 kHz. Each
path runs at every torch thread count from 1 to the default (all cores); the speedup is best
batched / best loop, each at the setting that suits it on this machine. On a compute-bound CPU,
batching across files barely pays; one process per core (a small model's ops are too small for
intra-op threads to scale) and the FFT front end (the conv STFT is a third of the tiny model's
work) do.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_files(folder: str, n: int, seconds: float, rate: int) -> list:
    import soundfile as sf

    rng = np.random.default_rng(0)
    paths = []
    t = np.arange(int(seconds * rate)) / rate
    for i in range(n):
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.02 * rng.standard_normal(len(t))
        p = os.path.join(folder, f"{i:04d}.wav")
        sf.write(p, x.astype(np.float32), rate, subtype="PCM_16")
        paths.append(p)
    return paths


def run(
    out: Path,
    *,
    n_files: int = 100,
    seconds: float = 10.0,
    batch_size: int = 16,
    num_workers: int | None = None,
    threads=None,
    device: str = "cpu",
    repeats: int = 3,
    runtimes=("torch", "onnxruntime"),
) -> dict:
    import torch

    import htsat
    from htsat.audio import load_audio
    from htsat.predict import Predictor

    default_threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    if num_workers is None:  # what `htsat predict` does by default
        num_workers = min(cores, 8) if device == "cpu" else min(4, max(0, cores - 1))
    thread_counts = [threads] if threads else sorted({1, default_threads})
    torch.manual_seed(0)
    model = htsat.create_model("htsat-audioset", backend="auto", **htsat.TINY_OVERRIDES).eval().to(device)
    sr = model.config.sample_rate
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_files(tmp, n_files, seconds, 44100)
        if device != "cpu" or importlib.util.find_spec("onnxruntime") is None:
            runtimes = ("torch",)
        preds = {
            rt: Predictor(
                model, htsat.audioset_labels(), torch.device(device), batch_size=batch_size, num_workers=num_workers, runtime=rt
            )
            for rt in runtimes
        }

        def loop():
            with torch.inference_mode():
                for p in paths:
                    model(torch.from_numpy(load_audio(p, sr))[None].to(device))

        def batched(pred):
            def go():
                for r in pred.iter_files(paths):
                    assert "error" not in r, r

            return go

        # "batched": htsat predict's path on the torch runtime; "batched-onnxruntime": --runtime onnxruntime
        fns = {"loop": loop, **{"batched" + ("" if rt == "torch" else f"-{rt}"): batched(p) for rt, p in preds.items()}}

        runs = []
        for th in thread_counts:
            torch.set_num_threads(th)
            loop()  # warm-up
            for p in preds.values():
                list(p.iter_files(paths[: min(8, n_files)]))
            best = {name: float("inf") for name in fns}
            for _ in range(repeats):  # interleaved, best of each: drifts of the machine hit every path alike
                for name, fn in fns.items():
                    best[name] = min(best[name], _timed(fn))
            for name, t in best.items():
                runs.append({"path": name, "torch_threads": th, "files_per_s": round(n_files / t, 2)})
        torch.set_num_threads(default_threads)
    best = {name: max((r for r in runs if r["path"] == name), key=lambda r: r["files_per_s"]) for name in fns}
    rec = {
        "case": "inference_files",
        "device": device,
        "model": "htsat-audioset + TINY_OVERRIDES",
        "files": n_files,
        "seconds_per_file": seconds,
        "file_rate_hz": 44100,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "worker_stage": "model" if device == "cpu" else "audio",
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "best": best,
        "speedup": round(best["batched"]["files_per_s"] / best["loop"]["files_per_s"], 2),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"inference_{device}_{rec['date']}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    for r in runs:
        print(
            f"inference: {n_files} files of {seconds:g} s, tiny model on {device}, {r['path']}, {r['torch_threads']} "
            f"thread(s): {r['files_per_s']} files/s"
        )
    b, lp = best["batched"], best["loop"]
    print(
        f"inference: batched (batch {batch_size}, {num_workers} worker(s), {b['torch_threads']} thread(s)) "
        f"{b['files_per_s']} files/s vs loop ({lp['torch_threads']} thread(s)) {lp['files_per_s']} files/s: x{rec['speedup']}"
    )
    for name in best:
        if name.startswith("batched-"):
            print(f"inference: {name} {best[name]['files_per_s']} files/s ({best[name]['torch_threads']} thread(s))")
    print(f"results: {path}")
    return rec


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
