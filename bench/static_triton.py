"""The Triton side of the compile report: every ``*_kernel`` Triton function of
``htsat_kernels.fused`` compiled ahead of time for a GPU arch, on any machine.

Each kernel is compiled with ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32))`` at the launch configuration its module's ``launch_config``
returns for that arch (the launcher calls the same function with its device's compute capability)
for each HTS-AT stage of each preset, with the
argument specialisation a real launch at batch 128 would get (Triton's own binder on meta
tensors: 16-byte alignment, ints divisible by 16, ints equal to 1 become constants). Compiles run
in worker processes that import the kernels with ``TRITON_INTERPRET=0`` (the calling process may
run the interpreter); identical specialisations are compiled once per worker.

Per compiled kernel: registers and stack/local (spill) bytes per thread from
``cuobjdump --dump-resource-usage`` of the cubin, shared memory from Triton's metadata, warps,
blocks and warps per SM that fit (``bench.gpu_limits``), tensor-core instructions in the PTX
(``wgmma.mma_async`` on sm_90, ``mma.sync`` on sm_80), and how many TTGIR dots have a
tensor-core (``#mma``) result layout.

Two paths per kernel: ``"eager"`` compiles the kernel as the module defines it (what an eager
launch runs); ``"inductor"`` compiles the source that ``torch.compile`` emits for it. Inductor
re-emits every user Triton kernel launched through ``wrap_triton`` (a ``triton_op``'s body) from
source, with the transitive closure of the JIT functions it calls, each under a plain
``@triton.jit`` (``torch._inductor.codegen.wrapper.user_defined_triton_kernel_transitive_closure_source_code``):
decorator options such as ``noinline=True`` are lost. Which kernels the compiled training step
re-emits is found without a GPU: the module's ops are traced with ``make_fx`` on fake CUDA tensors
(device queries answered for the target arch) and the kernels that land in Inductor's kernel side
table are those it would re-emit; an opaque custom op launches its kernel at run time as compiled
by the module, so it has eager records only. That same closure function is called to get the source
(written to a file and imported: Triton reads a kernel's source from its file).

The grid (``grid_stages``): windows N = ws^2 for ws in 7, 8, 9, 12, 16 at head dims 24 and 64
(Swin's window sizes), compiled unless ``launch_config`` declines the shape for the arch
(``resource_reason``): a declined point is a record with ``declined`` set to the reason, not compiled.
Every record has ``shared_limit_bytes``, the arch's per-block maximum.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import gpu_limits
from .static_cuda import find_tool, parse_resource_usage

ARCHS = ("sm_80", "sm_90")
GRID_ARCHS = ("sm_80", "sm_86", "sm_90")
GRID_WINDOWS = (7, 8, 9, 12, 16)  # N = 49, 64, 81, 144, 256
GRID_HEAD_DIMS = (24, 64)  # 32 compiles like 24 (both padded to 32)
PATHS = ("eager", "inductor")
DTYPES = ("fp16", "bf16", "fp32", "fp64")
BATCH = 128
KERNEL_MODULES = ("htsat_kernels.fused.window_attention",)
# Under autocast (the training default) the bias table (a parameter) and the mask (a buffer) stay
# fp32 while qkv is in the low dtype; in fp32/fp64 runs they share qkv's dtype.
_SIDE_DTYPE = {"fp16": "fp32", "bf16": "fp32", "fp32": "fp32", "fp64": "fp64"}


@dataclass(frozen=True)
class StageShape:
    preset: str
    stage: int
    H: int
    W: int
    C: int
    heads: int
    window: int
    shifted: bool  # the stage has shifted blocks (its second block kind)

    @property
    def nW(self) -> int:
        return (self.H // self.window) * (self.W // self.window)

    @property
    def label(self) -> str:
        return f"s{self.stage}"


def preset_stages() -> list[StageShape]:
    """Every stage of every preset, with the window rule of the blocks (map <= window: no shift)."""
    import htsat

    out = []
    for name in htsat.PRESETS:
        with warnings.catch_warnings():  # a preset's own filterbank notes are not this report's business
            warnings.simplefilter("ignore")
            cfg = htsat.load_config(name)
        gh, gw = cfg.spec_size // cfg.patch_stride[0], cfg.spec_size // cfg.patch_stride[1]
        for i, heads in enumerate(cfg.num_heads):
            H, W = gh // 2**i, gw // 2**i
            ws, shifted = cfg.window_size, cfg.depths[i] >= 2
            if min(H, W) <= ws:
                ws, shifted = min(H, W), False
            out.append(StageShape(name, i + 1, H, W, cfg.embed_dim * 2**i, heads, ws, shifted))
    return out


def grid_stages(windows=GRID_WINDOWS, head_dims=GRID_HEAD_DIMS) -> list[StageShape]:
    """Synthetic stages of the window / head-dim grid: 4 heads, 8 x 8 shifted windows."""
    return [StageShape(f"grid-ws{ws}-d{d}", 1, 8 * ws, 8 * ws, 4 * d, 4, ws, True) for ws in windows for d in head_dims]


# --------------------------------------------------------------------------------------------
# Triton: launch descriptions (the runtime arguments of each kernel at a stage shape)


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[name]


def _attention_args(direction: str, st: StageShape, dtype: str, has_mask: bool, sms: int) -> dict:
    """Arguments of the window attention kernels as the launchers pass them (contiguous tensors)."""
    import torch

    meta = functools.partial(torch.empty, device="meta")
    N, C, h = st.window**2, st.C, st.heads
    B_ = BATCH * st.nW
    lo, side = _torch_dtype(dtype), _torch_dtype(_SIDE_DTYPE[dtype])
    acc = torch.float64 if dtype == "fp64" else torch.float32
    qkv = meta((B_, N, 3 * C), dtype=lo)
    table = meta(((2 * st.window - 1) ** 2, h), dtype=side)
    no_grid = dict(win_rows=1, win_cols=1, shift=0)
    if has_mask:  # a mask tensor (the public ``mask`` argument)
        mask = meta((st.nW, N, N), dtype=side)
        mask_args = dict(mask_ptr=mask, s_mw=mask.stride(0), s_mi=mask.stride(1), s_mj=mask.stride(2), nW=st.nW, **no_grid)
    elif st.shifted:  # the model's shifted blocks: no mask tensor, the shift mask computed from the grid
        grid = dict(win_rows=st.H // st.window, win_cols=st.W // st.window, shift=st.window // 2)
        mask_args = dict(mask_ptr=qkv, s_mw=0, s_mi=0, s_mj=0, nW=st.nW, **grid)
    else:  # the launcher passes qkv as a dummy pointer with zero strides and nW = 1
        mask_args = dict(mask_ptr=qkv, s_mw=0, s_mi=0, s_mj=0, nW=1, **no_grid)
    common = dict(
        qkv_ptr=qkv,
        table_ptr=table,
        s_qb=qkv.stride(0),
        s_qn=qkv.stride(1),
        s_qc=qkv.stride(2),
        s_tr=table.stride(0),
        s_th=table.stride(1),
        C=C,
        scale_hi=(C // h) ** -0.5,
        scale_lo=0.0,
        **mask_args,
    )
    if direction == "forward":
        out = meta((B_, N, C), dtype=lo)
        return dict(
            common, out_ptr=out, lse_ptr=meta((B_, h, N), dtype=acc), s_ob=out.stride(0), s_on=out.stride(1), s_oc=out.stride(2)
        )
    # backward: one program per (group of windows, head), about 4 programs per SM (the launcher's
    # _num_groups on a device with `sms` SMs); only the divisibility of windows_per_group matters here.
    groups = min(B_, max(1, -(-4 * sms // h)))
    per_group = -(-B_ // groups)
    do, dqkv = meta((B_, N, C), dtype=lo), meta((B_, N, 3 * C), dtype=lo)
    return dict(
        common,
        do_ptr=do,
        lse_ptr=meta((B_, h, N), dtype=acc),
        dqkv_ptr=dqkv,
        dbias_ptr=meta((groups, h, N, N), dtype=acc),
        s_db=do.stride(0),
        s_dn=do.stride(1),
        s_dc=do.stride(2),
        s_gb=dqkv.stride(0),
        s_gn=dqkv.stride(1),
        s_gc=dqkv.stride(2),
        B=B_,
        windows_per_group=per_group,
    )


# kernel function name -> (op, direction, argument builder). A new *_kernel JIT function without an
# entry here shows up as a record with an error (and fails the CI test), never silently.
TRITON_KERNELS = {
    "_window_attention_fwd_kernel": ("window_attention", "forward", _attention_args),
    "_window_attention_bwd_kernel": ("window_attention", "backward", _attention_args),
}


# --------------------------------------------------------------------------------------------
# Triton: compile in worker processes


def _worker_init() -> None:
    # the kernels must be real JIT functions, not the interpreter's: set before htsat_kernels loads
    os.environ["TRITON_INTERPRET"] = "0"


def inductor_traced_kernels(module: str = KERNEL_MODULES[0], arch: int = 90) -> list[str]:
    """Names of the module's kernels that ``torch.compile`` re-emits from source for a training step
    (forward and backward op), found by tracing the ops on fake CUDA tensors (worker process: the
    kernels must be compiled JIT functions)."""
    _worker_init()
    import contextlib
    import types
    from unittest import mock

    import torch
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    mod = importlib.import_module(module)
    ops = torch.ops.htsat_kernels
    before = set(kernel_side_table.id_to_kernel)

    def step(qkv, table, go, lse):
        out = ops.window_attention_fwd(qkv, table, None, 4, 24**-0.5, 64, 64, 4)
        grads = ops.window_attention_bwd(go, qkv, table, None, lse, 4, 24**-0.5, 64, 64, 4)
        return out, grads

    props = types.SimpleNamespace(multi_processor_count=132 if arch >= 90 else 108)
    with (
        mock.patch.object(mod, "_device_arch", lambda device: arch),
        mock.patch.object(mod, "_device_guard", lambda t: contextlib.nullcontext()),
        mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: props),
        FakeTensorMode(),
    ):
        qkv = torch.empty(128, 64, 288, device="cuda", dtype=torch.bfloat16)
        table = torch.empty(225, 4, device="cuda")
        go = torch.empty(128, 64, 96, device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(128, 4, 64, device="cuda")
        make_fx(step, tracing_mode="fake")(qkv, table, go, lse)
    added = [k for i, k in kernel_side_table.id_to_kernel.items() if i not in before]
    return sorted({getattr(k, "fn", k).__name__ for k in added})


_INDUCTOR_DIR: list = []


def inductor_kernel(fn):
    """The kernel ``fn`` as torch.compile re-emits it: Inductor's own closure source, imported."""
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    src = user_defined_triton_kernel_transitive_closure_source_code(fn)
    src = "import triton\nimport triton.language as tl\n\n\n@triton.jit\n" + src
    if not _INDUCTOR_DIR:
        _INDUCTOR_DIR.append(tempfile.mkdtemp(prefix="htsat_inductor_"))
    path = Path(_INDUCTOR_DIR[0]) / f"inductor_{fn.__name__}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"_inductor_{fn.__name__}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, fn.__name__)


