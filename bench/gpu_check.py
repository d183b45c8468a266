"""``make gpu-check`` / ``python3 -m bench.gpu_check --budget 540``: all GPU evidence in one short run.

For a machine lent for a few minutes (one H100/H200, torch + Triton + nvcc + pytest preinstalled
in the system python, no network). Phases, each timed, in this order:

1. ``build``: the extension in place for the present GPU's architecture only.
2. ``tests``: the CUDA tests (``-k "CUDA or cuda"``: the ``requires_cuda`` classes).
3. ``sanitizer``: ``compute-sanitizer --tool memcheck`` over the CUDA extension tests (its
   refusal, e.g. without the needed driver permissions, is recorded, not fatal).
4. ``ops``: every op at the four stage shapes, B = 128, bf16, forward and full; providers
   reference / fused / sdpa first, then compile / flex stage by stage while the budget lasts.
5. ``model``: the whole model, training step and inference, eager (reference and fused), then the
   compiled (torch.compile / Inductor) fused training step: its forward + backward against the
   fp32 model by the numerics rule (``compiled_train_check``) and its time next to eager; the coverage
   report (``python -m bench --coverage``: which calls of each op ran fused, per dtype, train and
   inference); the memory section (saved-for-backward bytes and peak allocated memory of the training
   step at B = 128, per save policy, fp32 and bf16); then the compiled inference and the compiled
   bf16 coverage configurations while time lasts.
6. ``static``: the compile report, if time is left.

``--budget`` seconds bound the whole run: each phase gets at most its nominal time and never the
time the later phases need at minimum; a phase that does not fit is skipped with the reason. The
results are written after every phase (``<device>_<date>.json`` + CSV into ``$OUT`` if set, else
``bench/results/``; the bench parts and logs under ``gpu_check/``), so a stopped run leaves what
it had. On a machine without a CUDA device it exits at once with a message (status 2).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OPS = ("window_attention", "window_partition", "window_merge", "patch_merge", "layer_norm_window_partition", "window_merge_add")
EXT_TEST_FILES = ("tests/test_window_process.py", "tests/test_patch_merge.py")


@dataclass(frozen=True)
class Phase:
    name: str
    nominal_s: float  # what it takes on an H100 with 16 cores (estimated)
    min_s: float  # below this it is not worth starting


# Nominal times (estimates for an H100 with 16 cores) sum to the 510 s that `make gpu-check` gives (a test
# holds them to it); the allotment trims the later phases when an earlier one overruns. The model phase's nominal
# covers its first four parts (eager, the compiled training step, the eager coverage report, the activation memory).
PHASES = (
    Phase("build", 120, 60),
    Phase("tests", 50, 30),
    Phase("sanitizer", 30, 20),
    Phase("ops", 90, 45),
    Phase("model", 180, 40),
    Phase("static", 40, 30),
)
# the numerics rule (docs/design.md section 6) for a low-precision whole model: error against the fp32
# model at most 2x the eager reference's own error in that dtype, plus this (relative to max |truth|)
MODEL_RULE_ATOL = 1e-2


def allotment(remaining: float, phases_left: list[Phase]) -> float:
    """Seconds for the first of ``phases_left``: at most its nominal time, and never the minimum the
    later phases need; 0 when it does not get its own minimum (it is then skipped)."""
    cur, later = phases_left[0], phases_left[1:]
    avail = remaining - sum(p.min_s for p in later)
    if avail < cur.min_s:
        # the later phases cannot all run anyway: the current one may use what is left
        avail = remaining if remaining >= cur.min_s else 0.0
    return 0.0 if avail < cur.min_s else min(cur.nominal_s, avail)


@dataclass
class Outcome:
    """What a command did: exit status (None if it was stopped at its time limit) and its output."""

    rc: int | None
    seconds: float
    output: str = ""

    @property
    def timed_out(self) -> bool:
        return self.rc is None


def run_command(cmd: list[str], timeout: float, env: dict | None = None, log: Path | None = None) -> Outcome:
    """Run ``cmd`` in its own process group; on timeout the whole group is killed."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out or "")
    return Outcome(rc, time.monotonic() - t0, out or "")


