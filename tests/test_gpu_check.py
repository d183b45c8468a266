"""``make gpu-check``'s logic on CPU, with the GPU parts faked: phase planning, budget cutting,
incremental result writing, and the immediate refusal on a machine without a GPU."""

import json
import re
import subprocess
import sys

import pytest

from bench import gpu_check as gc

DEVICE = {"name": "NVIDIA H100 80GB HBM3", "cc": "9.0", "slug": "nvidia-h100-80gb-hbm3", "sms": 132}


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _bench_part(cmd, out_records):
    """Write what `python -m bench ... --out DIR` would: one results JSON in DIR."""
    from pathlib import Path

    out = Path(cmd[cmd.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    recs = [
        {
            "section": "ops",
            "op": "window_attention",
            "provider": "fused",
            "mode": "forward",
            "dtype": "bf16",
            "shape": "s",
            "stage": 1,
            "batch": 128,
            "median_ms": 0.2,
            "bytes": 4e8,
            "ideal_ms": 0.12,
            "pct_roofline": 60.0,
        }
    ]
    out_records += recs
    (out / "x.json").write_text(json.dumps({"meta": {"device": DEVICE["name"], "device_type": "cuda"}, "records": recs}))


@pytest.fixture(autouse=True)
def _sanitizer_present(monkeypatch):
    from bench import static_cuda

    real = static_cuda.find_tool
    monkeypatch.setattr(
        static_cuda, "find_tool", lambda name: "/fake/compute-sanitizer" if name == "compute-sanitizer" else real(name)
    )


def make_check(tmp_path, cost, fail=()):
    """A GpuCheck whose commands take `cost(cmd)` fake seconds (capped by their time limit)."""
    clock = FakeClock()
    calls, records = [], []

    def run(cmd, timeout, env=None, log=None):
        calls.append((cmd, timeout, env))
        spent = cost(cmd)
        if spent > timeout:
            clock.t += timeout
            return gc.Outcome(None, timeout, "killed")
        clock.t += spent
        if "bench" in cmd and "--out" in cmd and "--static" not in cmd:
            _bench_part(cmd, records)
        rc = 1 if any(f in " ".join(cmd) for f in fail) else 0
        return gc.Outcome(rc, spent, "=== 3 passed in 1.0s ===" if rc == 0 else "boom")

    check = gc.GpuCheck(out_dir=tmp_path, budget=540, device=DEVICE, run=run, clock=clock, python="python3")
    return check, calls, clock


def test_allotment_keeps_time_for_the_later_phases():
    a, b = gc.Phase("a", 100, 30), gc.Phase("b", 100, 50)
    assert gc.allotment(500, [a, b]) == 100  # nominal
    assert gc.allotment(120, [a, b]) == 70  # leaves b its minimum
    assert gc.allotment(60, [a, b]) == 60  # b cannot run anyway: a uses what is left
    assert gc.allotment(20, [a, b]) == 0  # below a's own minimum: skipped


def test_all_phases_run_in_order_within_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(gc.GpuCheck, "phase_sanitizer", lambda self, allot: {"status": "refused", "tail": "no permission"})
    check, calls, clock = make_check(tmp_path, cost=lambda cmd: 10)
    rc = check.run_all()
    assert rc == 0
    assert [p["phase"] for p in check.phases] == [p.name for p in gc.PHASES]
    assert clock.t <= check.budget
    build = calls[0]
    assert build[0][1:] == ["setup.py", "build_ext", "--inplace"]
    assert build[2]["HTSAT_KERNELS_CUDA_ARCHS"] == "9.0" and build[2]["TORCH_CUDA_ARCH_LIST"] == "9.0"
    tests_cmd = next(c[0] for c in calls if "pytest" in c[0])
    assert "tests/test_window_attention.py" in tests_cmd and "tests/test_train.py" not in tests_cmd  # CUDA test files only
    bench_args = [c[0] for c in calls if "bench" in c[0] and "--static" not in c[0] and "--coverage" not in c[0]]
    coverage_args = [c[0] for c in calls if "--coverage" in c[0]]
    assert [a[a.index("--coverage") + 1 : a.index("--out")] for a in coverage_args] == [["--quick"], ["--dtypes", "bf16"]]
    first = bench_args[0]
    assert first[first.index("--batches") + 1] == "128" and first[first.index("--dtypes") + 1] == "bf16"
    assert first[first.index("--modes") + 1] == "forward,full"
    providers = {p for a in bench_args for p in a[a.index("--providers") + 1].split(",")}
    assert {"reference", "fused", "compile", "sdpa", "flex", "fused+compile"} <= providers
    data = json.loads(check.stem.with_suffix(".json").read_text())
    assert len(data["records"]) == len(bench_args) + len(coverage_args)  # every part's records merged
    assert {p["phase"]: p["status"] for p in data["meta"]["gpu_check"]["phases"]}["sanitizer"] == "refused"
    assert check.stem.with_suffix(".csv").exists()


def test_a_slow_build_makes_later_phases_shrink_or_skip_with_a_reason(tmp_path):
    # the build uses all its time and is killed; each ops part takes 60 s
    check, calls, clock = make_check(tmp_path, cost=lambda cmd: 10_000 if "setup.py" in cmd else 60)
    check.budget = 300
    check.run_all()
    status = {p["phase"]: p for p in check.phases}
    assert status["build"]["status"] == "stopped at its time limit"
    assert clock.t <= check.budget
    nominal = {p.name: p.nominal_s for p in gc.PHASES}
    later = [p for p in check.phases if p["phase"] != "build"]
    assert all(p.get("allotted_s", 0) < nominal[p["phase"]] for p in later)  # every later phase shrank
    skips = [p["reason"] for p in later if p["status"] == "skipped"]
    skips += [part["reason"] for p in later for part in p.get("parts", []) if part["status"] == "skipped"]
    assert skips and all("budget" in r for r in skips)


def test_results_are_written_after_every_phase(tmp_path):
    seen = []

    def cost(cmd):
        if seen:  # a previous phase's results are on disk before the next command starts
            assert json.loads(check.stem.with_suffix(".json").read_text())["meta"]["gpu_check"]["phases"]
        seen.append(cmd)
        if "pytest" in cmd and "memcheck" not in cmd:
            raise KeyboardInterrupt  # the run is stopped during the tests
        return 5

    check, calls, clock = make_check(tmp_path, cost)
    with pytest.raises(KeyboardInterrupt):
        check.run_all()
    data = json.loads(check.stem.with_suffix(".json").read_text())
    assert [p["phase"] for p in data["meta"]["gpu_check"]["phases"]] == ["build"]


def test_a_failing_phase_is_recorded_and_the_run_goes_on(tmp_path):
    check, calls, clock = make_check(tmp_path, cost=lambda cmd: 5, fail=("setup.py",))
    rc = check.run_all(phases=gc.PHASES[:2])
    assert rc == 1
    assert check.phases[0]["status"] == "failed (exit 1)" and check.phases[0]["tail"] == "boom"
    assert check.phases[1]["status"] == "ok" and check.phases[1]["pytest"] == "3 passed in 1.0s"


def test_cpu_machine_exits_at_once_with_a_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--budget", "5"], capture_output=True, text=True, timeout=120, cwd=gc.REPO
    )
    assert res.returncode == 2
    assert res.stderr.strip().startswith("gpu-check: error: no CUDA device")
    assert "Traceback" not in res.stderr


def test_bad_arguments_are_one_line_errors(capsys):
    assert gc.main(["--budget", "0"]) == 2
    assert gc.main(["--phases", "build,nope"]) == 2
    err = capsys.readouterr().err
    assert "--budget must be a positive" in err and "unknown phase nope" in err


def test_run_command_stops_a_command_at_its_time_limit(tmp_path):
    # the child spawns a grandchild: the whole process group goes at the limit
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    res = gc.run_command([sys.executable, "-c", code], timeout=2, log=tmp_path / "x.log")
    assert res.timed_out and res.seconds < 30
    ok = gc.run_command([sys.executable, "-c", "print('hi')"], timeout=60, log=tmp_path / "y.log")
    assert ok.rc == 0 and (tmp_path / "y.log").read_text().strip() == "hi"


def test_nominal_times_fit_the_make_budget_and_the_model_phase_fits_its_compiled_training_step(tmp_path):
    """The budget logic is honest: the phases' nominal times sum to `make gpu-check`'s budget, and the model
    phase's covers eager and then the compiled training step (its first two parts), in that order."""
    make = (gc.REPO / "Makefile").read_text()
    budget = float(re.search(r"GPU_CHECK_BUDGET \?= (\d+)", make).group(1))
    assert sum(p.nominal_s for p in gc.PHASES) == budget
    check, _, _ = make_check(tmp_path, cost=lambda cmd: 10)
    plan = check.plan_model()
    assert [name for name, _, _ in plan[:2]] == ["model_eager", "model_compiled_train"]
    args = plan[1][1]
    assert args[args.index("--modes") + 1] == "train" and args[args.index("--providers") + 1] == "fused+compile"
    model = next(p for p in gc.PHASES if p.name == "model")
    assert sum(nominal for _, _, nominal in plan[:2]) <= model.nominal_s


def _model_record(provider, ms, err, diff=None):
    return {
        "op": "model",
        "mode": "train",
        "provider": provider,
        "dtype": "bf16",
        "median_ms": ms,
        "max_rel_err": err,
        "max_rel_diff_vs_reference": diff,
        "skipped_reason": None,
    }


def test_compiled_training_step_is_held_to_the_numerics_rule():
    eager = [_model_record("reference", 300.0, 0.2), _model_record("fused", 200.0, 0.21)]
    assert gc.compiled_train_check(eager) is None  # the compiled step did not run
    check = gc.compiled_train_check([*eager, _model_record("fused+compile", 160.0, 0.3, 0.1)])
    assert check["ok"] and check["speedup_vs_eager_fused"] == pytest.approx(1.25)
    assert check["compiled_ms"] == 160.0 and check["eager_reference_ms"] == 300.0
    bad = gc.compiled_train_check([*eager, _model_record("fused+compile", 160.0, 0.45)])  # > 2 x 0.2 + 0.01
    assert not bad["ok"] and "> 4.10e-01" in bad["verdict"]
    assert not gc.compiled_train_check([*eager, _model_record("fused+compile", 160.0, float("nan"))])["ok"]
    text = gc.summary_text(
        {"meta": {"device": "X", "gpu_check": {}}, "records": [*eager, _model_record("fused+compile", 160.0, 0.45)]}
    )
    assert "compiled training step (fused+compile, bf16): 160.0 ms vs eager fused 200.0 ms (1.25x); FAILS" in text


def test_a_compiled_training_step_off_the_rule_fails_the_model_phase(tmp_path, monkeypatch):
    check, _, _ = make_check(tmp_path, cost=lambda cmd: 10)

    def bench(self, name, args, allot):
        if name == "model_eager":
            self.records += [_model_record("reference", 300.0, 0.2), _model_record("fused", 200.0, 0.21)]
        elif name == "model_compiled_train":
            self.records.append(_model_record("fused+compile", 160.0, 0.9))
        return {"part": name, "status": "ok", "seconds": 10.0, "records": 1}

    monkeypatch.setattr(gc.GpuCheck, "_bench", bench)
    info = check.phase_model(140)
    assert info["status"] == "compiled training step off the numerics rule"
    assert info["compiled_train"]["ok"] is False


def test_model_phase_measures_activation_memory_at_b128(tmp_path):
    """gpu-check runs the memory section alone (fp32 and bf16; the bench picks B = 128 on CUDA) and
    prints it in the summary; the other model parts skip it."""
    check, _, _ = make_check(tmp_path, cost=lambda cmd: 10)
    parts = {name: args for name, args, _ in check.plan_model()}
    memory = parts["model_memory"]
    assert "--memory-only" in memory and memory[memory.index("--dtypes") + 1] == "fp32,bf16"
    assert all("--no-memory" in args for name, args in parts.items() if name != "model_memory" and "train" in args)
    rec = {
        "section": "memory",
        "op": "model",
        "provider": "fused",
        "backend": "fused",
        "save_policy": "recompute-norms-mlp",
        "dtype": "bf16",
        "autocast": True,
        "batch": 128,
        "saved_mb": 5000.0,
        "saved_vs_reference": 0.4,
        "peak_mem_mb": 7000.0,
        "clips_per_80gb": 2000,
    }
    text = gc.summary_text({"meta": {"device": "H100", "gpu_check": {"phases": []}}, "records": [rec]})
    assert "activation memory of the training step" in text and "recompute-norms-mlp" in text and "7000" in text
