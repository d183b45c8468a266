"""The report: aligned text tables on stdout, and the results files (JSON, CSV, PNG plots)."""

from __future__ import annotations

import csv
import functools
import json
import math
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from .schema import RECORD_FIELDS, device_slug

SECTION_ORDER = ("ops", "interpreter", "model", "memory")
PROVIDER_ORDER = ("reference", "fused", "compile", "sdpa", "flex", "fused+compile")
MODE_ORDER = ("forward", "backward", "full", "inference", "train")
DTYPE_ORDER = ("fp32", "bf16", "fp16")


@functools.cache
def op_order() -> tuple[str, ...]:
    """The ops in the order of their declarations (htsat_kernels.ops.OPS), imported on first use:
    this module stays importable without torch (bench.compare uses its table formatting)."""
    from htsat_kernels.ops import OPS

    return tuple(OPS)


def __getattr__(name: str):
    if name == "OP_ORDER":  # the op order as a module constant, for `from .report import OP_ORDER`
        return op_order()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Formatting helpers


def fmt(x, kind: str = "g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if kind == "ms":
        return f"{x:.4g}" if x < 1000 else f"{x:.0f}"
    if kind == "err":
        return "0" if x == 0 else f"{x:.2e}"
    if kind == "x":
        return f"{x:.2f}x"
    if kind == "f1":
        return f"{x:.1f}"
    if kind == "mb":
        return f"{x:.1f}" if x < 100 else f"{x:.0f}"
    return str(x)


def format_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(len(headers)))
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    def line(cells):
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _order(value, order) -> tuple:
    return (order.index(value), "") if value in order else (len(order), str(value))


def sort_key(r: dict) -> tuple:
    return (
        _order(r.get("section"), SECTION_ORDER),
        _order(r.get("op"), op_order()),
        r.get("stage") or 0,
        str(r.get("stage_label") or ""),
        _order(r.get("mode"), MODE_ORDER),
        r.get("batch") or 0,
        _order(r.get("dtype"), DTYPE_ORDER),
        _order(r.get("provider"), PROVIDER_ORDER),
    )


def record_key(r: dict) -> tuple:
    """Identity of a record across runs (used for speedups and by the compare tool)."""
    return (r.get("section"), r.get("op"), r.get("provider"), r.get("mode"), r.get("dtype"), r.get("shape"))


def reference_times(records: Iterable[dict]) -> dict:
    ref = {}
    for r in records:
        if r.get("provider") == "reference" and r.get("median_ms"):
            ref[(r.get("section"), r.get("op"), r.get("mode"), r.get("dtype"), r.get("shape"))] = r["median_ms"]
    return ref


def speedup_over_reference(r: dict, ref: dict) -> float | None:
    base = ref.get((r.get("section"), r.get("op"), r.get("mode"), r.get("dtype"), r.get("shape")))
    if base and r.get("median_ms"):
        return base / r["median_ms"]
    return None


class Notes:
    """Numbered footnotes for skip reasons, so a long reason is printed once per table."""

    def __init__(self) -> None:
        self.reasons: OrderedDict[str, int] = OrderedDict()

    def ref(self, reason: str, label: str = "skipped") -> str:
        if reason not in self.reasons:
            self.reasons[reason] = len(self.reasons) + 1
        return f"{label} [{self.reasons[reason]}]".strip()

    def render(self) -> str:
        return "\n".join(f"  [{n}] {reason}" for reason, n in self.reasons.items())


# --------------------------------------------------------------------------------------------
# Section titles: what ran where


