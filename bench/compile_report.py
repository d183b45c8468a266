"""``python -m bench --static``: what the GPU kernels compile to, on any machine (no GPU needed).

Triton kernels (every ``*_kernel`` JIT function of ``htsat_kernels.fused``): compiled ahead of
time with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for sm_80 and
sm_90, for each dtype (fp16, bf16, fp32; fp64, meant for gradcheck, apart and at the first stage
only), with and without the shift mask,
at the launch configuration the launcher itself chooses (``launch_config`` of the kernel's module)
for each HTS-AT stage of each preset, with the argument specialisation a real launch at batch 128
would get (Triton's own binder on meta tensors: 16-byte alignment, ints divisible by 16, ints
equal to 1). Per compiled kernel: registers and local-memory (spill) bytes per thread from
``cuobjdump --dump-resource-usage`` of the cubin, shared memory from Triton's metadata, warps,
the blocks and warps per SM that fit (``bench.gpu_limits``), tensor-core instructions in the PTX
(``wgmma.mma_async`` on sm_90, ``mma.sync`` on sm_80; none means the FMA path) and how many of
the TTGIR dots have a tensor-core (``#mma``) result layout.

CUDA kernels (every kernel of the compiled extension ``htsat_kernels/_C*.so``, every arch in
it): registers, local bytes and static shared memory from ``cuobjdump --dump-resource-usage``,
and from the SASS (``nvdisasm``) the number of call sites of the 64-bit integer division and
remainder helpers (``CALL.REL ... __cuda_sm20_{div,rem}_{s,u}64``): each is a ~70-instruction
subroutine that a 32-bit index path or a precomputed divisor avoids (issue #10).

Triton compiles run in a process pool whose workers import the kernels with
``TRITON_INTERPRET=0`` (the calling process may run the interpreter); identical specialisations
are compiled once. A kernel that fails to compile is a record with its error.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import datetime as _dt
import functools
import glob
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import gpu_limits, roofline
from .schema import STATIC_FIELDS

ARCHS = ("sm_80", "sm_90")
DTYPES = ("fp16", "bf16", "fp32", "fp64")
BATCH = 128
ROOFLINE_DEVICES = ("H100 SXM", "H200")
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
    if has_mask:
        mask = meta((st.nW, N, N), dtype=side)
        mask_args = dict(mask_ptr=mask, s_mw=mask.stride(0), s_mi=mask.stride(1), s_mj=mask.stride(2), nW=st.nW)
    else:  # the launcher passes qkv as a dummy pointer with zero strides and nW = 1
        mask_args = dict(mask_ptr=qkv, s_mw=0, s_mi=0, s_mj=0, nW=1)
    common = dict(qkv_ptr=qkv, table_ptr=table, s_qb=qkv.stride(0), s_qn=qkv.stride(1), s_qc=qkv.stride(2),
                  s_tr=table.stride(0), s_th=table.stride(1), C=C, scale_hi=(C // h) ** -0.5, scale_lo=0.0, **mask_args)
    if direction == "forward":
        out = meta((B_, N, C), dtype=lo)
        return dict(common, out_ptr=out, lse_ptr=meta((B_, h, N), dtype=acc),
                    s_ob=out.stride(0), s_on=out.stride(1), s_oc=out.stride(2))
    # backward: one program per (group of windows, head), about 4 programs per SM (the launcher's
    # _num_groups on a device with `sms` SMs); only the divisibility of windows_per_group matters here.
    groups = min(B_, max(1, -(-4 * sms // h)))
    per_group = -(-B_ // groups)
    do, dqkv = meta((B_, N, C), dtype=lo), meta((B_, N, 3 * C), dtype=lo)
    return dict(common, do_ptr=do, lse_ptr=meta((B_, h, N), dtype=acc), dqkv_ptr=dqkv,
                dbias_ptr=meta((groups, h, N, N), dtype=acc),
                s_db=do.stride(0), s_dn=do.stride(1), s_dc=do.stride(2),
                s_gb=dqkv.stride(0), s_gn=dqkv.stride(1), s_gc=dqkv.stride(2),
                B=B_, windows_per_group=per_group)


# kernel function name -> (op, direction, argument builder). A new *_kernel JIT function without an
# entry here shows up as a record with an error (and fails the CI test), never silently.
TRITON_KERNELS = {
    "_window_attention_fwd_kernel": ("window_attention", "forward", _attention_args),
    "_window_attention_bwd_kernel": ("window_attention", "backward", _attention_args),
}


# --------------------------------------------------------------------------------------------
# Tools


@functools.lru_cache(maxsize=None)
def find_tool(name: str) -> Optional[str]:
    """cuobjdump / nvdisasm: $CUOBJDUMP / $NVDISASM, nvcc's bin dir, $CUDA_HOME/bin, PATH, then
    the copy bundled with Triton (triton/backends/nvidia/bin)."""
    env = os.environ.get(name.upper())
    if env and os.path.isfile(env):
        return env
    dirs = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(os.path.dirname(os.path.realpath(nvcc)))
        try:  # /usr/local/bin/nvcc may be a wrapper script: ask nvcc where it lives
            text = Path(nvcc).read_text(errors="ignore")[:2000]
            dirs += [os.path.dirname(m) for m in re.findall(r"(/\S+/nvcc)\b", text)]
        except OSError:
            pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "bin"))
    dirs.append("/usr/local/cuda/bin")
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.isfile(p):
            return p
    except Exception:  # triton absent: no bundled tools
        pass
    return None


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_resource_usage(text: str) -> dict:
    """``cuobjdump --dump-resource-usage`` output -> {arch: {mangled name: {registers, stack, shared, local}}}."""
    out: dict = {}
    arch, fn = None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+a?)", line)
        if m:
            arch = gpu_limits.arch_name(m.group(1))
            out.setdefault(arch, {})
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            fn = m.group(1)
            continue
        m = _RES_RE.search(line)
        if m and fn is not None:
            reg, stack, shared, local = (int(x) for x in m.groups())
            out.setdefault(arch or "?", {})[fn] = {"registers": reg, "stack": stack, "shared": shared, "local": local}
            fn = None
    return out


_DIV64_RE = re.compile(r"CALL\.REL\S*\s+`?\(?\$?[^)\s]*__cuda_sm\d+_(?:div|rem)_[su]64")
_INSTR_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+\S")


def parse_sass(text: str) -> dict:
    """``nvdisasm`` output -> {mangled kernel: {"int64_div_calls", "sass_instructions"}}.

    A kernel's section holds its body and the helper subroutines it calls; the count is of call
    sites (static), not of executed calls.
    """
    out: dict = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*\.section\s+\.text\.([^,\s]+)", line)
        if m:
            cur = out.setdefault(m.group(1), {"int64_div_calls": 0, "sass_instructions": 0})
            continue
        if cur is None:
            continue
        if _INSTR_RE.search(line):
            cur["sass_instructions"] += 1
            if _DIV64_RE.search(line):
                cur["int64_div_calls"] += 1
    return out


def demangle(names: list[str]) -> dict:
    tool = shutil.which("cu++filt") or find_tool("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60)
        lines = res.stdout.splitlines()
        if res.returncode == 0 and len(lines) == len(names):
            return dict(zip(names, lines))
    except (OSError, subprocess.SubprocessError):
        pass
    return {n: n for n in names}


def short_kernel_name(demangled: str) -> str:
    """``void htsat::(anonymous namespace)::foo_kernel<htsat::X, c10::Half, float>(...)`` -> ``foo_kernel<X, Half, float>``."""
    s = re.sub(r"^void\s+", "", demangled)
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # drop the parameter list (the first '(' outside template brackets)
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not s[i:].startswith("(anonymous"):
            cut = i
            break
    s = s[:cut]
    return re.sub(r"\(anonymous namespace\)::|htsat::|c10::", "", s)


_CUDA_DTYPES = (("BFloat16", "bf16"), ("Half", "fp16"), ("double", "fp64"), ("float", "fp32"),
                ("unsigned char", "8-bit"), ("unsigned short", "16-bit"), ("unsigned int", "32-bit"),
                ("unsigned long", "64-bit"), ("uint4", "128-bit"), ("uint2", "64-bit"))


def classify_cuda_kernel(short: str) -> dict:
    """op / direction / dtype of a CUDA kernel from its name (heuristic: the names say what they do)."""
    base = short.split("<", 1)[0]
    targs = short[len(base):]
    dtype = next((tag for key, tag in _CUDA_DTYPES if key in targs), None)
    if "param_reduce" in base:  # the final weight/bias reduction shared by every gathered LayerNorm
        op = "layer_norm_window_partition/patch_merge"
    elif "layer_norm" in base:
        op = "patch_merge" if "PatchMerge" in targs else ("layer_norm_window_partition" if "WindowRows" in targs else "layer_norm")
    elif "merge_add" in base:
        op = "window_merge_add"
    elif "window_copy" in base or "partition" in base or "merge" in base:
        op = "window_partition/window_merge"
    elif "patch_merge" in base:
        op = "patch_merge"
    else:
        op = None
    direction = "backward" if ("backward" in base or "partials" in base or "param_reduce" in base) else "forward"
    return {"op": op, "direction": direction, "dtype": dtype}


def extension_path() -> Optional[str]:
    spec = importlib.util.find_spec("htsat_kernels")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(d, "_C*.so")) + glob.glob(os.path.join(d, "_C*.pyd")))
        if hits:
            return hits[0]
    return None


def cuda_records(so_path: Optional[str] = None) -> tuple[list[dict], Optional[str]]:
    """Records of every CUDA kernel in the extension, and a note when there are none to read."""
    so_path = so_path or extension_path()
    if not so_path:
        return [], "no compiled extension (htsat_kernels/_C*.so) found: build it with `make build`"
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if not cuobjdump:
        return [], "cuobjdump not found (nvcc's bin dir, $CUDA_HOME/bin, PATH, Triton's bundled tools)"
    records = []
    with tempfile.TemporaryDirectory(prefix="htsat_static_") as tmp:
        listing = subprocess.run([cuobjdump, "--list-elf", so_path], capture_output=True, text=True, timeout=120)
        if listing.returncode != 0 or not listing.stdout.strip():
            return [], f"the extension {os.path.basename(so_path)} has no CUDA device code (a CPU-only build)"
        subprocess.run([cuobjdump, "-xelf", "all", so_path], cwd=tmp, capture_output=True, text=True, timeout=300, check=True)
        cubins = sorted(glob.glob(os.path.join(tmp, "*.cubin")))
        for cubin in cubins:
            res = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True, timeout=120)
            usage = parse_resource_usage(res.stdout)
            m = re.search(r"\.(sm_\d+a?)\.cubin$", cubin)
            if m and "?" in usage:  # a lone cubin's listing may not name its arch: take it from the file name
                usage[gpu_limits.arch_name(m.group(1))] = usage.pop("?")
            sass: dict = {}
            if nvdisasm:
                dis = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, timeout=300)
                if dis.returncode == 0:
                    sass = parse_sass(dis.stdout)
            for arch, fns in usage.items():
                names = demangle(list(fns))
                for mangled, u in fns.items():
                    short = short_kernel_name(names[mangled])
                    occ = gpu_limits.occupancy(arch, u["registers"], None) if arch in gpu_limits.ARCH_LIMITS else {}
                    s = sass.get(mangled, {})
                    records.append({
                        "kind": "static", "backend": "cuda", "kernel": short, "symbol": mangled,
                        **classify_cuda_kernel(short), "stage": None, "arch": arch,
                        "registers": u["registers"], "spill_bytes": u["stack"] + u["local"], "stack_bytes": u["stack"],
                        "shared_bytes": u["shared"], "num_warps": None, "blocks_per_sm": None,
                        "warps_per_sm": occ.get("warps_per_sm"), "occupancy_limit": "registers (block size set by the host)",
                        "tensor_core_instructions": None,
                        "int64_div_calls": s.get("int64_div_calls") if nvdisasm else None,
                        "sass_instructions": s.get("sass_instructions"), "error": None,
                    })
    records.sort(key=lambda r: (r["arch"], r["kernel"]))
    return records, None


# --------------------------------------------------------------------------------------------
# Triton: compile in worker processes


def _worker_init() -> None:
    # the kernels must be real JIT functions, not the interpreter's: set before htsat_kernels loads
    os.environ["TRITON_INTERPRET"] = "0"


_COMPILED: dict = {}  # specialisation key -> metrics (per process)


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
    bound, spec, _ = binder(**args, **kwargs)
    names = [p.name for p in fn.params]
    signature = {n: s[0] for n, s in zip(names, spec)}
    constexprs = {(i,): bound[n] for i, (n, s) in enumerate(zip(names, spec)) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, (n, s) in enumerate(zip(names, spec))
             if s[0] != "constexpr" and isinstance(s[1], str)}
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
        "registers": u["registers"], "spill_bytes": u["stack"] + u["local"], "stack_bytes": u["stack"], "shared_bytes": shared,
        "num_warps": num_warps, **gpu_limits.occupancy(arch, u["registers"], num_warps, shared),
        "tensor_core_instructions": wgmma + mma, "wgmma": wgmma, "mma_sync": mma, "ptx_fma_f32": fma32,
        "dots": dots, "dots_on_tensor_cores": dots_tc,
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
        cc = int(job["arch"].split("_")[1])
        target = GPUTarget("cuda", cc, 32)
        backend = make_backend(target)
        _, direction, build_args = TRITON_KERNELS[job["kernel"]]
        sms = 132 if cc >= 90 else 108
    except Exception as exc:  # import or setup failure: every stage of the group gets the error
        return [{"stage_index": i, "error": f"{type(exc).__name__}: {exc}"} for i in range(len(job["stages"]))]
    dtype = _torch_dtype(job["dtype"])
    for i, st in enumerate(job["stages"]):
        rec: dict = {"stage_index": i}
        try:
            config = mod.launch_config(direction, st.window**2, st.C // st.heads, dtype, job["has_mask"])
            args = build_args(direction, st, job["dtype"], job["has_mask"], sms)
            sig, constexprs, attrs, options = _specialise(fn, backend, args, config)
            key = (job["module"], job["kernel"], job["arch"], repr(sorted(sig.items())), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), repr(sorted(options.items())))
            if key not in _COMPILED:
                t = time.perf_counter()
                kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options)
                _COMPILED[key] = dict(_kernel_metrics(kernel, job["arch"]), compile_s=round(time.perf_counter() - t, 2))
            rec.update(_COMPILED[key])
            rec["config"] = {k: v for k, v in config.items()}
            rec["error"] = None
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            rec["error"] = f"{type(exc).__name__}: {msg[0] if msg else ''}"[:400]
        results.append(rec)
    results.append({"group_s": round(time.perf_counter() - t0, 2)})
    return results


def triton_jobs(stages: list[StageShape], archs=ARCHS, dtypes=DTYPES) -> tuple[list[dict], list[dict]]:
    """(compile jobs, error records for *_kernel functions the report cannot launch)."""
    jobs, errors = [], []
    for module in KERNEL_MODULES:
        names = _kernel_names(module)
        for name in names:
            if name not in TRITON_KERNELS:
                errors.append({"kind": "static", "backend": "triton", "kernel": name, "op": None, "direction": None,
                               "dtype": None, "stage": None, "arch": None,
                               "error": f"{module}.{name} has no launch description in bench/compile_report.py TRITON_KERNELS"})
                continue
            for arch in archs:
                for dt in dtypes:
                    for has_mask in (False, True):
                        sel = [s for s in stages if s.shifted or not has_mask]
                        if dt == "fp64":  # gradcheck only, never at batch 128: the first stage of each preset
                            sel = [s for s in sel if s.stage == min(x.stage for x in sel)]
                        if sel:
                            jobs.append({"module": module, "kernel": name, "arch": arch, "dtype": dt, "has_mask": has_mask, "stages": sel})
    # longest first (backward, fp64, fp32, sm_90 compile slowest): a shorter makespan on few cores
    cost = {"fp64": 3, "fp32": 2}
    jobs.sort(key=lambda j: (TRITON_KERNELS[j["kernel"]][1] == "backward", cost.get(j["dtype"], 1), j["arch"], len(j["stages"])),
              reverse=True)
    return jobs, errors


def _kernel_names(module: str) -> list[str]:
    """Names of the ``*_kernel`` Triton functions defined in a module, read from its source (the
    module may be imported with the interpreter on in this process, so it is not inspected)."""
    spec = importlib.util.find_spec(module)
    src = Path(spec.origin).read_text()
    return re.findall(r"@triton\.jit[^\n]*\ndef\s+(\w+_kernel)\s*\(", src)


# --------------------------------------------------------------------------------------------
# Roofline at batch 128 (H100 SXM, H200)


def placeholder_flops(op: str, st, batch: int, direction: str) -> int:
    """FLOPs of one call. PLACEHOLDER until the op table (branch `optable`) supplies each op's
    formula: the integrator replaces this with it. Attention: 2 matmuls (QK^T, PV) forward, 5
    backward (recomputed QK^T, dV, dP, dQ, dK), 2·N·N·C FLOPs each per window; the data-movement
    and LayerNorm ops do O(1) FLOPs per element, negligible against their bytes (0 here)."""
    if op != "window_attention":
        return 0
    N = st.window**2
    per_matmul = 2 * batch * st.nW * N * N * st.C
    return (2 if direction == "forward" else 5) * per_matmul


def _ops_stage(st: StageShape):
    from . import ops

    return ops.Stage(st.stage, st.H, st.W, st.C, st.heads, st.window // 2 if st.shifted else 0)


def op_bytes(op: str, st: StageShape, batch: int, elem: int, direction: str) -> Optional[int]:
    """Bytes moved per call from bench/ops.py's formula (None if it is unavailable)."""
    try:
        from . import ops

        return ops.op_bytes(op, _ops_stage(st), batch, elem, direction)[0]
    except Exception:  # the op table may rename it; the ideal time is then left out
        return None


