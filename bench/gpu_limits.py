"""Hardware figures in one place: per-architecture SM limits (occupancy) and a table of devices
(peak memory bandwidth, dense bf16 tensor throughput, SM count); ``bench.roofline`` uses them.

No torch import at module level: the compare tool and the compile report's parent process use it.

Occupancy follows the CUDA Occupancy Calculator's rules: registers are allocated per warp in
units of 256, warps in granules of 4 (per SM sub-partition); shared memory per block is rounded up
to 128 bytes, and from sm_80 on the system reserves 1 KB of shared memory per resident block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ArchLimits:
    arch: str  # "sm_90"
    regs_per_sm: int  # 32-bit registers in the register file of one SM
    max_regs_per_thread: int
    smem_per_sm: int  # bytes, largest carve-out
    smem_per_block: int  # bytes, largest opt-in dynamic allocation of one block
    max_blocks_per_sm: int
    max_warps_per_sm: int
    reg_alloc_unit: int = 256  # registers per warp are allocated in multiples of this
    warp_alloc_granularity: int = 4
    smem_alloc_unit: int = 128
    smem_reserved_per_block: int = 1024  # sm_80+: the runtime reserves 1 KB per block


# Source: CUDA C++ Programming Guide, "Compute Capabilities", table "Technical Specifications per
# Compute Capability" (CUDA 12.x/13.x): registers per SM 64K and 255 per thread on all four; shared
# memory per SM 164 KB (8.0), 100 KB (8.6, 8.9), 228 KB (9.0); per block 163 KB, 99 KB, 99 KB,
# 227 KB; resident blocks per SM 32, 16, 24, 32; resident warps per SM 64, 48, 48, 64.
# The allocation units are those of the CUDA Occupancy Calculator (Nsight Compute "Launch
# Statistics" / cudaOccupancyMaxActiveBlocksPerMultiprocessor use the same).
ARCH_LIMITS = {
    "sm_80": ArchLimits("sm_80", 65536, 255, 164 * 1024, 163 * 1024, 32, 64),
    "sm_86": ArchLimits("sm_86", 65536, 255, 100 * 1024, 99 * 1024, 16, 48),
    "sm_89": ArchLimits("sm_89", 65536, 255, 100 * 1024, 99 * 1024, 24, 48),
    "sm_90": ArchLimits("sm_90", 65536, 255, 228 * 1024, 227 * 1024, 32, 64),
}


def arch_name(arch) -> str:
    """ "sm_90" from 90, "90", "9.0", "sm_90a" or "sm_90"."""
    s = str(arch).strip().lower().replace("sm_", "").replace("sm", "").rstrip("a")
    if "." in s:
        major, minor = s.split(".", 1)
        s = f"{int(major)}{int(minor)}"
    return f"sm_{int(s)}"


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(arch, registers: int, num_warps: int | None, shared_bytes: int = 0) -> dict:
    """Resident blocks and warps per SM for a kernel, and what limits them.

    ``num_warps`` None (a CUDA kernel whose block size is set by the host code): only the
    register-limited warps per SM are returned (``blocks_per_sm`` None).
    """
    lim = ARCH_LIMITS[arch_name(arch)]
    regs = max(int(registers or 0), 1)
    regs_per_warp = _round_up(regs * 32, lim.reg_alloc_unit)
    warps_by_regs = (lim.regs_per_sm // regs_per_warp) // lim.warp_alloc_granularity * lim.warp_alloc_granularity
    if not num_warps:
        return {"blocks_per_sm": None, "warps_per_sm": min(warps_by_regs, lim.max_warps_per_sm), "occupancy_limit": "registers"}
    limits = {
        "registers": warps_by_regs // num_warps,
        "warps": lim.max_warps_per_sm // num_warps,
        "blocks": lim.max_blocks_per_sm,
    }
    if shared_bytes:
        per_block = _round_up(int(shared_bytes) + lim.smem_reserved_per_block, lim.smem_alloc_unit)
        limits["shared memory"] = 0 if shared_bytes > lim.smem_per_block else lim.smem_per_sm // per_block
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], list(limits).index(k)))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps, "occupancy_limit": limiter}


# --------------------------------------------------------------------------------------------
# Devices


@dataclass(frozen=True)
class Device:
    name: str
    pattern: str  # regex on torch.cuda.get_device_properties().name
    arch: str
    sms: int
    hbm_gbps: float  # peak DRAM bandwidth, 1e9 B/s
    bf16_tflops: float  # dense (no sparsity) bf16 tensor-core throughput, fp32 accumulate


# First match wins (so the specific names come first). Sources, one per line:
# - H200 SXM: NVIDIA H200 Tensor Core GPU datasheet (2024): 4.8 TB/s HBM3e, BF16 1,979 TFLOPS with
#   sparsity = 989 dense, 132 SMs (same GH100 configuration as the H100 SXM).
# - H100 SXM5 80 GB: NVIDIA H100 datasheet: 3.35 TB/s, BF16 1,979 sparse = 989 dense; 132 SMs
#   (NVIDIA Hopper architecture whitepaper, table 3).
# - H100 PCIe 80 GB: NVIDIA H100 datasheet: 2.0 TB/s, BF16 1,513 sparse = 756 dense; 114 SMs.
# - A100 80 GB SXM4: NVIDIA A100 datasheet: 2,039 GB/s, BF16 312 TFLOPS dense; 108 SMs. The
#   80 GB PCIe card: 1,935 GB/s. A100 40 GB: 1,555 GB/s, 312 TFLOPS, 108 SMs.
# - L40S: NVIDIA L40S datasheet: 864 GB/s GDDR6, BF16 733 sparse = 362 dense; 142 SMs.
# - L4: NVIDIA L4 datasheet: 300 GB/s, BF16 242 sparse = 121 dense; 58 SMs.
# - RTX 4090: NVIDIA Ada Lovelace architecture whitepaper, appendix table: 1,008 GB/s GDDR6X,
#   FP16/BF16 tensor with FP32 accumulate 165.2 TFLOPS dense; 128 SMs.
DEVICES = (
    Device("H200", r"H200", "sm_90", 132, 4800.0, 989.0),
    Device("H100 PCIe", r"H100.*PCIe", "sm_90", 114, 2000.0, 756.0),
    Device("H100 SXM", r"H100", "sm_90", 132, 3350.0, 989.0),
    Device("A100 80GB PCIe", r"A100.*80GB.*PCIe", "sm_80", 108, 1935.0, 312.0),
    Device("A100 80GB", r"A100.*80GB", "sm_80", 108, 2039.0, 312.0),
    Device("A100 40GB", r"A100", "sm_80", 108, 1555.0, 312.0),
    Device("L40S", r"L40S", "sm_89", 142, 864.0, 362.0),
    Device("L4", r"\bL4\b", "sm_89", 58, 300.0, 121.0),
    Device("RTX 4090", r"4090", "sm_89", 128, 1008.0, 165.2),
)
DEVICE_BY_NAME = {d.name: d for d in DEVICES}


def find_device(cuda_name: str) -> Device | None:
    """The table entry for a CUDA device name (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    for d in DEVICES:
        if re.search(d.pattern, cuda_name or ""):
            return d
    return None


def measured_copy_gbps(device=None, nbytes: int = 1 << 30, reps: int = 10) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / time) for a device not in the table."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = device or torch.device("cuda")
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / reps
    del src, dst
    return nbytes / seconds / 1e9


def device_peaks(cuda_name: str, measure=measured_copy_gbps) -> dict:
    """Peak bandwidth (GB/s) and dense bf16 TFLOP/s of the present device, with their source."""
    d = find_device(cuda_name)
    if d is not None:
        return {"roofline_device": d.name, "peak_gbps": d.hbm_gbps, "peak_tflops": d.bf16_tflops, "peak_source": "table"}
    gbps = measure() if measure else None
    return {
        "roofline_device": cuda_name,
        "peak_gbps": gbps,
        "peak_tflops": None,
        "peak_source": "measured device-to-device copy" if gbps else "unknown",
    }