def _tail(text: str, n: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@dataclass
class GpuCheck:
    out_dir: Path
    budget: float
    device: dict  # name, cc ("9.0"), slug
    run: Callable[..., Outcome] = run_command
    clock: Callable[[], float] = time.monotonic
    python: str = sys.executable
    phases: list = field(default_factory=list)  # the log: one dict per phase
    records: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.t0 = self.clock()
        self.work = self.out_dir / "gpu_check"
        date = time.strftime("%Y-%m-%d", time.gmtime())
        stem = f"{self.device['slug']}_{date}"
        n = 2
        while (self.out_dir / f"{stem}.json").exists():
            stem = f"{self.device['slug']}_{date}_{n}"
            n += 1
        self.stem = self.out_dir / stem

    # ----------------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.budget - (self.clock() - self.t0)

    def write(self) -> Path:
        """The results so far: merged bench records, the phase log and the meta (JSON + CSV)."""
        from .report import write_csv, write_json

        self.out_dir.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta)
        meta.update(
            {
                "gpu_check": {
                    "budget_s": self.budget,
                    "elapsed_s": round(self.clock() - self.t0, 1),
                    "phases": self.phases,
                    "device": self.device,
                }
            }
        )
        meta.setdefault("device", self.device.get("name"))
        meta.setdefault("device_type", "cuda")
        result = {"meta": meta, "records": self.records}
        write_json(self.stem.with_suffix(".json"), result)
        write_csv(self.stem.with_suffix(".csv"), self.records)
        return self.stem.with_suffix(".json")

    def log_phase(self, name: str, status: str, seconds: float, **extra) -> dict:
        entry = {"phase": name, "status": status, "seconds": round(seconds, 1), **extra}
        self.phases.append(entry)
        print(
            f"[gpu-check] {name}: {status} in {seconds:.0f} s" + (f" ({extra['reason']})" if extra.get("reason") else ""),
            flush=True,
        )
        self.write()
        return entry

    # ----------------------------------------------------------------------------------------
    def phase_build(self, allot: float) -> dict:
        cc = self.device["cc"]
        env = {"TORCH_CUDA_ARCH_LIST": cc, "HTSAT_KERNELS_CUDA_ARCHS": cc, "MAX_JOBS": str(os.cpu_count() or 16)}
        res = self.run([self.python, "setup.py", "build_ext", "--inplace"], allot, env=env, log=self.work / "build.log")
        ok = res.rc == 0
        return {
            "status": "ok" if ok else ("stopped at its time limit" if res.timed_out else f"failed (exit {res.rc})"),
            "archs": cc,
            "tail": None if ok else _tail(res.output),
        }

    def phase_tests(self, allot: float) -> dict:
        files = cuda_test_files()
        if not files:
            return {"status": "skipped", "reason": "no test file under tests/ uses requires_cuda or pytest.mark.cuda"}
        # only the files with CUDA tests: the others may need packages this machine lacks (soundfile, ...)
        cmd = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
        res = self.run([*cmd, "-k", "CUDA or cuda", *files], allot, log=self.work / "tests.log")
        summary = _pytest_summary(res.output)
        status = "stopped at its time limit" if res.timed_out else ("ok" if res.rc == 0 else f"failed (exit {res.rc})")
        return {"status": status, "pytest": summary, "tail": None if res.rc == 0 else _tail(res.output, 15)}

    def phase_sanitizer(self, allot: float) -> dict:
        from .static_cuda import find_tool

        tool = find_tool("compute-sanitizer")
        if tool is None:
            return {"status": "skipped", "reason": "compute-sanitizer not found (nvcc's bin dir, $CUDA_HOME/bin, PATH)"}
        cmd = [
            tool,
            "--tool",
            "memcheck",
            "--error-exitcode",
            "97",
            self.python,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-k",
            "CUDA",
            *[f for f in EXT_TEST_FILES if (REPO / f).exists()],
        ]
        res = self.run(cmd, allot, log=self.work / "sanitizer.log")
        errors = re.findall(r"ERROR SUMMARY: (\d+) error", res.output)
        refused = res.rc not in (0, 97, None) and not _pytest_summary(res.output)
        if res.timed_out:
            status = "stopped at its time limit"
        elif refused:
            status = "refused"
        elif res.rc == 97 or (errors and int(errors[-1])):
            status = "memcheck errors"
        else:
            status = "ok" if res.rc == 0 else f"failed (exit {res.rc})"
        return {
            "status": status,
            "memcheck_errors": int(errors[-1]) if errors else None,
            "pytest": _pytest_summary(res.output),
            "tail": None if status == "ok" else _tail(res.output, 12),
        }

    def _bench(self, name: str, args: list[str], allot: float) -> dict:
        """One ``python -m bench`` part; its records join the results as soon as it finishes."""
        out = self.work / "parts" / name
        cmd = [self.python, "-m", "bench", *args, "--out", str(out), "--no-progress", "--no-plots", "--update-readme", "no"]
        res = self.run(cmd, allot, log=self.work / f"{name}.log")
        files = sorted(glob.glob(str(out / "*.json")), key=os.path.getmtime)
        if files:
            data = json.loads(Path(files[-1]).read_text())
            self.records += data.get("records", [])
            if not self.meta:
                self.meta = {k: v for k, v in data.get("meta", {}).items() if k not in ("files", "argv")}
        status = "stopped at its time limit" if res.timed_out else ("ok" if res.rc == 0 else f"failed (exit {res.rc})")
        return {
            "part": name,
            "status": status,
            "seconds": round(res.seconds, 1),
            "records": len(data.get("records", [])) if files else 0,
        }

    def plan_ops(self) -> list[tuple[str, list[str], float]]:
        """(part, bench args, nominal seconds) in priority order: the eager providers everywhere, then
        the compiled ones (torch.compile and flex build one graph per op, shape and mode: 5-20 s
        each) in small parts, attention first, so that a part stopped at the budget loses little."""
        common = ["--batches", "128", "--dtypes", "bf16", "--modes", "forward,full"]
        later = common + ["--skip-model-check"]
        others = ",".join(op for op in OPS if op != "window_attention")
        parts = [("ops_eager", ["--ops", ",".join(OPS), "--providers", "reference,fused,sdpa", *common], 60)]
        for stage in (1, 2, 3, 4):
            parts.append(
                (
                    f"ops_attention_compiled_s{stage}",
                    ["--ops", "window_attention", "--providers", "compile,flex", "--stages", str(stage), *later],
                    50,
                )
            )
            if stage == 1:
                parts.append(("ops_compiled_s1", ["--ops", others, "--providers", "compile", "--stages", "1", *later], 80))
        return parts

    def plan_model(self) -> list[tuple[str, list[str], float]]:
        """Eager first (the baseline of everything after), then the compiled fused training step (its error
        probe runs forward + backward through the compiled graph; Inductor compiles the train graph for
        the timing), the eager coverage report, the activation memory at B = 128, then the compiled inference
        and the compiled coverage configurations while time lasts."""
        common = ["--ops", "model", "--dtypes", "bf16", "--skip-model-check"]
        return [
            ("model_eager", [*common, "--modes", "train,inference", "--providers", "reference,fused", "--no-memory"], 45),
            ("model_compiled_train", [*common, "--modes", "train", "--providers", "fused+compile", "--no-memory"], 70),
            ("coverage_eager", ["--coverage", "--quick"], 25),
            # saved-for-backward bytes and the step's peak at B = 128 per save policy (bench/activation_memory.py)
            (
                "model_memory",
                [*common[:2], "--dtypes", "fp32,bf16", "--modes", "train", "--providers", "reference,fused"]
                + ["--memory-only", "--skip-model-check"],
                40,
            ),
            ("model_compiled_inference", [*common, "--modes", "inference", "--providers", "compile,fused+compile"], 60),
            ("coverage_compiled_bf16", ["--coverage", "--dtypes", "bf16"], 90),
        ]

    def _parts(self, parts, allot: float) -> dict:
        t_end = self.clock() + allot
        done = []
        for name, args, nominal in parts:
            left = t_end - self.clock()
            if left < min(nominal, 20):
                done.append(
                    {"part": name, "status": "skipped", "reason": f"budget: {left:.0f} s left in the phase, needs ~{nominal} s"}
                )
                continue
            done.append(self._bench(name, args, left))
            self.write()
        ran = [d for d in done if d["status"] == "ok"]
        status = "ok" if len(ran) == len(done) else ("partial" if ran else "failed")
        return {"status": status, "parts": done}

    def phase_ops(self, allot: float) -> dict:
        return self._parts(self.plan_ops(), allot)

    def phase_model(self, allot: float) -> dict:
        info = self._parts(self.plan_model(), allot)
        check = compiled_train_check(self.records)
        info["compiled_train"] = check
        if check is not None and not check["ok"]:
            info["status"] = "compiled training step off the numerics rule"
        return info

    def phase_static(self, allot: float) -> dict:
        cmd = [self.python, "-m", "bench", "--static", "--out", str(self.work / "static")]
        res = self.run(cmd, allot, log=self.work / "static.log")
        return {"status": "stopped at its time limit" if res.timed_out else ("ok" if res.rc == 0 else f"failed (exit {res.rc})")}

    # ----------------------------------------------------------------------------------------
    def run_all(self, phases=PHASES) -> int:
        phases = list(phases)
        for i, ph in enumerate(phases):
            remaining = self.remaining()
            allot = allotment(remaining, phases[i:])
            if allot <= 0:
                self.log_phase(
                    ph.name, "skipped", 0.0, reason=f"budget: {remaining:.0f} s left, the phase needs at least {ph.min_s:.0f} s"
                )
                continue
            print(f"[gpu-check] {ph.name}: up to {allot:.0f} s ({remaining:.0f} s of the budget left)", flush=True)
            t = self.clock()
            try:
                info = getattr(self, f"phase_{ph.name}")(allot)
            except Exception as exc:  # a phase's own crash is recorded; the next phases still run
                info = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            status = info.pop("status")
            self.log_phase(ph.name, status, self.clock() - t, allotted_s=round(allot), **info)
        path = self.finish()
        print(f"[gpu-check] results: {path}", flush=True)
        return 0 if all(p["status"] in ("ok", "skipped", "partial", "refused") for p in self.phases) else 1

    def finish(self) -> Path:
        """Final files (JSON, CSV, plots) and the printed summary."""
        from .report import write_plots
        from .roofline import render_roofline

        path = self.write()
        result = json.loads(path.read_text())
        try:
            write_plots(self.stem, result)
        except Exception as exc:  # plots are a convenience: never lose the results over them
            print(f"[gpu-check] plots not written: {exc}", flush=True)
        print(summary_text(result))
        if any(r.get("ideal_ms") is not None for r in result["records"]):
            print(render_roofline(result, providers=("fused",)))  # every provider's figures are in the JSON
        return path


