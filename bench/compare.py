"""``python -m bench.compare A.json B.json``: two benchmark runs side by side.

Records are matched on (section, op, provider, mode, dtype, shape). For each match: A and B
median ms, the speedup of B over A (A_ms / B_ms: above 1 means B is faster), a REGRESSION flag
when B is slower than A by more than ``--threshold`` (default 10%), and the error change (ERR+
when B's max relative error grew past 2x A's and above 1e-6), the FLOPs of one call and B's achieved
TFLOP/s where the op does arithmetic, and for GPU runs the ideal time at the device's roofline with each
run's percent of it (``ideal_ms``, ``pct_roofline``; computed from the run's peaks where the record lacks
them); MEM+ when the bytes kept for backward (``saved_mb``) grew by more than the threshold. Records that ran in one run and were
skipped in the other, or exist in only one, are listed. Always exits 0 (a report, not a gate)
unless ``--fail-on-regression`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "meta" not in data or "records" not in data:
        raise SystemExit(f"{path}: not a bench results file (expected {{'meta': ..., 'records': [...]}})")
    return data


def key(r: dict) -> tuple:
    return (r.get("section"), r.get("op"), r.get("provider"), r.get("mode"), r.get("dtype"), r.get("shape"))


def _ms(x) -> str:
    return "-" if x is None else (f"{x:.4g}" if x < 1000 else f"{x:.0f}")


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0f}%"


def _err(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return "0" if x == 0 else f"{x:.1e}"


def _ideal_and_pct(r: dict, meta: dict) -> tuple[float | None, float | None]:
    """(ideal ms, percent of roofline) of a record: its own, else from its run's peaks (GPU runs only)."""
    from .roofline import pct_of_roofline, record_ideal_ms

    if r.get("ideal_ms") is not None:
        return r["ideal_ms"], r.get("pct_roofline")
    if r.get("skipped_reason") or not r.get("bytes") or not meta.get("peak_gbps"):
        return None, None
    ideal = record_ideal_ms(r, meta)
    return ideal, pct_of_roofline(ideal, r.get("median_ms"))


def _gflop(x) -> str:
    return "-" if not x else f"{x / 1e9:.3g}"


