"""transformers' CLAP audio encoder (``ClapAudioLayer``, ``ClapAudioPatchMerging``) on htsat_kernels ops.

Facts from transformers' ``modeling_clap.py`` (a port of laion-clap's HTSAT) that the replacements
rely on, checked by tests/test_integrations.py against the unpatched model:

- ``ClapAudioLayer.forward(hidden_states, input_dimensions, output_attentions, always_partition)``:
  ``set_shift_and_window_size`` (shift 0 and window = map where the map is no larger than the
  window), ``layernorm_before`` -> view (B, H, W, C) -> zero-pad H, W up to multiples of the window
  -> roll by -shift -> partition (batch-major, row-major) -> attention with ``get_attn_mask`` of the
  padded map (nW, N, N; 0 / -100; the same 3 x 3 regions as the original) -> merge -> roll by
  +shift -> crop -> ``shortcut + drop_path(x)`` -> ``x + output(intermediate(layernorm_after(x)))``;
  returns a tuple.
- ``ClapAudioSelfAttention``: separate query / key / value Linears (heads contiguous), scores
  ``q k^T / sqrt(d)``, bias ``table[index]`` with the original's index, softmax, dropout;
  ``ClapAudioSelfOutput``: dense + dropout.
- ``ClapAudioPatchMerging.forward(x, input_dimensions)``: zero-pad odd H / W, cat of
  x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2], LayerNorm(4C), Linear(4C, 2C).

q / k / v: their weights (and biases) are concatenated per call with ``torch.cat`` into one
[q | k | v] projection, so gradients reach the original Linears and nothing is added to the
state_dict; the copy (3 C^2 values per block) is small next to the activations.
``output_attentions=True`` runs the original forward (the fused attention never forms the maps).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import htsat_kernels as hk

from ._handle import PatchHandle, class_names, patched_forward

TOP_LEVEL = ("ClapModel", "ClapAudioModel", "ClapAudioModelWithProjection", "ClapAudioEncoder")


def _qkv_projection(sa: Any, windows: Tensor) -> Tensor:
    q, k, v = sa.query, sa.key, sa.value
    weight = torch.cat([q.weight, k.weight, v.weight], dim=0)
    biases = (q.bias, k.bias, v.bias)
    if all(b is None for b in biases):
        bias = None
    else:
        bias = torch.cat([b if b is not None else q.weight.new_zeros(q.out_features) for b in biases])
    return F.linear(windows, weight, bias)


def attention_of(attention: Any, windows: Tensor, grid: tuple[int, int, int] | None) -> Tensor:
    """``ClapAudioAttention(windows, mask)[0]`` through htsat_kernels; the shift mask is given as the
    shifted grid (Hp, Wp, shift): the op builds ``get_attn_mask``'s -100/0 mask itself (tested equal),
    the fused kernel in registers without reading a mask tensor."""
    sa: Any = attention.self
    qkv = _qkv_projection(sa, windows)
    table, heads = sa.relative_position_bias_table, sa.num_attention_heads
    scale = sa.attention_head_size**-0.5
    p = sa.dropout.p
    if sa.training and p > 0.0:
        # the fused op has no dropout: the reference math applies it (same RNG draws as transformers)
        context = hk.reference.window_attention(qkv, table, None, heads, scale, p, shifted_grid=grid)
    else:
        context = hk.window_attention(qkv, table, None, heads, scale, shifted_grid=grid)
    return attention.output(context, windows)


def _drop_path_active(module: nn.Module) -> bool:
    return module.training and float(getattr(module, "drop_prob", 0.0) or 0.0) > 0.0


@patched_forward
def layer_forward(self, hidden_states: Tensor, input_dimensions, output_attentions=False, always_partition=False):
    if output_attentions:
        return type(self).forward(self, hidden_states, input_dimensions, output_attentions, always_partition)
    if not always_partition:
        self.set_shift_and_window_size(input_dimensions)
    ws, shift = int(self.window_size), int(self.shift_size)
    if tuple(self.attention.self.window_size) != (ws, ws):
        # a window smaller than the bias table's: the original forward behaves as it does
        return type(self).forward(self, hidden_states, input_dimensions, output_attentions, always_partition)
    H, W = input_dimensions
    B, L, C = hidden_states.shape
    pad_h, pad_w = (ws - H % ws) % ws, (ws - W % ws) % ws
    Hp, Wp = H + pad_h, W + pad_w
    hidden_states = hidden_states.contiguous()  # no-op unless the patch embedding has no norm (a transposed view)
    shortcut = hidden_states
    ln = self.layernorm_before
    if not (pad_h or pad_w) and ln.elementwise_affine and ln.bias is not None:
        windows = hk.layer_norm_window_partition(hidden_states.view(B, H, W, C), ln.weight, ln.bias, ln.eps, ws, shift)
    else:
        x = F.pad(ln(hidden_states).view(B, H, W, C), (0, 0, 0, pad_w, 0, pad_h))
        windows = hk.window_partition(x, ws, shift)
    windows = attention_of(self.attention, windows, (Hp, Wp, shift) if shift > 0 else None)
    if not (pad_h or pad_w) and not _drop_path_active(self.drop_path):
        hidden_states = hk.window_merge_add(windows, shortcut, H, W, shift)
    else:
        x = hk.window_merge(windows, Hp, Wp, shift)
        if pad_h or pad_w:
            x = x[:, :H, :W, :]
        hidden_states = shortcut + self.drop_path(x.reshape(B, L, C))
    out = self.intermediate(self.layernorm_after(hidden_states))
    return (hidden_states + self.output(out),)


@patched_forward
def patch_merging_forward(self, input_feature: Tensor, input_dimensions) -> Tensor:
    H, W = input_dimensions
    B, L, C = input_feature.shape
    norm = self.norm
    if H % 2 or W % 2 or not norm.elementwise_affine or norm.bias is None:
        return type(self).forward(self, input_feature, input_dimensions)  # odd maps: its own zero padding
    merged = hk.patch_merge(input_feature.view(B, H, W, C), norm.weight, norm.bias, norm.eps)
    return self.reduction(merged)


def _is_layer(m: nn.Module) -> bool:
    attention = getattr(m, "attention", None)
    sa = getattr(attention, "self", None)
    return (
        "ClapAudioLayer" in class_names(m)
        and sa is not None
        and all(isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value"))
        and hasattr(sa, "relative_position_bias_table")
        and isinstance(getattr(m, "layernorm_before", None), nn.LayerNorm)
        and hasattr(m, "set_shift_and_window_size")
    )


def _is_patch_merging(m: nn.Module) -> bool:
    return (
        "ClapAudioPatchMerging" in class_names(m)
        and isinstance(getattr(m, "norm", None), nn.LayerNorm)
        and isinstance(getattr(m, "reduction", None), nn.Linear)
    )


def recognises(model: nn.Module) -> bool:
    return bool(class_names(model) & set(TOP_LEVEL))


def patch(model: nn.Module, handle: PatchHandle) -> None:
    """Install the replacement forwards on every audio Swin layer and patch merge of ``model``."""
    for _, m in model.named_modules():
        if _is_layer(m):
            handle._install(m, layer_forward, "blocks")
        elif _is_patch_merging(m):
            handle._install(m, patch_merging_forward, "patch merges")
