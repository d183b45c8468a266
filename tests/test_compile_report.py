"""The compile report (``python -m bench --static``) as CI checks: the GPU kernels compile for
sm_80 and sm_90 on this CPU machine, and use the hardware as the design says.

A representative subset is compiled (every Triton kernel, sm_80 and sm_90, bf16 and fp16, the
first HTS-AT stage with and without the shift mask: its specialisation is that of a real launch at
batch 128; then bf16, fp16 and fp32 at the first stage of HTS-AT and of clap-large);
``python -m bench --static`` compiles every stage, preset and dtype. Known shortfalls are strict
xfails naming the issue that fixes them, so the fix flips the test.
"""

import os
import re

import pytest

from bench import compile_report as cr
from bench import gpu_limits
from bench import static_cuda as sc
from bench import static_triton as st

triton = pytest.importorskip("triton")

ARCHS = ("sm_80", "sm_90")
DTYPES = ("bf16", "fp16")


@pytest.fixture(scope="module")
def report():
    stage1 = [s for s in st.preset_stages() if s.preset == "htsat-audioset" and s.stage == 1]
    assert stage1 and stage1[0].shifted  # stage 1 has both block kinds: masked and unmasked variants
    return cr.build_report(archs=ARCHS, dtypes=DTYPES, stages=stage1, include_cuda=False)


def _triton(report, direction=None):
    recs = [r for r in report["records"] if r.get("backend") == "triton"]
    return [r for r in recs if direction is None or r["direction"] == direction]


def _ids(recs):
    return [f"{r['kernel']} {r['dtype']} {r['arch']} mask={r['has_mask']}" for r in recs]


def test_every_triton_kernel_has_a_launch_description_and_compiles(report):
    names = set(st._kernel_names("htsat_kernels.fused.window_attention"))
    assert names == set(st.TRITON_KERNELS)
    recs = _triton(report)
    errors = [r for r in report["records"] if r.get("error")]
    assert not errors, errors
    got = {(r["kernel"], r["arch"], r["dtype"], r["has_mask"]) for r in recs}
    want = {(k, a, d, m) for k in names for a in ARCHS for d in DTYPES for m in (False, True)}
    assert got == want
    for r in recs:
        assert r["registers"] > 0 and r["num_warps"] > 0 and r["blocks_per_sm"] >= 1, r
        assert r["ideal_us"]["H100 SXM"] > r["ideal_us"]["H200"] > 0  # H200 has more bandwidth


def test_every_dot_lowers_to_tensor_cores(report):
    for r in _triton(report):
        assert r["dots"] > 0, r
        assert r["dots_on_tensor_cores"] == r["dots"], _ids([r])
        key = "wgmma" if r["arch"] == "sm_90" else "mma_sync"
        assert r[key] > 0 and r["tensor_core_instructions"] == r["wgmma"] + r["mma_sync"], _ids([r])


def test_attention_forward_does_not_spill(report):
    bad = [r for r in _triton(report, "forward") if r["spill_bytes"]]
    assert not bad, _ids(bad)


def test_attention_backward_does_not_spill(report):
    bad = [r for r in _triton(report, "backward") if r["spill_bytes"]]
    assert not bad, _ids(bad)


def test_attention_backward_fits_four_blocks_per_sm(report):
    bad = [r for r in _triton(report, "backward") if r["registers"] > 128 or r["blocks_per_sm"] < 4]
    assert not bad, _ids(bad)


def test_report_launches_what_the_launcher_launches(report):
    import torch

    from htsat_kernels.fused import window_attention as wa

    stage = next(s for s in st.preset_stages() if s.stage == 1)
    for r in _triton(report):
        want = wa.launch_config(
            r["direction"],
            stage.window**2,
            stage.C // stage.heads,
            getattr(torch, {"bf16": "bfloat16"}.get(r["dtype"], "float16")),
            r["has_mask"],
            int(r["arch"].split("_")[1]),  # the launcher reads the device's compute capability
        )
        want["PREC"] = "ieee"  # the launcher's choice when compiled (this process runs the interpreter)
        assert r["config"] == want