def compiled_train_check(records: list[dict]) -> dict | None:
    """The compiled (Inductor) fused training step against eager, from the model records: times side by side
    and the numerics rule: its error against the fp32 model (outputs and every parameter gradient) at most
    2x the eager reference's own error in that dtype + MODEL_RULE_ATOL. None when it did not run."""
    train = {
        r["provider"]: r
        for r in records
        if r.get("op") == "model" and r.get("mode") == "train" and not r.get("skipped_reason") and r.get("median_ms")
    }
    comp, eager, ref = train.get("fused+compile"), train.get("fused"), train.get("reference")
    if comp is None:
        return None
    out = {
        "dtype": comp.get("dtype"),
        "compiled_ms": comp["median_ms"],
        "eager_fused_ms": eager["median_ms"] if eager else None,
        "eager_reference_ms": ref["median_ms"] if ref else None,
        "speedup_vs_eager_fused": eager["median_ms"] / comp["median_ms"] if eager else None,
        "speedup_vs_eager_reference": ref["median_ms"] / comp["median_ms"] if ref else None,
        "compiled_rel_err": comp.get("max_rel_err"),
        "eager_reference_rel_err": ref.get("max_rel_err") if ref else None,
        "compiled_rel_diff_vs_reference": comp.get("max_rel_diff_vs_reference"),
    }
    err, base = out["compiled_rel_err"], out["eager_reference_rel_err"]
    if err is None or base is None:
        out.update(ok=False, verdict="no error figures to compare (the eager reference or the error probe did not run)")
        return out
    bound = (2 * base if comp.get("dtype") != "fp32" else 0.0) + MODEL_RULE_ATOL
    out["ok"] = bool(err <= bound)  # NaN fails
    out["verdict"] = (
        f"error {err:.2e} vs the fp32 model {'<=' if out['ok'] else '>'} {bound:.2e} "
        f"(2 x eager reference {base:.2e} + {MODEL_RULE_ATOL:g})"
    )
    return out


