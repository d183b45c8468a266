"""The one harness every case runs through: timing, peak memory, numerical error, run metadata.

A *case* (see ``bench.ops`` and ``bench.model``) is prepared into a :class:`Prepared`: a callable
that does one timed iteration, an optional untimed ``setup`` run before each iteration, and the
record fields known before timing (errors, byte counts). :func:`time_prepared` times it:

- CUDA: CUDA events around each call, the L2 cache flushed (a 256 MiB buffer zeroed) before each
  call outside the timed window, a warm-up of ~25 ms then ~100 ms of repetitions (at least 10),
  one ``torch.cuda.synchronize`` at the end; peak memory from ``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats``, minus what was allocated before the case was set up.
- CPU: ``time.perf_counter`` around each call, a shorter budget; peak memory is not measured
  (null) because the CPU allocator has no peak counter that covers ATen's allocations.

All times are in milliseconds; the record keeps the median and the 20th/80th percentiles.
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .schema import RECORD_FIELDS

REPO_ROOT = Path(__file__).resolve().parent.parent

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Skip(Exception):
    """A case that cannot run here; the message becomes the record's ``skipped_reason``."""


def reason_of(exc: BaseException, limit: int = 400) -> str:
    """A one-line reason from an exception (type and the first meaningful line of the message)."""
    msg = str(exc).strip()
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if type(exc).__name__ == "InductorError" and len(lines) > 1 and len(first) < 40:
        first = " ".join(lines[:2])
    text = first if isinstance(exc, Skip) else f"{type(exc).__name__}: {first}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Devices and metadata


def peak_bandwidth_gbps(device_name: str) -> float | None:
    """Peak DRAM bandwidth of a known device (the one table: bench/gpu_limits.py), else None."""
    from .gpu_limits import find_device

    device = find_device(device_name)
    return None if device is None else device.hbm_gbps


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def device_info(device: torch.device) -> dict:
    """Name, driver and peak bandwidth of the device the benchmark runs on."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        return {
            "device": name,
            "device_type": "cuda",
            "driver": _nvidia_driver(),
            "cuda_runtime": torch.version.cuda,
            "compute_capability": f"{props.major}.{props.minor}",
            "device_memory_gb": round(props.total_memory / 1e9, 1),
            "num_sms": props.multi_processor_count,
            "peak_bandwidth_gbps": peak_bandwidth_gbps(name),
        }
    return {
        "device": f"CPU: {_cpu_name()}",
        "device_type": "cpu",
        "driver": None,
        "cuda_runtime": torch.version.cuda,
        "compute_capability": None,
        "device_memory_gb": None,
        "num_sms": None,
        "peak_bandwidth_gbps": None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def git_commit() -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # triton is optional
        triton_version = f"unavailable ({reason_of(exc, 120)})"
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def build_meta(device: torch.device, *, quick: bool, argv: Iterable[str], extra: dict | None = None) -> dict:
    import htsat_kernels as hk

    now = utc_now()
    meta = {
        **device_info(device),
        **versions(),
        **git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "quick": bool(quick),
        "argv": list(argv),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "fused_status": hk.fused_status(),
        "error_definition": (
            "max_abs_err = max |out - ref|; max_rel_err = max |out - ref| / max |ref| (per tensor, "
            "then the max over the compared tensors); ref = the reference op in fp32 on the same "
            "(dtype-rounded) inputs. forward: output; backward: every input gradient; full: both."
        ),
        "peak_mem_definition": (
            "CUDA only: torch.cuda.max_memory_allocated during the timed calls minus the memory "
            "allocated before the case was set up (the case's inputs, activations, outputs, grads "
            "and temporaries); null on CPU."
        ),
        "gbps_definition": "bytes (see bytes_formula) / median time; pct_peak_bw = gbps / peak_bandwidth_gbps",
    }
    if extra:
        meta.update(extra)
    return meta


# --------------------------------------------------------------------------------------------
# Numerical error


def tensor_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|) of ``out`` against ``ref``, computed in fp64."""
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    a = out.detach().double()
    b = ref.detach().double().to(a.device)
    diff = (a - b).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if math.isnan(max_abs) or not bool(torch.isfinite(a).all()):
        return float("nan"), float("nan")
    scale = float(b.abs().max()) if b.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, max_rel