def ideal_us(op: str, st: StageShape, direction: str, dtype: str, batch: int = BATCH) -> dict:
    elem = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}.get(dtype, 2)
    nbytes = op_bytes(op, st, batch, elem, direction)
    flops = placeholder_flops(op, st, batch, direction)
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
                rows.append({"op": op, "stage": st.label, "direction": direction, "dtype": dtype, "batch": BATCH,
                             "bytes": nbytes, "flops": placeholder_flops(op, st, BATCH, direction),
                             "ideal_us": ideal_us(op, st, direction, dtype)})
    return rows


# --------------------------------------------------------------------------------------------
# The report


def build_report(archs=ARCHS, dtypes=DTYPES, stages: Optional[list[StageShape]] = None, workers: Optional[int] = None,
                 include_cuda: bool = True, progress=None) -> dict:
    """Compile everything and return {"meta": ..., "records": [...], "roofline": [...]}."""
    t0 = time.perf_counter()
    stages = stages if stages is not None else preset_stages()
    jobs, records = triton_jobs(stages, archs, dtypes)
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    group_s = []
    results: list = [None] * len(jobs)
    if jobs:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(_compile_group, job): i for i, job in enumerate(jobs)}
            cuda_recs, cuda_note = cuda_records() if include_cuda else ([], "CUDA kernels not requested")
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except Exception as exc:  # a crashed worker: the whole group is an error
                    results[i] = [{"stage_index": k, "error": f"{type(exc).__name__}: {exc}"} for k in range(len(jobs[i]["stages"]))]
                if progress:
                    progress(sum(r is not None for r in results), len(jobs))
    else:
        cuda_recs, cuda_note = cuda_records() if include_cuda else ([], "CUDA kernels not requested")
    for job, res in zip(jobs, results):
        op, direction, _ = TRITON_KERNELS[job["kernel"]]
        for r in res:
            if "group_s" in r:
                group_s.append(r["group_s"])
                continue
            st = job["stages"][r.pop("stage_index")]
            rec = {"kind": "static", "backend": "triton", "kernel": job["kernel"], "op": op, "direction": direction,
                   "dtype": job["dtype"], "stage": st.label, "preset": st.preset, "arch": job["arch"],
                   "has_mask": job["has_mask"], "shape": f"B={BATCH} H={st.H} W={st.W} C={st.C} h={st.heads} ws={st.window}"}
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
        "flops_note": "ideal_us uses bench.compile_report.placeholder_flops until the op table's FLOPs formula replaces it",
        "definitions": {
            "registers": "32-bit registers per thread (cuobjdump --dump-resource-usage REG)",
            "spill_bytes": "stack frame + local memory per thread in bytes (cuobjdump STACK + LOCAL): ptxas puts spilled "
                           "registers in the stack frame; these kernels have no local arrays and no ABI calls that need one",
            "shared_bytes": "shared memory per block (Triton metadata + static SHARED)",
            "blocks_per_sm": "resident blocks per SM allowed by registers, shared memory, warp and block limits",
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
    groups: dict = {}
    keys = ("registers", "spill_bytes", "shared_bytes", "num_warps", "blocks_per_sm", "warps_per_sm", "wgmma", "mma_sync", "dots",
            "dots_on_tensor_cores", "error")
    for r in records:
        g = (r["kernel"], r["direction"], r["dtype"], r["has_mask"], r["arch"]) + tuple(str(r.get(k)) for k in keys)
        groups.setdefault(g, []).append(r)
    rows = []
    for recs in groups.values():
        r = recs[0]
        stages = _stage_span([x["stage"] for x in recs])
        presets = sorted({x["preset"] for x in recs})
        if r.get("error"):
            rows.append([r["direction"], r["dtype"], "yes" if r["has_mask"] else "no", stages, r["arch"], "ERROR: " + r["error"][:90]])
            continue
        tc = f"{r['wgmma']} wgmma" if r.get("wgmma") else (f"{r['mma_sync']} mma" if r.get("mma_sync") else "none (FMA)")
        rows.append([
            r["direction"], r["dtype"], "yes" if r["has_mask"] else "no", stages + ("" if len(presets) > 1 else f" ({presets[0]})"),
            r["arch"], str(r["registers"]), str(r["spill_bytes"]), _kb(r["shared_bytes"]), str(r["num_warps"]),
            f"{r['blocks_per_sm']} ({r['warps_per_sm']} warps, {r['occupancy_limit']})", tc,
            f"{r['dots_on_tensor_cores']}/{r['dots']}",
        ])
    return rows


def render_text(report: dict) -> str:
    from .report import format_table

    meta, records = report["meta"], report["records"]
    lines = ["=" * 100, "htsat-kernels compile report (static: no GPU used)",
             f"triton {meta['triton']}   archs {', '.join(meta['archs'])}   cuobjdump {meta['cuobjdump'] or 'not found'}",
             f"extension {meta['extension'] or 'not built'}", "=" * 100]
    tri = [r for r in records if r.get("backend") == "triton"]
    hdr = ["dir", "dtype", "mask", "stages", "arch", "regs", "spill B", "smem KB", "warps", "blocks/SM (warps/SM, limit)",
           "tensor cores", "TC dots"]
    for title, sel in (("Triton kernels (fp16, bf16, fp32)", [r for r in tri if r.get("dtype") != "fp64"]),
                       ("Triton kernels in fp64 (meant for gradcheck)", [r for r in tri if r.get("dtype") == "fp64"])):
        by_kernel: dict = {}
        for r in sel:
            by_kernel.setdefault(r["kernel"], []).append(r)
        if not by_kernel:
            continue
        lines += ["", f"#### {title}: batch {BATCH}, every stage of every preset (identical rows merged)"]
        for kernel, recs in by_kernel.items():
            rows = _triton_rows(recs)
            lines += ["", f"-- {kernel}", format_table(hdr[: max(len(x) for x in rows)], rows, right={5, 6, 7, 8})]
    cu = [r for r in records if r.get("backend") == "cuda"]
    lines += ["", "#### CUDA kernels of the extension (block size is set by the host: warps/SM is the register limit)"]
    if not cu:
        lines.append(f"  none: {meta.get('cuda_note')}")
    else:
        rows = [[r["arch"], r["kernel"][:78], str(r["registers"]), str(r["spill_bytes"]), str(r["shared_bytes"]),
                 str(r["warps_per_sm"]), "-" if r.get("int64_div_calls") is None else str(r["int64_div_calls"]),
                 "-" if r.get("sass_instructions") is None else str(r["sass_instructions"])] for r in cu]
        lines.append(format_table(["arch", "kernel", "regs", "spill B", "smem B", "warps/SM", "int64 div calls", "SASS instr"], rows,
                                  right={2, 3, 4, 5, 6, 7}))
    rl = report.get("roofline") or []
    if rl:
        devs = list(ROOFLINE_DEVICES)
        lines += ["", f"#### Roofline: ideal time per call at batch {BATCH}, bf16 (max of bytes / HBM bandwidth and FLOPs / dense bf16 peak)"]
        rows = [[r["op"], r["stage"], r["direction"], f"{(r['bytes'] or 0) / 1e6:.1f}", f"{r['flops'] / 1e9:.1f}"]
                + ["-" if r["ideal_us"].get(d) is None else f"{r['ideal_us'][d]:.1f}" for d in devs] for r in rl]
        lines.append(format_table(["op", "stage", "dir", "MB", "GFLOP"] + [f"{d} us" for d in devs], rows, right={3, 4, 5, 6}))
        lines.append("  FLOPs: placeholder formula (bench.compile_report.placeholder_flops) until the op table provides them.")
    errors = [r for r in records if r.get("error")]
    lines += ["", f"{len(records)} records, {len(errors)} with errors; Triton compile time {meta['compile_wall_s']} s "
                  f"in {meta['workers']} worker(s); wall {meta['wall_s']} s"]
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
            w.writerow(["" if r.get(c) is None else (json.dumps(r[c], sort_keys=True) if isinstance(r.get(c), (dict, list)) else r[c])
                        for c in list(STATIC_FIELDS) + extra])
    return {"json": json_path, "csv": csv_path}


def main(out_dir: Path, archs=ARCHS, dtypes=DTYPES) -> int:
    import sys

    def progress(done, total):
        print(f"\rcompile report: {done}/{total} kernel groups compiled", end="" if done < total else "\n", file=sys.stderr, flush=True)

    report = build_report(archs=archs, dtypes=dtypes, progress=progress)
    print(render_text(report))
    paths = write_files(out_dir, report)
    print(f"\nresults: {paths['json']}\n         {paths['csv']}")
    return 0
