"""``python -m bench --static``: what the GPU kernels compile to, on any machine (no GPU needed).

Gathers ``bench.static_triton`` (every Triton kernel compiled ahead of time for sm_80 and sm_90 at
the launcher's own configuration, per stage, preset, dtype and mask) and ``bench.static_cuda``
(every kernel of the compiled extension, per arch in it) into records of the bench JSON family
(``kind: "static"``, first fields ``bench.schema.STATIC_FIELDS``), adds the ideal time of each op
at batch 128 on H100 SXM and H200 (``bench.roofline``), prints the tables and writes
``static_<date>.json`` and ``.csv``. A kernel that fails to compile is a record with its error.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import datetime as _dt
import json
import multiprocessing
import os
import time
from pathlib import Path

from . import gpu_limits, roofline
from .schema import STATIC_FIELDS
from .static_cuda import cuda_records, extension_path, find_tool
from .static_triton import (
    ARCHS,
    BATCH,
    DTYPES,
    GRID_ARCHS,
    PATHS,
    TRITON_KERNELS,
    StageShape,
    _compile_group,
    _worker_init,
    grid_stages,
    inductor_traced_kernels,
    preset_stages,
    triton_jobs,
)

ROOFLINE_DEVICES = ("H100 SXM", "H200")

# --------------------------------------------------------------------------------------------
# Roofline at batch 128 (H100 SXM, H200)


def op_flops(op: str, st: StageShape, batch: int, direction: str) -> int:
    """FLOPs of one call, from the op table's formula (htsat_kernels.ops)."""
    from . import ops

    return ops.op_flops(op, _ops_stage(st), batch, direction)[0]


def _ops_stage(st: StageShape):
    from . import ops

    return ops.Stage(st.stage, st.H, st.W, st.C, st.heads, st.window // 2 if st.shifted else 0)


def op_bytes(op: str, st: StageShape, batch: int, elem: int, direction: str) -> int:
    """Bytes moved per call, from the op table's formula (htsat_kernels.ops)."""
    from . import ops

    return ops.op_bytes(op, _ops_stage(st), batch, elem, direction)[0]


def ideal_us(op: str, st: StageShape, direction: str, dtype: str, batch: int = BATCH) -> dict:
    elem = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}.get(dtype, 2)
    nbytes = op_bytes(op, st, batch, elem, direction)
    flops = op_flops(op, st, batch, direction)
    out = {}
    for name in ROOFLINE_DEVICES:
        d = gpu_limits.DEVICE_BY_NAME[name]
        ms = roofline.ideal_ms(nbytes, flops, d.hbm_gbps, d.bf16_tflops if dtype in ("bf16", "fp16") else None)
        out[name] = None if ms is None else round(ms * 1e3, 2)
    return out


def roofline_rows(stages: list[StageShape], dtype: str = "bf16") -> list[dict]:
    from . import ops

    rows = []
    seen = set()
    for st in stages:
        key = (st.stage, st.H, st.W, st.C, st.heads, st.window, st.shifted)
        if key in seen:
            continue
        seen.add(key)
        for op in ops.OPS:
            if op == "patch_merge" and st.stage == max(s.stage for s in stages):
                continue
            for direction in ("forward", "backward"):
                nbytes = op_bytes(op, st, BATCH, 2, direction)
                rows.append(
                    {
                        "op": op,
                        "stage": st.label,
                        "direction": direction,
                        "dtype": dtype,
                        "batch": BATCH,
                        "bytes": nbytes,
                        "flops": op_flops(op, st, BATCH, direction),
                        "ideal_us": ideal_us(op, st, direction, dtype),
                    }
                )
    return rows