def section_title(section: str, meta: dict, records: list[dict]) -> str:
    dev = meta.get("device", "?")
    if section == "ops":
        if meta.get("device_type") == "cuda":
            bw = meta.get("peak_bandwidth_gbps")
            bw_txt = f", peak bandwidth {bw:g} GB/s" if bw else ", peak bandwidth unknown"
            return f"Per-op benchmarks on CUDA: {dev}{bw_txt}"
        batches = sorted({r.get("batch") for r in records if r.get("batch")})
        return (
            f"Per-op benchmarks on CPU (no CUDA device; {dev}): reference vs the C++ CPU twins "
            f"(provider 'fused') and the peers that run on CPU; batch capped at {batches} "
            "(GPU runs use 32 and 128)"
        )
    if section == "interpreter":
        return (
            "Triton interpreter on CPU (numerics only, timings meaningless): the Triton window "
            "attention at reduced shapes (one clip of a 16x16 map per stage: 4 windows, real mask)"
        )
    if section == "model":
        where = "CUDA: " + dev if meta.get("device_type") == "cuda" else f"CPU (no CUDA device; {dev})"
        labels = sorted({str(r.get("stage_label")) for r in records})
        return f"Whole model ({', '.join(labels)}) on {where}"
    if section == "memory":
        labels = sorted({str(r.get("stage_label")) for r in records})
        return f"Activation memory of the training step ({', '.join(labels)}): saved for backward, exact, on {dev}"
    return section


# --------------------------------------------------------------------------------------------
# Text report


def _op_table(records: list[dict], ref: dict, meta: dict) -> str:
    notes = Notes()
    has_bw = meta.get("peak_bandwidth_gbps") is not None
    headers = ["stage", "B", "dtype", "mode", "provider", "median ms", "p20-p80 ms", "vs ref", "peak MB", "GB/s"]
    if has_bw:
        headers.append("%peak")
    headers += ["max abs err", "max rel err"]
    rows = []
    for r in sorted(records, key=sort_key):
        head = [str(r.get("stage_label") or r.get("stage")), str(r.get("batch")), r["dtype"], r["mode"], r["provider"]]
        if r.get("skipped_reason"):
            rows.append(head + [notes.ref(r["skipped_reason"])] + [""] * (len(headers) - 6))
            continue
        spread = "-" if r.get("p20_ms") is None else f"{fmt(r['p20_ms'], 'ms')}-{fmt(r['p80_ms'], 'ms')}"
        row = head + [
            fmt(r.get("median_ms"), "ms"),
            spread,
            fmt(speedup_over_reference(r, ref), "x"),
            fmt(r.get("peak_mem_mb"), "mb"),
            fmt(r.get("gbps"), "f1"),
        ]
        if has_bw:
            row.append(fmt(r.get("pct_peak_bw"), "f1"))
        row += [fmt(r.get("max_abs_err"), "err"), fmt(r.get("max_rel_err"), "err")]
        rows.append(row)
    text = format_table(headers, rows, right={1, 5, 6, 7, 8, 9, 10, 11, 12})
    formulas = OrderedDict()
    for r in records:
        if r.get("bytes_formula"):
            formulas.setdefault(r["mode"], r["bytes_formula"].split(";")[0])
    if formulas:
        text += "\n  bytes (GB/s = bytes / median time; s = bytes per element):"
        for mode, f in formulas.items():
            text += f"\n    {mode}: {f}"
    if notes.reasons:
        text += "\n" + notes.render()
    return text


def _interp_table(records: list[dict]) -> str:
    notes = Notes()
    headers = ["stage", "dtype", "mode", "provider", "shape", "max abs err", "max rel err", "status"]
    rows = []
    for r in sorted(records, key=sort_key):
        head = [str(r.get("stage_label")), r["dtype"], r["mode"], r["provider"], r["shape"]]
        if r.get("skipped_reason"):
            rows.append(head + ["", "", notes.ref(r["skipped_reason"])])
        else:
            rows.append(head + [fmt(r.get("max_abs_err"), "err"), fmt(r.get("max_rel_err"), "err"), "ok"])
    text = format_table(headers, rows, right={5, 6})
    text += "\n  errors against the reference op in fp32; compare fused with reference in the same dtype."
    if notes.reasons:
        text += "\n" + notes.render()
    return text


def _calls(r: dict, notes: Notes) -> str:
    """'fused n/m calls', with a note listing why the others ran the reference."""
    if r.get("calls") is None:
        return "-"
    text = f"{r['fused_calls']}/{r['calls']}"
    if r.get("declines"):
        text += " " + notes.ref("reference ran: " + "; ".join(f"{k} ({n}x)" for k, n in sorted(r["declines"].items())), "")
    return text


