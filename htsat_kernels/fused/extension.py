"""Loads the compiled extension ``htsat_kernels._C`` (C++ CPU kernels, and CUDA kernels where built).

Importing ``_C`` registers the ``torch.ops.htsat_kernels`` ops (window_partition, window_merge,
patch_merge_forward, patch_merge_backward, layer_norm_window_partition(_backward), window_merge_add) with
the dispatcher. ``load_error`` is None when it loaded, otherwise why not and how to build it; the fused
modules raise ImportError with it, which the dispatcher records as the reason the fused path is
unavailable (``htsat_kernels.fused_status()``). The build is optional (setup.py): it records its outcome
in ``_C_build.json`` next to the extension, so a compile that failed at install time is reported as such,
with the architectures its CUDA part holds (``cuda_archs``): a CUDA tensor on a GPU that none of them runs
on is declined before launch (the CUDA runtime would fail with "no kernel image is available").
"""

from __future__ import annotations

import importlib
import json
import os
import re
from types import ModuleType

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BUILD_HINT = "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"


def _build_record() -> dict:
    """What the last build of the extension recorded (setup.py writes it next to _C), or {}."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_C_build.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


build_record: dict = _build_record()
load_error: str | None = None
with_cuda: bool = False
_C: ModuleType | None

try:
    _C = importlib.import_module("htsat_kernels._C")  # registers the ops

    with_cuda = bool(getattr(_C, "with_cuda", 0))
except Exception as exc:  # not built, the compile failed at install time, or built against another torch
    _C = None
    if build_record.get("error") and isinstance(exc, ModuleNotFoundError):
        load_error = (
            f"htsat_kernels._C is not installed: {build_record['error']}; see README 'Install', then rebuild with {BUILD_HINT}"
        )
    else:
        load_error = f"htsat_kernels._C is not built: run {BUILD_HINT} (error: {type(exc).__name__}: {exc})"


def arch_reason(archs: object, capability: tuple[int, int]) -> str | None:
    """Why a binary holding ``archs`` ("sm_80", "compute_90", "sm_90a") has no code for a GPU of compute
    capability ``capability``, or None. Machine code sm_XY runs on X.Y' for Y' >= Y (same major; "a": X.Y
    only, "f": that family), PTX compute_XY on X.Y and newer (JIT-compiled by the driver). None also when the
    record does not list the architectures (a build older than this check)."""
    if not isinstance(archs, list) or not archs:  # older records held a description string here
        return None
    cap = tuple(capability)
    for code in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", str(code))
        if not m:
            continue
        kind, built, suffix = m.group(1), (int(m.group(2)), int(m.group(3))), m.group(4)
        if suffix == "a":
            runs = cap == built
        elif suffix == "f" or kind == "sm":
            runs = cap[0] == built[0] and cap[1] >= built[1]
        else:
            runs = cap >= built
        if runs:
            return None
    major, minor = cap
    return (
        f"htsat_kernels._C's CUDA part was built for {', '.join(archs)}, which has no kernel image for this GPU "
        f'(compute capability {major}.{minor}); rebuild on this machine or with HTSAT_KERNELS_CUDA_ARCHS="{major}.{minor}"'
    )


def device_reason(device: torch.device | int | None = None) -> str | None:
    """Why the CUDA kernels cannot run on ``device`` (default: the current GPU), or None: no CUDA part, or
    none of the built architectures runs on it. None where there is no GPU to compare with."""
    if not torch.cuda.is_available():
        return None
    if not with_cuda:
        return f"htsat_kernels._C was built without its CUDA part ({build_record.get('cuda_error') or 'CPU-only build'})"
    props = torch.cuda.get_device_properties(device)  # (torch.compile folds it to a constant while tracing)
    return arch_reason(build_record.get("cuda_archs"), (props.major, props.minor))


def require() -> None:
    """Raise ImportError with the build hint when the extension did not load."""
    if load_error is not None:
        raise ImportError(load_error)


def tensor_reason(name: str, t, ndim: int) -> str | None:
    """Why the compiled kernels cannot take tensor argument ``name`` (type, rank, dtype, device), or None."""
    if not isinstance(t, Tensor):
        return f"{name} must be a tensor, got {type(t).__name__}"
    if t.dim() != ndim:
        return f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}"
    if t.dtype not in FLOAT_DTYPES:
        return f"{name} has dtype {t.dtype}; the compiled kernels support float32, float16, bfloat16 and float64"
    if t.device.type == "cpu":
        return None
    if t.device.type == "cuda":
        if not with_cuda:
            why = build_record.get("cuda_error") or "no nvcc at build time, or HTSAT_KERNELS_SKIP_CUDA=1"
            return f"{name} is a CUDA tensor but htsat_kernels._C was built without its CUDA part ({why})"
        return device_reason(t.device)
    return f"{name} is on device {t.device.type!r}; the compiled kernels run on CPU and CUDA only"


# LayerNorm weight / bias dtypes the compiled kernels take for activations of each dtype: the activations'
# own, or float32 for float16 / bfloat16 activations (autocast's mix: fp32 parameters, low-precision
# activations); the kernels compute in float32 either way (docs/design.md, numerics).
HALF_DTYPES = (torch.float16, torch.bfloat16)


def mixed_operand_ok(activation: torch.dtype, param: torch.dtype) -> bool:
    """True when the compiled kernels take a float tensor of dtype ``param`` next to ``activation`` ones."""
    return param == activation or (param == torch.float32 and activation in HALF_DTYPES)


def layer_norm_affine_reason(x: Tensor, weight, bias, n: int) -> str | None:
    """Why the compiled LayerNorm kernels cannot take this (weight, bias) of LayerNorm(n) with x, or None."""
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor):
            return f"{name} must be a tensor (LayerNorm with elementwise affine), got {type(t).__name__}"
        if tuple(t.shape) != (n,):
            return f"{name} must have shape ({n},) for C={x.shape[-1]}, got {tuple(t.shape)}"
        if not mixed_operand_ok(x.dtype, t.dtype):
            return (
                f"{name} has dtype {t.dtype} but x has {x.dtype}; the compiled kernel needs x's dtype, "
                "or float32 with float16 / bfloat16 x"
            )
        if t.device != x.device:
            return f"{name} is on {t.device} but x is on {x.device}"
    if weight.dtype != bias.dtype:
        return f"weight has dtype {weight.dtype} but bias has {bias.dtype}; the compiled kernel needs them equal"
    return None
