"""The CUDA side of the compile report: find the CUDA binary tools and read every kernel of the
compiled extension (``htsat_kernels/_C*.so``), for every arch built into it.

Per kernel: registers, stack and local bytes and static shared memory from
``cuobjdump --dump-resource-usage``; the block size from the kernel's ``__launch_bounds__`` (the
``EIATTR_MAX_THREADS`` attribute of ``cuobjdump -elf``), which is the block the host launcher uses
(every kernel in csrc/ is launched with the constant of its bound; ``param_reduce_kernel`` with 8 x
lanes threads, lanes = 64 from 512 row chunks on, which every HTS-AT stage at B >= 4 reaches), and
the occupancy that follows at that block size (``num_warps``, ``blocks_per_sm``; dynamic shared
memory set at launch, the LayerNorm backward's column window, is not in it); and from the SASS (``nvdisasm``) the number of call sites
of the 64-bit integer division and remainder helpers (``CALL.REL ... __cuda_sm20_{div,rem}_{s,u}64``,
about 70 instructions each, that a 32-bit index path or a precomputed divisor avoids; issue #10).
Kernels are found in the binary, not by source file name.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import gpu_limits

# --------------------------------------------------------------------------------------------
# Tools


@functools.cache
def find_tool(name: str) -> str | None:
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


def parse_max_threads(text: str) -> dict:
    """``cuobjdump -elf`` output of one cubin -> {mangled kernel: threads per block of its
    ``__launch_bounds__``}; a kernel without a bound is absent."""
    out: dict = {}
    fn, pending = None, False
    for line in text.splitlines():
        m = re.match(r"\s*\.nv\.info\.(\S+)\s*$", line)
        if m:
            fn, pending = m.group(1), False
            continue
        if "EIATTR_MAX_THREADS" in line:
            pending = True
            continue
        m = re.match(r"\s*Value:\s+((?:0x[0-9a-fA-F]+\s*)+)$", line)
        if pending and m and fn is not None:
            threads = 1
            for v in m.group(1).split():  # x, y, z
                threads *= int(v, 16)
            out[fn] = threads
            pending = False
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


_CUDA_DTYPES = (
    ("BFloat16", "bf16"),
    ("Half", "fp16"),
    ("double", "fp64"),
    ("float", "fp32"),
    ("unsigned char", "8-bit"),
    ("unsigned short", "16-bit"),
    ("unsigned int", "32-bit"),
    ("unsigned long", "64-bit"),
    ("uint4", "128-bit"),
    ("uint2", "64-bit"),
)


def classify_cuda_kernel(short: str) -> dict:
    """op / direction / dtype of a CUDA kernel from its name (heuristic: the names say what they do)."""
    base = short.split("<", 1)[0]
    targs = short[len(base) :]
    dtype = next((tag for key, tag in _CUDA_DTYPES if key in targs), None)
    if "param_reduce" in base:  # the final weight/bias reduction shared by every gathered LayerNorm
        op = "layer_norm_window_partition/patch_merge"
    elif "layer_norm" in base:
        op = (
            "patch_merge" if "PatchMerge" in targs else ("layer_norm_window_partition" if "WindowRows" in targs else "layer_norm")
        )
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


def extension_path() -> str | None:
    spec = importlib.util.find_spec("htsat_kernels")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(d, "_C*.so")) + glob.glob(os.path.join(d, "_C*.pyd")))
        if hits:
            return hits[0]
    return None


def cuda_records(so_path: str | None = None) -> tuple[list[dict], str | None]:
    """Records of every CUDA kernel in the extension, and a note when there are none to read."""
    so_path = so_path or extension_path()
    if not so_path:
        return [], "no compiled extension (htsat_kernels/_C*.so) found: build it with `make build`"
    so_path = os.path.abspath(so_path)  # cuobjdump extracts into a temporary folder it runs in
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
            elf = subprocess.run([cuobjdump, "-elf", cubin], capture_output=True, text=True, timeout=120)
            block_threads = parse_max_threads(elf.stdout)
            sass: dict = {}
            if nvdisasm:
                dis = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, timeout=300)
                if dis.returncode == 0:
                    sass = parse_sass(dis.stdout)
            for arch, fns in usage.items():
                names = demangle(list(fns))
                for mangled, u in fns.items():
                    short = short_kernel_name(names[mangled])
                    threads = block_threads.get(mangled)
                    warps = -(-threads // 32) if threads else None
                    occ = gpu_limits.occupancy(arch, u["registers"], warps, u["shared"]) if arch in gpu_limits.ARCH_LIMITS else {}
                    s = sass.get(mangled, {})
                    records.append(
                        {
                            "kind": "static",
                            "backend": "cuda",
                            "kernel": short,
                            "symbol": mangled,
                            **classify_cuda_kernel(short),
                            "stage": None,
                            "arch": arch,
                            "registers": u["registers"],
                            "spill_bytes": u["stack"] + u["local"],
                            "stack_bytes": u["stack"],
                            "shared_bytes": u["shared"],
                            "block_threads": threads,
                            "num_warps": warps,
                            "blocks_per_sm": occ.get("blocks_per_sm"),
                            "warps_per_sm": occ.get("warps_per_sm"),
                            "occupancy_limit": occ.get("occupancy_limit") if warps else "registers (no launch bound)",
                            "tensor_core_instructions": None,
                            "int64_div_calls": s.get("int64_div_calls") if nvdisasm else None,
                            "sass_instructions": s.get("sass_instructions"),
                            "error": None,
                        }
                    )
    records.sort(key=lambda r: (r["arch"], r["kernel"]))
    return records, None