def _verdict(r: dict) -> str:
    if r.get("numerics_ok") is None:
        return "-"
    return "ok" if r["numerics_ok"] else f"FAIL (ref {fmt(r.get('reference_norm_rel_err'), 'err')})"


def _model_table(records: list[dict], ref: dict) -> str:
    notes = Notes()
    headers = [
        "mode",
        "B",
        "dtype",
        "provider",
        "median ms",
        "p20-p80 ms",
        "clips/s",
        "vs ref",
        "peak MB",
        "saved MB",
        "fused calls",
        "norm rel err",
        "2x rule",
        "diff vs ref (same dtype)",
    ]
    rows = []
    for r in sorted(records, key=sort_key):
        head = [r["mode"], str(r.get("batch")), r["dtype"] + (" autocast" if r.get("autocast") else ""), r["provider"]]
        if r.get("skipped_reason"):
            rows.append(head + [notes.ref(r["skipped_reason"])] + [""] * (len(headers) - 5))
            continue
        spread = "-" if r.get("p20_ms") is None else f"{fmt(r['p20_ms'], 'ms')}-{fmt(r['p80_ms'], 'ms')}"
        rows.append(
            head
            + [
                fmt(r.get("median_ms"), "ms"),
                spread,
                fmt(r.get("clips_per_s"), "f1"),
                fmt(speedup_over_reference(r, ref), "x"),
                fmt(r.get("peak_mem_mb"), "mb"),
                fmt(r.get("saved_mb"), "mb"),
                _calls(r, notes),
                fmt(r.get("norm_rel_err"), "err"),
                _verdict(r),
                fmt(r.get("max_abs_diff_vs_reference"), "err"),
            ]
        )
    text = format_table(headers, rows, right={1, 4, 5, 6, 7, 8, 9, 10, 11, 13})
    eb = next((r.get("error_batch") for r in records if r.get("error_batch")), None)
    text += (
        "\n  train = forward + BCE + backward + AdamW step (train mode); inference = eval forward under no_grad."
        f"\n  errors: eval mode at batch {eb}, outputs (inference) or outputs + all parameter gradients (train),"
        "\n  against the reference model in fp32: the largest norm-relative error ||a - t|| / ||t||; '2x rule': at"
        "\n  most twice the reference model's own in that dtype plus 1e-3 (docs/design.md, numerics);"
        "\n  'fused calls': op calls of that forward that ran fused (python -m bench --coverage for every"
        "\n  configuration); 'diff vs ref' is the max abs difference from the reference model in the same dtype."
        "\n  saved MB: bytes the training forward keeps for backward (exact, any device; see the memory section)."
    )
    if notes.reasons:
        text += "\n" + notes.render()
    return text


def memory_table(records: list[dict]) -> str:
    headers = ["B", "dtype", "provider", "backend", "save policy", "saved MB", "vs ref", "step ms", "vs save all"]
    headers += ["B per 80 GB", "peak MB", "by stage (MB)", "largest ops (MB)"]
    rows = []
    for r in sorted(records, key=lambda r: (_order(r.get("dtype"), DTYPE_ORDER), r.get("batch") or 0)):
        stages = ", ".join(f"{k.replace('stage ', 's')} {v / 2**20:.1f}" for k, v in (r.get("saved_by_stage") or {}).items())
        ops = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in list((r.get("saved_by_op") or {}).items())[:4])
        rows.append(
            [
                str(r.get("batch")),
                r["dtype"] + (" autocast" if r.get("autocast") else ""),
                r["provider"],
                str(r.get("backend")),
                str(r.get("save_policy")),
                fmt(r.get("saved_mb"), "mb"),
                fmt(r.get("saved_vs_reference"), "x"),
                fmt(r.get("step_ms"), "ms"),
                fmt(r.get("step_vs_save_all"), "x"),
                fmt(r.get("clips_per_80gb")),
                fmt(r.get("peak_mem_mb"), "mb"),
                stages,
                ops,
            ]
        )
    text = format_table(headers, rows, right={0, 5, 6, 7, 8, 9, 10})
    text += (
        "\n  saved MB: every storage autograd keeps for backward after the training forward, counted once"
        "\n  (saved-tensor hooks; parameters and buffers excluded); vs ref: over the reference (eager, save all) at"
        "\n  the same B and dtype. step ms: forward + loss + backward, best of the interleaved repeats; vs save all:"
        "\n  the recomputation's cost against the same backend saving everything. B per 80 GB: (80 GB - params,"
        "\n  grads, AdamW state) / saved bytes per clip (an upper bound); peak MB (CUDA): the step's peak above the model."
    )
    return text


