"""The benchmark command end to end: ``python -m bench --quick`` on CPU, its files, the compare tool.

One quick run (a subprocess, ~1-2 minutes on 2 CPU cores) is shared by the tests of this module.
No timing asserts: only that every case produced a complete record and the files exist.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

RECORD_FIELDS = (
    "op",
    "provider",
    "mode",
    "dtype",
    "shape",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_mem_mb",
    "gbps",
    "max_abs_err",
    "max_rel_err",
    "skipped_reason",
)
META_FIELDS = ("device", "driver", "torch", "triton", "git_commit", "date", "quick")


def _run(args, timeout=900):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quick")
    proc = _run(["-m", "bench", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    jsons = sorted(out.glob("*.json"))
    assert len(jsons) == 1, jsons
    return out, jsons[0], proc.stdout


def test_quick_json_has_every_field(quick_run):
    out, path, _ = quick_run
    assert path.name.startswith("cpu_") and path.name.endswith("_quick.json")
    data = json.loads(path.read_text())
    meta, records = data["meta"], data["records"]
    for k in META_FIELDS:
        assert k in meta, k
    assert meta["quick"] is True
    assert meta["device"] and meta["torch"] and meta["triton"] and meta["date"]
    # the model check that opens the report: built presets, outputs on generated audio, backends
    check = meta["model_check"]
    assert check["ok"] is True and len(check["checks"]) >= 5
    assert check["presets"]["htsat-audioset"]["trainable_params"] == 30_241_687
    assert "auto" in check["backends"] and set(check["fused_status"]) >= {"window_attention", "patch_merge"}
    assert records
    for r in records:
        missing = [k for k in RECORD_FIELDS if k not in r]
        assert not missing, (missing, r)
        if r["skipped_reason"] is not None:
            assert isinstance(r["skipped_reason"], str) and r["skipped_reason"], r
            assert r["median_ms"] is None
        elif r["section"] in ("ops", "model"):
            assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
            assert r["max_abs_err"] is not None and r["max_rel_err"] is not None, r
            assert r["peak_mem_mb"] is None  # CPU: not measured
        if r["section"] == "ops" and r["skipped_reason"] is None:
            assert r["gbps"] > 0 and r["bytes_formula"], r
        if r["section"] in ("ops", "interpreter"):  # every op record: bytes and FLOPs with their formulas
            assert r["bytes"] > 0 and isinstance(r["flops"], int) and r["flops"] >= 0 and r["flops_formula"], r
            if r["op"] in ("window_partition", "window_merge"):
                assert r["flops"] == 0, r  # pure data movement
            elif r["op"] != "window_merge_add" or r["mode"] != "backward":  # its backward only copies
                assert r["flops"] > 0, r

    ops = {"window_attention", "window_partition", "window_merge", "patch_merge"}
    for op in ops:
        refs = [r for r in records if r["section"] == "ops" and r["op"] == op and r["provider"] == "reference"]
        assert refs and all(r["skipped_reason"] is None for r in refs), op
        assert {r["mode"] for r in refs} == {"forward", "backward", "full"}
        # the reference in fp32 is the error baseline: exactly zero error
        assert all(r["max_abs_err"] == 0 for r in refs if r["dtype"] == "fp32")
    providers = {(r["op"], r["provider"]) for r in records if r["section"] == "ops"}
    for p in ("reference", "fused", "compile", "sdpa", "flex"):
        assert ("window_attention", p) in providers, p  # listed, run or skipped with a reason
    # the SDPA peer runs on CPU: a skip there is a broken call (it once missed the op's dropout_p)
    sdpa = [r for r in records if r["section"] == "ops" and r["op"] == "window_attention" and r["provider"] == "sdpa"]
    assert sdpa and all(r["skipped_reason"] is None for r in sdpa), [r["skipped_reason"] for r in sdpa][:1]
    # data movement is exact
    for r in records:
        if r["op"] in ("window_partition", "window_merge") and r["provider"] == "fused" and r["skipped_reason"] is None:
            assert r["max_abs_err"] == 0, r

    sections = {r["section"] for r in records}
    assert "ops" in sections and "model" in sections
    model = [r for r in records if r["section"] == "model"]
    assert {r["provider"] for r in model} >= {"reference", "fused", "compile", "fused+compile"}
    assert {r["mode"] for r in model} == {"train", "inference"}
    for r in model:
        if r["skipped_reason"] is None:
            assert r["clips_per_s"] > 0
    # saved-for-backward bytes: in the model table (train) and per configuration in the memory section
    train = {r["provider"]: r for r in model if r["mode"] == "train" and r["skipped_reason"] is None}
    assert train["fused"]["saved_mb"] <= 0.6 * train["reference"]["saved_mb"]
    memory = [r for r in records if r["section"] == "memory"]
    assert {(r["dtype"], r["save_policy"]) for r in memory} == {
        (d, p) for d in ("fp32", "bf16") for p in ("all", "recompute-norms", "recompute-norms-mlp")
    }
    for r in memory:
        assert r["saved_bytes"] == sum(r["saved_by_stage"].values()) == sum(r["saved_by_op"].values()) > 0, r
        assert r["step_ms"] > 0 and r["clips_per_80gb"] > 0
        if r["provider"] == "reference":
            assert r["saved_vs_reference"] == 1.0 and r["save_policy"] == "all"
        if r["save_policy"] == "recompute-norms-mlp":
            assert r["saved_vs_reference"] <= 0.6, r


def test_quick_csv_and_plots(quick_run):
    out, path, stdout = quick_run
    data = json.loads(path.read_text())
    csv_path = path.with_suffix(".csv")
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["records"])
    assert set(RECORD_FIELDS) <= set(rows[0])
    pngs = sorted(out.glob("*.png"))
    assert any(p.name.endswith("_ops_speedup.png") for p in pngs), pngs
    assert any(p.name.endswith("_model.png") for p in pngs), pngs
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the printed report labels where each section ran
    assert "Per-op benchmarks on CPU (no CUDA device" in stdout
    assert "Whole model" in stdout


def test_compare_two_runs(quick_run, tmp_path):
    _, path, _ = quick_run
    data = json.loads(path.read_text())
    slower = copy.deepcopy(data)
    n_slowed = 0
    for r in slower["records"]:
        if r["median_ms"] and r["provider"] == "reference":
            for k in ("median_ms", "p20_ms", "p80_ms"):
                r[k] *= 1.5
            n_slowed += 1
    slower["meta"]["git_commit"] = "0" * 40
    b = tmp_path / "b.json"
    b.write_text(json.dumps(slower))
    proc = _run(["-m", "bench.compare", str(path), str(b)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "REGRESSION" in proc.stdout
    assert f"{n_slowed} regressions" in proc.stdout
    assert "A: " in proc.stdout and "B: " in proc.stdout
    # same file twice: no regressions
    proc = _run(["-m", "bench.compare", str(path), str(path), "--only-changes"], timeout=120)
    assert proc.returncode == 0 and " 0 regressions" in proc.stdout


# ------------------------------------------------------------------------------------------------
# The pieces the report is built from (fast, in-process)


def test_quantiles_bandwidth_and_slugs():
    from bench.harness import peak_bandwidth_gbps, quantile
    from bench.schema import device_slug

    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert quantile(xs, 0.5) == 3.0
    assert quantile(xs, 0.2) == pytest.approx(1.8)
    assert quantile(xs, 0.8) == pytest.approx(4.2)
    assert peak_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_bandwidth_gbps("NVIDIA H200") == 4800.0
    assert peak_bandwidth_gbps("NVIDIA H100 PCIe") == 2000.0
    assert peak_bandwidth_gbps("Some Future GPU") is None
    assert device_slug({"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
    assert device_slug({"device_type": "cpu", "device": "CPU: x"}) == "cpu"


def test_byte_formulas():
    from bench.ops import STAGES, op_bytes

    s1 = STAGES[0]  # 64x64, C=96, 4 heads, shift 4, nW=64
    B, s = 32, 2
    Bw = B * 64
    n, formula = op_bytes("window_attention", s1, B, s, "forward")
    assert n == (Bw * 64 * 3 * 96 + Bw * 64 * 96 + 225 * 4) * s  # the shift mask is computed from the grid
    assert "qkv" in formula and "shift mask computed, not read" in formula
    n4, f4 = op_bytes("window_attention", STAGES[3], B, s, "forward")
    assert "mask" not in f4.split(";")[0]
    n, _ = op_bytes("window_partition", s1, B, s, "full")
    assert n == 4 * B * 64 * 64 * 96 * s
    fwd, _ = op_bytes("patch_merge", s1, B, s, "forward")
    bwd, _ = op_bytes("patch_merge", s1, B, s, "backward")
    full, _ = op_bytes("patch_merge", s1, B, s, "full")
    assert full == fwd + bwd


def test_flop_formulas():
    from bench.ops import STAGES, op_flops

    s1, s4 = STAGES[0], STAGES[3]  # s1: 64x64, C=96, 4 heads, shift 4, nW=64; s4: one window, no mask
    B = 32
    Bw, N, C, h = B * 64, 64, 96, 4
    fwd, formula = op_flops("window_attention", s1, B, "forward")
    assert fwd == 4 * Bw * N * N * C + 7 * Bw * h * N * N + Bw * N * C
    assert "4·B_·N²·C" in formula and f"B_={Bw}" in formula
    bwd, _ = op_flops("window_attention", s1, B, "backward")
    assert bwd == 10 * Bw * N * N * C + 9 * Bw * h * N * N + Bw * N * C
    full, _ = op_flops("window_attention", s1, B, "full")
    assert full == fwd + bwd
    n4, _ = op_flops("window_attention", s4, B, "forward")  # no mask add
    assert n4 == 4 * B * N * N * 768 + 6 * B * 32 * N * N + B * N * 768
    for op in ("window_partition", "window_merge"):
        assert op_flops(op, s1, B, "full")[0] == 0
    elems = B * 64 * 64 * 96
    assert op_flops("patch_merge", s1, B, "forward")[0] == 8 * elems
    assert op_flops("layer_norm_window_partition", s1, B, "backward")[0] == 12 * elems
    assert op_flops("window_merge_add", s1, B, "full")[0] == elems


def test_sdpa_peer_matches_reference():
    import torch

    import htsat_kernels as hk
    from bench.ops import sdpa_window_attention

    for H, shift, C, h in ((16, 4, 48, 2), (8, 0, 48, 2)):
        nW = (H // 8) ** 2
        qkv = torch.randn(2 * nW, 64, 3 * C, dtype=torch.float64)
        table = torch.randn(225, h, dtype=torch.float64)
        mask = hk.reference.shifted_window_mask(H, H, 8, shift).double() if shift else None
        ref = hk.reference.window_attention(qkv, table, mask, h, (C // h) ** -0.5)
        out = sdpa_window_attention(qkv, table, mask, h, (C // h) ** -0.5)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        if shift:  # the mask given by the grid, as the op table's samples call it
            out = sdpa_window_attention(qkv, table, None, h, (C // h) ** -0.5, 0.0, (H, H, shift))
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_compare_flags_regressions_and_errors(tmp_path, capsys):
    from bench.compare import compare

    rec = {
        "section": "ops",
        "op": "window_attention",
        "provider": "fused",
        "mode": "forward",
        "dtype": "bf16",
        "shape": "B=32",
        "median_ms": 1.0,
        "max_rel_err": 1e-3,
        "skipped_reason": None,
    }
    a = {"meta": {"device": "X"}, "records": [rec, {**rec, "provider": "sdpa"}]}
    b = {"meta": {"device": "X"}, "records": [{**rec, "median_ms": 2.0, "max_rel_err": 1e-2}, {**rec, "provider": "flex"}]}
    text, stats = compare(a, b)
    assert stats["regressions"] == 1 and stats["error_increases"] == 1
    assert stats["only_a"] == 1 and stats["only_b"] == 1
    assert "0.50x" in text and "REGRESSION" in text and "ERR+" in text


def test_compare_shows_flops_and_the_roofline_of_gpu_runs():
    """FLOPs per call and B's achieved rate; on GPU runs the ideal time and each run's percent of the
    roofline, from the record or, where it has none (an older file), from its run's peaks."""
    from bench.compare import compare

    rec = {
        "section": "ops",
        "op": "window_attention",
        "provider": "fused",
        "mode": "forward",
        "dtype": "bf16",
        "shape": "B=32",
        "median_ms": 2.0,
        "bytes": 2_000_000_000,  # 1 ms at 2000 GB/s
        "flops": 4_000_000_000_000,  # 4 ms at 1000 TFLOP/s: the bound
        "skipped_reason": None,
    }
    gpu = {"device": "G", "device_type": "cuda", "peak_gbps": 2000.0, "peak_tflops": 1000.0}
    a = {"meta": gpu, "records": [{**rec, "median_ms": 8.0, "ideal_ms": 4.0, "pct_roofline": 50.0}]}
    b = {"meta": gpu, "records": [rec]}
    text, _ = compare(a, b)
    header, _, row = text.splitlines()[3:6]
    cells = dict(zip(re.split(r"\s{2,}", header), re.split(r"\s{2,}", row.strip())))
    assert cells["GFLOP"] == "4e+03" and cells["B TFLOP/s"] == "2e+03"  # 4e12 FLOP in 2 ms
    assert cells["ideal ms"] == "4" and cells["A %roof"] == "50%"
    assert cells["B %roof"] == "200%"  # from B's peaks: 4 ms ideal / 2 ms measured
    cpu = {"meta": {"device": "C", "device_type": "cpu"}, "records": [{**rec, "flops": 0}]}
    text, _ = compare(cpu, cpu)
    assert "GFLOP" not in text and "%roof" not in text  # no arithmetic, no peaks: no such columns