def cuda_test_files() -> list[str]:
    """Test files with CUDA tests (a ``requires_cuda`` class or function, or ``pytest.mark.cuda``)."""
    hits = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        text = path.read_text(errors="ignore")
        if "@requires_cuda" in text or "pytest.mark.cuda" in text:
            hits.append(str(path.relative_to(REPO)))
    return hits


def _pytest_summary(output: str) -> str | None:
    m = re.findall(
        r"^=*\s*(\d+ (?:passed|failed|skipped|error|errors|deselected|xfailed|xpassed)[^=\n]*?)\s*=*\s*$", output, re.MULTILINE
    )
    return m[-1] if m else None


def summary_text(result: dict) -> str:
    """The phase table and the whole-model figures."""
    from .report import format_table

    meta = result["meta"]
    gc = meta.get("gpu_check", {})
    rows = [
        [p["phase"], p["status"], f"{p['seconds']:.0f}", str(p.get("reason") or p.get("pytest") or "")[:90]]
        for p in gc.get("phases", [])
    ]
    lines = [
        "=" * 100,
        f"gpu-check on {meta.get('device')}: {gc.get('elapsed_s')} s of a {gc.get('budget_s')} s budget",
        format_table(["phase", "status", "s", "detail"], rows, right={2}),
    ]
    model = [
        r for r in result["records"] if r.get("op") == "model" and r.get("section") != "memory" and not r.get("skipped_reason")
    ]
    if model:
        mrows = [
            [
                r["mode"],
                str(r.get("batch")),
                r["provider"],
                f"{r.get('clips_per_s') or 0:.1f}",
                "-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}",
            ]
            for r in model
        ]
        lines += [
            "",
            "whole model (bf16):",
            format_table(["mode", "B", "provider", "clips/s", "peak MB"], mrows, right={1, 3, 4}),
        ]
    check = compiled_train_check(result["records"])
    if check is not None:
        eager = check["eager_fused_ms"]
        lines += [
            "",
            f"compiled training step (fused+compile, {check['dtype']}): {check['compiled_ms']:.1f} ms"
            + (f" vs eager fused {eager:.1f} ms ({check['speedup_vs_eager_fused']:.2f}x)" if eager else "")
            + f"; {'ok' if check['ok'] else 'FAILS'}: {check['verdict']}",
        ]
    memory = [r for r in result["records"] if r.get("section") == "memory"]
    if memory:
        from .report import memory_table

        lines += ["", "activation memory of the training step (saved for backward, peak above the model):", memory_table(memory)]
    return "\n".join(lines)