def render_text(result: dict) -> str:
    meta, records = result["meta"], result["records"]
    lines = [
        "=" * 100,
        "htsat-kernels benchmark" + ("  (--quick)" if meta.get("quick") else ""),
        f"device: {meta.get('device')}   driver: {meta.get('driver') or '-'}   CUDA runtime: {meta.get('cuda_runtime') or '-'}",
        f"torch {meta.get('torch')}   triton {meta.get('triton')}   python {meta.get('python')}",
        f"commit {meta.get('git_commit') or '?'}{' (dirty)' if meta.get('git_dirty') else ''}   date {meta.get('date')}",
        "fused ops: "
        + ", ".join(
            f"{k}={'available' if v == 'available' else 'unavailable'}" for k, v in (meta.get("fused_status") or {}).items()
        ),
        "=" * 100,
    ]
    ref = reference_times(records)
    for section in SECTION_ORDER:
        recs = [r for r in records if r.get("section") == section]
        if not recs:
            continue
        lines += ["", "#" * 4 + " " + section_title(section, meta, recs), ""]
        if section == "model":
            lines.append(_model_table(recs, ref))
            continue
        if section == "memory":
            lines.append(memory_table(recs))
            continue
        present = {r["op"] for r in recs}
        ordered = [o for o in op_order() if o in present]
        for op in ordered + sorted(present - set(ordered)):
            ops = [r for r in recs if r["op"] == op]
            lines += [f"-- {op}", _interp_table(ops) if section == "interpreter" else _op_table(ops, ref, meta), ""]
    if meta.get("section_wall_s"):
        lines.append("wall time per section (s): " + ", ".join(f"{k} {v}" for k, v in meta["section_wall_s"].items()))
    for note in meta.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Files


def results_stem(out_dir: Path, meta: dict) -> Path:
    date = (meta.get("date") or "")[:10] or "undated"
    stem = f"{device_slug(meta)}_{date}{'_quick' if meta.get('quick') else ''}"
    path = out_dir / stem
    n = 2
    while path.with_suffix(".json").exists():
        path = out_dir / f"{stem}_{n}"
        n += 1
    return path


