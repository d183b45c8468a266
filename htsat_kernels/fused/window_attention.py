"""Fused window attention in Triton: kernels, launchers, torch.library registration and autograd.

(One file per op, over 500 lines on purpose: the kernels, the launch configuration they are compiled
with, their registration and their autograd formula change together.)

Computes, for every window b of ``qkv`` (B_, N, 3C) and head h (d = C / heads channels each)::

    out[b, :, h*d:(h+1)*d] = softmax((q*scale) @ k^T + table[index][:, :, h] + mask[b % nW]) @ v

exactly as ``htsat_kernels.reference.window_attention`` does, without any (B_, h, N, N) tensor;
``mask`` is a tensor or, given ``shifted_grid`` = (H, W, shift) instead, the shift mask of that
grid, computed in the kernel (no (nW, N, N) tensor is read):

* forward: one program per (window, head), heads fastest in launch order (and per block of query rows when N > 64, e.g.
  ws = 12: N = 144 keys padded to 256, 32 query rows per program; fp32 on sm_80: 16 rows). q, k, v are read straight from the qkv Linear output
  with its strides (no permute, no contiguous copy); the head dim (24 for HTS-AT) is padded to
  the next power of two >= 16 in registers through masked loads; the relative-position index is
  computed from token coordinates in the kernel and the bias gathered from the ((2ws-1)^2, h)
  table; a (nW, N, N) mask tensor is read for window ``b % nW``, a grid's shift mask is computed
  from the token coordinates (``_grid_mask``: -100 across the region border of the last window row
  and column; a mask tensor cost every (window, head) program more bytes than its q, k, v).
  Softmax runs in fp32 (fp64 for fp64 inputs), exp once per score; only the per-row
  log-sum-exp (B_, h, N) is saved.
* backward: one program per (group of windows at one window position, head): the windows of a
  group share the mask slice and the bias, so bias + mask (read, or computed from the grid) is
  built once into a private scratch.
  Each window goes through ``_bwd_window`` (not inlined: see there), which recomputes the scores
  from q, k and the saved log-sum-exp (D_i = sum_j P_ij dP_ij is formed in-kernel, so the output
  is not needed), writes dq, dk, dv into a (B_, N, 3C) tensor in the qkv layout, and adds dS into
  the program's own slot of a (groups, h, 2*SLOT) buffer (independent of the batch size; never
  shared). Its tiles are transposed, keys as rows (S^T = k q^T: P^T and dS^T feed dv and dk from
  registers), and wide heads (d = 64) and fp32 go through the head dim in chunks of DC columns
  (``_bwd_window_chunks``; DC per dtype and arch from ``launch_config``: at most 128 registers
  for bf16/fp16, clap-large at sm_90 with 8 warps; K >= 16 for fp32). The chunked path adds every
  window's dS into a slot the kernel zeroed, with relaxed atomic adds, each element always by the
  same thread in window order, so its sums are as deterministic as the load-add-store of the other
  path. The table gradient is then reduced deterministically in
  torch: a gather with a fixed, cached index and one fixed-shape sum, so repeated runs are
  bit-identical. The number of groups follows the blocks per SM that the compiled kernel fits
  (``_resident_blocks``).

Registration: ``htsat_kernels::window_attention_fwd`` is a ``torch.library.triton_op`` whose kernel
launch goes through ``torch.library.wrap_triton`` (so ``torch.compile`` sees the kernel), with the
autograd formula attached by ``torch.library.register_autograd``; ``window_attention_bwd`` is an
opaque ``torch.library.custom_op`` (Inductor would re-emit its kernel without ``noinline``, see its
registration). Under ``TRITON_INTERPRET=1`` (``triton.jit`` then returns an interpreted function,
which cannot be traced), both are opaque custom ops with explicit fake implementations.

Supported: fp16, bf16, fp32 (fp32 dots on tensor cores as PyTorch's fp32 matmul setting says:
``input_precision="tf32"`` where TF32 is allowed, else "tf32x3", about fp32 accuracy) and fp64
(dots as broadcast-and-sum, meant for gradcheck: ``backend="auto"`` keeps the reference for fp64
CUDA tensors, only ``backend="fused"`` runs it); N = ws^2 <= 256 tokens; head dim <= 64 (on a GPU, shapes over its
limits are declined: ``resource_reason``). The table
and mask may have any floating dtype (they are read and used in the compute precision); the
table gradient comes back in the table's dtype. The mask gets no gradient (it is a buffer), and
the backward is not itself differentiable (a second derivative raises; no double backward). No
attention dropout: a call with dropout_p > 0 is declined (the reference implements it). The
Triton interpreter's tl.dot misreads bf16 data, so interpreted bf16 dots upcast their operands to
fp32 (exact products).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from numbers import Real
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks import shifted_grid_of
from .first_order import first_order_only

__all__ = ["fused_window_attention", "unsupported_reason", "MAX_TOKENS", "MAX_HEAD_DIM"]

MAX_TOKENS = 256  # N = ws^2 tokens per window held in one tile (ws <= 16)
MAX_HEAD_DIM = 64
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, FP64: tl.constexpr, PREC: tl.constexpr):
    """a (M, K) @ b (K, N): tl.dot (fp32 accumulation), or an exact fp64 broadcast-and-sum.

    PREC is tl.dot's input_precision ("ieee" for fp16/bf16; "tf32" or "tf32x3" for fp32, after
    PyTorch's fp32 matmul setting), or "upcast": operands are converted to fp32 first (exact for
    bf16), because the Triton interpreter's dot misreads bf16 data.
    """
    if FP64:
        c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif PREC == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _scores(
    q,
    k,
    bias,
    mask_ptrs,
    pair_ok,
    key_ok,
    scale_hi,
    scale_lo,
    HAS_MASK: tl.constexpr,
    FP64: tl.constexpr,
    PREC: tl.constexpr,
):
    """Scores of a block of query rows: (q*scale) @ k^T + bias (+ mask); padded keys get -inf.

    Returns (scores in the compute precision, q*scale in the input dtype).
    """
    if FP64:
        qs = q * scale_hi + q * scale_lo  # scale = hi + lo: fp64 precision from two fp32 args
    else:
        # like the reference: q * scale computed in fp32 and rounded to the input dtype
        qs = (q.to(tl.float32) * scale_hi).to(q.dtype)
    s = _mm(qs, tl.trans(k), FP64, PREC)
    s = s + bias
    if HAS_MASK:
        m = tl.load(mask_ptrs, mask=pair_ok, other=0.0)
        s = s + m.to(s.dtype)
    s = tl.where(key_ok[None, :], s, float("-inf"))
    return s, qs


@triton.jit
def _relative_bias(table_ptr, s_tr, s_th, h, offs_m, offs_n, pair_ok, WS: tl.constexpr, FP64: tl.constexpr):
    """bias[i, j] = table[(ri - rj + ws-1) * (2ws-1) + (ci - cj + ws-1), h], index from coordinates."""
    ri = offs_m // WS
    ci = offs_m % WS
    rj = offs_n // WS
    cj = offs_n % WS
    rel = (ri[:, None] - rj[None, :] + (WS - 1)) * (2 * WS - 1) + (ci[:, None] - cj[None, :] + (WS - 1))
    bias = tl.load(table_ptr + rel * s_tr + h * s_th, mask=pair_ok, other=0.0)
    if FP64:
        bias = bias.to(tl.float64)
    else:
        bias = bias.to(tl.float32)
    return bias


@triton.jit
def _grid_mask(w, win_rows, win_cols, shift, offs_m, offs_n, WS: tl.constexpr):
    """The shift mask of window w of a rolled (win_rows x win_cols windows) grid, from coordinates:
    -100 where query i and key j lie in different regions, else 0 (as ``shifted_window_mask``).

    Only the last window row (column) straddles a region border, at token row (column) ws - shift."""
    cut = WS - shift
    last_row = (w // win_cols) == win_rows - 1
    last_col = (w % win_cols) == win_cols - 1
    rows_differ = ((offs_m // WS) >= cut)[:, None] != ((offs_n // WS) >= cut)[None, :]
    cols_differ = ((offs_m % WS) >= cut)[:, None] != ((offs_n % WS) >= cut)[None, :]
    return tl.where((last_row & rows_differ) | (last_col & cols_differ), -100.0, 0.0)


@triton.jit
def _window_attention_fwd_kernel(
    qkv_ptr,
    table_ptr,
    mask_ptr,
    out_ptr,
    lse_ptr,
    s_qb,
    s_qn,
    s_qc,
    s_tr,
    s_th,
    s_mw,
    s_mi,
    s_mj,
    s_ob,
    s_on,
    s_oc,
    C,
    nW,
    win_rows,
    win_cols,
    shift,
    scale_hi,
    scale_lo,
    WS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    FP64: tl.constexpr,
    PREC: tl.constexpr,
):
    """One program per (window b, head h, block of BLOCK_M query rows); all N keys at once.

    Heads vary fastest in launch order (program b * H + h), so the heads of one window run
    together: its qkv rows (and a mask tensor's slice) are read from DRAM once and hit L2 for the
    other heads. shift > 0: the shift mask of window b % nW of a win_rows x win_cols grid is
    computed from token coordinates (``_grid_mask``), no mask tensor (HAS_MASK is then False)."""
    H = C // D
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    N = WS * WS

    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    key_ok = offs_n < N
    d_ok = offs_d < D
    pair_ok = row_ok[:, None] & key_ok[None, :]

    bias = _relative_bias(table_ptr, s_tr, s_th, h, offs_m, offs_n, pair_ok, WS, FP64)
    mask_ptrs = mask_ptr + (b % nW).to(tl.int64) * s_mw + offs_m[:, None] * s_mi + offs_n[None, :] * s_mj

    base = qkv_ptr + b.to(tl.int64) * s_qb + (h * D + offs_d)[None, :] * s_qc
    q = tl.load(base + offs_m[:, None] * s_qn, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(base + offs_n[:, None] * s_qn + C * s_qc, mask=kv_mask, other=0.0)
    v = tl.load(base + offs_n[:, None] * s_qn + 2 * C * s_qc, mask=kv_mask, other=0.0)
    s, qs = _scores(q, k, bias, mask_ptrs, pair_ok, key_ok, scale_hi, scale_lo, HAS_MASK, FP64, PREC)
    if not HAS_MASK:  # the mask-tensor variant gets no grid code (it would cost it registers)
        if shift > 0:  # the shift mask computed, not read: one (N, N) slice per program was more bytes than q, k, v
            s = s + _grid_mask(b % nW, win_rows, win_cols, shift, offs_m, offs_n, WS).to(s.dtype)

    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    row_sum = tl.sum(p, axis=1)
    p = p * (1.0 / row_sum)[:, None]  # one division per row, not per score
    o = _mm(p.to(v.dtype), v, FP64, PREC)

    o_ptrs = out_ptr + b.to(tl.int64) * s_ob + offs_m[:, None] * s_on + (h * D + offs_d)[None, :] * s_oc
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse_ptrs = lse_ptr + (b.to(tl.int64) * H + h) * N + offs_m
    tl.store(lse_ptrs, (m + tl.log(row_sum)).to(lse_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _mm_acc(a, b, acc, FP64: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b, accumulated in the dot itself (``_mm`` otherwise: a product, then an add, needs
    a second accumulator tile)."""
    if FP64:
        c = acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif PREC == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc, input_precision=PREC)
    return c