def test_compare_flags_more_saved_memory():
    from bench.compare import compare

    rec = {"section": "memory", "op": "model", "provider": "fused", "mode": "train", "dtype": "fp32", "shape": "B=2"}
    a = {"meta": {"device": "X"}, "records": [{**rec, "saved_mb": 100.0}, {**rec, "dtype": "bf16", "saved_mb": 50.0}]}
    b = {"meta": {"device": "X"}, "records": [{**rec, "saved_mb": 150.0}, {**rec, "dtype": "bf16", "saved_mb": 50.0}]}
    text, stats = compare(a, b)
    assert stats["memory_increases"] == 1 and "MEM+" in text


def test_readme_shows_latest_gpu_run(quick_run, tmp_path):
    import shutil

    from bench.readme import END, START, update_readme

    _, path, _ = quick_run
    data = json.loads(path.read_text())
    shutil.copy(REPO / "bench" / "results" / "README.md", tmp_path / "README.md")
    assert update_readme(tmp_path) is None  # no GPU run yet: nothing to show
    for date in ("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"):
        fake = copy.deepcopy(data)
        fake["meta"].update(device="NVIDIA H100 80GB HBM3", device_type="cuda", quick=False, date=date)
        (tmp_path / f"nvidia-h100-80gb-hbm3_{date[:10]}.json").write_text(json.dumps(fake))
    assert update_readme(tmp_path) == tmp_path / "README.md"
    text = (tmp_path / "README.md").read_text()
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert "nvidia-h100-80gb-hbm3_2026-02-01.json" in block  # the latest one is cited
    assert "| window_attention |" in block
    assert text.count(START) == 1 and text.count(END) == 1