def test_backward_config_follows_the_arch():
    """Wide heads (clap-large, d = 64) split the head dim in chunks, narrower on sm_80 (no wgmma);
    the N > 64 and fp64 paths take one chunk; fp32 takes narrow chunks everywhere."""
    import torch

    from htsat_kernels.fused import window_attention as wa

    def dc(N, d, dtype, arch):
        return wa.launch_config("backward", N, d, dtype, True, arch)["DC"]

    assert dc(64, 24, torch.bfloat16, 80) == dc(64, 24, torch.bfloat16, 90) == 32  # HTS-AT: one chunk
    assert (dc(64, 64, torch.bfloat16, 80), dc(64, 64, torch.bfloat16, 90), dc(64, 64, torch.bfloat16, None)) == (16, 32, 32)
    assert dc(64, 24, torch.float32, 80) == 16 and dc(64, 64, torch.float32, 90) == 16
    assert dc(144, 64, torch.bfloat16, 80) == 64 and dc(64, 24, torch.float64, 80) == 32
    assert "DC" not in wa.launch_config("forward", 64, 64, torch.bfloat16, True, 80)
    # the fp32 forward takes 16 query rows per program on sm_80 (no spills), 64 on sm_90
    assert [wa.launch_config("forward", 64, 24, torch.float32, True, a)["BLOCK_M"] for a in (80, 90, None)] == [16, 64, 64]


@pytest.fixture(scope="module")
def report_wide():
    """Stage 1 of HTS-AT (d = 24) and of clap-large (d = 64), both archs, both block kinds, in
    bf16, fp16 and fp32 (the HTS-AT bf16/fp16 kernels are those of ``report``: cached)."""
    stages = [s for s in st.preset_stages() if s.stage == 1 and s.preset in ("htsat-audioset", "clap-htsat-large")]
    assert len(stages) == 2
    return cr.build_report(archs=ARCHS, dtypes=("bf16", "fp16", "fp32"), stages=stages, include_cuda=False)


@pytest.mark.parametrize("arch,dtype", [(a, d) for a in ARCHS for d in DTYPES])
def test_wide_head_backward_keeps_sixteen_warps_per_sm(report_wide, arch, dtype):
    """clap-large (d = 64): the chunked backward without spills, <= 128 registers and at least 16 resident
    warps per SM: 4 blocks of 4 warps at sm_80, 3 blocks of 8 warps (two warpgroups) at sm_90."""
    recs = [r for r in _triton(report_wide, "backward") if r["preset"] == "clap-htsat-large" and r["arch"] == arch]
    recs = [r for r in recs if r["dtype"] == dtype]
    assert len(recs) == 2 and all(r["config"]["DC"] < r["config"]["BLOCK_D"] for r in recs)  # the chunked path
    assert {r["num_warps"] for r in recs} == {8 if arch == "sm_90" else 4}
    bad = [r for r in recs if r["spill_bytes"] or r["registers"] > 128 or r["blocks_per_sm"] * r["num_warps"] < 16]
    assert not bad, [(r["registers"], r["blocks_per_sm"], r["num_warps"]) for r in bad]


