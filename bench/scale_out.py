"""Files/s of ``htsat embed`` spread over processes (``python -m bench --inference-files N --processes 1,2``).

N files of 10 s (44.1 kHz PCM, resampled to the model's 16 kHz) through the tiny model on CPU, for
each process count P:

- ``torchrun``: ``torchrun --nproc_per_node P -m htsat embed FOLDER -o out.npz --num-workers 0``, one
  torch thread per process (P = 1 is the plain one-process command): wall time of the whole
  command, start-up (Python, torch, the model) and the merge included, as a user sees it, and the
  CPU seconds of all its processes (what the split costs, whatever else loads the machine);
- ``ray``: ``htsat.ray.Embedder`` over a ``path`` column, ``ActorPoolStrategy(size=P)`` in a local
  ``ray.init(num_cpus=P)``; the pipeline's wall time (actor start-up included, ``ray.init`` not).

Interleaved, best of ``repeats``. Writes ``scale_out_cpu_<date>.json`` to ``--out``.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _torchrun(folder: str, ckpt: str, out: str, procs: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all processes of the launch) of one torchrun command."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "htsat",
           "embed", folder, "--checkpoint", ckpt, "--device", "cpu", "--num-workers", "0", "-o", out, "--no-progress"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    t = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun with {procs} process(es) failed: {proc.stderr[-2000:]}")
    return t, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _ray(paths: list[str], ckpt: str, actors: int) -> float:
    import ray

    from htsat.ray import Embedder

    t0 = time.perf_counter()
    rows = (
        ray.data.from_items([{"path": p} for p in paths])
        .map_batches(
            Embedder,
            fn_constructor_kwargs={"checkpoint": ckpt, "device": "cpu"},
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=8,
        )
        .take_all()
    )
    t = time.perf_counter() - t0
    assert len(rows) == len(paths) and all(r["error"] is None for r in rows)
    return t


def run(out: Path, *, n_files: int = 48, processes=(1, 2), seconds: float = 10.0, repeats: int = 2) -> dict:
    import torch

    import htsat

    from .inference import _write_files

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        audio = os.path.join(tmp, "audio")
        os.makedirs(audio)
        paths = _write_files(audio, n_files, seconds, 44100)
        torch.manual_seed(0)
        model = htsat.create_model("htsat-audioset", backend="auto", **htsat.TINY_OVERRIDES).eval()
        ckpt = os.path.join(tmp, "tiny.pt")
        htsat.save_checkpoint(model, ckpt)
        best: dict = {}
        cpu: dict = {}
        for _ in range(repeats):
            for p in processes:
                t, c = _torchrun(audio, ckpt, os.path.join(tmp, f"out{p}.npz"), p)
                best[("torchrun", p)] = min(best.get(("torchrun", p), float("inf")), t)
                cpu[("torchrun", p)] = min(cpu.get(("torchrun", p), float("inf")), c)
        try:
            import ray
        except ImportError:
            ray = None
            print("scale-out: ray is not installed (pip install -e '.[ray]'): torchrun only")
        if ray is not None:
            for p in processes:  # one local Ray per size: its CPUs are the actors' cores
                ray.init(num_cpus=p, include_dashboard=False, log_to_driver=False, configure_logging=False)
                try:
                    for _ in range(repeats):
                        t = _ray(paths, ckpt, p)
                        best[("ray", p)] = min(best.get(("ray", p), float("inf")), t)
                finally:
                    ray.shutdown()
    for (how, p), t in best.items():
        run = {"runner": how, "processes": p, "seconds": round(t, 2), "files_per_s": round(n_files / t, 2)}
        if (how, p) in cpu:  # CPU time of every process (start-up included): what sharding costs, whatever the load
            run["cpu_seconds"] = round(cpu[(how, p)], 2)
        runs.append(run)
    rec = {
        "case": "scale_out",
        "device": "cpu",
        "model": "htsat-audioset + TINY_OVERRIDES",
        "files": n_files,
        "seconds_per_file": seconds,
        "file_rate_hz": 44100,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "repeats": repeats,
        "runs": runs,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"scale_out_cpu_{rec['date']}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    for r in runs:
        print(
            f"scale-out: {n_files} files of {seconds:g} s, {r['runner']}, {r['processes']} process(es): "
            f"{r['files_per_s']} files/s" + (f" ({r['cpu_seconds']} CPU s)" if "cpu_seconds" in r else "")
        )
    print(f"results: {path}")
    return rec
