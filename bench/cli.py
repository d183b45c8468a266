"""``python -m bench``: find the hardware, run the cases with progress, print the report, write results.

Sections (each labelled in the report with what ran where):

- ``ops``: the ops at HTS-AT's stage shapes. On CUDA: batch 32 and 128, every provider. On a
  CPU-only machine: CPU timings of the reference against the C++ CPU twins (provider ``fused``)
  and the peers that run on CPU, at batch 2, one thread.
- ``interpreter`` (CPU only): the Triton window attention in the Triton interpreter at reduced
  shapes: numerics only, no timings.
- ``model``: HTS-AT training step and inference per provider (tiny config in ``--quick``).
- ``memory``: what the training step saves for backward, exactly (any device), per backend and save
  policy, fp32 and bf16, per stage and op; the recomputation's cost; B per 80 GB
  (``bench/activation_memory.py``); on CUDA the step's peak at B = 128.

``--coverage`` instead reports which calls of each op ran fused in each precision / compile / mode
configuration, and why the others did not (``bench/coverage.py``).

``--static`` instead writes the compile report (``bench/compile_report.py``): registers, spills,
shared memory, occupancy and tensor-core use of every Triton and CUDA kernel for sm_80 and sm_90,
compiled ahead of time on any machine (no GPU needed), and the ideal time of each op at batch 128.
On a GPU, the report also prints the roofline (ideal time and percent of it) of every timed record.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark and verification report of the htsat-kernels ops and the HTS-AT model.",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timings (a CPU run takes under 3 minutes)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: bench/results/)")
    p.add_argument(
        "--ops",
        type=_csv,
        default=None,
        help="comma list of ops (the names or aliases of htsat_kernels.ops.OPS; --list shows the cases) and model (default: all)",
    )
    p.add_argument(
        "--providers",
        type=_csv,
        default=None,
        help="comma list of reference, fused, compile, sdpa, flex, fused+compile (default: all)",
    )
    p.add_argument("--dtypes", type=_csv, default=None, help="comma list of fp32, bf16, fp16 (default: all; --quick: fp32, bf16)")
    p.add_argument(
        "--modes", type=_csv, default=None, help="comma list of forward, backward, full (ops) and train, inference (model)"
    )
    p.add_argument(
        "--batches",
        type=lambda s: [int(v) for v in _csv(s)],
        default=None,
        help="per-op batch sizes (default: 32,128 on CUDA; 2 on CPU; 1 with --quick)",
    )
    p.add_argument(
        "--stages", type=lambda s: [int(v) for v in _csv(s)], default=None, help="comma list of stages 1-4 (default: all)"
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--model-config",
        default=None,
        help="model preset or JSON config for the model section (default: htsat-audioset; --quick: the tiny config)",
    )
    p.add_argument(
        "--model-compile-on-cpu",
        action="store_true",
        help="run the model's compile providers on a CPU-only run too (tens of minutes)",
    )
    p.add_argument("--no-interpreter", action="store_true", help="skip the Triton interpreter numerics section (CPU only)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for a CPU-only run (default 1: on a shared machine OpenMP thread contention otherwise dominates the timings)",
    )
    p.add_argument("--rep-ms", type=float, default=None, help="timing budget per case in ms (default 100 on CUDA, 300 on CPU)")
    p.add_argument(
        "--update-readme",
        choices=("auto", "yes", "no"),
        default="auto",
        help="refresh bench/results/README.md with the latest GPU run (auto: after a non-quick CUDA run written to bench/results/)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory section (saved-for-backward bytes per save policy)")
    p.add_argument("--memory-only", action="store_true", help="of the model, run only the memory section")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--skip-model-check", action="store_true", help="do not run the model check that opens the report (gpu-check parts)"
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="compile report instead of timings: every Triton and CUDA kernel compiled for --archs (no GPU needed; "
        "--dtypes may include fp64)",
    )
    p.add_argument(
        "--static-grid",
        choices=("none", "quick", "full"),
        default="none",
        help="--static: also the window / head-dim grid (N 49..256, d 24 and 64 at sm_80, sm_86, sm_90): quick (bf16, "
        "fp32, unmasked), full (also fp16 and the mask tensor), none (default: keeps --static within minutes)",
    )
    p.add_argument(
        "--archs", type=_csv, default=None, help="--static: comma list of sm_80, sm_86, sm_89, sm_90 (default: sm_80,sm_90)"
    )
    p.add_argument(
        "--coverage",
        action="store_true",
        help="coverage report instead of timings: per configuration (dtype, eager/compile, train/inference) each op's "
        "calls that ran fused and that ran the reference, with the reasons; on a CPU also the CUDA picture derived "
        "from autocast's dtype flow (bench/coverage.py); with --quick eager only; --dtypes and --model-config apply",
    )
    p.add_argument(
        "--clap",
        type=int,
        nargs="?",
        const=16,
        default=None,
        metavar="N",
        help="CLAP embedding throughput instead of the report: N (16) clips of 10 s through clap-htsat-base, ours vs "
        "laion-clap's module vs that module patched with htsat_kernels.integrations",
    )
    p.add_argument(
        "--inference-files",
        type=int,
        nargs="?",
        const=100,
        default=None,
        metavar="N",
        help="file throughput of htsat predict instead of the report: N (100) files of 10 s, tiny model, batched vs one at a time",
    )
    p.add_argument(
        "--processes",
        type=_csv,
        default=None,
        metavar="P1,P2",
        help="with --inference-files: files/s of htsat embed under torchrun and of htsat.ray.Embedder, with each "
        "number of processes / Ray actors (e.g. 1,2)",
    )
    p.add_argument(
        "--cpu-runtimes",
        action="store_true",
        help="CPU clips/s instead of the report: eager reference, auto, torch.compile, ONNX Runtime (fp32, int8) and "
        "OpenVINO if installed, interleaved; batch 1 and 8, 1 and all threads; htsat-audioset and clap-htsat-base "
        "(--quick: htsat-audioset, batch 1, no compile)",
    )
    p.add_argument("--repeats", type=int, default=None, help="--cpu-runtimes: timed repeats per runtime (default 3)")
    p.add_argument(
        "--int8-quality",
        action="store_true",
        help="int8 against fp32 instead of the report: cosine of the embeddings, top-1/top-5 tag agreement on speech "
        "(espeak-ng), tones and noise made here; htsat-audioset and clap-htsat-base (--quick: htsat-audioset)",
    )
    return p


def _check(values, allowed, what):
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return values


def plan(args, device):
    """The cases of every section, and notes about the plan."""
    from . import model as model_mod
    from . import ops as ops_mod

    ops_mod.configure_compiler()
    cpu = device.type != "cuda"
    all_ops = list(ops_mod.OPS) + ["model"]
    ops = [ops_mod.OP_ALIASES.get(o, o) for o in (args.ops or all_ops)]
    _check(ops, all_ops, "op")
    providers = args.providers or list(ops_mod.PROVIDERS) + ["fused+compile"]
    _check(providers, list(ops_mod.PROVIDERS) + ["fused+compile"], "provider")
    dtypes = args.dtypes or (["fp32", "bf16"] if args.quick else ["fp32", "bf16", "fp16"])
    _check(dtypes, ["fp32", "bf16", "fp16"], "dtype")
    modes = args.modes or list(ops_mod.MODES) + list(model_mod.MODEL_MODES)
    _check(modes, list(ops_mod.MODES) + list(model_mod.MODEL_MODES), "mode")
    stages = args.stages
    if stages:
        _check(stages, [1, 2, 3, 4], "stage")
    if args.batches:
        batches = args.batches
    elif args.quick:
        batches = [1]
    else:
        batches = [2] if cpu else [32, 128]
    notes = []
    if cpu and not args.batches:
        notes.append(
            f"CPU run: per-op batch capped at {batches} (GPU runs use 32 and 128); model: "
            f"{'the ' + args.model_config + ' config' if args.model_config else 'the tiny config'} at batch 1-2."
        )
    op_modes = [m for m in modes if m in ops_mod.MODES]
    op_list = [o for o in ops if o != "model"]
    cases = ops_mod.build_op_cases(
        device=device, ops=op_list, providers=providers, dtypes=dtypes, modes=op_modes, batches=batches, stages=stages
    )
    if cpu and not args.no_interpreter and "window_attention" in op_list:
        idt = [d for d in dtypes if d in ("fp32", "bf16")] if args.quick else dtypes
        # "full" checks the output and every gradient: in --quick it stands for "forward" too.
        imodes = (["full"] if "full" in op_modes else op_modes) if args.quick else op_modes
        cases += ops_mod.build_interpreter_cases(
            dtypes=idt or dtypes[:1], modes=imodes or ["forward"], providers=providers, stages=stages
        )
    if "model" in ops and not args.memory_only:
        m_modes = [m for m in modes if m in model_mod.MODEL_MODES]
        spec = None
        if args.model_config:
            spec = model_mod.ModelSpec(args.model_config, tiny=False, label=Path(args.model_config).stem)
        cases += model_mod.build_model_cases(
            device=device, providers=providers, dtypes=dtypes, modes=m_modes, quick=args.quick, spec=spec
        )
    if args.quick:
        notes.append(
            "--quick: batch 1, fp32 and bf16, tiny model config, short timings; compile/flex only at the smallest stage, fp32 forward."
        )
    return cases, notes


def main(argv=None) -> int:
    from ._env import prepare_process

    interpret = prepare_process()  # before htsat_kernels is imported

    import torch

    from . import report
    from .context import RunContext
    from .harness import TimingConfig, build_meta, reserve_l2_buffer
    from .runner import run_cases

    args = build_parser().parse_args(argv)
    if args.static:
        return _static(args)
    if args.coverage:
        from . import coverage

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.dtypes:
            _check(args.dtypes, list(coverage.DTYPES), "dtype")
        return coverage.main(
            args.out, device=args.device, model_name=args.model_config, compiled=not args.quick, dtypes=args.dtypes
        )
    if args.clap:
        from . import clap

        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        clap.run(args.out, clips=args.clap, device=dev, threads=args.threads)
        return 0
    if args.inference_files and args.processes:
        from . import scale_out

        scale_out.run(args.out, n_files=args.inference_files, processes=[int(p) for p in args.processes])
        return 0
    if args.int8_quality:
        from . import int8_quality

        int8_quality.run(args.out, models=("htsat-audioset",) if args.quick else ("htsat-audioset", "clap-htsat-base"))
        return 0
    if args.cpu_runtimes:
        from . import cpu_runtimes

        if args.quick:
            runtimes = tuple(r for r in cpu_runtimes.RUNTIMES if r != "compile")
            cpu_runtimes.run(
                args.out,
                models=("htsat-audioset",),
                batches=(1,),
                threads=args.threads,
                runtimes=runtimes,
                repeats=args.repeats or 2,
            )
        else:
            # torch.compile takes many minutes per model and batch shape on a shared 2-core box: audioset, batch 1
            cpu_runtimes.run(
                args.out,
                threads=args.threads,
                repeats=args.repeats or 3,
                compile_models=("htsat-audioset",),
                compile_batches=(1,),
            )
        return 0
    if args.inference_files:
        from . import inference

        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        inference.run(args.out, n_files=args.inference_files, device=dev, threads=args.threads)
        return 0
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    cases, notes = plan(args, device)
    peaks = _roofline_peaks(device)
    # On a CPU-only run, one thread by default: on a shared machine the OpenMP thread pool's
    # contention (10x swings) would drown the kernels being compared.
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
        notes.append(f"torch CPU threads: {threads}" + ("" if args.threads else " (CPU default; --threads N to change)") + ".")
    if args.list:
        for c in cases:
            print(f"{c.section:12s} {c.test_id()}")
        print(f"{len(cases)} cases")
        return 0

    timing = TimingConfig()
    if args.quick:
        timing = TimingConfig(warmup_ms=5, rep_ms=20, min_reps=5, max_reps=200, cpu_rep_ms=25, cpu_min_reps=3, cpu_max_reps=10)
    if args.rep_ms:
        timing.rep_ms = timing.cpu_rep_ms = args.rep_ms
    if interpret and device.type == "cpu":
        notes.append("TRITON_INTERPRET=1: the Triton kernels run in the interpreter (numerics only).")

    torch.manual_seed(0)
    meta = build_meta(device, quick=args.quick, argv=sys.argv[1:] if argv is None else argv)
    meta["notes"] = notes
    meta["timing"] = {k: getattr(timing, k) for k in timing.__dataclass_fields__}
    print(f"bench: {len(cases)} cases on {meta['device']}" + (" (--quick)" if args.quick else ""), file=sys.stderr, flush=True)
    reserve_l2_buffer(device)
    ctx = RunContext(device=device, quick=args.quick, timing=timing, model_compile_on_cpu=args.model_compile_on_cpu)
    t0 = time.perf_counter()
    from .verify import model_check, render

    if args.skip_model_check:
        meta["model_check"] = {"ok": True, "skipped": "--skip-model-check"}
    else:
        meta["model_check"] = model_check(device)
        print(render(meta["model_check"]), flush=True)
    records = []
    meta["section_wall_s"] = {}
    for section in ("ops", "interpreter", "model"):
        sec_cases = [c for c in cases if c.section == section]
        if not sec_cases:
            continue
        t_sec = time.perf_counter()
        records += run_cases(
            sec_cases, ctx, peak_bw_gbps=meta.get("peak_bandwidth_gbps"), progress=not args.no_progress, desc=section
        )
        ctx.memo.clear()
        ctx.release()
        meta["section_wall_s"][section] = round(time.perf_counter() - t_sec, 1)
    if "model" in ops_of(args) and "train" in (args.modes or ["train"]) and not args.no_memory and not args.list:
        t_sec = time.perf_counter()
        records += _memory_section(args, device)
        meta["section_wall_s"]["memory"] = round(time.perf_counter() - t_sec, 1)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["n_records"] = len(records)
    meta["n_skipped"] = sum(1 for r in records if r.get("skipped_reason"))

    if peaks:
        from .roofline import annotate_records

        meta.update(peaks)
        annotate_records(records, peaks)
    result = {"meta": meta, "records": sorted(records, key=report.sort_key)}
    paths = report.write_results(args.out, result, plots=not args.no_plots)
    print(report.render_text(result))
    if peaks:
        from .roofline import render_roofline

        print()
        print(render_roofline(result))
    print()
    print(f"results: {paths['json']}")
    print(f"         {paths['csv']}")
    for p in paths["plots"]:
        print(f"         {p}")
    print(f"ran {len(records)} records ({meta['n_skipped']} skipped) in {meta['wall_s']} s")
    if not meta["model_check"]["ok"]:
        print("model check FAILED (see the top of the report)", file=sys.stderr)
        return 1

    upd = args.update_readme
    if upd == "yes" or (
        upd == "auto" and device.type == "cuda" and not args.quick and os.path.realpath(args.out) == os.path.realpath(DEFAULT_OUT)
    ):
        from .readme import update_readme

        readme = update_readme(DEFAULT_OUT)
        if readme:
            print(f"updated {readme}")
    return 0


def ops_of(args) -> list[str]:
    from . import ops as ops_mod

    return [ops_mod.OP_ALIASES.get(o, o) for o in (args.ops or ["model"])]


def _memory_section(args, device) -> list[dict]:
    """Saved-for-backward bytes per configuration (bench/activation_memory.py), on the model section's config."""
    from . import activation_memory
    from .model import ModelSpec, build_model_cases

    if args.model_config:
        spec = ModelSpec(args.model_config, tiny=False, label=Path(args.model_config).stem)
    else:
        spec = build_model_cases(device=device, providers=["reference"], dtypes=["fp32"], modes=["train"], quick=args.quick)[
            0
        ].spec
    batch = 2 if args.quick or device.type != "cuda" else 128
    dtypes = [d for d in (args.dtypes or ["fp32", "bf16"]) if d in activation_memory.DTYPES] or ["fp32"]
    print(f"bench: memory section ({spec.label}, B={batch}, {', '.join(dtypes)})", file=sys.stderr, flush=True)
    return activation_memory.measure(
        device,
        spec.name,
        spec.overrides(),
        spec.label,
        batch=batch,
        dtypes=dtypes,
        repeats=1 if args.quick else (2 if device.type == "cuda" else 3),  # CUDA: B = 128, within gpu-check's part
        interpreter_batch=None if args.quick else 1,
    )


def _roofline_peaks(device) -> dict:
    """Peak bandwidth and bf16 throughput of a CUDA device (table, else a measured copy); {} on CPU."""
    if device.type != "cuda":
        return {}
    import torch

    from .gpu_limits import device_peaks, measured_copy_gbps

    return device_peaks(torch.cuda.get_device_properties(device).name, measure=lambda: measured_copy_gbps(device))


def _static(args) -> int:
    """``--static``: the compile report (no GPU needed)."""
    from . import compile_report, gpu_limits

    try:
        archs = [gpu_limits.arch_name(a) for a in (args.archs or compile_report.ARCHS)]
    except ValueError:
        raise SystemExit(
            f"unknown arch in --archs {','.join(args.archs)} (choose from {', '.join(gpu_limits.ARCH_LIMITS)})"
        ) from None
    _check(archs, list(gpu_limits.ARCH_LIMITS), "arch")
    dtypes = args.dtypes or list(compile_report.DTYPES)
    _check(dtypes, list(compile_report.DTYPES), "dtype")
    grid = None if args.static_grid == "none" else args.static_grid
    return compile_report.main(args.out, archs=tuple(archs), dtypes=tuple(dtypes), grid=grid)