def compare(a: dict, b: dict, threshold: float = 0.10, only_changes: bool = False) -> tuple[str, dict]:
    from .report import format_table

    ra = {key(r): r for r in a["records"]}
    rb = {key(r): r for r in b["records"]}
    order = [k for k in ra if k in rb]
    only_a = [k for k in ra if k not in rb]
    only_b = [k for k in rb if k not in ra]

    headers = [
        "section",
        "op",
        "shape",
        "dtype",
        "mode",
        "provider",
        "A ms",
        "B ms",
        "B/A speedup",
        "A rel err",
        "B rel err",
        "flags",
    ]
    # FLOP columns where any op does arithmetic: the count of one call and B's achieved rate
    flops = any(r.get("flops") for r in list(ra.values()) + list(rb.values()))
    if flops:
        headers[-1:-1] = ["GFLOP", "B TFLOP/s"]
    # roofline columns (GPU runs): the ideal time and each run's percent of it
    roof_a = {k: _ideal_and_pct(r, a["meta"]) for k, r in ra.items()}
    roof_b = {k: _ideal_and_pct(r, b["meta"]) for k, r in rb.items()}
    roof = any(v[0] is not None for v in list(roof_a.values()) + list(roof_b.values()))
    if roof:
        headers[-1:-1] = ["ideal ms", "A %roof", "B %roof"]
    rows = []
    stats = {
        "matched": len(order),
        "regressions": 0,
        "improvements": 0,
        "error_increases": 0,
        "status_changes": 0,
        "memory_increases": 0,
    }
    for k in order:
        x, y = ra[k], rb[k]
        flags = []
        ta, tb = x.get("median_ms"), y.get("median_ms")
        speed = None
        if ta and tb:
            speed = ta / tb
            if tb > ta * (1 + threshold):
                flags.append("REGRESSION")
                stats["regressions"] += 1
            elif ta > tb * (1 + threshold):
                flags.append("faster")
                stats["improvements"] += 1
        if bool(x.get("skipped_reason")) != bool(y.get("skipped_reason")):
            flags.append("now skipped" if y.get("skipped_reason") else "now runs")
            stats["status_changes"] += 1
        ea, eb = x.get("max_rel_err"), y.get("max_rel_err")
        if isinstance(ea, (int, float)) and isinstance(eb, (int, float)) and eb > max(2 * ea, 1e-6):
            flags.append("ERR+")
            stats["error_increases"] += 1
        sa, sb = x.get("saved_mb"), y.get("saved_mb")  # activation memory kept for backward
        if isinstance(sa, (int, float)) and isinstance(sb, (int, float)) and sb > sa * (1 + threshold):
            flags.append("MEM+")
            stats["memory_increases"] += 1
        if only_changes and not flags:
            continue
        shape = str(k[5])
        rows.append(
            [
                str(k[0]),
                str(k[1]),
                shape if len(shape) <= 44 else shape[:41] + "...",
                str(k[4]),
                str(k[3]),
                str(k[2]),
                "skipped" if x.get("skipped_reason") else _ms(ta),
                "skipped" if y.get("skipped_reason") else _ms(tb),
                "-" if speed is None else f"{speed:.2f}x",
                _err(ea),
                _err(eb),
                " ".join(flags),
            ]
        )
        if flops:
            n = y.get("flops") or x.get("flops")
            rate = n / (tb * 1e-3) / 1e12 if n and tb and not y.get("skipped_reason") else None
            rows[-1][-1:-1] = [_gflop(n), "-" if rate is None else f"{rate:.3g}"]
        if roof:
            (ideal_a, pct_a), (ideal_b, pct_b) = roof_a[k], roof_b[k]
            rows[-1][-1:-1] = [_ms(ideal_b if ideal_b is not None else ideal_a), _pct(pct_a), _pct(pct_b)]
    ma, mb = a["meta"], b["meta"]

    def desc(m):
        return f"{m.get('device')} | torch {m.get('torch')} triton {m.get('triton')} | commit {(m.get('git_commit') or '?')[:10]} | {m.get('date')}{' | quick' if m.get('quick') else ''}"

    lines = [f"A: {desc(ma)}", f"B: {desc(mb)}"]
    if ma.get("device") != mb.get("device"):
        lines.append("note: the runs are on different devices; speedups compare the devices too.")
    right = set(range(6, len(headers) - 1))
    lines += ["", format_table(headers, rows, right=right) if rows else "(no matched records to show)", ""]
    if only_a:
        lines.append(
            f"only in A ({len(only_a)}): "
            + "; ".join(" ".join(map(str, k[1:5])) for k in only_a[:20])
            + (" ..." if len(only_a) > 20 else "")
        )
    if only_b:
        lines.append(
            f"only in B ({len(only_b)}): "
            + "; ".join(" ".join(map(str, k[1:5])) for k in only_b[:20])
            + (" ..." if len(only_b) > 20 else "")
        )
    stats["only_a"], stats["only_b"] = len(only_a), len(only_b)
    lines.append(
        f"{stats['matched']} matched records: {stats['regressions']} regressions (> {threshold:.0%} slower), "
        f"{stats['improvements']} faster, {stats['error_increases']} error increases, {stats['status_changes']} run/skip changes, "
        f"{stats['memory_increases']} saved-memory increases"
    )
    return "\n".join(lines), stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description="Show two bench result files side by side.")
    p.add_argument("a", type=Path, help="baseline results JSON")
    p.add_argument("b", type=Path, help="new results JSON")
    p.add_argument("--threshold", type=float, default=0.10, help="relative slowdown flagged as a regression (default 0.10)")
    p.add_argument("--only-changes", action="store_true", help="show only flagged records")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a regression is flagged")
    args = p.parse_args(argv)
    text, stats = compare(load(args.a), load(args.b), args.threshold, args.only_changes)
    print(text)
    return 1 if args.fail_on_regression and stats["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