def test_fp32_attention_uses_tensor_cores_without_spills(report_wide):
    import torch

    from htsat_kernels.fused import window_attention as wa

    assert not [r for r in report_wide["records"] if r.get("error")]
    recs = [r for r in _triton(report_wide) if r["dtype"] == "fp32"]
    assert {(r["arch"], r["direction"], r["preset"]) for r in recs} == {
        (a, d, p) for a in ARCHS for d in ("forward", "backward") for p in ("htsat-audioset", "clap-htsat-large")
    }
    by_preset = {s.preset: s for s in st.preset_stages() if s.stage == 1}
    for r in recs:
        stage = by_preset[r["preset"]]
        arch = int(r["arch"].split("_")[1])
        want = wa.launch_config(r["direction"], stage.window**2, stage.C // stage.heads, torch.float32, r["has_mask"], arch)
        assert r["config"] == want and want["PREC"] in ("tf32", "tf32x3")  # tensor-core precisions
        assert r["dots"] > 0 and r["dots_on_tensor_cores"] == r["dots"], _ids([r])
        assert r["wgmma" if r["arch"] == "sm_90" else "mma_sync"] > 0, _ids([r])
    # fp32 may spill a little in the sm_80 backward (tf32x3 mma.sync operands): Triton 3.8 0 B for
    # HTS-AT, 88 B for clap-large (strict xfail below); Triton 3.6 (the GPU machine's) 48 B and 144 B
    bad = [
        f"{r['preset']} " + _ids([r])[0]
        for r in recs
        if r["spill_bytes"] and not (r["arch"] == "sm_80" and r["direction"] == "backward" and r["spill_bytes"] <= 160)
    ]
    assert not bad, bad


def _wide_fp32_bwd_sm80(r) -> bool:
    return r["preset"] == "clap-htsat-large" and r["direction"] == "backward" and r["arch"] == "sm_80"


@pytest.mark.xfail(
    strict=True,
    reason="clap-large's fp32 backward at sm_80 spills (88 B/thread) with chunks of 16 head-dim columns: "
    "Triton 3.6 rejects K = 8 for 32-bit dots, and no wider chunk or warp count fits it in 255 registers yet",
)
def test_wide_head_fp32_backward_at_sm80_does_not_spill(report_wide):
    recs = [r for r in _triton(report_wide) if r["dtype"] == "fp32" and _wide_fp32_bwd_sm80(r)]
    assert recs and not [r for r in recs if r["spill_bytes"]]


# --------------------------------------------------------------------------------------------
# CUDA kernels of the extension


@pytest.fixture(scope="module")
def cuda_report():
    if sc.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found")
    recs, note = sc.cuda_records()
    if not recs:
        pytest.skip(note or "the extension has no CUDA kernels")
    return recs


def test_cuda_kernels_are_read_for_every_arch(cuda_report):
    archs = {r["arch"] for r in cuda_report}
    assert archs and archs <= set(gpu_limits.ARCH_LIMITS)
    for arch in archs:
        names = {r["kernel"].split("<")[0] for r in cuda_report if r["arch"] == arch}
        assert any("layer_norm" in n for n in names) and any("window" in n for n in names), names
    assert all(r["registers"] > 0 and r["int64_div_calls"] is not None for r in cuda_report)


def test_cuda_kernels_do_not_spill(cuda_report):
    bad = [f"{r['arch']} {r['kernel']}" for r in cuda_report if r["dtype"] != "fp64" and r["spill_bytes"]]
    assert not bad, bad


# fp64 is for gradcheck, not speed: the one accepted spill is the sm_80 build of the 64-bit-index fallback of
# the fp64 patch-merge LayerNorm forward (tensors past 2^31 elements), 12 B stored / 36 B loaded around its
# division helper calls (ptxas -v; 16 B stack). Anything else, or more, fails.
_FP64_SPILL_ALLOWED = {("sm_80", "gathered_layer_norm_forward_kernel<PatchMergeRows, double, double, long>"): 16}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_fp64_kernels_do_not_spill(cuda_report, arch):
    recs = [r for r in cuda_report if r["arch"] == arch]
    if not recs:
        pytest.skip(f"the extension is not built for {arch}")
    bad = [
        (r["kernel"], r["spill_bytes"])
        for r in recs
        if r["dtype"] == "fp64" and r["spill_bytes"] > _FP64_SPILL_ALLOWED.get((arch, r["kernel"]), 0)
    ]
    assert not bad, bad


def test_cuda_kernels_have_no_64bit_division(cuda_report):
    # kernels templated on a 64-bit index type are the fallback for tensors past 2^31 elements
    hts = [r for r in cuda_report if ", long" not in r["kernel"]]
    assert any("layer_norm" in r["kernel"] for r in hts) and any("window_copy" in r["kernel"] for r in hts)
    bad = [f"{r['arch']} {r['kernel']}: {r['int64_div_calls']}" for r in hts if r["int64_div_calls"]]
    assert not bad, bad


# --------------------------------------------------------------------------------------------
# Parsers and limits (no compiler needed)


def test_occupancy_follows_the_register_file_and_shared_memory():
    # 255 registers: 8192 per warp, so 8 warps (2 blocks of 4) fit in 64K registers
    assert gpu_limits.occupancy("sm_90", 255, 4, 0) == {"blocks_per_sm": 2, "warps_per_sm": 8, "occupancy_limit": "registers"}
    assert gpu_limits.occupancy("sm_90", 64, 4, 0)["blocks_per_sm"] == 8  # 2048 registers per warp: 32 warps
    assert gpu_limits.occupancy("sm_90", 16, 4, 0) == {"blocks_per_sm": 16, "warps_per_sm": 64, "occupancy_limit": "warps"}
    # 100 KB of shared memory per block (+1 KB reserved): 2 fit in 228 KB, 1 in 164 KB (sm_80)
    assert gpu_limits.occupancy("sm_90", 32, 4, 100 * 1024)["blocks_per_sm"] == 2
    occ = gpu_limits.occupancy("sm_80", 32, 4, 100 * 1024)
    assert occ["blocks_per_sm"] == 1 and occ["occupancy_limit"] == "shared memory"
    assert gpu_limits.occupancy("sm_86", 32, 4, 200 * 1024)["blocks_per_sm"] == 0  # over the per-block limit
    assert gpu_limits.arch_name("9.0") == gpu_limits.arch_name(90) == gpu_limits.arch_name("sm_90a") == "sm_90"


def test_parsers_read_cuobjdump_and_nvdisasm_text():
    usage = sc.parse_resource_usage(
        "arch = sm_90\n Function _Z3fooPf:\n  REG:40 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:400\n"
        " Function _Z3barPf:\n  REG:255 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:400\n"
    )
    assert usage == {
        "sm_90": {
            "_Z3fooPf": {"registers": 40, "stack": 16, "shared": 0, "local": 0},
            "_Z3barPf": {"registers": 255, "stack": 0, "shared": 1024, "local": 8},
        }
    }
    sass = sc.parse_sass(
        '\t.section\t.text._Z3fooPf,"ax",@progbits\n'
        "        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;\n"
        "        /*0140*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;\n"
        "        /*0150*/                   CALL.REL.NOINC `($__internal_1_$__cuda_sm20_rem_u64) ;\n"
        "        /*0160*/                   CALL.REL.NOINC `($__internal_2_$__cuda_sm3x_div_rn_noftz_f32_slowpath) ;\n"
    )
    assert sass == {"_Z3fooPf": {"int64_div_calls": 2, "sass_instructions": 4}}
    name = sc.short_kernel_name(
        "void htsat::(anonymous namespace)::window_copy_kernel<unsigned short, long, true>"
        "(unsigned short const*, unsigned short*, htsat::WindowGeometry, long, long)"
    )
    assert name == "window_copy_kernel<unsigned short, long, true>"
    assert sc.classify_cuda_kernel("gathered_layer_norm_forward_kernel<PatchMergeRows, BFloat16, float>") == {
        "op": "patch_merge",
        "direction": "forward",
        "dtype": "bf16",
    }


def test_the_launchers_take_their_config_from_launch_config(monkeypatch):
    """The report compiles what launch_config returns; the launchers must launch exactly that."""
    import torch

    import htsat_kernels as hk
    from htsat_kernels.fused import window_attention as wa

    if not wa._INTERPRETED:
        pytest.skip("runs the interpreted kernels (CPU)")
    calls = []
    real = wa.launch_config

    def spy(direction, N, d, dtype, has_mask, arch=None):
        calls.append((direction, N, d, dtype, has_mask, arch))
        return real(direction, N, d, dtype, has_mask, arch)

    monkeypatch.setattr(wa, "launch_config", spy)
    ws, h, C = 4, 2, 16
    qkv = torch.randn(2, ws * ws, 3 * C, requires_grad=True)
    table = torch.randn((2 * ws - 1) ** 2, h, requires_grad=True)
    out = hk.window_attention(qkv, table, None, h, (C // h) ** -0.5, backend="fused")
    out.sum().backward()
    assert calls == [("forward", 16, 8, torch.float32, False, None), ("backward", 16, 8, torch.float32, False, None)]


def test_launch_bounds_are_read_from_the_cubin():
    text = (
        ".nv.info._Z3fooPf\n\t<0x7>\n\tAttribute:\tEIATTR_MAX_THREADS\n\tFormat:\tEIFMT_SVAL\n\tValue:\t0x80 0x1 0x1 \n"
        "\t<0x8>\n\tAttribute:\tEIATTR_CBANK_PARAM_SIZE\n\tFormat:\tEIFMT_HVAL\n\tValue:\t0x8\n"
        ".nv.info._Z3bazPf\n\tAttribute:\tEIATTR_CBANK_PARAM_SIZE\n\tFormat:\tEIFMT_HVAL\n\tValue:\t0x8\n"
        ".nv.info._Z3barPf\n\tAttribute:\tEIATTR_MAX_THREADS\n\tFormat:\tEIFMT_SVAL\n\tValue:\t0x8 0x40 0x1 \n"
    )
    assert sc.parse_max_threads(text) == {"_Z3fooPf": 128, "_Z3barPf": 512}


def _launch_args(text: str) -> list[list[str]]:
    """The <<<grid, block, ...>>> arguments of every kernel launch in CUDA source, split at top-level commas."""
    out = []
    for m in re.finditer(r"<<<(.*?)>>>", text, re.S):
        args, depth, cur = [], 0, ""
        for ch in m.group(1):
            depth += ch in "(<[" and 1 or (ch in ")>]" and -1 or 0)
            if ch == "," and depth == 0:
                args.append(cur.strip())
                cur = ""
            else:
                cur += ch
        out.append([*args, cur.strip()])
    return out


def test_every_cuda_kernel_is_launched_with_its_launch_bound():
    """The compile report takes a CUDA kernel's block size from its __launch_bounds__: every kernel in
    csrc/ declares one and every launch uses a bound's constant (param_reduce: 8 x lanes, lanes <= 64)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    for name in sorted(os.listdir(root)):
        if not name.endswith(".cu"):
            continue
        text = open(os.path.join(root, name)).read()
        kernels = re.findall(r"__global__\s+void\s+(?!__launch_bounds__)(\w+)", text)
        assert not kernels, f"{name}: kernels without __launch_bounds__: {kernels}"
        bounds = {re.sub(r"\s+", "", b.split(",")[0]) for b in re.findall(r"__launch_bounds__\(([^)]*)\)", text)}
        launches = _launch_args(text)
        assert bounds and launches, name
        for args in launches:
            block = re.sub(r"\s+", "", args[1])
            ok = block in bounds or (block == "dim3(kReduceCols,lanes)" and "kReduceCols*kMaxReduceLanes" in bounds)
            assert ok, f"{name}: a launch with block {args[1]!r}, not one of the launch bounds {sorted(bounds)}"


_LAUNCH_BOUNDS_CU = """
__global__ void __launch_bounds__(128) rows_kernel(float* x) { x[threadIdx.x] += 1.f; }
__global__ void __launch_bounds__(512) reduce_kernel(float* x) {
  __shared__ float s[2048];
  s[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  x[threadIdx.x] = s[threadIdx.x ^ 1];
}
__global__ void unbounded_kernel(float* x) { x[threadIdx.x] += 1.f; }
"""


@pytest.mark.slow
def test_cuda_records_carry_the_launch_block_and_its_occupancy(tmp_path):
    """A library built with nvcc: each kernel's record has the warps of its launch bound and the blocks per
    SM that registers, shared memory and the warp limit allow at that block size."""
    import shutil
    import subprocess

    if shutil.which("nvcc") is None or sc.find_tool("cuobjdump") is None:
        pytest.skip("needs nvcc and cuobjdump")
    src = tmp_path / "bounds.cu"
    src.write_text(_LAUNCH_BOUNDS_CU)
    so = tmp_path / "bounds.so"
    subprocess.run(
        ["nvcc", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90,code=sm_90", str(src), "-o", str(so)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    recs, note = sc.cuda_records(str(so))
    assert note is None
    by = {r["kernel"]: r for r in recs}
    rows, red, unb = by["rows_kernel"], by["reduce_kernel"], by["unbounded_kernel"]
    assert (rows["block_threads"], rows["num_warps"], red["num_warps"]) == (128, 4, 16)
    for r in (rows, red):
        assert (
            r["blocks_per_sm"]
            == gpu_limits.occupancy("sm_90", r["registers"], r["num_warps"], r["shared_bytes"])["blocks_per_sm"]
        )
    assert rows["blocks_per_sm"] == 16 and rows["occupancy_limit"] == "warps"  # 64 warps per SM at 4 per block
    assert red["blocks_per_sm"] == 4  # 16 warps per block
    assert unb["num_warps"] is None and unb["blocks_per_sm"] is None and "no launch bound" in unb["occupancy_limit"]


def test_a_cpu_only_extension_gives_a_note_not_a_crash():
    import _ctypes  # any shared library without CUDA device code

    if sc.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found")
    recs, note = sc.cuda_records(_ctypes.__file__)
    assert recs == [] and "no CUDA device code" in note


def test_inductor_reemits_only_kernels_that_keep_their_compile(report):
    """torch.compile re-emits a triton_op's kernels from source under a plain @triton.jit, which
    would drop noinline=True on _bwd_window (stage 1 bf16: 125 -> 158 registers at sm_90, 127 -> 168
    at sm_80). The backward op is opaque to Inductor: the compiled training step re-emits the
    forward kernel only, and Inductor's source of it compiles exactly as the eager kernel."""
    recs = _triton(report)
    inductor = [r for r in recs if r["path"] == "inductor"]
    assert {r["kernel"] for r in inductor} == {"_window_attention_fwd_kernel"}
    eager = {(r["kernel"], r["arch"], r["dtype"], r["has_mask"]): r for r in recs if r["path"] == "eager"}
    keys = ("registers", "spill_bytes", "shared_bytes", "blocks_per_sm", "wgmma", "mma_sync")
    assert len(inductor) == len(ARCHS) * len(DTYPES) * 2
    for r in inductor:
        e = eager[(r["kernel"], r["arch"], r["dtype"], r["has_mask"])]
        assert [r[k] for k in keys] == [e[k] for k in keys], _ids([r])


def test_chunked_backward_writes_the_slot_with_one_op():
    """The chunked backward (head dim in chunks: fp32 here, at sm_80) adds every window's dS into
    the table-gradient slot with the same atomic add (the kernel zeroes the slot before a barrier):
    a first-window store lowered to another layout than the adds (element (0, 2) stored by warp 1,
    added by warp 0), ordered only by a barrier Triton happened to insert. In the compiled
    ``_bwd_window``: the three gradient stores (dv, dk, dq) and one atomic add, no slot store."""
    import re

    stage = next(s for s in st.preset_stages() if s.preset == "htsat-audioset" and s.stage == 1)
    job = {
        "module": "htsat_kernels.fused.window_attention",
        "kernel": "_window_attention_bwd_kernel",
        "arch": "sm_80",
        "dtype": "fp32",
        "has_mask": False,
        "stages": [stage],
        "path": "eager",
        "keep_ttgir": True,
    }
    import concurrent.futures as cf
    import multiprocessing

    # a fresh process: this one imported the kernels under the interpreter
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=st._worker_init) as pool:
        (rec, _) = pool.submit(st._compile_group, job).result()
    assert not rec.get("error"), rec
    assert rec["config"]["DC"] < rec["config"]["BLOCK_D"]  # the chunked path
    funcs = re.split(r"\n\s*tt\.func ", rec["ttgir"])
    body = next(f for f in funcs if re.match(r"(private |public |)?@\S*_bwd_window", f))
    assert len(re.findall(r"tt\.atomic_rmw", body)) == 1
    assert len(re.findall(r"\btt\.store\b", body)) == 3


@pytest.mark.slow
def test_window_grid_runs_within_every_arch_limits_or_is_declined():
    """Swin's windows 7, 8, 9, 12, 16 (N = 49..256) at d = 24 and 64, sm_80 / sm_86 / sm_90: every
    point either compiles within the arch's shared memory per block (and without spills in bf16)
    or is declined before launch by ``resource_reason`` (then the op runs the reference under
    "auto"). The fp32 backward at N >= 144 needed 262,144 B of shared memory (over every limit)."""
    import torch

    from htsat_kernels.fused import window_attention as wa

    rep = cr.build_report(stages=[], paths=("eager",), grid="quick", include_cuda=False)
    recs = _triton(rep)
    assert {r["arch"] for r in recs} == set(st.GRID_ARCHS)
    assert {int(r["preset"].split("-")[1][2:]) ** 2 for r in recs} == {49, 64, 81, 144, 256}
    for r in recs:
        assert not r["error"], r
        ws, d = int(r["preset"].split("-")[1][2:]), int(r["preset"].split("-")[2][1:])
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[r["dtype"]]
        reason = wa.resource_reason(ws * ws, d, dtype, int(r["arch"].split("_")[1]))
        assert r.get("declined") == reason
        if reason is None:
            assert r["shared_bytes"] <= r["shared_limit_bytes"], r
            assert r["dtype"] == "fp32" or r["spill_bytes"] == 0, r
    # HTS-AT's own shape is never declined
    assert not any(r.get("declined") for r in recs if r["preset"] == "grid-ws8-d24" and r["dtype"] == "bf16")
