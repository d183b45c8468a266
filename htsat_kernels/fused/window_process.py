"""Compiled window partition / merge: cyclic shift fused with the (un)partition, one pass each way.

Ops (C++ in csrc/ops.cpp, CUDA in csrc/window_process_cuda.cu):
  ``htsat_kernels::window_partition(x, window_size, shift)``  (B, H, W, C) -> (B*nW, ws*ws, C)
  ``htsat_kernels::window_merge(windows, H, W, shift)``        (B*nW, ws*ws, C) -> (B, H, W, C)
Both are bit-exact copies (every dtype) through one index map (csrc/window_process.h); the backward of
one is the other with the same arguments, registered here with ``torch.library.register_autograd`` so
eager autograd, ``torch.compile`` and export all see the same two ops. Shapes and semantics are those
of ``htsat_kernels.reference.window_partition`` / ``window_merge``.

Further fusions of the Swin block, built on the same map (optional building blocks next to the
unfused ops; their unfused equivalents are in ``htsat_kernels.reference``):
  ``htsat_kernels::layer_norm_window_partition(x, weight, bias, eps, window_size, shift)
      -> (windows, mean, rstd)``: norm1's LayerNorm(C) + cyclic shift + partition in one pass
      (backward op ``layer_norm_window_partition_backward``, deterministic weight/bias gradient; no
      second derivative: double backward raises);
  ``htsat_kernels::window_merge_add(windows, shortcut, shift)``: shortcut + window_merge(windows),
      the merge + unshift + residual add in one pass (bit-exact against the unfused ops).

Mixed precision (autocast's dtypes, docs/design.md numerics): the LayerNorm takes float32 weight / bias
with float16 / bfloat16 x, computes in float32 and returns windows in x's dtype (weight / bias
gradients in float32); window_merge_add takes float16 / bfloat16 windows with a float32 shortcut and
returns float32 (torch's promotion), windows' gradient in their own dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import extension
from .first_order import first_order_only

extension.require()  # ImportError with the build hint when htsat_kernels._C is missing
device_reason = extension.device_reason  # fused_status(): whether the built CUDA code runs on this GPU

_ops = torch.ops.htsat_kernels


# ---- fake (meta) implementations: shapes only, for torch.compile / export ----


@torch.library.register_fake("htsat_kernels::window_partition")
def _partition_fake(x: Tensor, window_size: int, shift: int) -> Tensor:
    B, H, W, C = x.shape
    return x.new_empty((B * (H // window_size) * (W // window_size), window_size * window_size, C))


@torch.library.register_fake("htsat_kernels::window_merge")
def _merge_fake(windows: Tensor, H: int, W: int, shift: int) -> Tensor:
    _, N, C = windows.shape
    ws = math.isqrt(int(N))
    return windows.new_empty((windows.shape[0] // ((H // ws) * (W // ws)), H, W, C))


# ---- autograd: the backward of each op is the other op with the same geometry ----


def _partition_setup_context(ctx, inputs, output) -> None:
    x, window_size, shift = inputs
    ctx.H, ctx.W, ctx.shift = x.shape[1], x.shape[2], shift


def _partition_backward(ctx, grad: Tensor):
    return _ops.window_merge(grad.contiguous(), ctx.H, ctx.W, ctx.shift), None, None


def _merge_setup_context(ctx, inputs, output) -> None:
    windows, H, W, shift = inputs
    ctx.window_size = math.isqrt(int(windows.shape[1]))
    ctx.shift = shift


def _merge_backward(ctx, grad: Tensor):
    return _ops.window_partition(grad.contiguous(), ctx.window_size, ctx.shift), None, None, None


torch.library.register_autograd("htsat_kernels::window_partition", _partition_backward, setup_context=_partition_setup_context)
torch.library.register_autograd("htsat_kernels::window_merge", _merge_backward, setup_context=_merge_setup_context)


# ---- public entry points (registered with the dispatcher in htsat_kernels/__init__.py) ----


def _is_reshape(H, W, window_size, shift) -> bool:
    """True when the (un)partition is a plain reshape: one window across the width (HTS-AT's last stage,
    where the whole map is a single window) and a shift that is a multiple of H and W (no roll). The
    wrappers then return the reshape (a view of a contiguous input) and launch no copy kernel; autograd
    and torch.compile see an ordinary reshape."""
    return window_size > 0 and W == window_size and H > 0 and H % window_size == 0 and shift % H == 0 and shift % W == 0


def _merge_is_reshape(windows: Tensor, H, W, shift) -> bool:
    N = int(windows.shape[1])
    ws = math.isqrt(N)
    return ws * ws == N and _is_reshape(H, W, ws, shift) and windows.shape[0] % (H // ws) == 0


def fused_window_partition(x: Tensor, window_size: int, shift: int = 0) -> Tensor:
    """(B, H, W, C) -> (B*nW, ws*ws, C) after a cyclic shift by -shift on H and W (compiled kernel)."""
    if _is_reshape(x.shape[1], x.shape[2], window_size, shift):
        return x.reshape(-1, window_size * window_size, x.shape[3])  # a view, as the reference's
    return _ops.window_partition(x.contiguous(), int(window_size), int(shift))


def fused_window_merge(windows: Tensor, H: int, W: int, shift: int = 0) -> Tensor:
    """(B*nW, ws*ws, C) -> (B, H, W, C): inverse of fused_window_partition incl. the +shift roll."""
    if _merge_is_reshape(windows, H, W, shift):
        return windows.reshape(-1, H, W, windows.shape[2])
    return _ops.window_merge(windows.contiguous(), int(H), int(W), int(shift))


def _int_reason(name: str, v) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        return f"{name} must be an int, got {type(v).__name__}"
    return None


def partition_unsupported_reason(x: Tensor, window_size: int, shift: int = 0) -> str | None:
    """None when the compiled kernel can run ``window_partition(x, window_size, shift)``, else why not."""
    reason = extension.tensor_reason("x", x, 4) or _int_reason("window_size", window_size) or _int_reason("shift", shift)
    if reason:
        return reason
    if window_size <= 0:
        return f"window_size must be positive, got {window_size}"
    _, H, W, _ = x.shape
    if H <= 0 or W <= 0 or H % window_size or W % window_size:
        return f"x: H and W (dims 1 and 2) must be positive multiples of window_size={window_size}, got H={H}, W={W}"
    return None


def merge_unsupported_reason(windows: Tensor, H: int, W: int, shift: int = 0) -> str | None:
    """None when the compiled kernel can run ``window_merge(windows, H, W, shift)``, else why not."""
    reason = (
        extension.tensor_reason("windows", windows, 3)
        or _int_reason("H", H)
        or _int_reason("W", W)
        or _int_reason("shift", shift)
    )
    if reason:
        return reason
    N = int(windows.shape[1])
    ws = math.isqrt(N)
    if N <= 0 or ws * ws != N:
        return f"windows: tokens per window (dim 1) must be a positive square number, got {N}"
    if H <= 0 or W <= 0 or H % ws or W % ws:
        return f"H and W must be positive multiples of the window size {ws}, got H={H}, W={W}"
    n_win = (H // ws) * (W // ws)
    if windows.shape[0] % n_win:
        return (
            f"windows: dim 0 ({windows.shape[0]}) must be a multiple of the number of windows per image "
            f"({n_win} for H={H}, W={W})"
        )
    return None


# ---------------------------------------------------------------------------------------------------
# Fused norm1 LayerNorm + window partition, and window merge + residual add
# ---------------------------------------------------------------------------------------------------


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("htsat_kernels::layer_norm_window_partition")
def _ln_partition_fake(x: Tensor, weight: Tensor, bias: Tensor, eps: float, window_size: int, shift: int):
    B, H, W, C = x.shape
    nw = B * (H // window_size) * (W // window_size)
    n = window_size * window_size
    stat = _stat_dtype(x.dtype)
    return x.new_empty((nw, n, C)), x.new_empty((nw, n), dtype=stat), x.new_empty((nw, n), dtype=stat)


@torch.library.register_fake("htsat_kernels::layer_norm_window_partition_backward")
def _ln_partition_backward_fake(grad_windows, x, weight, mean, rstd, window_size: int, shift: int):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


@torch.library.register_fake("htsat_kernels::window_merge_add")
def _merge_add_fake(windows: Tensor, shortcut: Tensor, shift: int) -> Tensor:
    return torch.empty_like(shortcut)


def _ln_partition_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps, window_size, shift = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.window_size, ctx.shift = window_size, shift


@first_order_only("layer_norm_window_partition")
def _ln_partition_backward(ctx, grad_windows: Tensor, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _ops.layer_norm_window_partition_backward(
        grad_windows.contiguous(), x, weight, mean, rstd, ctx.window_size, ctx.shift
    )
    return grad_x, grad_weight, grad_bias, None, None, None


def _merge_add_setup_context(ctx, inputs, output) -> None:
    windows, shortcut, shift = inputs
    ctx.window_size = math.isqrt(int(windows.shape[1]))
    ctx.shift = shift
    ctx.windows_dtype = windows.dtype


def _merge_add_backward(ctx, grad: Tensor):
    grad = grad.contiguous()
    # each input's gradient in its own dtype: a float32 shortcut's is the float32 grad, float16 / bfloat16
    # windows get it rounded once (as the backward of torch's promoting add gives)
    grad_windows = _ops.window_partition(grad.to(ctx.windows_dtype), ctx.window_size, ctx.shift)
    return grad_windows, grad, None


torch.library.register_autograd(
    "htsat_kernels::layer_norm_window_partition", _ln_partition_backward, setup_context=_ln_partition_setup_context
)
torch.library.register_autograd("htsat_kernels::window_merge_add", _merge_add_backward, setup_context=_merge_add_setup_context)


def fused_layer_norm_window_partition(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, window_size: int, shift: int = 0
) -> Tensor:
    """x (B, H, W, C) -> windows (B*nW, ws*ws, C) of LayerNorm(C)(x) after the -shift cyclic roll."""
    if _is_reshape(x.shape[1], x.shape[2], window_size, shift):
        # the partition is a view: ATen's LayerNorm then a reshape is already one pass (and faster). Float32
        # parameters with low-precision x: in float32 (CUDA's LayerNorm takes no mixed pair); the output in x's
        # dtype like the kernel's (docs/design.md, numerics)
        out = F.layer_norm(x if weight.dtype == x.dtype else x.float(), (x.shape[-1],), weight, bias, eps)
        return out.to(x.dtype).reshape(-1, window_size * window_size, x.shape[3])
    windows, _, _ = _ops.layer_norm_window_partition(
        x.contiguous(), weight.contiguous(), bias.contiguous(), float(eps), int(window_size), int(shift)
    )
    return windows


def fused_window_merge_add(windows: Tensor, shortcut: Tensor, H: int, W: int, shift: int = 0) -> Tensor:
    """shortcut + window_merge(windows, H, W, shift); shortcut (B, H*W, C) or (B, H, W, C), same shape out."""
    if _merge_is_reshape(windows, H, W, shift):
        return shortcut + windows.reshape(shortcut.shape)  # the merge is a reshape: just the residual add
    B, C = shortcut.shape[0], shortcut.shape[-1]
    out = _ops.window_merge_add(windows.contiguous(), shortcut.reshape(B, H, W, C).contiguous(), int(shift))
    return out.view(shortcut.shape)


def layer_norm_partition_unsupported_reason(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, window_size: int, shift: int = 0
) -> str | None:
    """None when the compiled kernel can run the fused LayerNorm + partition, else why not."""
    reason = partition_unsupported_reason(x, window_size, shift)
    if reason:
        return reason
    C = x.shape[-1]
    return extension.layer_norm_affine_reason(x, weight, bias, C)


def merge_add_unsupported_reason(windows: Tensor, shortcut: Tensor, H: int, W: int, shift: int = 0) -> str | None:
    """None when the compiled kernel can run the fused window merge + residual add, else why not."""
    reason = merge_unsupported_reason(windows, H, W, shift)
    if reason:
        return reason
    if not isinstance(shortcut, Tensor):
        return f"shortcut must be a tensor, got {type(shortcut).__name__}"
    ws = math.isqrt(int(windows.shape[1]))
    n_img, C = windows.shape[0] // ((H // ws) * (W // ws)), windows.shape[-1]
    if tuple(shortcut.shape) not in ((n_img, H * W, C), (n_img, H, W, C)):
        return f"shortcut must have shape ({n_img}, {H * W}, {C}) or ({n_img}, {H}, {W}, {C}), got {tuple(shortcut.shape)}"
    if not extension.mixed_operand_ok(windows.dtype, shortcut.dtype):
        return (
            f"shortcut has dtype {shortcut.dtype} but windows has {windows.dtype}; the compiled kernel needs "
            "windows' dtype, or a float32 shortcut with float16 / bfloat16 windows"
        )
    if shortcut.device != windows.device:
        return f"shortcut is on {shortcut.device} but windows is on {windows.device}"
    return None