def roofline_markdown(preset: str = "htsat-audioset", dtype: str = "bf16") -> str:
    """The README's roofline table: the ideal time of every op at each stage of ``preset`` at batch
    ``BATCH``, forward and backward, on each roofline device ("H100 SXM / H200" in us per call).
    ``tests/test_roofline.py`` checks that the README holds exactly this text."""
    from .static_triton import preset_stages

    stages = [s for s in preset_stages() if s.preset == preset]
    rows = roofline_rows(stages, dtype)
    devs = list(ROOFLINE_DEVICES)
    labels = [s.label for s in stages]
    head = "| op | direction | " + " | ".join(f"stage {s.stage} ({s.H}×{s.W}×{s.C})" for s in stages) + " |"
    lines = [head, "|---|---|" + "---|" * len(labels)]
    for op in dict.fromkeys(r["op"] for r in rows):
        for direction in ("forward", "backward"):
            cells = []
            for label in labels:
                r = next((r for r in rows if r["op"] == op and r["direction"] == direction and r["stage"] == label), None)
                if r is None:
                    cells.append("-")
                    continue
                us = " / ".join(f"{r['ideal_us'][d]:.0f}" if r["ideal_us"][d] >= 10 else f"{r['ideal_us'][d]:.1f}" for d in devs)
                cells.append(f"{us} ({r['bytes'] / 1e6:.0f} MB)")
            lines.append(f"| `{op}` | {direction} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The report


def build_report(
    archs=ARCHS,
    dtypes=DTYPES,
    stages: list[StageShape] | None = None,
    workers: int | None = None,
    include_cuda: bool = True,
    progress=None,
    paths=PATHS,
    grid: str | None = None,
) -> dict:
    """Compile everything and return {"meta": ..., "records": [...], "roofline": [...]}.

    ``paths``: "eager" and/or "inductor" (the source torch.compile emits, for the kernels the
    compiled training step re-emits; fp16, bf16, fp32). ``grid``: None, "quick" (bf16 and fp32 at
    sm_80, sm_86, sm_90, unmasked) or "full" (with fp16 and the mask-tensor variants) over
    ``grid_stages()``."""
    t0 = time.perf_counter()
    stages = stages if stages is not None else preset_stages()
    jobs, records = triton_jobs(stages, archs, dtypes) if "eager" in paths else ([], [])
    if grid:
        grid_dtypes = ("bf16", "fp32") if grid == "quick" else ("fp16", "bf16", "fp32")
        grid_jobs, _ = triton_jobs(grid_stages(), GRID_ARCHS, grid_dtypes)
        jobs += [j for j in grid_jobs if grid == "full" or not j["has_mask"]]
    workers = workers or max(1, min(len(jobs) + 1, os.cpu_count() or 1))
    group_s = []
    inductor_kernels: list[str] = []
    results: list = []
    if jobs or "inductor" in paths:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
            traced = pool.submit(inductor_traced_kernels) if "inductor" in paths else None
            futures = {pool.submit(_compile_group, job): i for i, job in enumerate(jobs)}
            if traced is not None:
                try:
                    inductor_kernels = traced.result()
                except Exception as exc:  # the trace itself failed: one error record, no inductor path
                    records.append({"kind": "static", "backend": "triton", "path": "inductor", "kernel": None, "op": None,
                                    "direction": None, "dtype": None, "stage": None, "arch": None,
                                    "error": f"tracing the ops for Inductor failed: {type(exc).__name__}: {exc}"[:400]})  # fmt: skip
                more, _ = triton_jobs(stages, archs, [d for d in dtypes if d != "fp64"], "inductor", inductor_kernels)
                futures.update({pool.submit(_compile_group, job): len(jobs) + i for i, job in enumerate(more)})
                jobs += more
            results: list = [None] * len(jobs)
            cuda_recs, cuda_note = cuda_records() if include_cuda else ([], "CUDA kernels not requested")
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except Exception as exc:  # a crashed worker: the whole group is an error
                    results[i] = [
                        {"stage_index": k, "error": f"{type(exc).__name__}: {exc}"} for k in range(len(jobs[i]["stages"]))
                    ]
                if progress:
                    progress(sum(r is not None for r in results), len(jobs))
    else:
        cuda_recs, cuda_note = cuda_records() if include_cuda else ([], "CUDA kernels not requested")
    for job, res in zip(jobs, results):
        op, direction, _ = TRITON_KERNELS[job["kernel"]]
        for r in res or []:
            if "group_s" in r:
                group_s.append(r["group_s"])
                continue
            st = job["stages"][r.pop("stage_index")]
            rec = {
                "kind": "static",
                "backend": "triton",
                "kernel": job["kernel"],
                "op": op,
                "direction": direction,
                "dtype": job["dtype"],
                "stage": st.label,
                "preset": st.preset,
                "arch": job["arch"],
                "has_mask": job["has_mask"],
                "path": job["path"],
                "shape": f"B={BATCH} H={st.H} W={st.W} C={st.C} h={st.heads} ws={st.window}",
            }
            rec.update(r)
            rec["ideal_us"] = ideal_us(op, st, direction, job["dtype"])
            records.append(rec)
    records += cuda_recs
    import triton

    meta = {
        "kind": "static",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "triton": triton.__version__,
        "archs": list(archs),
        "dtypes": list(dtypes),
        "batch_for_ideal_time": BATCH,
        "roofline_devices": {n: vars(gpu_limits.DEVICE_BY_NAME[n]) for n in ROOFLINE_DEVICES},
        "cuobjdump": find_tool("cuobjdump"),
        "nvdisasm": find_tool("nvdisasm"),
        "extension": extension_path(),
        "cuda_note": cuda_note,
        "arch_limits": {k: vars(v) for k, v in gpu_limits.ARCH_LIMITS.items()},
        "workers": workers,
        "compile_wall_s": round(sum(group_s), 1),
        "flops_note": "bytes and FLOPs from the op table's formulas (htsat_kernels.ops)",
        "definitions": {
            "registers": "32-bit registers per thread (cuobjdump --dump-resource-usage REG)",
            "spill_bytes": "stack frame + local memory per thread in bytes (cuobjdump STACK + LOCAL): ptxas puts spilled "
            "registers in the stack frame; these kernels have no local arrays and no ABI calls that need one",
            "shared_bytes": "shared memory per block (Triton metadata + static SHARED)",
            "blocks_per_sm": "resident blocks per SM allowed by registers, shared memory, warp and block limits",
            "num_warps": "warps per block: Triton's launch config; CUDA: the kernel's __launch_bounds__ (EIATTR_MAX_THREADS), "
            "the block size its host launcher uses",
            "tensor_core_instructions": "wgmma.mma_async + mma.sync instructions in the PTX (0: FMA path)",
            "int64_div_calls": "SASS call sites of __cuda_sm20_{div,rem}_{s,u}64 (64-bit integer division helpers)",
            "ideal_us": f"max(bytes / peak bandwidth, flops / dense bf16 peak) at batch {BATCH}, per device",
        },
    }
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    return {"meta": meta, "records": records, "roofline": roofline_rows(stages)}


# --------------------------------------------------------------------------------------------
# Rendering and files


def _kb(x) -> str:
    return "-" if x is None else f"{x / 1024:.1f}"


def _stage_span(labels: list[str]) -> str:
    idx = sorted({int(s[1:]) for s in labels})
    if len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1)):
        return f"s{idx[0]}-s{idx[-1]}"
    return ",".join(f"s{i}" for i in idx)