def test_inference_files_record(tmp_path):
    """`python -m bench --inference-files N`: each path at each thread count, the best of each, their ratio."""
    pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    from bench import inference

    rec = inference.run(tmp_path, n_files=3, seconds=6.0, batch_size=4, num_workers=1, threads=1, repeats=1, runtimes=("torch",))
    assert {(r["path"], r["torch_threads"]) for r in rec["runs"]} == {("loop", 1), ("batched", 1)}
    assert all(r["files_per_s"] > 0 for r in rec["runs"])
    assert rec["worker_stage"] == "model"
    assert rec["speedup"] == pytest.approx(rec["best"]["batched"]["files_per_s"] / rec["best"]["loop"]["files_per_s"], abs=0.01)
    assert json.loads(next(tmp_path.glob("inference_cpu_*.json")).read_text())["runs"] == rec["runs"]


@pytest.mark.slow
def test_scale_out_record_without_ray(tmp_path, monkeypatch):
    """`python -m bench --inference-files N --processes 1`: a torchrun run per process count, files/s
    recorded; without ray installed it says so and measures torchrun only."""
    pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    import sys

    from bench import scale_out

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    rec = scale_out.run(tmp_path, n_files=2, processes=[1], seconds=2.0, repeats=1)
    assert [(r["runner"], r["processes"]) for r in rec["runs"]] == [("torchrun", 1)]
    assert rec["runs"][0]["files_per_s"] == pytest.approx(2 / rec["runs"][0]["seconds"], abs=0.01)
    assert rec["runs"][0]["cpu_seconds"] > 0
    assert json.loads(next(tmp_path.glob("scale_out_cpu_*.json")).read_text())["runs"] == rec["runs"]


