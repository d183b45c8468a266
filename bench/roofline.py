"""The roofline of a benchmark record: the ideal time at the device's peaks, and how close the
measured time comes to it.

    ideal_ms = max(bytes / peak bandwidth, flops / peak dense bf16 throughput)
    pct_roofline = 100 * ideal_ms / median_ms

Records carry ``bytes`` (the minimal DRAM traffic, ``bench/ops.py``) and, once the op table
provides them, ``flops``; a record without ``flops`` is bounded by bandwidth alone. The peaks
come from ``bench.gpu_limits.device_peaks`` (the devices table, else a measured copy bandwidth).
"""

from __future__ import annotations


def ideal_ms(nbytes: float | None, flops: float | None, peak_gbps: float | None, peak_tflops: float | None) -> float | None:
    """max(bytes / bandwidth, flops / peak) in ms; a term with an unknown peak or count is left out."""
    terms = []
    if nbytes and peak_gbps:
        terms.append(nbytes / (peak_gbps * 1e9))
    if flops and peak_tflops:
        terms.append(flops / (peak_tflops * 1e12))
    return max(terms) * 1e3 if terms else None


def pct_of_roofline(ideal: float | None, measured_ms: float | None) -> float | None:
    """100 * ideal / measured: how close a measured time comes to the roofline (100 = at the roof)."""
    if ideal is None or not measured_ms:
        return None
    return 100.0 * ideal / measured_ms


def annotate_records(records: list, peaks: dict) -> None:
    """Add ``ideal_ms`` and ``pct_roofline`` to every timed record with a byte count (in place).

    Only low-precision records use the bf16 tensor peak; fp32 records are bounded by bandwidth
    (their FLOPs run on tensor cores only with TF32, which the kernels do not use by default).
    """
    for r in records:
        if r.get("skipped_reason") or not r.get("bytes"):
            continue
        ideal = record_ideal_ms(r, peaks)
        r["ideal_ms"] = ideal
        r["pct_roofline"] = pct_of_roofline(ideal, r.get("median_ms"))


def record_ideal_ms(r: dict, peaks: dict) -> float | None:
    """The ideal time of one record at ``peaks`` (a run's meta holds them): bf16/fp16 records may use the
    tensor peak, the others are bounded by bandwidth."""
    tflops = peaks.get("peak_tflops") if r.get("dtype") in ("bf16", "fp16") else None
    return ideal_ms(r.get("bytes"), r.get("flops"), peaks.get("peak_gbps"), tflops)


def render_roofline(result: dict, providers=("fused", "reference", "compile", "sdpa", "flex")) -> str:
    """A table of ideal time and percent of roofline per timed op record (the GPU report's last section)."""
    from .report import format_table, sort_key

    meta = result["meta"]
    recs = [r for r in result["records"] if r.get("ideal_ms") is not None and r.get("provider") in providers]
    head = (
        f"#### Roofline on {meta.get('roofline_device') or meta.get('device')}: peak "
        f"{meta.get('peak_gbps') or '?'} GB/s ({meta.get('peak_source', '?')}), "
        f"dense bf16 {meta.get('peak_tflops') or '?'} TFLOP/s"
    )
    if not recs:
        return head + "\n  (no timed record with a byte count)"
    rows = []
    for r in sorted(recs, key=sort_key):
        pct = r.get("pct_roofline")
        rows.append(
            [
                r.get("op", ""),
                str(r.get("stage_label") or r.get("stage") or ""),
                str(r.get("batch") or ""),
                r.get("dtype", ""),
                r.get("mode", ""),
                r.get("provider", ""),
                f"{r['median_ms'] * 1e3:.1f}" if r.get("median_ms") else "-",
                f"{r['ideal_ms'] * 1e3:.1f}",
                "-" if pct is None else f"{pct:.0f}%",
            ]
        )
    table = format_table(
        ["op", "stage", "B", "dtype", "mode", "provider", "measured us", "ideal us", "% of roofline"], rows, right={2, 6, 7, 8}
    )
    return (
        head
        + "\n"
        + table
        + "\n  ideal = max(bytes / peak bandwidth, flops / peak bf16 throughput); FLOPs where the record has them."
    )
