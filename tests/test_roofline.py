"""The roofline figures: the devices table, ideal time and percent of roofline on bench records,
the compare tool's roofline columns, and bench/ kept out of the installed packages."""

import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_limits, roofline

REPO = Path(__file__).resolve().parent.parent


def test_devices_table_matches_cuda_names():
    assert gpu_limits.find_device("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert gpu_limits.find_device("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert gpu_limits.find_device("NVIDIA H200").name == "H200"
    assert gpu_limits.find_device("NVIDIA A100-SXM4-80GB").name == "A100 80GB"
    assert gpu_limits.find_device("NVIDIA A100-SXM4-40GB").name == "A100 40GB"
    assert gpu_limits.find_device("NVIDIA L4").name == "L4"
    assert gpu_limits.find_device("NVIDIA L40S").name == "L40S"
    assert gpu_limits.find_device("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert gpu_limits.find_device("NVIDIA GeForce GTX 1080") is None
    for d in gpu_limits.DEVICES:
        assert d.arch in gpu_limits.ARCH_LIMITS and d.sms > 0 and d.hbm_gbps > 0 and d.bf16_tflops > 0


def test_unknown_device_falls_back_to_a_measured_copy():
    peaks = gpu_limits.device_peaks("Mystery GPU", measure=lambda: 1234.0)
    assert peaks == {
        "roofline_device": "Mystery GPU",
        "peak_gbps": 1234.0,
        "peak_tflops": None,
        "peak_source": "measured device-to-device copy",
    }
    assert gpu_limits.device_peaks("NVIDIA H200", measure=None)["peak_gbps"] == 4800.0


def test_ideal_time_is_the_larger_of_bandwidth_and_compute_time():
    # 3.35e9 bytes at 3350 GB/s = 1 ms; 989e9 flops at 989 TFLOP/s = 1 ms
    assert roofline.ideal_ms(3.35e9, None, 3350, 989) == pytest.approx(1.0)
    assert roofline.ideal_ms(3.35e9, 2 * 989e9, 3350, 989) == pytest.approx(2.0)
    assert roofline.ideal_ms(None, None, 3350, 989) is None
    assert roofline.pct_of_roofline(1.0, 4.0) == 25.0


def test_annotate_records_reads_bytes_and_optional_flops():
    peaks = {"peak_gbps": 1000.0, "peak_tflops": 100.0}
    recs = [
        {"dtype": "bf16", "bytes": 1e9, "median_ms": 2.0},  # 1 ms ideal: 50%
        {"dtype": "bf16", "bytes": 1e9, "flops": 3e11, "median_ms": 6.0},  # compute-bound: 3 ms, 50%
        {"dtype": "fp32", "bytes": 1e9, "flops": 3e11, "median_ms": 2.0},  # no tensor peak for fp32: 1 ms
        {"dtype": "bf16", "bytes": 1e9, "median_ms": None, "skipped_reason": "x"},
    ]
    roofline.annotate_records(recs, peaks)
    assert [r.get("pct_roofline") for r in recs] == [50.0, 50.0, 50.0, None]
    assert recs[1]["ideal_ms"] == pytest.approx(3.0)
    assert "ideal_ms" not in recs[3]


def test_compare_shows_roofline_columns():
    from bench.compare import compare

    rec = {
        "section": "ops",
        "op": "window_attention",
        "provider": "fused",
        "mode": "forward",
        "dtype": "bf16",
        "shape": "B=128",
        "median_ms": 0.2,
        "ideal_ms": 0.1,
        "pct_roofline": 50.0,
    }
    text, _ = compare(
        {"meta": {}, "records": [rec]}, {"meta": {}, "records": [{**rec, "median_ms": 0.125, "pct_roofline": 80.0}]}
    )
    assert "%roof" in text and "50%" in text and "80%" in text
    text, _ = compare(
        {"meta": {}, "records": [{k: v for k, v in rec.items() if "roof" not in k and k != "ideal_ms"}]},
        {"meta": {}, "records": [{k: v for k, v in rec.items() if "roof" not in k and k != "ideal_ms"}]},
    )
    assert "%roof" not in text  # CPU runs: no roofline columns


def test_bench_is_not_an_installed_package_but_runs_from_the_repo():
    import tomllib
    from setuptools import find_packages

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(REPO), include=cfg["include"])
    assert "htsat" in packages and "htsat_kernels" in packages
    assert not [p for p in packages if p.split(".")[0] == "bench"]
    res = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--static" in res.stdout


def test_readme_roofline_table_is_the_op_tables():
    """The README's expected time of every op (B = 128, bf16, H100 SXM / H200) is generated from the op
    table's byte and FLOP formulas: a formula change without the README refreshed fails here
    (refresh: replace the block between the roofline-table markers by roofline_markdown())."""
    from bench import compile_report

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- roofline-table:start -->\n", "<!-- roofline-table:end -->"
    block = readme[readme.index(start) + len(start) : readme.index(end)]
    want = compile_report.roofline_markdown()
    assert block == want
    ops = {line.split("`")[1] for line in want.splitlines() if line.startswith("| `")}
    from htsat_kernels.ops import OPS

    assert ops == set(OPS)  # every op of the table, forward and backward
    assert want.count("| forward |") == want.count("| backward |") == len(OPS)
