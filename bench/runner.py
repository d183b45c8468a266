"""Runs cases into records: plan-time skips, prepare (errors), timing, derived numbers."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from .context import Case, RunContext
from .harness import Skip, blank_record, reason_of, time_prepared


def run_case(case: Case, ctx: RunContext, peak_bw_gbps: float | None = None) -> dict:
    rec = blank_record(**case.fields())
    rec.update({"reps": None, "pct_peak_bw": None})
    reason = case.plan_skip(ctx)
    if reason:
        rec["skipped_reason"] = reason
        return rec
    prep = None
    try:
        prep = case.prepare(ctx)
        rec.update(prep.fields)
        if prep.timed:
            rec.update(time_prepared(prep, ctx.device, ctx.timing))
    except Skip as exc:
        rec["skipped_reason"] = str(exc) or "skipped"
    except Exception as exc:  # e.g. out of memory while timing: keep the row, say why
        rec["skipped_reason"] = reason_of(exc)
        for k in ("median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "reps"):
            rec[k] = None
    finally:
        if prep is not None:
            items = prep.items_per_call
            del prep
        else:
            items = None
    med = rec.get("median_ms")
    if med and rec.get("skipped_reason") is None:
        nbytes = rec.get("bytes")
        if nbytes:
            rec["gbps"] = nbytes / (med * 1e-3) / 1e9
            if peak_bw_gbps:
                rec["pct_peak_bw"] = 100.0 * rec["gbps"] / peak_bw_gbps
        if items:
            key = "clips_per_s" if rec.get("op") == "model" else "items_per_s"
            rec[key] = items / (med * 1e-3)
    return rec


def run_cases(cases: Iterable[Case], ctx: RunContext, *, peak_bw_gbps=None, progress: bool = True, desc: str = "") -> list[dict]:
    cases = list(cases)
    records = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(cases), desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)
        except ImportError:  # tqdm is optional: fall back to a line per case
            bar = None
    for i, case in enumerate(cases):
        label = case.test_id()
        if bar is not None:
            bar.set_postfix_str(label[:60], refresh=False)
        elif progress:
            print(f"[{desc} {i + 1}/{len(cases)}] {label}", file=sys.stderr, flush=True)
        records.append(run_case(case, ctx, peak_bw_gbps))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    ctx.release()
    return records
