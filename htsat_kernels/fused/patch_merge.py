"""Compiled patch merging: 2x2 gather + LayerNorm(4C) in one kernel, forward and backward.

Ops (C++ in csrc/ops.cpp, CUDA in csrc/patch_merge_cuda.cu):
  ``htsat_kernels::patch_merge_forward(x, weight, bias, eps) -> (out, mean, rstd)``
      x (B, H, W, C) with H, W even -> out (B, H/2*W/2, 4C); mean, rstd (B, H/2*W/2) in the
      accumulation dtype (float32, or float64 for float64 inputs)
  ``htsat_kernels::patch_merge_backward(grad_out, x, weight, mean, rstd) -> (grad_x, grad_weight, grad_bias)``
      grad_weight / grad_bias reduced deterministically (fixed chunks, fixed order, no atomics)
The gather order is the original's [x0 even/even, x1 odd/even, x2 even/odd, x3 odd/odd] (rows = H axis);
see ``htsat_kernels.reference.patch_merge``. The backward is attached with
``torch.library.register_autograd``; the backward op has no derivative of its own, so a second
derivative raises (``first_order.first_order_only``) instead of silently being 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import extension
from .first_order import first_order_only

extension.require()  # ImportError with the build hint when htsat_kernels._C is missing
device_reason = extension.device_reason  # fused_status(): whether the built CUDA code runs on this GPU

_ops = torch.ops.htsat_kernels


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake (meta) implementations ----


@torch.library.register_fake("htsat_kernels::patch_merge_forward")
def _forward_fake(x: Tensor, weight: Tensor, bias: Tensor, eps: float):
    B, H, W, C = x.shape
    L = (H // 2) * (W // 2)
    stat = _stat_dtype(x.dtype)
    return x.new_empty((B, L, 4 * C)), x.new_empty((B, L), dtype=stat), x.new_empty((B, L), dtype=stat)


@torch.library.register_fake("htsat_kernels::patch_merge_backward")
def _backward_fake(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


# ---- autograd ----


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


@first_order_only("patch_merge")
def _backward(ctx, grad_out: Tensor, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _ops.patch_merge_backward(grad_out.contiguous(), x, weight, mean, rstd)
    return grad_x, grad_weight, grad_bias, None


torch.library.register_autograd("htsat_kernels::patch_merge_forward", _backward, setup_context=_setup_context)


# ---- public entry point (registered with the dispatcher in htsat_kernels/__init__.py) ----


def fused_patch_merge(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """(B, H, W, C) -> (B, H/2*W/2, 4C): 2x2 gather then LayerNorm(4C) (compiled kernel)."""
    out, _, _ = _ops.patch_merge_forward(x.contiguous(), weight.contiguous(), bias.contiguous(), float(eps))
    return out


def unsupported_reason(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> str | None:
    """None when the compiled kernel can run ``patch_merge(x, weight, bias, eps)``, else why not."""
    reason = extension.tensor_reason("x", x, 4)
    if reason:
        return reason
    _, H, W, C = x.shape
    if H % 2 or W % 2:
        return f"x: patch_merge needs even H and W (dims 1 and 2), got H={H}, W={W}"
    return extension.layer_norm_affine_reason(x, weight, bias, 4 * C)