_COMPILED: dict = {}  # specialisation key -> metrics (per process)


class _Pointer:
    """A tensor argument as Triton's specialisation sees it: a dtype and a 16-byte aligned address
    (the caching allocator's blocks are 512-byte aligned). Meta tensors would do on recent torch,
    but not every torch version gives them a data_ptr."""

    def __init__(self, dtype) -> None:
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 0


def _specialise(fn, backend, args: dict, config: dict):
    """(signature, constexprs, attrs, options) a launch with ``args`` would compile, via Triton's binder."""
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(config)
    num_warps = kwargs.pop("num_warps", 4)
    num_stages = kwargs.pop("num_stages", None)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    missing = [p.name for p in fn.params if p.name not in args and p.name not in kwargs]
    if missing:
        raise TypeError(f"launch description lacks arguments {missing} of {fn.__name__}")
    import torch

    args = {k: _Pointer(v.dtype) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    bound, spec, _ = binder(**args, **kwargs)
    names = [p.name for p in fn.params]
    signature = {n: s[0] for n, s in zip(names, spec)}
    constexprs = {(i,): bound[n] for i, (n, s) in enumerate(zip(names, spec)) if s[0] == "constexpr"}
    attrs = {
        (i,): backend.parse_attr(s[1])
        for i, (n, s) in enumerate(zip(names, spec))
        if s[0] != "constexpr" and isinstance(s[1], str)
    }
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return signature, constexprs, attrs, options


def _count_dots(ttgir: str) -> tuple[int, int]:
    total = tc = 0
    for line in ttgir.splitlines():
        if re.search(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s", line):
            total += 1
            if re.search(r"->\s*tensor<[^>]*#mma", line):
                tc += 1
    return total, tc


def _kernel_metrics(kernel, arch: str) -> dict:
    ptx = kernel.asm.get("ptx", "")
    wgmma = len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M))
    mma = len(re.findall(r"^\s*mma\.sync", ptx, re.M))
    fma32 = len(re.findall(r"^\s*fma\.rn\.f32", ptx, re.M))
    dots, dots_tc = _count_dots(kernel.asm.get("ttgir", ""))
    cuobjdump = find_tool("cuobjdump")
    if not cuobjdump:
        raise RuntimeError("cuobjdump not found: cannot read registers from the cubin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=120)
    fns = [u for per in parse_resource_usage(res.stdout).values() for u in per.values()]
    if not fns:
        raise RuntimeError(f"cuobjdump --dump-resource-usage gave no function: {res.stderr.strip()[:200]}")
    u = fns[0]
    shared = int(getattr(kernel.metadata, "shared", 0) or 0) + u["shared"]
    num_warps = int(kernel.metadata.num_warps)
    return {
        "registers": u["registers"],
        "spill_bytes": u["stack"] + u["local"],
        "stack_bytes": u["stack"],
        "shared_bytes": shared,
        "num_warps": num_warps,
        **gpu_limits.occupancy(arch, u["registers"], num_warps, shared),
        "tensor_core_instructions": wgmma + mma,
        "wgmma": wgmma,
        "mma_sync": mma,
        "ptx_fma_f32": fma32,
        "dots": dots,
        "dots_on_tensor_cores": dots_tc,
    }


def _compile_group(job: dict) -> list[dict]:
    """Worker: compile one (kernel, arch, dtype, mask) at every stage; identical specialisations once."""
    _worker_init()
    t0 = time.perf_counter()
    results = []
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler.compiler import make_backend

        mod = importlib.import_module(job["module"])
        fn = getattr(mod, job["kernel"])
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            raise RuntimeError(f"{job['kernel']} is not a compiled JIT function (TRITON_INTERPRET was on at import)")
        if job.get("path", "eager") == "inductor":
            fn = inductor_kernel(fn)
        cc = int(job["arch"].split("_")[1])
        target = GPUTarget("cuda", cc, 32)
        backend = make_backend(target)
        _, direction, build_args = TRITON_KERNELS[job["kernel"]]
        sms = 132 if cc >= 90 else 108
    except Exception as exc:  # import or setup failure: every stage of the group gets the error
        return [{"stage_index": i, "error": f"{type(exc).__name__}: {exc}"} for i in range(len(job["stages"]))]
    dtype = _torch_dtype(job["dtype"])
    for i, st in enumerate(job["stages"]):
        rec: dict = {"stage_index": i, "shared_limit_bytes": gpu_limits.ARCH_LIMITS[job["arch"]].smem_per_block}
        try:
            reason = mod.resource_reason(st.window**2, st.C // st.heads, dtype, cc)
            if reason:
                rec.update(declined=reason, error=None)
                results.append(rec)
                continue
            config = mod.launch_config(direction, st.window**2, st.C // st.heads, dtype, job["has_mask"], cc)
            args = build_args(direction, st, job["dtype"], job["has_mask"], sms)
            sig, constexprs, attrs, options = _specialise(fn, backend, args, config)
            key = (
                job["module"],
                job["kernel"],
                job.get("path", "eager"),
                job["arch"],
                repr(sorted(sig.items())),
                repr(sorted(constexprs.items())),
                repr(sorted(attrs.items())),
                repr(sorted(options.items())),
            )
            if key not in _COMPILED:
                t = time.perf_counter()
                kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options)
                _COMPILED[key] = dict(_kernel_metrics(kernel, job["arch"]), compile_s=round(time.perf_counter() - t, 2))
                if job.get("keep_ttgir"):  # tests read the IR
                    _COMPILED[key]["ttgir"] = kernel.asm.get("ttgir", "")
            rec.update(_COMPILED[key])
            rec["config"] = {k: v for k, v in config.items()}
            rec["error"] = None
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            rec["error"] = f"{type(exc).__name__}: {msg[0] if msg else ''}"[:400]
        results.append(rec)
    results.append({"group_s": round(time.perf_counter() - t0, 2)})
    return results


def triton_jobs(
    stages: list[StageShape], archs=ARCHS, dtypes=DTYPES, path: str = "eager", kernels=None
) -> tuple[list[dict], list[dict]]:
    """(compile jobs, error records for *_kernel functions the report cannot launch); ``kernels``:
    only these (the inductor path: the kernels Inductor re-emits)."""
    jobs, errors = [], []
    for module in KERNEL_MODULES:
        names = _kernel_names(module)
        for name in names:
            if kernels is not None and name not in kernels:
                continue
            if name not in TRITON_KERNELS:
                errors.append(
                    {
                        "kind": "static",
                        "backend": "triton",
                        "kernel": name,
                        "op": None,
                        "direction": None,
                        "dtype": None,
                        "stage": None,
                        "arch": None,
                        "error": f"{module}.{name} has no launch description in bench/compile_report.py TRITON_KERNELS",
                    }
                )
                continue
            for arch in archs:
                for dt in dtypes:
                    for has_mask in (False, True):
                        sel = [s for s in stages if s.shifted or not has_mask]
                        if dt == "fp64":  # gradcheck only, never at batch 128: the first stage of each preset
                            sel = [s for s in sel if s.stage == min(x.stage for x in sel)]
                        if sel:
                            job = {"module": module, "kernel": name, "arch": arch, "dtype": dt, "has_mask": has_mask}
                            jobs.append(dict(job, stages=sel, path=path))
    # longest first (backward, fp64, fp32, sm_90 compile slowest): a shorter makespan on few cores
    cost = {"fp64": 3, "fp32": 2}
    jobs.sort(
        key=lambda j: (TRITON_KERNELS[j["kernel"]][1] == "backward", cost.get(j["dtype"], 1), j["arch"], len(j["stages"])),
        reverse=True,
    )
    return jobs, errors


def _kernel_names(module: str) -> list[str]:
    """Names of the ``*_kernel`` Triton functions defined in a module, read from its source (the
    module may be imported with the interpreter on in this process, so it is not inspected)."""
    spec = importlib.util.find_spec(module)
    src = Path(spec.origin).read_text()
    return re.findall(r"@triton\.jit[^\n]*\ndef\s+(\w+_kernel)\s*\(", src)
