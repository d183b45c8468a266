"""Window attention on CPU through ``F.scaled_dot_product_attention``: what ``auto`` runs for CPU tensors.

ATen's fused CPU attention (flash-style, one pass over the scores) replaces the reference's two bmm
calls, the bias and mask additions and the softmax, each of which writes a (B_, h, N, N) tensor: 2.5-7x
faster per stage at HTS-AT's shapes (``python -m bench --cpu-runtimes`` measures the whole model). The
relative-position bias and the shift mask are folded into one (nW * h, N, N) additive mask that
broadcasts over the clips (windows and heads share one axis, the layout the fused kernel accepts).
Values and gradients equal the reference within fp32 rounding (tests/test_cpu_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import grid_mask, relative_position_index, window_size_of

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def sdpa_unsupported_reason(qkv: Tensor, table: Tensor, mask, num_heads: int, scale: float, dropout_p=0.0, shifted_grid=None):
    if qkv.device.type != "cpu":
        return "the SDPA path is for CPU tensors"
    if qkv.dtype not in _DTYPES:
        return f"the SDPA path takes {', '.join(map(str, _DTYPES))}, not {qkv.dtype}"
    if dropout_p > 0.0:
        return "attention dropout (training) stays on the reference"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast: the reference keeps its dtype rules"
    return None


def sdpa_window_attention(qkv: Tensor, table: Tensor, mask, num_heads: int, scale: float, dropout_p=0.0, shifted_grid=None):
    """The op's contract (``htsat_kernels.reference.window_attention``) through SDPA."""
    B_, N, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    if shifted_grid is not None:
        mask = grid_mask(shifted_grid, window_size_of(N), qkv.device)
    nW = mask.shape[0] if mask is not None else 1
    B = B_ // nW
    parts = qkv.view(B, nW, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, d)
    q, k, v = (p.reshape(B, nW * num_heads, N, d) for p in parts.unbind(0))
    index = relative_position_index(window_size_of(N), qkv.device)
    bias = table[index.view(-1)].view(N, N, num_heads).permute(2, 0, 1)  # (h, N, N)
    if mask is not None:
        dense = (bias.unsqueeze(0) + mask.to(bias.dtype).unsqueeze(1)).reshape(1, nW * num_heads, N, N)
    else:
        dense = bias.unsqueeze(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense.to(q.dtype), scale=scale)
    return out.view(B, nW, num_heads, N, d).permute(0, 1, 3, 2, 4).reshape(B_, N, C)