def combine_errors(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, dict]:
    """Errors of several named tensors: the max of each measure plus the per-tensor detail."""
    detail = {}
    for name, (out, ref) in pairs.items():
        a, r = tensor_errors(out, ref)
        detail[name] = {"max_abs_err": a, "max_rel_err": r}
    if not detail:
        return None, None, {}
    max_abs = max(d["max_abs_err"] for d in detail.values())
    max_rel = max(d["max_rel_err"] for d in detail.values())
    return max_abs, max_rel, detail


# --------------------------------------------------------------------------------------------
# Timing


@dataclass
class Prepared:
    """A case ready to time: ``fn()`` is one iteration, ``setup()`` runs untimed before each."""

    fn: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    fields: dict = field(default_factory=dict)
    timed: bool = True
    # Work items per call (e.g. clips for the model): the runner adds items_per_s.
    items_per_call: int | None = None
    baseline_alloc: int = 0


@dataclass
class TimingConfig:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 10
    max_reps: int = 1000
    cpu_rep_ms: float = 300.0
    cpu_min_reps: int = 3
    cpu_max_reps: int = 50
    flush_l2: bool = True


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (same convention as numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


_l2_buffer: torch.Tensor | None = None


def _flush_l2(device: torch.device) -> None:
    global _l2_buffer
    if _l2_buffer is None or _l2_buffer.device != device:
        _l2_buffer = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    _l2_buffer.zero_()


def reserve_l2_buffer(device: torch.device) -> None:
    """Allocate the L2 flush buffer once, so it is not counted in any case's peak memory."""
    if device.type == "cuda":
        _flush_l2(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_baseline(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    synchronize(device)
    return torch.cuda.memory_allocated(device)


def time_prepared(prep: Prepared, device: torch.device, cfg: TimingConfig) -> dict:
    """Time ``prep.fn``; returns median/p20/p80 in ms, the number of reps and peak memory."""
    fn, setup = prep.fn, prep.setup
    if device.type == "cuda":
        return _time_cuda(fn, setup, device, cfg, prep.baseline_alloc)
    return _time_cpu(fn, setup, cfg)


def _time_cuda(fn, setup, device, cfg: TimingConfig, baseline: int) -> dict:
    # Estimate the cost of one call (the first call, e.g. a compile, already ran in prepare).
    n_est = 3
    if setup:
        setup()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(n_est):
        if setup:
            setup()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    est_ms = max(start.elapsed_time(end) / n_est, 1e-3)
    n_warm = max(1, int(cfg.warmup_ms / est_ms))
    n_rep = int(min(cfg.max_reps, max(cfg.min_reps, cfg.rep_ms / est_ms)))
    for _ in range(n_warm):
        if setup:
            setup()
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for i in range(n_rep):
        if setup:
            setup()
        if cfg.flush_l2:
            _flush_l2(device)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    peak = torch.cuda.max_memory_allocated(device) - baseline
    return {
        "median_ms": quantile(times, 0.5),
        "p20_ms": quantile(times, 0.2),
        "p80_ms": quantile(times, 0.8),
        "reps": n_rep,
        "peak_mem_mb": max(peak, 0) / 2**20,
    }


def _time_cpu(fn, setup, cfg: TimingConfig) -> dict:
    times: list[float] = []
    budget_s = cfg.cpu_rep_ms / 1e3
    t_begin = time.perf_counter()
    while True:
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        n = len(times)
        if n >= cfg.cpu_max_reps:
            break
        if n >= cfg.cpu_min_reps and time.perf_counter() - t_begin >= budget_s:
            break
    return {
        "median_ms": quantile(times, 0.5),
        "p20_ms": quantile(times, 0.2),
        "p80_ms": quantile(times, 0.8),
        "reps": len(times),
        "peak_mem_mb": None,
    }


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def blank_record(**known) -> dict:
    rec = {k: None for k in RECORD_FIELDS}
    rec.update(known)
    return rec