def _jsonable(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_json(path: Path, result: dict) -> None:
    path.write_text(json.dumps(_jsonable(result), indent=1, sort_keys=False) + "\n")


def write_csv(path: Path, records: list[dict]) -> None:
    extra = sorted({k for r in records for k in r} - set(RECORD_FIELDS))
    columns = list(RECORD_FIELDS) + extra
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in records:
            row = []
            for c in columns:
                v = r.get(c)
                if isinstance(v, (dict, list, tuple)):
                    v = json.dumps(_jsonable(v), sort_keys=True)
                row.append("" if v is None else v)
            w.writerow(row)


def write_plots(stem: Path, result: dict) -> list[Path]:
    """PNG plots: speedup over reference per op and stage; model throughput and memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    meta, records = result["meta"], result["records"]
    paths = []
    dev = meta.get("device", "")
    ref = reference_times(records)

    # 1. Per-op speedups over the reference (largest batch), one panel per op and mode.
    ops_recs = [r for r in records if r.get("section") == "ops"]
    ops = [op for op in op_order() if any(r["op"] == op for r in ops_recs)]
    modes = [m for m in ("forward", "backward", "full") if any(r["mode"] == m for r in ops_recs)]
    if ops and modes:
        fig, axes = plt.subplots(len(ops), len(modes), figsize=(5.2 * len(modes), 3.0 * len(ops)), squeeze=False)
        for i, op in enumerate(ops):
            recs = [r for r in ops_recs if r["op"] == op]
            bmax = max(r.get("batch") or 0 for r in recs)
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                sel = [r for r in recs if r["mode"] == mode and r.get("batch") == bmax and r["provider"] != "reference"]
                groups = sorted({(r.get("stage") or 0, r["dtype"]) for r in sel}, key=lambda g: (g[0], _order(g[1], DTYPE_ORDER)))
                provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in sel)]
                width = 0.8 / max(len(provs), 1)
                any_bar = False
                for k, p in enumerate(provs):
                    ys = []
                    for g in groups:
                        r = next((r for r in sel if r["provider"] == p and (r.get("stage") or 0, r["dtype"]) == g), None)
                        s = speedup_over_reference(r, ref) if r else None
                        ys.append(s if s else 0.0)
                        any_bar |= bool(s)
                    ax.bar([x + k * width for x in range(len(groups))], ys, width, label=p)
                ax.axhline(1.0, color="k", lw=0.8, ls="--")
                ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
                ax.set_xticklabels([f"s{s}\n{d}" for s, d in groups], fontsize=7)
                ax.set_title(f"{op} {mode} (B={bmax})", fontsize=9)
                if j == 0:
                    ax.set_ylabel("speedup over reference")
                if not any_bar:
                    ax.text(0.5, 0.5, "no timed provider", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                if provs:
                    ax.legend(fontsize=7)
        fig.suptitle(f"Speedup over the eager reference ({dev}, {meta.get('date', '')[:10]})", fontsize=10)
        fig.tight_layout()
        p = stem.parent / f"{stem.name}_ops_speedup.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    # 2. Model throughput and memory per provider.
    m_recs = [r for r in records if r.get("section") == "model"]
    if m_recs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
        groups = sorted(
            {(r["mode"], r.get("batch") or 0, r["dtype"]) for r in m_recs},
            key=lambda g: (_order(g[0], MODE_ORDER), g[1], _order(g[2], DTYPE_ORDER)),
        )
        provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in m_recs)]
        width = 0.8 / max(len(provs), 1)
        for ax, key, ylabel in ((axes[0][0], "clips_per_s", "clips / s"), (axes[0][1], "peak_mem_mb", "peak memory (MB)")):
            any_bar = False
            for k, p in enumerate(provs):
                ys = []
                for g in groups:
                    r = next(
                        (r for r in m_recs if r["provider"] == p and (r["mode"], r.get("batch") or 0, r["dtype"]) == g), None
                    )
                    v = r.get(key) if r and not r.get("skipped_reason") else None
                    ys.append(v or 0.0)
                    any_bar |= bool(v)
                ax.bar([x + k * width for x in range(len(groups))], ys, width, label=p)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
            ax.set_xticklabels([f"{m}\nB={b} {d}" for m, b, d in groups], fontsize=7)
            ax.set_ylabel(ylabel)
            if not any_bar:
                msg = "not measured on CPU" if key == "peak_mem_mb" and meta.get("device_type") != "cuda" else "no timed provider"
                ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes)
            ax.legend(fontsize=7)
        label = ", ".join(sorted({str(r.get("stage_label")) for r in m_recs}))
        fig.suptitle(f"Whole model ({label}): throughput and peak memory ({dev})", fontsize=10)
        fig.tight_layout()
        p = stem.parent / f"{stem.name}_model.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def write_results(out_dir: Path, result: dict, plots: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(out_dir, result["meta"])
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    pngs = write_plots(stem, result) if plots else []
    result["meta"]["files"] = {"json": json_path.name, "csv": csv_path.name, "plots": [p.name for p in pngs]}
    write_json(json_path, result)
    write_csv(csv_path, result["records"])
    return {"json": json_path, "csv": csv_path, "plots": pngs}
