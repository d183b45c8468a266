"""Argument contracts of the public ops, checked once by the public wrapper before dispatch.

Each ``check_<op>(*args)`` raises TypeError (wrong kind of argument) or ValueError (wrong value or
shape) with one line naming the argument, so "auto", "reference" and "fused" report the same error
for the same bad call. What is checked here is the op's contract, valid for every backend; what only
one implementation cannot do (a device, a dtype pairing, a head dim over the kernel's tile, autocast)
stays in that implementation's capability check, where "auto" falls back and "fused" raises
``BackendUnavailable``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the ops take float16, bfloat16, float32 or float64")


def integer(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")


def real(name: str, v, *, low: float = -math.inf, what: str = "a finite real number") -> None:
    if isinstance(v, bool) or not isinstance(v, (Real, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    if not (low <= float(v) < math.inf):
        raise ValueError(f"{name} must be {what}, got {v!r}")


def same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def affine(x: Tensor, weight, bias, n: int) -> None:
    """LayerNorm(n)'s weight and bias: tensors of shape (n,) on x's device."""
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor (LayerNorm with elementwise affine), got {type(t).__name__}")
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},) for C={x.shape[-1]}, got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the ops take float16, bfloat16, float32 or float64")
        same_device(name, t, "x", x)


def window_of(windows: Tensor) -> int:
    """The window size of (B*nW, N, C) windows; N must be a positive square."""
    N = int(windows.shape[1])
    ws = math.isqrt(N)
    if N <= 0 or ws * ws != N:
        raise ValueError(f"windows: tokens per window (dim 1) must be a positive square number, got {N}")
    return ws


# ---- one check per op, with the op's own signature ----


def check_window_partition(x, window_size, shift=0) -> None:
    tensor("x", x, 4, "(B, H, W, C)")
    integer("window_size", window_size)
    integer("shift", shift)
    if window_size <= 0:
        raise ValueError(f"window_size must be positive, got {window_size}")
    _, H, W, _ = x.shape
    if H <= 0 or W <= 0 or H % window_size or W % window_size:
        raise ValueError(f"x: H and W (dims 1 and 2) must be positive multiples of window_size={window_size}, got H={H}, W={W}")


def check_window_merge(windows, H, W, shift=0) -> None:
    tensor("windows", windows, 3, "(B*nW, N, C)")
    for name, v in (("H", H), ("W", W), ("shift", shift)):
        integer(name, v)
    ws = window_of(windows)
    if H <= 0 or W <= 0 or H % ws or W % ws:
        raise ValueError(f"H and W must be positive multiples of the window size {ws}, got H={H}, W={W}")
    n_win = (H // ws) * (W // ws)
    if windows.shape[0] % n_win:
        raise ValueError(
            f"windows: dim 0 ({windows.shape[0]}) must be a multiple of the number of windows per image "
            f"({n_win} for H={H}, W={W})"
        )


def check_layer_norm_window_partition(x, weight, bias, eps, window_size, shift=0) -> None:
    check_window_partition(x, window_size, shift)
    affine(x, weight, bias, x.shape[-1])
    real("eps", eps, low=0.0, what="a finite number >= 0")


def check_window_merge_add(windows, shortcut, H, W, shift=0) -> None:
    check_window_merge(windows, H, W, shift)
    if not isinstance(shortcut, Tensor):
        raise TypeError(f"shortcut must be a tensor, got {type(shortcut).__name__}")
    ws = window_of(windows)
    n_img, C = windows.shape[0] // ((H // ws) * (W // ws)), windows.shape[-1]
    if tuple(shortcut.shape) not in ((n_img, H * W, C), (n_img, H, W, C)):
        raise ValueError(
            f"shortcut must have shape ({n_img}, {H * W}, {C}) or ({n_img}, {H}, {W}, {C}), got {tuple(shortcut.shape)}"
        )
    if shortcut.dtype not in FLOAT_DTYPES:
        raise TypeError(f"shortcut has dtype {shortcut.dtype}; the ops take float16, bfloat16, float32 or float64")
    same_device("shortcut", shortcut, "windows", windows)


def check_patch_merge(x, weight, bias, eps=1e-5) -> None:
    tensor("x", x, 4, "(B, H, W, C)")
    _, H, W, C = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"x: patch_merge needs even H and W (dims 1 and 2), got H={H}, W={W}")
    affine(x, weight, bias, 4 * C)
    real("eps", eps, low=0.0, what="a finite number >= 0")


def shifted_grid_of(shifted_grid, window_size: int, num_windows: int) -> tuple[int, int, int]:
    """(H, W, shift) of a shifted window grid: H and W positive multiples of the window size, 0 <
    shift < window size, and H/ws * W/ws windows dividing ``num_windows`` (qkv's B*nW)."""
    if not isinstance(shifted_grid, (tuple, list)) or len(shifted_grid) != 3:
        raise TypeError(f"shifted_grid must be a tuple (H, W, shift) or None, got {shifted_grid!r}")
    for name, v in zip(("H", "W", "shift"), shifted_grid):
        integer(f"shifted_grid: {name}", v)
    H, W, shift = shifted_grid
    ws = window_size
    if H <= 0 or W <= 0 or H % ws or W % ws:
        raise ValueError(f"shifted_grid: H and W must be positive multiples of the window size {ws}, got H={H}, W={W}")
    if not 0 < shift < ws:
        raise ValueError(f"shifted_grid: shift must be in 1 .. window size - 1 = {ws - 1}, got {shift}")
    nW = (H // ws) * (W // ws)
    if num_windows % nW:
        raise ValueError(f"shifted_grid: nW = {nW} windows of a {H}x{W} map does not divide qkv's B*nW = {num_windows}")
    return int(H), int(W), int(shift)


def check_window_attention(qkv, table, mask: Tensor | None, num_heads, scale, dropout_p=0.0, shifted_grid=None) -> None:
    tensor("qkv", qkv, 3, "(B*nW, N, 3C)")
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, torch.SymInt)) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    real("scale", scale)
    real("dropout_p", dropout_p, low=0.0, what="a probability in [0, 1]")
    if dropout_p > 1:
        raise ValueError(f"dropout_p must be a probability in [0, 1], got {dropout_p!r}")
    B_, N, C3 = qkv.shape
    if C3 % 3 != 0:
        raise ValueError(f"qkv: last dim must be 3C ([q | k | v]), got {C3}")
    C = C3 // 3
    if C == 0 or C % num_heads != 0:
        raise ValueError(f"qkv: C = {C} channels are not divisible by num_heads = {num_heads}")
    ws = math.isqrt(N)
    if N == 0 or ws * ws != N:
        raise ValueError(f"qkv: tokens per window N = {N} must be a square number (window_size**2)")
    tensor("table", table, 2, "((2*ws-1)**2, num_heads)")
    rows = (2 * ws - 1) ** 2
    if tuple(table.shape) != (rows, num_heads):
        raise ValueError(
            f"table must be ((2*ws-1)**2, num_heads) = ({rows}, {num_heads}) for window size {ws}, got {tuple(table.shape)}"
        )
    same_device("table", table, "qkv", qkv)
    if shifted_grid is not None:
        if mask is not None:
            raise ValueError("mask and shifted_grid were both given: the shift mask comes from one or the other")
        shifted_grid_of(shifted_grid, ws, B_)
    if mask is None:
        return
    tensor("mask", mask, 3, "(nW, N, N)")
    if mask.shape[1] != N or mask.shape[2] != N or mask.shape[0] == 0:
        raise ValueError(f"mask must be (nW, N, N) = (nW, {N}, {N}), got {tuple(mask.shape)}")
    if B_ % mask.shape[0] != 0:
        raise ValueError(f"mask: nW = {mask.shape[0]} windows does not divide qkv's B*nW = {B_}")
    same_device("mask", mask, "qkv", qkv)