def detect_device() -> tuple[dict | None, str]:
    """(device info, "") on a CUDA machine, else (None, why not)."""
    try:
        import torch
    except ImportError as exc:
        return None, f"torch is not importable here ({exc}): gpu-check runs on a GPU machine with torch installed"
    if not torch.cuda.is_available():
        return None, "no CUDA device (torch.cuda.is_available() is False): run it on a machine with an NVIDIA GPU"
    props = torch.cuda.get_device_properties(0)
    slug = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-") or "cuda"
    return {"name": props.name, "cc": f"{props.major}.{props.minor}", "slug": slug, "sms": props.multi_processor_count}, ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=540.0, help="wall-time budget of the whole run in seconds (default 540)")
    p.add_argument("--out", type=Path, default=None, help="results directory (default: $OUT if set, else bench/results/)")
    p.add_argument(
        "--phases", default=None, help="comma list of phases to run (default: all: " + ",".join(x.name for x in PHASES) + ")"
    )
    args = p.parse_args(argv)
    if args.budget <= 0:
        print("gpu-check: error: --budget must be a positive number of seconds", file=sys.stderr)
        return 2
    phases = PHASES
    if args.phases:
        names = [x.strip() for x in args.phases.split(",") if x.strip()]
        unknown = [n for n in names if n not in {x.name for x in PHASES}]
        if unknown:
            print(
                f"gpu-check: error: unknown phase {', '.join(unknown)} (choose from {', '.join(x.name for x in PHASES)})",
                file=sys.stderr,
            )
            return 2
        phases = tuple(x for x in PHASES if x.name in names)
    device, why = detect_device()
    if device is None:
        print(f"gpu-check: error: {why}", file=sys.stderr)
        return 2
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results")
    print(
        f"[gpu-check] {device['name']} (sm_{device['cc'].replace('.', '')}), budget {args.budget:.0f} s, results in {out}",
        flush=True,
    )
    return GpuCheck(out_dir=out, budget=args.budget, device=device).run_all(phases)


if __name__ == "__main__":
    sys.exit(main())