def test_model_table_shows_coverage_and_the_numerics_verdict():
    """The whole-model rows say how many op calls ran fused (and why the others did not) and judge the error
    by the model 2x rule instead of a per-element maximum."""
    from bench.report import _model_table

    base = {"section": "model", "op": "model", "mode": "train", "batch": 2, "dtype": "bf16", "autocast": True}
    ref = {**base, "provider": "reference", "median_ms": 10.0, "fused_calls": 0, "calls": 27}
    ref.update(declines={"patch_merge: backend 'reference' was asked for": 3}, norm_rel_err=0.5, numerics_ok=True)
    fused = {**base, "provider": "fused", "median_ms": 5.0, "fused_calls": 26, "calls": 27, "norm_rel_err": 0.06}
    fused.update(declines={"window_attention: qkv is a CPU tensor": 1}, numerics_ok=True, max_abs_diff_vs_reference=1e-4)
    bad = {**fused, "provider": "fused+compile", "numerics_ok": False, "reference_norm_rel_err": 0.01, "declines": {}}
    text = _model_table([ref, fused, bad], {})
    assert "26/27 [2]" in text and "0/27 [1]" in text
    assert "[2] reference ran: window_attention: qkv is a CPU tensor (1x)" in text
    assert "FAIL (ref 1.00e-02)" in text and "max rel err" not in text