def _triton_rows(records: list[dict]) -> list[list[str]]:
    """One row per distinct compiled kernel (stages and presets with identical results collapse)."""
    order = {"fp16": 0, "bf16": 1, "fp32": 2, "fp64": 3}
    records = sorted(records, key=lambda r: (order.get(r["dtype"], 9), r["has_mask"], r["arch"], r.get("path", "eager")))
    groups: dict = {}
    keys = (
        "registers",
        "spill_bytes",
        "shared_bytes",
        "num_warps",
        "blocks_per_sm",
        "warps_per_sm",
        "wgmma",
        "mma_sync",
        "dots",
        "dots_on_tensor_cores",
        "error",
        "declined",
    )
    for r in records:
        g = (r["kernel"], r["direction"], r["dtype"], r["has_mask"], r["arch"], r.get("path", "eager")) + tuple(
            str(r.get(k)) for k in keys
        )
        groups.setdefault(g, []).append(r)
    rows = []
    for recs in groups.values():
        r = recs[0]
        stages = _stage_span([x["stage"] for x in recs])
        presets = sorted({x["preset"] for x in recs})
        head = [r["direction"], r.get("path", "eager"), r["dtype"], "yes" if r["has_mask"] else "no"]
        if r.get("error"):
            rows.append(head + [stages, r["arch"], "ERROR: " + r["error"][:90]])
            continue
        if r.get("declined"):
            rows.append(head + [stages + f" ({presets[0]})", r["arch"], "declined: " + r["declined"][:90]])
            continue
        tc = f"{r['wgmma']} wgmma" if r.get("wgmma") else (f"{r['mma_sync']} mma" if r.get("mma_sync") else "none (FMA)")
        rows.append(
            head
            + [
                stages + ("" if len(presets) > 1 else f" ({presets[0]})"),
                r["arch"],
                str(r["registers"]),
                str(r["spill_bytes"]),
                _kb(r["shared_bytes"]),
                str(r["num_warps"]),
                f"{r['blocks_per_sm']} ({r['warps_per_sm']} warps, {r['occupancy_limit']})",
                tc,
                f"{r['dots_on_tensor_cores']}/{r['dots']}",
            ]
        )
    return rows


