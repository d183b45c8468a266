"""htsat_kernels: the hot ops of HTS-AT, each with a pure-PyTorch reference and a fused kernel.

Public ops (contracts in DESIGN.md): ``window_partition``, ``window_merge``, ``patch_merge``,
``window_attention``, and the block-level fusions ``layer_norm_window_partition`` (norm1 + shift +
partition) and ``window_merge_add`` (merge + unshift + residual add). Each takes ``backend=None | "auto" | "reference" | "fused"``; see
``htsat_kernels.backends`` for how the choice is made.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .backends import (
    BACKENDS,
    BackendUnavailable,
    FusedImpl,
    current_backend,
    fused_status,
    register_fused,
    use_backend,
)
from .backends import dispatch as _dispatch

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "current_backend",
    "fused_status",
    "layer_norm_window_partition",
    "patch_merge",
    "reference",
    "use_backend",
    "window_attention",
    "window_merge",
    "window_merge_add",
    "window_partition",
]


def window_partition(x: Tensor, window_size: int, shift: int = 0, *, backend: Optional[str] = None) -> Tensor:
    """(B, H, W, C) -> (B*nW, N, C) after a cyclic shift by -shift on H and W."""
    args = (x, window_size, shift)
    return _dispatch("window_partition", args, backend)(*args)


def window_merge(windows: Tensor, H: int, W: int, shift: int = 0, *, backend: Optional[str] = None) -> Tensor:
    """(B*nW, N, C) -> (B, H, W, C): inverse of window_partition including the +shift roll."""
    args = (windows, H, W, shift)
    return _dispatch("window_merge", args, backend)(*args)


def layer_norm_window_partition(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, window_size: int, shift: int = 0, *, backend: Optional[str] = None
) -> Tensor:
    """A block's norm1 fused into window_partition: (B, H, W, C) -> (B*nW, N, C) of LayerNorm(C)(x)."""
    args = (x, weight, bias, eps, window_size, shift)
    return _dispatch("layer_norm_window_partition", args, backend)(*args)


def window_merge_add(windows: Tensor, shortcut: Tensor, H: int, W: int, shift: int = 0, *, backend: Optional[str] = None) -> Tensor:
    """A block's residual fused into window_merge: shortcut + window_merge(windows, H, W, shift)."""
    args = (windows, shortcut, H, W, shift)
    return _dispatch("window_merge_add", args, backend)(*args)


def patch_merge(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """(B, H, W, C) -> (B, H/2*W/2, 4C): 2x2 gather then LayerNorm(4C)."""
    args = (x, weight, bias, eps)
    return _dispatch("patch_merge", args, backend)(*args)


def window_attention(
    qkv: Tensor,
    table: Tensor,
    mask: Optional[Tensor],
    num_heads: int,
    scale: float,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """qkv (B_, N, 3C), table ((2ws-1)^2, h), mask (nW, N, N) or None -> (B_, N, C)."""
    args = (qkv, table, mask, num_heads, scale)
    return _dispatch("window_attention", args, backend)(*args)


def _slower_on_cpu_in_fp16(x: Tensor, *args) -> Optional[str]:
    """The C++ CPU LayerNorm twins convert fp16 element by element: eager PyTorch is faster there
    (bench/results/cpu_*.json); fp32 and bf16 are faster fused at every HTS-AT shape."""
    if x.device.type == "cpu" and x.dtype == torch.float16:
        return "the reference is faster for float16 on CPU (use backend='fused' to force the C++ twin)"
    return None


def _register_fused_implementations() -> None:
    """Load each fused module; one that cannot load records why instead of breaking the import."""
    try:
        from .fused import window_attention as _wa

        register_fused("window_attention", FusedImpl(_wa.fused_window_attention, _wa.unsupported_reason, auto_on_cpu=False))
    except Exception as exc:  # triton missing or broken: the reference path still works
        register_fused("window_attention", f"Triton window attention failed to load: {exc}")
    try:
        from .fused import window_process as _wp

        register_fused("window_partition", FusedImpl(_wp.fused_window_partition, _wp.partition_unsupported_reason))
        register_fused("window_merge", FusedImpl(_wp.fused_window_merge, _wp.merge_unsupported_reason))
        register_fused(
            "layer_norm_window_partition",
            FusedImpl(
                _wp.fused_layer_norm_window_partition,
                _wp.layer_norm_partition_unsupported_reason,
                auto_declines=_slower_on_cpu_in_fp16,
            ),
        )
        register_fused(
            "window_merge_add",
            FusedImpl(_wp.fused_window_merge_add, _wp.merge_add_unsupported_reason, auto_declines=_slower_on_cpu_in_fp16),
        )
    except Exception as exc:  # the compiled extension is optional
        for op in ("window_partition", "window_merge", "layer_norm_window_partition", "window_merge_add"):
            register_fused(op, f"window_process failed to load: {exc}")
    try:
        from .fused import patch_merge as _pm

        register_fused(
            "patch_merge", FusedImpl(_pm.fused_patch_merge, _pm.unsupported_reason, auto_declines=_slower_on_cpu_in_fp16)
        )
    except Exception as exc:
        register_fused("patch_merge", f"patch_merge failed to load: {exc}")


_register_fused_implementations()