@pytest.mark.slow
def test_inference_files_runtime_axis(tmp_path, monkeypatch):
    """--inference-files with onnxruntime installed: the batched path on each runtime (one export, into $HTSAT_HOME)."""
    pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from bench import inference

    monkeypatch.setenv("HTSAT_HOME", str(tmp_path / "home"))
    rec = inference.run(tmp_path, n_files=2, seconds=6.0, batch_size=4, num_workers=1, threads=1, repeats=1)
    assert {r["path"] for r in rec["runs"]} == {"loop", "batched", "batched-onnxruntime"}
    assert all(r["files_per_s"] > 0 for r in rec["runs"])
    assert len(list((tmp_path / "home" / "onnx").glob("*.onnx"))) == 1


def test_cpu_runtimes_summary_and_table():
    """`--cpu-runtimes`: auto against onnxruntime per setting, and the README table (fastest in bold)."""
    from bench.cpu_runtimes import markdown_table, summary

    recs = [
        {"model": "htsat-audioset", "runtime": rt, "batch": 1, "threads": 1, "clips_per_s": v}
        for rt, v in (("reference", 2.0), ("auto", 3.0), ("onnxruntime", 2.5))
    ]
    assert summary(recs) == ["htsat-audioset B=1 threads=1: auto 3.00 vs onnxruntime 2.50 clips/s: x1.20"]
    table = markdown_table(recs).splitlines()
    assert table[0] == "| runtime | audioset B=1 t=1 |"
    assert table[2:] == ["| `reference` | 2.00 |", "| `auto` | **3.00** |", "| `onnxruntime` | 2.50 |"]


def test_int8_quality_compare_and_clips():
    """`--int8-quality`: cosine, top-1 agreement and top-5 overlap of two runs' outputs; the synthetic clips."""
    import numpy as np

    from bench.int8_quality import clips, compare

    p = np.array([[0.9, 0.8, 0.1, 0.2, 0.3, 0.05], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    q = p.copy()
    q[1, 5], q[1, 0] = 0.0, 0.7  # row 2: another top-1, one class of the top 5 swapped
    emb = np.array([[1.0, 0.0], [0.0, 1.0]])
    r = compare({"clipwise_output": p, "latent_output": emb}, {"clipwise_output": q, "latent_output": -emb}, "latent_output")
    assert r["cosine_mean"] == -1.0 and r["top1_agreement"] == 0.5 and r["top5_overlap"] == 0.9
    assert r["max_prob_diff"] == pytest.approx(0.6)
    made = clips(8000, seconds=1.0)
    assert {"tone-440", "white-noise", "pink-noise"} <= {n for n, _ in made}
    assert all(x.shape == (8000,) and x.dtype == np.float32 and np.abs(x).max() <= 1 for _, x in made)