def _is_grid(r: dict) -> bool:
    return str(r.get("preset") or "").startswith("grid-")


_GRID_HDR = ["dir", "dtype", "arch", "mask", "N", "d", "regs", "spill B", "smem KB", "limit KB", "blocks/SM or reason"]


def _grid_rows(records: list[dict]) -> list[list[str]]:
    order = {"fp16": 0, "bf16": 1, "fp32": 2}
    recs = sorted(records, key=lambda r: (r["direction"], order.get(r["dtype"], 9), r["arch"], r["has_mask"], r["preset"]))
    rows = []
    for r in recs:
        ws, d = (int(x[2:]) if x.startswith("ws") else int(x[1:]) for x in r["preset"].split("-")[1:])
        head = [r["direction"], r["dtype"], r["arch"], "yes" if r["has_mask"] else "no", str(ws * ws), str(d)]
        if r.get("error") or r.get("declined"):
            what = ("ERROR: " + r["error"]) if r.get("error") else ("declined: " + r["declined"])
            rows.append(head + ["-", "-", "-", _kb(r.get("shared_limit_bytes")), what[:100]])
            continue
        rows.append(
            head
            + [str(r["registers"]), str(r["spill_bytes"]), _kb(r["shared_bytes"]), _kb(r["shared_limit_bytes"])]
            + [str(r["blocks_per_sm"])]
        )
    return rows


