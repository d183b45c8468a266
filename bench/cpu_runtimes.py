"""CPU inference runtimes side by side: ``python -m bench --cpu-runtimes``.

Clips/s of one forward of 10 s clips (random weights: speed does not depend on them) for each
runtime, interleaved in one run (each repeat times every runtime once, best of the repeats), at
batch 1 and 8 and at 1 and all torch / ONNX Runtime intra-op threads, for htsat-audioset and
clap-htsat-base. Runtimes:

- ``reference``: the eager model on the reference backend (conv STFT, reference attention).
- ``auto``: the package's default CPU path (``create_model()``: FFT log-mel, SDPA window attention,
  the C++ twins of the window ops).
- ``compile``: ``torch.compile`` of ``auto`` (inductor's C++ backend; compile time recorded apart).
- ``onnxruntime``: the file ``htsat export`` writes (waveform input: the conv STFT in the graph, every
  op its reference), in an ONNX Runtime session: what a user who exports the model by hand runs.
- ``onnxruntime+fft``: ``htsat predict --runtime onnxruntime``: the mel graph behind the FFT log-mel.
- ``onnxruntime-int8``: that graph dynamically quantized (``--quantize int8``).
- ``openvino``: the waveform graph compiled by OpenVINO for CPU, when ``openvino`` is installed.

Writes ``cpu_runtimes_<date>.json`` to ``--out`` with the machine's load average before and after.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

RUNTIMES = ("reference", "auto", "compile", "onnxruntime", "onnxruntime+fft", "onnxruntime-int8", "openvino")
MODELS = ("htsat-audioset", "clap-htsat-base")


def _openvino_runner(path: str, threads: int):
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    compiled = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads})
    return lambda x: compiled(x.numpy())


def _runners(model, runtimes, threads: int, compiled: dict, sessions: dict) -> dict:
    """runtime -> callable(x) for this thread count (ONNX Runtime sessions opened per thread count)."""
    import torch

    from htsat.export import OnnxModel

    out = {}
    for rt in runtimes:
        if rt == "reference":
            out[rt] = compiled["reference"]
        elif rt == "auto":
            out[rt] = model
        elif rt == "compile" and "compile" in compiled:
            out[rt] = compiled["compile"]
        elif rt in ("onnxruntime", "onnxruntime+fft", "onnxruntime-int8"):
            om = OnnxModel(sessions[rt], threads=threads)
            om.session()
            out[rt] = om
        elif rt == "openvino":
            run = _openvino_runner(sessions["onnxruntime"], threads)
            if run is not None:
                out[rt] = run
    del torch
    return out


def run(
    out: Path,
    *,
    models=MODELS,
    batches=(1, 8),
    threads=None,
    runtimes=RUNTIMES,
    repeats: int = 3,
    compile_models=MODELS,
    compile_batches=(1, 8),
) -> dict:
    import torch

    import htsat
    from htsat.export import cached_export

    default_threads = torch.get_num_threads()
    thread_counts = [threads] if threads else sorted({1, default_threads})
    load_before = os.getloadavg()
    records, notes = [], {}
    for name in models:
        torch.manual_seed(0)
        model = htsat.create_model(name).eval()
        ref = htsat.create_model(name, backend="reference").eval()
        ref.load_state_dict(model.state_dict())
        cfg = model.config
        n = int(round(cfg.clip_seconds * cfg.sample_rate))
        sessions = {}
        t0 = time.perf_counter()
        if "onnxruntime" in runtimes or "openvino" in runtimes:
            sessions["onnxruntime"] = cached_export(model, input="waveform")
        if "onnxruntime+fft" in runtimes:
            sessions["onnxruntime+fft"] = cached_export(model, input="mel")
        if "onnxruntime-int8" in runtimes:
            sessions["onnxruntime-int8"] = cached_export(model, input="mel", quantize="int8")
        notes[f"{name} export_s"] = round(time.perf_counter() - t0, 1)
        compiled = {"reference": ref}
        if "compile" in runtimes and name in compile_models:
            compiled["compile"] = torch.compile(model)
        for th in thread_counts:
            torch.set_num_threads(th)
            runners = _runners(model, runtimes, th, compiled, sessions)
            for B in batches:
                x = 0.1 * torch.randn(B, n, generator=torch.Generator().manual_seed(B))
                best = {}
                batch_runners = {rt: fn for rt, fn in runners.items() if rt != "compile" or B in compile_batches}
                with torch.inference_mode():
                    for rt, fn in batch_runners.items():  # warm-up (compile: the compilation for this shape)
                        t0 = time.perf_counter()
                        fn(x)
                        if rt == "compile":
                            notes[f"{name} compile_s B={B} threads={th}"] = round(time.perf_counter() - t0, 1)
                        best[rt] = float("inf")
                    for _ in range(repeats):
                        for rt, fn in batch_runners.items():
                            t0 = time.perf_counter()
                            fn(x)
                            best[rt] = min(best[rt], time.perf_counter() - t0)
                for rt, t in best.items():
                    rec = {"model": name, "runtime": rt, "batch": B, "threads": th, "seconds": round(t, 4)}
                    rec["clips_per_s"] = round(B / t, 3)
                    records.append(rec)
                    print(
                        f"cpu-runtimes: {name} B={B} threads={th} {rt:<17} {rec['clips_per_s']:8.2f} clips/s ({t * 1000:.0f} ms)"
                    )
                fastest = max(
                    (r for r in records if r["model"] == name and r["batch"] == B and r["threads"] == th),
                    key=lambda r: r["clips_per_s"],
                )
                print(f"cpu-runtimes: {name} B={B} threads={th}: fastest {fastest['runtime']}")
        torch.set_num_threads(default_threads)
    rec = {
        "case": "cpu_runtimes",
        "clip_seconds": 10,
        "repeats": repeats,
        "records": records,
        "notes": notes,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "compiled_models": list(compile_models),
        "compiled_batches": list(compile_batches),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "openvino": _version("openvino"),
        "date": datetime.date.today().isoformat(),
    }
    rec["summary"] = summary(records)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu_runtimes_{rec['date']}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    for line in rec["summary"]:
        print(f"cpu-runtimes: {line}")
    print(f"results: {path}")
    return rec


def summary(records: list[dict]) -> list[str]:
    """Per setting: auto against ONNX Runtime (the hand export), as a ratio of clips/s."""
    lines = []
    keys = sorted({(r["model"], r["batch"], r["threads"]) for r in records})
    for key in keys:
        rows = {r["runtime"]: r for r in records if (r["model"], r["batch"], r["threads"]) == key}
        if "auto" in rows and "onnxruntime" in rows:
            a, o = rows["auto"]["clips_per_s"], rows["onnxruntime"]["clips_per_s"]
            lines.append(f"{key[0]} B={key[1]} threads={key[2]}: auto {a:.2f} vs onnxruntime {o:.2f} clips/s: x{a / o:.2f}")
    return lines


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def markdown_table(records: list[dict]) -> str:
    """Clips/s per runtime (rows) and setting (columns), the fastest of each column in bold."""
    settings = sorted(
        {(r["model"], r["batch"], r["threads"]) for r in records},
        key=lambda k: (MODELS.index(k[0]) if k[0] in MODELS else 9, k[1], k[2]),
    )
    runtimes = [rt for rt in RUNTIMES if any(r["runtime"] == rt for r in records)]
    head = (
        "| runtime | "
        + " | ".join(f"{m.replace('htsat-', '').replace('clap-', 'clap ')} B={b} t={t}" for m, b, t in settings)
        + " |"
    )
    lines = [head, "|---" * (len(settings) + 1) + "|"]
    cell = {(r["runtime"], r["model"], r["batch"], r["threads"]): r["clips_per_s"] for r in records}
    best = {s: max(v for (rt, *k), v in cell.items() if tuple(k) == s) for s in settings}
    for rt in runtimes:
        row = []
        for s in settings:
            v = cell.get((rt, *s))
            row.append("-" if v is None else (f"**{v:.2f}**" if v == best[s] else f"{v:.2f}"))
        lines.append(f"| `{rt}` | " + " | ".join(row) + " |")
    return "\n".join(lines)
