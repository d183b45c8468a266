"""Keep ``bench/results/README.md`` showing the latest committed GPU run.

``python -m bench.readme [DIR]`` (and ``python -m bench`` after a non-quick CUDA run written to
``bench/results/``) rewrites the block between the two markers below with a summary table of the
newest non-quick CUDA JSON in DIR, its plots, and the file it came from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START = "<!-- latest-gpu-run:start -->"
END = "<!-- latest-gpu-run:end -->"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def latest_gpu_run(results_dir: Path) -> tuple[Path, dict] | None:
    best = None
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            meta = data["meta"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if meta.get("device_type") != "cuda" or meta.get("quick"):
            continue
        key = (meta.get("date") or "", path.name)
        if best is None or key > best[0]:
            best = (key, path, data)
    return (best[1], best[2]) if best else None


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def summary_markdown(path: Path, data: dict) -> str:
    """Markdown: the op table (largest batch, bf16 if present, full mode) and the model table."""
    from .report import reference_times, speedup_over_reference

    meta, records = data["meta"], data["records"]
    ref = reference_times(records)
    ops = [r for r in records if r.get("section") == "ops"]
    lines = [
        f"Latest GPU run: [`{path.name}`]({path.name}) on **{meta.get('device')}** "
        f"(driver {meta.get('driver') or '?'}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
        f"commit `{(meta.get('git_commit') or '?')[:10]}`, {meta.get('date')}).",
        "",
    ]
    if ops:
        dtypes = {r["dtype"] for r in ops}
        dt = "bf16" if "bf16" in dtypes else sorted(dtypes)[0]
        bmax = max(r.get("batch") or 0 for r in ops)
        mode = "full" if any(r["mode"] == "full" for r in ops) else ops[0]["mode"]
        sel = [r for r in ops if r["dtype"] == dt and r.get("batch") == bmax and r["mode"] == mode]
        provs = [p for p in ("reference", "fused", "compile", "sdpa", "flex") if any(r["provider"] == p for r in sel)]
        lines += [
            f"Per op, batch {bmax}, {dt}, mode {mode} (forward + backward): median ms (speedup over reference); "
            "fused GB/s and max relative error against the fp32 reference.",
            "",
            "| op | stage | " + " | ".join(provs) + " | fused GB/s | fused max rel err |",
            "|---|---|" + "---|" * len(provs) + "---|---|",
        ]
        from .report import OP_ORDER

        for op in OP_ORDER:
            for st in sorted({r.get("stage") for r in sel if r["op"] == op}):
                cells = []
                fused = None
                for p in provs:
                    r = next((r for r in sel if r["op"] == op and r.get("stage") == st and r["provider"] == p), None)
                    if r is None or r.get("median_ms") is None:
                        cells.append("skipped" if r is not None else "-")
                        continue
                    s = speedup_over_reference(r, ref)
                    cells.append(f"{r['median_ms']:.3g} ({s:.2f}x)" if s else f"{r['median_ms']:.3g}")
                    if p == "fused":
                        fused = r
                lines.append(
                    f"| {op} | {st} | "
                    + " | ".join(cells)
                    + f" | {_f(fused and fused.get('gbps'), '.0f')} | {_f(fused and fused.get('max_rel_err'), '.1e')} |"
                )
        lines.append("")
    model = [r for r in records if r.get("section") == "model" and r.get("clips_per_s")]
    if model:
        lines += [
            "Whole model: clips/s, peak memory (MB), max error against the fp32 reference.",
            "",
            "| mode | batch | dtype | provider | clips/s | peak MB | max abs err |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in model:
            lines.append(
                f"| {r['mode']} | {r['batch']} | {r['dtype']} | {r['provider']} | {r['clips_per_s']:.1f} | "
                f"{_f(r.get('peak_mem_mb'), '.0f')} | {_f(r.get('max_abs_err'), '.1e')} |"
            )
        lines.append("")
    for png in (meta.get("files") or {}).get("plots", []):
        lines.append(f"![{png}]({png})")
    return "\n".join(lines)


def update_readme(results_dir: Path = RESULTS_DIR) -> Path | None:
    readme = results_dir / "README.md"
    found = latest_gpu_run(results_dir)
    if found is None or not readme.exists():
        return None
    text = readme.read_text()
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n## Latest GPU run\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{summary_markdown(*found)}\n{END}{tail}")
    return readme


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR
    out = update_readme(target)
    print(f"updated {out}" if out else f"no non-quick CUDA run in {target} (or no README.md there)")