def render_text(report: dict) -> str:
    from .report import format_table

    meta, records = report["meta"], report["records"]
    lines = [
        "=" * 100,
        "htsat-kernels compile report (static: no GPU used)",
        f"triton {meta['triton']}   archs {', '.join(meta['archs'])}   cuobjdump {meta['cuobjdump'] or 'not found'}",
        f"extension {meta['extension'] or 'not built'}",
        "=" * 100,
    ]
    tri = [r for r in records if r.get("backend") == "triton" and not _is_grid(r)]
    hdr = [
        "dir",
        "path",
        "dtype",
        "mask",
        "stages",
        "arch",
        "regs",
        "spill B",
        "smem KB",
        "warps",
        "blocks/SM (warps/SM, limit)",
        "tensor cores",
        "TC dots",
    ]
    for title, sel in (
        ("Triton kernels (fp16, bf16, fp32)", [r for r in tri if r.get("dtype") != "fp64"]),
        ("Triton kernels in fp64 (meant for gradcheck)", [r for r in tri if r.get("dtype") == "fp64"]),
    ):
        by_kernel: dict = {}
        for r in sel:
            by_kernel.setdefault(r["kernel"], []).append(r)
        if not by_kernel:
            continue
        lines += ["", f"#### {title}: batch {BATCH}, every stage of every preset (identical rows merged)"]
        for kernel, recs in by_kernel.items():
            rows = _triton_rows(recs)
            lines += ["", f"-- {kernel}", format_table(hdr[: max(len(x) for x in rows)], rows, right={6, 7, 8, 9})]
    grid = [r for r in records if r.get("backend") == "triton" and _is_grid(r)]
    if grid:
        lines += ["", "#### Window / head-dim grid (4 heads, 8x8 shifted windows, no mask tensor): compiled or declined"]
        lines.append(format_table(_GRID_HDR, _grid_rows(grid), right={4, 5, 6, 7, 8, 9}))
    cu = [r for r in records if r.get("backend") == "cuda"]
    lines += ["", "#### CUDA kernels of the extension (block = the launch bound the host launches with; static shared memory)"]
    if not cu:
        lines.append(f"  none: {meta.get('cuda_note')}")
    else:
        rows = [
            [
                r["arch"],
                r["kernel"][:78],
                str(r["registers"]),
                str(r["spill_bytes"]),
                str(r["shared_bytes"]),
                "-" if r.get("num_warps") is None else str(r["num_warps"]),
                "-"
                if r.get("blocks_per_sm") is None
                else f"{r['blocks_per_sm']} ({r['warps_per_sm']} warps, {r['occupancy_limit']})",
                "-" if r.get("int64_div_calls") is None else str(r["int64_div_calls"]),
                "-" if r.get("sass_instructions") is None else str(r["sass_instructions"]),
            ]
            for r in cu
        ]
        lines.append(
            format_table(
                [
                    "arch",
                    "kernel",
                    "regs",
                    "spill B",
                    "smem B",
                    "warps",
                    "blocks/SM (warps/SM, limit)",
                    "int64 div",
                    "SASS instr",
                ],
                rows,
                right={2, 3, 4, 5, 7, 8},
            )
        )
    rl = report.get("roofline") or []
    if rl:
        devs = list(ROOFLINE_DEVICES)
        lines += [
            "",
            f"#### Roofline: ideal time per call at batch {BATCH}, bf16 "
            "(max of bytes / HBM bandwidth and FLOPs / dense bf16 peak)",
        ]
        rows = [
            [r["op"], r["stage"], r["direction"], f"{(r['bytes'] or 0) / 1e6:.1f}", f"{r['flops'] / 1e9:.1f}"]
            + ["-" if r["ideal_us"].get(d) is None else f"{r['ideal_us'][d]:.1f}" for d in devs]
            for r in rl
        ]
        lines.append(format_table(["op", "stage", "dir", "MB", "GFLOP"] + [f"{d} us" for d in devs], rows, right={3, 4, 5, 6}))
        lines.append(
            "  bytes and FLOPs: the op table's formulas (htsat_kernels.ops); ideal = max(bytes / HBM, FLOPs / bf16 peak)."
        )
    errors = [r for r in records if r.get("error")]
    lines += [
        "",
        f"{len(records)} records, {len(errors)} with errors; Triton compile time {meta['compile_wall_s']} s "
        f"in {meta['workers']} worker(s); wall {meta['wall_s']} s",
    ]
    if meta.get("cuda_note"):
        lines.append(f"note: {meta['cuda_note']}")
    return "\n".join(lines)


def write_files(out_dir: Path, report: dict) -> dict:
    from .report import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"static_{report['meta']['date'][:10]}"
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    write_json(json_path, report)
    recs = report["records"]
    extra = sorted({k for r in recs for k in r} - set(STATIC_FIELDS))
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(STATIC_FIELDS) + extra)
        for r in recs:
            w.writerow(
                [
                    "" if r.get(c) is None else (json.dumps(r[c], sort_keys=True) if isinstance(r.get(c), (dict, list)) else r[c])
                    for c in list(STATIC_FIELDS) + extra
                ]
            )
    return {"json": json_path, "csv": csv_path}


def main(out_dir: Path, archs=ARCHS, dtypes=DTYPES, grid: str | None = None) -> int:
    import sys

    tty = sys.stderr.isatty()

    def progress(done, total):
        if tty:
            print(
                f"\rcompile report: {done}/{total} kernel groups compiled",
                end="" if done < total else "\n",
                file=sys.stderr,
                flush=True,
            )
        elif done == total or done % 8 == 0:  # a log file gets a few plain lines
            print(f"compile report: {done}/{total} kernel groups compiled", file=sys.stderr, flush=True)

    report = build_report(archs=archs, dtypes=dtypes, progress=progress, grid=grid)
    print(render_text(report))
    paths = write_files(out_dir, report)
    print(f"\nresults: {paths['json']}\n         {paths['csv']}")
    return 0
