"""Pure-PyTorch reference of every op: the fallback, the test oracle and the benchmark baseline.

Each function follows the original HTS-AT / Swin code step by step (docs/model.md §4.1-4.5), so the
model on this path reproduces the original's outputs. Shapes use N = window_size**2 tokens per
window, C channels, h heads, d = C / h.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def window_size_of(num_tokens: int) -> int:
    """Window side from the number of tokens per window (N = ws * ws)."""
    ws = math.isqrt(num_tokens)
    if ws * ws != num_tokens:
        raise ValueError(f"tokens per window must be a square number, got {num_tokens}")
    return ws


def _relative_position_index(window_size: int) -> Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # (2, N): row, col of each token
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    rel = rel + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


@functools.cache
def _relative_position_index_cached(window_size: int, device: torch.device) -> Tensor:
    return _relative_position_index(window_size).to(device)  # one copy per device, not one per call


def relative_position_index(window_size: int, device=None) -> Tensor:
    """(N, N) int64: index into the ((2ws-1)^2, h) table for query i and key j.

    index = (hi - hj + ws - 1) * (2ws - 1) + (wi - wj + ws - 1), as in the original (docs/model.md §4.2).
    """
    if torch.compiler.is_compiling():  # traced once into the graph; the eager cache is for eager calls
        return _relative_position_index(window_size).to(device)
    return _relative_position_index_cached(window_size, torch.device(device or "cpu"))


def shifted_window_mask(H: int, W: int, window_size: int, shift: int) -> Tensor:
    """(nW, N, N) float32 additive mask of a shifted block: 0 inside a region, -100 across regions."""
    img_mask = torch.zeros(1, H, W, 1)
    slices = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    label = 0
    for hs in slices:
        for ws in slices:
            img_mask[:, hs, ws, :] = label
            label += 1
    windows = window_partition(img_mask, window_size).squeeze(-1)  # (nW, N)
    mask = windows[:, None, :] - windows[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


@functools.cache
def _shifted_window_mask_cached(H: int, W: int, window_size: int, shift: int, device: torch.device) -> Tensor:
    return shifted_window_mask(H, W, window_size, shift).to(device)


def grid_mask(shifted_grid: tuple[int, int, int], window_size: int, device=None) -> Tensor:
    """The (nW, N, N) float32 mask that ``shifted_grid`` = (H, W, shift) describes:
    ``shifted_window_mask(H, W, window_size, shift)``, cached per device in eager mode."""
    H, W, shift = (int(v) for v in shifted_grid)
    if torch.compiler.is_compiling():  # traced into the graph; the eager cache is for eager calls
        return shifted_window_mask(H, W, window_size, shift).to(device)
    return _shifted_window_mask_cached(H, W, window_size, shift, torch.device(device or "cpu"))


def window_partition(x: Tensor, window_size: int, shift: int = 0) -> Tensor:
    """(B, H, W, C) -> (B*nW, N, C), after a cyclic shift of the content by -shift on H and W.

    Windows are ordered batch-major, then window row, then window column; tokens row-major.
    """
    B, H, W, C = x.shape
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    nh, nw = H // window_size, W // window_size
    x = x.reshape(B, nh, window_size, nw, window_size, C)  # reshape: any strides (channels-last too)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, window_size * window_size, C)


def window_merge(windows: Tensor, H: int, W: int, shift: int = 0) -> Tensor:
    """(B*nW, N, C) -> (B, H, W, C): the inverse of window_partition, including the +shift roll."""
    window_size = window_size_of(windows.shape[1])
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // window_size) * (W // window_size))
    x = windows.reshape(B, H // window_size, W // window_size, window_size, window_size, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x


def layer_norm_window_partition(x: Tensor, weight: Tensor, bias: Tensor, eps: float, window_size: int, shift: int = 0) -> Tensor:
    """A block's norm1 then window_partition: (B, H, W, C) -> (B*nW, N, C) of LayerNorm(C)(x)."""
    return window_partition(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), window_size, shift)


def window_merge_add(windows: Tensor, shortcut: Tensor, H: int, W: int, shift: int = 0) -> Tensor:
    """A block's residual: shortcut + window_merge(windows); shortcut (B, H*W, C) or (B, H, W, C)."""
    return shortcut + window_merge(windows, H, W, shift).reshape(shortcut.shape)


def patch_merge(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """(B, H, W, C) -> (B, H/2 * W/2, 4C): 2x2 gather [x0, x1, x2, x3] then LayerNorm(4C) (docs/model.md §4.5)."""
    B, H, W, C = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"x: patch_merge needs even H and W (dims 1 and 2), got H={H}, W={W}")
    x0 = x[:, 0::2, 0::2, :]  # even rows, even cols
    x1 = x[:, 1::2, 0::2, :]  # odd rows, even cols
    x2 = x[:, 0::2, 1::2, :]  # even rows, odd cols
    x3 = x[:, 1::2, 1::2, :]  # odd rows, odd cols
    # reshape with explicit sizes: cat may keep a channels-last layout, and B = 0 or C = 0 leave -1 ambiguous
    x = torch.cat([x0, x1, x2, x3], dim=-1).reshape(B, (H // 2) * (W // 2), 4 * C)
    return F.layer_norm(x, (4 * C,), weight, bias, eps)


def window_attention(
    qkv: Tensor,
    table: Tensor,
    mask: Tensor | None,
    num_heads: int,
    scale: float,
    dropout_p: float = 0.0,
    shifted_grid: tuple[int, int, int] | None = None,
) -> Tensor:
    """Window multi-head self-attention with relative-position bias and optional shift mask.

    qkv (B_, N, 3C) straight from the qkv Linear ([q | k | v], heads contiguous in each third);
    table ((2ws-1)^2, h); mask (nW, N, N) additive or None, window index = batch index mod nW.
    ``shifted_grid`` = (H, W, shift), with mask None: the windows were cut from an H x W map rolled
    by -shift, and the mask is ``shifted_window_mask(H, W, ws, shift)``, built where it is used (the
    fused kernel computes it from the token coordinates and never reads a mask tensor); here it is
    added in float32 under autocast, else in qkv's dtype, as a model's mask buffer would be.
    Returns (B_, N, C), heads concatenated. q is scaled before q @ k^T, as in the original.
    ``dropout_p`` > 0 applies dropout to the probabilities (as F.scaled_dot_product_attention, whatever
    the module's mode: the model passes its attn_drop_rate in training and 0 in eval).
    """
    B_, N, C3 = qkv.shape
    C = C3 // 3
    head_dim = C // num_heads
    qkv = qkv.reshape(B_, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * scale
    attn = q @ k.transpose(-2, -1)  # (B_, h, N, N)
    index = relative_position_index(window_size_of(N), table.device)
    bias = table[index.view(-1)].view(N, N, num_heads).permute(2, 0, 1)
    attn = attn + bias.unsqueeze(0)
    if shifted_grid is not None:
        mask = grid_mask(shifted_grid, window_size_of(N), qkv.device)
        if not torch.is_autocast_enabled(qkv.device.type):
            mask = mask.to(qkv.dtype)  # exact: 0 and -100
    if mask is not None:
        nW = mask.shape[0]
        attn = attn.view(B_ // nW, nW, num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, N, N)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p, training=True)
    return (attn @ v).transpose(1, 2).reshape(B_, N, C)