@triton.jit
def _qs_chunk(q_ptr, offs_m, cc, row_ok, c_ok, s_qn, s_qc, scale_hi, scale_lo, FP64: tl.constexpr):
    """q * scale for columns cc of the head (rounded to the input dtype, like the reference)."""
    q = tl.load(q_ptr + offs_m[:, None] * s_qn + cc[None, :] * s_qc, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    if FP64:
        qs = q * scale_hi + q * scale_lo  # scale = hi + lo: fp64 precision from two fp32 args
    else:
        qs = (q.to(tl.float32) * scale_hi).to(q.dtype)
    return qs


@triton.jit
def _bwd_window_chunks(
    q_ptr,
    do_ptr,
    lse_ptr,
    dq_ptr,
    slot_ptr,
    s_qn,
    s_qc,
    s_dn,
    s_dc,
    s_gn,
    s_gc,
    C,
    scale_hi,
    scale_lo,
    WS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP64: tl.constexpr,
    PREC: tl.constexpr,
    SLOT: tl.constexpr,
    DC: tl.constexpr,
):
    """``_bwd_window`` for one block of all N queries, the head dim in chunks of DC columns.

    For wide heads (d = 64): a dot operand of the full head dim would hold 64 of its columns in
    every warp. S^T and dP^T accumulate over the chunks (first S^T, then dP^T: never both
    accumulating at once); dv, dk, dq are computed and stored chunk by chunk."""
    N = WS * WS
    NUM_C: tl.constexpr = BLOCK_D // DC  # annotated: Triton 3.6's interpreter makes it a tensor otherwise
    if FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    in_ty = q_ptr.dtype.element_ty
    out_ty = dq_ptr.dtype.element_ty
    offs_n = tl.arange(0, BLOCK_N)  # keys: the rows of the transposed tiles
    offs_m = tl.arange(0, BLOCK_N)  # queries: their columns
    offs_c = tl.arange(0, DC)
    key_ok = offs_n < N
    row_ok = offs_m < N
    tile = offs_m[None, :] * BLOCK_N + offs_n[:, None]  # (key j, query i): the slot's entry (i, j)
    st = tl.load(slot_ptr + SLOT + tile).to(acc_ty)
    for c in range(NUM_C):
        cc = c * DC + offs_c
        c_ok = cc < D
        k = tl.load(
            q_ptr + C * s_qc + offs_n[:, None] * s_qn + cc[None, :] * s_qc, mask=key_ok[:, None] & c_ok[None, :], other=0.0
        )
        qs = _qs_chunk(q_ptr, offs_m, cc, row_ok, c_ok, s_qn, s_qc, scale_hi, scale_lo, FP64)
        st = _mm_acc(k, tl.trans(qs), st, FP64, PREC)
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    pt = tl.exp(st - lse.to(acc_ty)[None, :])  # 0 on padded rows and keys (-inf scores)
    dpt = pt * 0.0  # zeros that wait for pt: the compiler cannot start dP^T's dots before the exp
    for c in range(NUM_C):
        cc = c * DC + offs_c
        c_ok = cc < D
        v = tl.load(
            q_ptr + 2 * C * s_qc + offs_n[:, None] * s_qn + cc[None, :] * s_qc, mask=key_ok[:, None] & c_ok[None, :], other=0.0
        )
        do = tl.load(do_ptr + offs_m[:, None] * s_dn + cc[None, :] * s_dc, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        dpt = _mm_acc(v, tl.trans(do.to(in_ty)), dpt, FP64, PREC)
    delta = tl.sum(pt * dpt, axis=0)  # D_i = sum_j P_ij dP_ij, per query (column)
    ptb = pt.to(in_ty)
    dst = pt * (dpt - delta[None, :])
    # Every window adds (the kernel zeroed the slot before its barrier): one op, so one layout and one
    # thread per element for all windows; a first-window store lowered to another layout on sm_80
    # (a different thread per element) and was ordered only by a barrier Triton happened to insert.
    # A red.add: no 32 registers of loaded sums (a load-add-store spills fp32 at sm_80); in window
    # order per element: deterministic.
    tl.atomic_add(slot_ptr + tile, dst.to(slot_ptr.dtype.element_ty), sem="relaxed")
    dstb = dst.to(in_ty)
    for c in range(NUM_C):
        cc = c * DC + offs_c
        c_ok = cc < D
        kv_mask = key_ok[:, None] & c_ok[None, :]
        q_mask = row_ok[:, None] & c_ok[None, :]
        dk_ptrs = dq_ptr + C * s_gc + offs_n[:, None] * s_gn + cc[None, :] * s_gc
        do = tl.load(do_ptr + offs_m[:, None] * s_dn + cc[None, :] * s_dc, mask=q_mask, other=0.0)
        dv = _mm(ptb, do.to(in_ty), FP64, PREC)
        tl.store(dk_ptrs + C * s_gc, dv.to(out_ty), mask=kv_mask)
        qs = _qs_chunk(q_ptr, offs_m, cc, row_ok, c_ok, s_qn, s_qc, scale_hi, scale_lo, FP64)
        dk = _mm(dstb, qs, FP64, PREC)
        tl.store(dk_ptrs, dk.to(out_ty), mask=kv_mask)
        k = tl.load(q_ptr + C * s_qc + offs_n[:, None] * s_qn + cc[None, :] * s_qc, mask=kv_mask, other=0.0)
        dq = _mm(tl.trans(dstb), k, FP64, PREC)
        if FP64:
            dq = dq * scale_hi + dq * scale_lo
        else:
            dq = dq * scale_hi
        tl.store(dq_ptr + offs_m[:, None] * s_gn + cc[None, :] * s_gc, dq.to(out_ty), mask=q_mask)


@triton.jit(noinline=True)
def _bwd_window(
    q_ptr,
    do_ptr,
    lse_ptr,
    dq_ptr,
    slot_ptr,
    s_qn,
    s_qc,
    s_dn,
    s_dc,
    s_gn,
    s_gc,
    C,
    first,
    scale_hi,
    scale_lo,
    WS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP64: tl.constexpr,
    PREC: tl.constexpr,
    SLOT: tl.constexpr,
    DC: tl.constexpr,
):
    """Backward of one window and head: dq, dk, dv stored, dS added into the program's slot.

    The pointers are those of the window and head (q and its dq at channel h*d of window b, the
    log-sum-exp row of (b, h)). Not inlined on purpose: inlined into the window loop, the compiler
    hoists every loop-invariant pointer and index tile out of it and keeps them live across
    windows (255 registers and spills); as a call, each window starts from a few scalars.

    Works on transposed tiles, keys as rows: S^T = k @ (q*scale)^T, so P^T and dS^T feed dv = P^T @ dO
    and dk = dS^T @ (q*scale) straight from registers (only dq = dS @ k goes through shared memory),
    which needs fewer registers than the query-row form. Bias + mask (-inf on padding) are read
    from the program's scratch with the same offsets as the slot."""
    N = WS * WS
    NUM_RB: tl.constexpr = BLOCK_N // BLOCK_M  # annotated: Triton 3.6's interpreter makes it a tensor otherwise
    if FP64:
        acc_ty = tl.float64
    else:
        acc_ty = tl.float32
    if DC < BLOCK_D:
        _bwd_window_chunks(
            q_ptr, do_ptr, lse_ptr, dq_ptr, slot_ptr, s_qn, s_qc, s_dn, s_dc, s_gn, s_gc, C, scale_hi, scale_lo,
            WS, D, BLOCK_N, BLOCK_D, FP64, PREC, SLOT, DC,
        )  # fmt: skip
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < N
    d_ok = offs_d < D
    kv_mask = key_ok[:, None] & d_ok[None, :]
    kv_offs = offs_n[:, None] * s_qn + offs_d[None, :] * s_qc
    k = tl.load(q_ptr + C * s_qc + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(q_ptr + 2 * C * s_qc + kv_offs, mask=kv_mask, other=0.0)
    out_ty = dq_ptr.dtype.element_ty
    dk_ptrs = dq_ptr + C * s_gc + offs_n[:, None] * s_gn + offs_d[None, :] * s_gc
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_ty)
    for rb in range(NUM_RB):  # blocks of BLOCK_M queries: the columns of the tiles
        offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + offs_m[:, None] * s_qn + offs_d[None, :] * s_qc, mask=q_mask, other=0.0)
        if FP64:
            qs = q * scale_hi + q * scale_lo  # scale = hi + lo: fp64 precision from two fp32 args
        else:
            qs = (q.to(tl.float32) * scale_hi).to(q.dtype)  # like the reference: rounded to the input dtype
        tile = offs_m[None, :] * BLOCK_N + offs_n[:, None]  # (key j, query i): the slot's entry (i, j)
        st = _mm(k, tl.trans(qs), FP64, PREC) + tl.load(slot_ptr + SLOT + tile).to(acc_ty)
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
        pt = tl.exp(st - lse.to(acc_ty)[None, :])  # 0 on padded rows and keys (-inf scores)
        do = tl.load(do_ptr + offs_m[:, None] * s_dn + offs_d[None, :] * s_dc, mask=q_mask, other=0.0)
        do = do.to(v.dtype)
        dv += _mm(pt.to(v.dtype), do, FP64, PREC)
        if NUM_RB == 1:  # stored at once: its registers are free for the rest of the window
            tl.store(dk_ptrs + C * s_gc, dv.to(out_ty), mask=kv_mask)
        dpt = _mm(v, tl.trans(do), FP64, PREC)
        delta = tl.sum(pt * dpt, axis=0)  # D_i = sum_j P_ij dP_ij, per query (column)
        dst = pt * (dpt - delta[None, :])
        dk += _mm(dst.to(qs.dtype), qs, FP64, PREC)
        if NUM_RB == 1:  # likewise, and dk's dot is not interleaved with dq's
            tl.store(dk_ptrs, dk.to(out_ty), mask=kv_mask)
        dq = _mm(tl.trans(dst.to(k.dtype)), k, FP64, PREC)
        if FP64:
            dq = dq * scale_hi + dq * scale_lo
        else:
            dq = dq * scale_hi
        tl.store(dq_ptr + offs_m[:, None] * s_gn + offs_d[None, :] * s_gc, dq.to(out_ty), mask=q_mask)
        slot_ptrs = slot_ptr + tile
        if first:  # the program's first window writes the slot, the others add to it
            tl.store(slot_ptrs, dst.to(slot_ptr.dtype.element_ty))
        else:
            tl.debug_barrier()
            acc = tl.load(slot_ptrs)
            tl.store(slot_ptrs, acc + dst.to(acc.dtype))
    if NUM_RB > 1:
        tl.store(dk_ptrs, dk.to(out_ty), mask=kv_mask)
        tl.store(dk_ptrs + C * s_gc, dv.to(out_ty), mask=kv_mask)


@triton.jit
def _window_attention_bwd_kernel(
    qkv_ptr,
    table_ptr,
    mask_ptr,
    do_ptr,
    lse_ptr,
    dqkv_ptr,
    dbias_ptr,
    s_qb,
    s_qn,
    s_qc,
    s_tr,
    s_th,
    s_mw,
    s_mi,
    s_mj,
    s_db,
    s_dn,
    s_dc,
    s_gb,
    s_gn,
    s_gc,
    B,
    C,
    nW,
    win_rows,
    win_cols,
    shift,
    windows_per_group,
    scale_hi,
    scale_lo,
    WS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    FP64: tl.constexpr,
    PREC: tl.constexpr,
    DC: tl.constexpr,
):
    """One program per (group g of windows at one window position, head h).

    Group g holds the windows b = j * nW + (g % nW) for a range of j, which share one mask slice
    and the bias: bias + mask is built once into the program's scratch. Per program, 2 * SLOT
    elements of ``dbias_ptr``: the (BLOCK_N, BLOCK_N) bias gradient summed over the group's
    windows (no other program touches it), a zero the host-side gather reads for keys
    outside the window, then the bias + mask scratch.
    """
    g = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    N = WS * WS
    SLOT: tl.constexpr = BLOCK_N * BLOCK_N + 4
    w = g % nW
    slot_ptr = dbias_ptr + (g.to(tl.int64) * H + h) * (2 * SLOT)
    tl.store(slot_ptr + BLOCK_N * BLOCK_N, 0.0)
    offs_m = tl.arange(0, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    pair_ok = (offs_m < N)[:, None] & (offs_n < N)[None, :]
    bm = _relative_bias(table_ptr, s_tr, s_th, h, offs_m, offs_n, pair_ok, WS, FP64)
    if HAS_MASK:
        mk = tl.load(mask_ptr + w.to(tl.int64) * s_mw + offs_m[:, None] * s_mi + offs_n[None, :] * s_mj, mask=pair_ok, other=0.0)
        bm += mk.to(bm.dtype)
    elif shift > 0:  # the shift mask of a rolled grid, computed as in the forward
        bm += _grid_mask(w, win_rows, win_cols, shift, offs_m, offs_n, WS).to(bm.dtype)
    bm = tl.where(pair_ok, bm, float("-inf"))
    tl.store(slot_ptr + SLOT + offs_m[:, None] * BLOCK_N + offs_n[None, :], bm.to(dbias_ptr.dtype.element_ty))
    if DC < BLOCK_D:  # the chunked path adds every window's dS into a zeroed slot
        tl.store(slot_ptr + offs_m[:, None] * BLOCK_N + offs_n[None, :], tl.zeros_like(bm).to(dbias_ptr.dtype.element_ty))
    tl.debug_barrier()  # the scratch is read back in another layout (and the zeros are in before any add)

    start = (g // nW) * windows_per_group
    end = tl.minimum(start + windows_per_group, B // nW)
    # a while loop: Triton 3.6's interpreter rejects range() with runtime bounds (its scalars are
    # 1-element arrays, which range() cannot take)
    j = start
    while j < end:
        b = (j * nW + w).to(tl.int64)
        _bwd_window(
            qkv_ptr + b * s_qb + h * D * s_qc,
            do_ptr + b * s_db + h * D * s_dc,
            lse_ptr + (b * H + h) * N,
            dqkv_ptr + b * s_gb + h * D * s_gc,
            slot_ptr,
            s_qn,
            s_qc,
            s_dn,
            s_dc,
            s_gn,
            s_gc,
            C,
            j == start,
            scale_hi,
            scale_lo,
            WS,
            D,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            FP64,
            PREC,
            SLOT,
            DC,
        )
        j += 1


# Under TRITON_INTERPRET=1 triton.jit returns an interpreted function, which torch cannot trace.
_INTERPRETED = not isinstance(_window_attention_fwd_kernel, triton.runtime.jit.JITFunction)


# ----------------------------------------------------------------------------------------------
# Argument checks and capability
# ----------------------------------------------------------------------------------------------


def _check_args(qkv, table, mask, num_heads, scale, shifted_grid=None) -> tuple[int, int, int, int, int]:
    """Validate the arguments; returns (B_, N, C, head_dim, window_size). Raises TypeError/ValueError."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv must be a Tensor, got {type(qkv).__name__}")
    if qkv.dtype not in _DTYPES:
        raise TypeError(f"qkv: dtype {qkv.dtype} is not supported (float16, bfloat16, float32, float64)")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B*nW, N, 3C), got shape {tuple(qkv.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if isinstance(scale, bool) or not isinstance(scale, Real) or not abs(float(scale)) < 3.0e38:
        raise ValueError(f"scale must be a finite real number within the float32 range, got {scale!r}")
    B_, N, C3 = qkv.shape
    if C3 % 3 != 0:
        raise ValueError(f"qkv: last dim must be 3C ([q | k | v]), got {C3}")
    C = C3 // 3
    if C == 0 or C % num_heads != 0:
        raise ValueError(f"qkv: C = {C} channels are not divisible by num_heads = {num_heads}")
    d = C // num_heads
    if d > MAX_HEAD_DIM:
        raise ValueError(f"qkv: head dim {d} > {MAX_HEAD_DIM} is not supported by the fused kernel")
    ws = math.isqrt(N)
    if N == 0 or ws * ws != N:
        raise ValueError(f"qkv: tokens per window N = {N} must be a square number (window_size**2)")
    if N > MAX_TOKENS:
        raise ValueError(f"qkv: N = {N} tokens per window > {MAX_TOKENS} (window size > 16) is not supported")
    if not isinstance(table, Tensor):
        raise TypeError(f"table must be a Tensor, got {type(table).__name__}")
    if table.dtype not in _DTYPES:
        raise TypeError(f"table: dtype {table.dtype} is not supported (a floating dtype is needed)")
    rows = (2 * ws - 1) ** 2
    if tuple(table.shape) != (rows, num_heads):
        raise ValueError(
            f"table must be ((2*ws-1)**2, num_heads) = ({rows}, {num_heads}) for window size {ws}, got {tuple(table.shape)}"
        )
    if table.device != qkv.device:
        raise ValueError(f"table is on {table.device} but qkv is on {qkv.device}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a Tensor or None, got {type(mask).__name__}")
        if mask.dtype not in _DTYPES:
            raise TypeError(f"mask: dtype {mask.dtype} is not supported (an additive floating mask is needed)")
        if mask.dim() != 3 or mask.shape[1] != N or mask.shape[2] != N or mask.shape[0] == 0:
            raise ValueError(f"mask must be (nW, N, N) = (nW, {N}, {N}), got {tuple(mask.shape)}")
        if B_ % mask.shape[0] != 0:
            raise ValueError(f"mask: nW = {mask.shape[0]} windows does not divide qkv's B*nW = {B_}")
        if mask.device != qkv.device:
            raise ValueError(f"mask is on {mask.device} but qkv is on {qkv.device}")
        if mask.requires_grad:
            raise ValueError("mask requires grad, but the fused kernel gives no mask gradient (it is a buffer)")
    if shifted_grid is not None:
        if mask is not None:
            raise ValueError("mask and shifted_grid were both given: the shift mask comes from one or the other")
        shifted_grid_of(shifted_grid, ws, B_)
    return B_, N, C, d, ws


def _device_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "qkv is a CPU tensor: set TRITON_INTERPRET=1 to run the Triton kernel on CPU"
        if not _INTERPRETED:
            return (
                "qkv is a CPU tensor and the Triton kernels were compiled for a GPU: set TRITON_INTERPRET=1 "
                "before importing htsat_kernels to run the Triton kernel on CPU"
            )
        return None
    return f"qkv is on {device.type}; the Triton kernel runs on CUDA (or on CPU with TRITON_INTERPRET=1)"


def unsupported_reason(qkv, table, mask, num_heads, scale, dropout_p=0.0, shifted_grid=None) -> str | None:
    """None when the fused kernel can run this call, else why not (a human-readable sentence)."""
    if dropout_p:
        return f"the fused window attention has no attention dropout (dropout_p={dropout_p}); the reference has"
    try:
        _, N, _, d, _ = _check_args(qkv, table, mask, num_heads, scale, shifted_grid)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return _device_reason(qkv.device) or _limits_reason(qkv, N, d)


def _limits_reason(qkv: Tensor, N: int, d: int) -> str | None:
    """``resource_reason`` for the device of ``qkv`` (no limits to keep off a GPU: the interpreter)."""
    arch = _device_arch(qkv.device)
    return None if arch is None else resource_reason(N, d, qkv.dtype, arch)


# ----------------------------------------------------------------------------------------------
# Launchers (bodies of the registered ops)
# ----------------------------------------------------------------------------------------------


def _blocks(N: int, d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M query rows per step, BLOCK_N >= N keys, BLOCK_D >= d, num_warps)."""
    block_n = max(16, triton.next_power_of_2(N))
    block_d = max(16, triton.next_power_of_2(d))
    # fp64 multiplies by broadcast-and-sum: (BLOCK_M, K, N) products, so keep BLOCK_M small
    block_m = min(block_n, 16 if dtype == torch.float64 else (64 if block_n <= 128 else 32))
    num_warps = 4 if block_n <= 64 else 8
    return block_m, block_n, block_d, num_warps


def _bwd_chunk(block_m: int, block_n: int, block_d: int, dtype: torch.dtype, arch: int | None) -> int:
    """DC, the head-dim columns per chunk of the backward (``_bwd_window_chunks`` when < BLOCK_D):
    the one with the fewest registers (bf16/fp16: 128 or fewer; d = 64 at sm_90 with 8 warps, 80) or without
    spills (fp32, whose tf32x3 dots hold three operand splits), from the compile report at sm_80
    and sm_90."""
    if block_m < block_n or dtype == torch.float64:  # several query blocks (N > 64), or fp64: one chunk
        return block_d
    if dtype == torch.float32:  # K >= 16: Triton 3.6 rejects tl.dot of 32-bit operands with K = 8
        return 16
    if block_d <= 32:
        return block_d
    return 32 if (arch or DEFAULT_ARCH) >= 90 else 16


DEFAULT_ARCH = 90  # the configuration of the interpreter (CPU) and of a device of unknown capability


def launch_config(direction: str, N: int, d: int, dtype: torch.dtype, has_mask: bool, arch: int | None = None) -> dict:
    """Compile-time parameters (constexprs and num_warps) of the ``direction`` ("forward" or
    "backward") kernel for one call on a device of compute capability ``arch`` (major * 10 + minor,
    e.g. 80 or 90; None: as DEFAULT_ARCH). The launchers and the compile report
    (bench/compile_report.py) both call this, so the report compiles exactly what a launch would."""
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    block_m, block_n, block_d, num_warps = _blocks(N, d, dtype)
    if direction == "forward" and dtype == torch.float32 and (arch or DEFAULT_ARCH) < 90:
        block_m = min(block_m, 16)  # sm_80's tf32x3 mma.sync operands spill at 32 or 64 query rows
    cfg = dict(
        WS=math.isqrt(N),
        D=d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HAS_MASK=has_mask,
        FP64=dtype == torch.float64,
        PREC=_dot_precision(dtype),
        num_warps=num_warps,
    )
    if direction == "backward":
        cfg["DC"] = _bwd_chunk(block_m, block_n, block_d, dtype, arch)
        if block_d >= 64 and block_m == block_n and dtype in (torch.float16, torch.bfloat16) and (arch or DEFAULT_ARCH) >= 90:
            # d = 64 (clap-large) at sm_90: two warpgroups. At 4 warps the 64x64 fp32 tiles need 126-130
            # registers (3 blocks, 12 warps per SM); at 8 warps 79-80 and 3 blocks: 24 warps per SM.
            cfg["num_warps"] = 8
    return cfg


def resource_reason(N: int, d: int, dtype: torch.dtype, arch: int | None) -> str | None:
    """Why the kernels cannot run a window of N tokens at head dim d in ``dtype`` on a device of
    compute capability ``arch`` within its limits (shared memory per block, no register spills in
    fp16/bf16), or None. From the compile report's grid (bench/static_triton.py, N in 49..256,
    d in 24..64, sm_80 / sm_86 / sm_90), which its test checks against this rule."""
    if dtype == torch.float32 and N > 64:
        return (
            f"fp32 windows of N = {N} > 64 tokens: the fp32 backward needs 160-460 KB of shared memory per block "
            "(over the limit of every GPU from N = 144 on) and spills registers at 1 block per SM"
        )
    if dtype in (torch.float16, torch.bfloat16):
        if N > 128:
            return f"{dtype} windows of N = {N} > 128 tokens: the backward's 256-key tiles spill registers"
        small_shared = (arch or DEFAULT_ARCH) not in _ARCHS_WITH_BIG_SHARED
        if N > 64 and d > 32 and small_shared:
            return (
                f"{dtype} windows of N = {N} > 64 tokens at head dim {d} > 32 on compute capability {arch} "
                "(99 KB of shared memory per block): the backward spills registers"
            )
    return None


# compute capabilities with 163 KB or more of shared memory per block (A100, Orin, H100/H200, B200)
_ARCHS_WITH_BIG_SHARED = (80, 87, 90, 100, 103)


def _device_arch(device: torch.device) -> int | None:
    """Compute capability of a CUDA device as major * 10 + minor; None elsewhere."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _kernel(fn):
    """The launchable kernel: traceable through wrap_triton when compiled (the forward's, inside its
    triton_op), raw when interpreted."""
    return fn if _INTERPRETED else torch.library.wrap_triton(fn)


_INT32_MAX = 2**31 - 1


def _int32_addressable(t: Tensor, from_dim: int = 1) -> Tensor:
    """``t``, or a contiguous copy when an element offset the kernels form in int32 (dims from
    ``from_dim`` on; the window dim is int64 in the kernels) could pass 2**31: the op takes any
    strides, Triton's pointer arithmetic on int32 arguments is 32-bit."""
    reach = sum((n - 1) * abs(st) for n, st in zip(t.shape[from_dim:], t.stride()[from_dim:]) if n > 0)
    return t if reach <= _INT32_MAX else t.contiguous()


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _split_scale(scale: float) -> tuple[float, float]:
    """scale = hi + lo with hi, lo fp32 (kernel float args are fp32; fp64 mode uses hi + lo)."""
    hi = struct.unpack("f", struct.pack("f", float(scale)))[0]
    return hi, float(scale) - hi


def _mask_args(mask: Tensor | None, dummy: Tensor, ws: int, grid_h: int, grid_w: int, shift: int):
    """(mask tensor, its strides, nW, HAS_MASK, windows per grid column, per grid row, shift): a mask
    tensor, or shift > 0 and the mask computed in the kernel from the (grid_h, grid_w) grid, or none."""
    if mask is not None:
        return mask, mask.stride(0), mask.stride(1), mask.stride(2), mask.shape[0], True, 1, 1, 0
    if shift > 0:
        rows, cols = grid_h // ws, grid_w // ws
        return dummy, 0, 0, 0, rows * cols, False, rows, cols, shift
    return dummy, 0, 0, 0, 1, False, 1, 1, 0


def _fp32_matmul_allows_tf32(matmul: Any = None) -> bool:
    """PyTorch's own setting for fp32 matmuls on CUDA: ``torch.backends.cuda.matmul.fp32_precision``
    ("tf32" / "ieee", or "none": the generic ``torch.backends.fp32_precision``) where it exists,
    ``allow_tf32`` on older torch (reading ``allow_tf32`` after the new API was used can raise)."""
    matmul = torch.backends.cuda.matmul if matmul is None else matmul
    prec = getattr(matmul, "fp32_precision", None)
    if prec is None:
        return bool(matmul.allow_tf32)
    if prec == "none":
        prec = getattr(torch.backends, "fp32_precision", "ieee")
    return prec == "tf32"


def _dot_precision(dtype: torch.dtype, matmul: Any = None) -> str:
    """tl.dot's input_precision: fp32 follows PyTorch's fp32 matmul setting on tensor cores, "tf32"
    where TF32 is allowed, else "tf32x3" (three TF32 products: about fp32 accuracy; "ieee" has no
    tensor-core path and spills); bf16 under the interpreter upcasts (its dot misreads bf16)."""
    if dtype == torch.float32:
        return "tf32" if _fp32_matmul_allows_tf32(matmul) else "tf32x3"
    return "upcast" if _INTERPRETED and dtype == torch.bfloat16 else "ieee"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_impl(
    qkv: Tensor, table: Tensor, mask: Tensor | None, num_heads: int, scale: float, grid_h: int, grid_w: int, shift: int
) -> tuple[Tensor, Tensor]:
    B_, N, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    qkv, table = _int32_addressable(qkv), _int32_addressable(table, 0)
    mask = None if mask is None else _int32_addressable(mask)
    out = torch.empty((B_, N, C), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((B_, num_heads, N), dtype=_acc_dtype(qkv.dtype), device=qkv.device)
    if B_ == 0:
        return out, lse
    mask_t, s_mw, s_mi, s_mj, nW, has_mask, win_rows, win_cols, shift = _mask_args(
        mask, qkv, math.isqrt(N), grid_h, grid_w, shift
    )
    cfg = launch_config("forward", N, d, qkv.dtype, has_mask, _device_arch(qkv.device))
    hi, lo = _split_scale(scale)
    with _device_guard(qkv):
        _kernel(_window_attention_fwd_kernel)[(B_ * num_heads, triton.cdiv(N, cfg["BLOCK_M"]))](
            qkv,
            table,
            mask_t,
            out,
            lse,
            qkv.stride(0),
            qkv.stride(1),
            qkv.stride(2),
            table.stride(0),
            table.stride(1),
            s_mw,
            s_mi,
            s_mj,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            C,
            nW,
            win_rows,
            win_cols,
            shift,
            hi,
            lo,
            **cfg,
        )
    return out, lse


DEFAULT_BLOCKS_PER_SM = 4  # backward programs per SM assumed where the compiled kernel cannot be read
_RESIDENT: dict[tuple, int] = {}


def _blocks_per_sm(n_regs: int, shared: int, num_warps: int, props: Any) -> int:
    """Resident blocks per SM of a kernel (CUDA occupancy rules: registers allocated per warp in
    units of 256, 1 KB of shared memory reserved per block) on a device with ``props``."""
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // regs_per_warp // num_warps
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    by_smem = smem // (shared + 1024) if shared else by_threads
    return max(1, min(by_regs, by_threads, by_smem))


def _resident_blocks(fn, make_args, cfg: dict, device: torch.device) -> int:
    """Blocks per SM of the backward kernel as compiled for ``device`` (registers and shared memory
    read from the compiled kernel, cached per configuration and device); DEFAULT_BLOCKS_PER_SM on
    CPU, while tracing (fake tensors cannot specialise a compile) or if the metadata is unreadable."""
    if device.type != "cuda" or _INTERPRETED:
        return DEFAULT_BLOCKS_PER_SM
    if _tracing():
        return DEFAULT_BLOCKS_PER_SM
    key = (tuple(sorted(cfg.items())), str(device))
    if key not in _RESIDENT:
        try:
            kernel = fn.warmup(*make_args(), grid=(1,), **cfg)
            kernel._init_handles()  # loads the binary: sets n_regs
            n_regs = int(kernel.n_regs)
            shared = int(getattr(kernel.metadata, "shared", 0) or 0)
            _RESIDENT[key] = _blocks_per_sm(n_regs, shared, cfg["num_warps"], torch.cuda.get_device_properties(device))
        except Exception:  # an unexpected Triton API: the documented default, never a failed backward
            _RESIDENT[key] = DEFAULT_BLOCKS_PER_SM
    return _RESIDENT[key]


def _num_groups(B_: int, nW: int, num_heads: int, device: torch.device, blocks_per_sm: int) -> int:
    """Groups of windows for the backward (one program per group and head): a multiple of nW (a
    group holds windows of one window position), about ``blocks_per_sm`` programs per SM."""
    per_pos = B_ // nW  # windows at each window position
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = max(1, -(-blocks_per_sm * sms // num_heads))
    else:
        target = 4
    chunks = max(1, min(per_pos, round(target / nW)))
    per_chunk = -(-per_pos // chunks)
    return nW * -(-per_pos // per_chunk)


_GATHER_INDEX: dict[tuple[int, int, int, str], Tensor] = {}


def _table_gather_index(ws: int, heads: int, block_n: int, device: torch.device) -> Tensor:
    """((2ws-1)^2 * heads * N,) int64 index into one group's heads * 2*SLOT elements (SLOT =
    block_n^2 + 4; the kernel's bias gradient of (query i, key j) at i * block_n + j, a zero at
    block_n^2), laid out as (table row, head, query token): for table row (dh, dw), head h and
    query i, the position of (i, j = i - (dh, dw)), or the zero if j is outside the window.

    Cached per (ws, heads, block_n, device): built on the host and copied with a synchronous copy,
    so it is complete before any stream reads it (built on the first caller's stream, another
    stream could read it unfilled). Built afresh on the device, never cached, while tracing (a
    tensor made under a fake or proxy mode must not outlive the trace) or while the stream is
    captured into a CUDA graph (a host copy cannot be captured; the graph's own index is filled at
    each replay)."""
    key = (ws, heads, block_n, str(device))
    if _tracing() or _capturing(device):
        return _build_gather_index(ws, heads, block_n, device)
    if key not in _GATHER_INDEX:
        _GATHER_INDEX[key] = _build_gather_index(ws, heads, block_n, torch.device("cpu")).to(device)
    return _GATHER_INDEX[key]


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.utils._python_dispatch.is_in_torch_dispatch_mode()


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _build_gather_index(ws: int, heads: int, block_n: int, device: torch.device) -> Tensor:
    n = ws * ws
    rel = torch.arange(2 * ws - 1, device=device) - (ws - 1)
    pos = torch.arange(ws, device=device)
    key_pos = pos[None, :] - rel[:, None]  # (2ws-1, ws): key coordinate for each offset and query coordinate
    ok = (key_pos >= 0) & (key_pos < ws)
    query = pos[:, None] * ws + pos[None, :]  # (ws, ws) query token index
    key_tok = key_pos[:, None, :, None] * ws + key_pos[None, :, None, :]  # (dh, dw, qh, qw)
    flat = query[None, None] * block_n + key_tok
    valid = ok[:, None, :, None] & ok[None, :, None, :]
    flat = torch.where(valid, flat, torch.full_like(flat, block_n * block_n)).reshape((2 * ws - 1) ** 2, 1, n)
    head = torch.arange(heads, device=device).reshape(1, heads, 1) * (2 * (block_n * block_n + 4))
    return (flat + head).reshape(-1)


def _bias_grad_to_table(parts: Tensor, ws: int, block_n: int) -> Tensor:
    """(groups, h, 2*SLOT) per-program slots -> ((2ws-1)^2, h) table gradient in two launches (a
    gather and one fixed-shape sum over groups and query tokens): no atomics, bit-identical runs."""
    groups, h, _ = parts.shape
    n = ws * ws
    index = _table_gather_index(ws, h, block_n, parts.device)
    gathered = torch.index_select(parts.reshape(groups, -1), 1, index)
    return gathered.reshape(groups, (2 * ws - 1) ** 2, h, n).sum(dim=(0, 3))


def _bwd_impl(
    grad_out: Tensor,
    qkv: Tensor,
    table: Tensor,
    mask: Tensor | None,
    lse: Tensor,
    num_heads: int,
    scale: float,
    grid_h: int,
    grid_w: int,
    shift: int,
) -> tuple[Tensor, Tensor]:
    B_, N, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    ws = math.isqrt(N)
    qkv, table, grad_out = _int32_addressable(qkv), _int32_addressable(table, 0), _int32_addressable(grad_out)
    mask = None if mask is None else _int32_addressable(mask)
    dqkv = torch.empty((B_, N, C3), dtype=qkv.dtype, device=qkv.device)
    if B_ == 0:
        return dqkv.zero_(), torch.zeros_like(table)
    mask_t, s_mw, s_mi, s_mj, nW, has_mask, win_rows, win_cols, shift = _mask_args(mask, qkv, ws, grid_h, grid_w, shift)
    cfg = launch_config("backward", N, d, qkv.dtype, has_mask, _device_arch(qkv.device))
    hi, lo = _split_scale(scale)
    block_n = cfg["BLOCK_N"]
    acc = _acc_dtype(qkv.dtype)

    def launch_args(groups: int) -> tuple:
        per_group = -(-(B_ // nW) // (groups // nW))
        # every element of a program's 2*SLOT is written (or never read) by the kernel
        parts = torch.empty((groups, num_heads, 2 * (block_n * block_n + 4)), dtype=acc, device=qkv.device)
        strides: tuple = (qkv.stride(0), qkv.stride(1), qkv.stride(2), table.stride(0), table.stride(1), s_mw, s_mi, s_mj)
        strides += (grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), dqkv.stride(0), dqkv.stride(1), dqkv.stride(2))
        return (qkv, table, mask_t, grad_out, lse, dqkv, parts, *strides, B_, C, nW, win_rows, win_cols, shift, per_group, hi, lo)

    with _device_guard(qkv):
        blocks = DEFAULT_BLOCKS_PER_SM
        if qkv.device.type == "cuda":
            provisional = _num_groups(B_, nW, num_heads, qkv.device, DEFAULT_BLOCKS_PER_SM)
            blocks = _resident_blocks(_window_attention_bwd_kernel, lambda: launch_args(provisional), cfg, qkv.device)
        groups = _num_groups(B_, nW, num_heads, qkv.device, blocks)
        args = launch_args(groups)
        # launched as is, not through wrap_triton: the backward op is opaque to Inductor (see its registration)
        _window_attention_bwd_kernel[(groups, num_heads)](*args, **cfg)
    dbias_parts = args[6]
    dtable = _bias_grad_to_table(dbias_parts, ws, block_n).to(table.dtype)
    return dqkv, dtable


# ----------------------------------------------------------------------------------------------
# torch.library registration and autograd
# ----------------------------------------------------------------------------------------------


def window_attention_fwd(
    qkv: Tensor, table: Tensor, mask: Tensor | None, num_heads: int, scale: float, grid_h: int, grid_w: int, shift: int
) -> tuple[Tensor, Tensor]:
    """(out (B_, N, C), lse (B_, h, N) log-sum-exp of each score row). shift > 0 (mask None): the
    shift mask of a grid_h x grid_w map rolled by -shift, computed in the kernel."""
    return _fwd_impl(qkv, table, mask, num_heads, scale, grid_h, grid_w, shift)


def window_attention_bwd(
    grad_out: Tensor,
    qkv: Tensor,
    table: Tensor,
    mask: Tensor | None,
    lse: Tensor,
    num_heads: int,
    scale: float,
    grid_h: int,
    grid_w: int,
    shift: int,
) -> tuple[Tensor, Tensor]:
    """(dqkv (B_, N, 3C) in the qkv layout, dtable ((2ws-1)^2, h))."""
    return _bwd_impl(grad_out, qkv, table, mask, lse, num_heads, scale, grid_h, grid_w, shift)


def _fake_fwd(qkv, table, mask, num_heads, scale, grid_h, grid_w, shift):
    B_, N, C3 = qkv.shape
    out = qkv.new_empty((B_, N, C3 // 3))
    lse = qkv.new_empty((B_, num_heads, N), dtype=_acc_dtype(qkv.dtype))
    return out, lse


def _fake_bwd(grad_out, qkv, table, mask, lse, num_heads, scale, grid_h, grid_w, shift):
    return qkv.new_empty(qkv.shape), table.new_empty(table.shape)


_fwd_op: Any  # a CustomOpDef (interpreter) or the triton_op's function (GPU)
if _INTERPRETED:
    # Interpreted kernels are plain Python: register opaque custom ops with explicit fakes.
    _fwd_op = torch.library.custom_op("htsat_kernels::window_attention_fwd", window_attention_fwd, mutates_args=())
    _fwd_op.register_fake(_fake_fwd)
else:
    # triton_op derives the fake implementation by running the body on fake tensors; Inductor
    # re-emits the kernel from source (a plain @triton.jit, which the forward kernel is).
    _fwd_op = torch.library.triton_op("htsat_kernels::window_attention_fwd", window_attention_fwd, mutates_args=())
# The backward is opaque to Inductor everywhere (a custom op, its kernel launched as compiled here):
# Inductor re-emits user Triton kernels from source with a plain @triton.jit, which drops
# noinline=True on _bwd_window (HTS-AT stage 1 bf16: 125 -> 158 registers at sm_90, 127 -> 168 at
# sm_80, 3 blocks per SM instead of 4). Opaque, it also runs with real tensors under torch.compile,
# so the grid is sized from the kernel that actually compiled (``_resident_blocks``).
_bwd_op = torch.library.custom_op("htsat_kernels::window_attention_bwd", window_attention_bwd, mutates_args=())
_bwd_op.register_fake(_fake_bwd)


def _setup_context(ctx, inputs, output):
    qkv, table, mask, num_heads, scale, grid_h, grid_w, shift = inputs
    _, lse = output
    ctx.save_for_backward(qkv, table, mask, lse)
    ctx.num_heads = num_heads
    ctx.scale = scale
    ctx.grid = (grid_h, grid_w, shift)
    ctx.mark_non_differentiable(lse)


@first_order_only("window_attention")
def _backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output for the backward; it is marked non-differentiable.
    qkv, table, mask, lse = ctx.saved_tensors
    dqkv, dtable = torch.ops.htsat_kernels.window_attention_bwd(
        grad_out, qkv, table, mask, lse, ctx.num_heads, ctx.scale, *ctx.grid
    )
    return dqkv, dtable, None, None, None, None, None, None


torch.library.register_autograd("htsat_kernels::window_attention_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def fused_window_attention(
    qkv: Tensor,
    table: Tensor,
    mask: Tensor | None,
    num_heads: int,
    scale: float,
    dropout_p: float = 0.0,
    shifted_grid: tuple[int, int, int] | None = None,
) -> Tensor:
    """Fused window attention; same contract as ``htsat_kernels.reference.window_attention``.

    qkv (B_, N, 3C) (any strides), table ((2ws-1)^2, h), mask (nW, N, N) or None -> (B_, N, C);
    shifted_grid (H, W, shift) with mask None: the shift mask is computed in the kernel.
    Raises TypeError / ValueError naming the bad argument, RuntimeError if the device cannot run it
    or ``dropout_p`` is not 0 (no dropout in the kernel).
    """
    if dropout_p:
        raise RuntimeError(f"fused window attention cannot run: no attention dropout (dropout_p={dropout_p})")
    _, N, _, d, _ = _check_args(qkv, table, mask, num_heads, scale, shifted_grid)
    reason = _device_reason(qkv.device) or _limits_reason(qkv, N, d)
    if reason is not None:
        raise RuntimeError(f"fused window attention cannot run: {reason}")
    grid_h, grid_w, shift = (int(v) for v in shifted_grid) if shifted_grid is not None else (0, 0, 0)
    out, _ = torch.ops.htsat_kernels.window_attention_fwd(qkv, table, mask, int(num_heads), float(scale), grid_h, grid_w, shift)
    return out
