"""laion-clap's HTSAT audio branch and the original HTS-AT code, on htsat_kernels ops.

laion-clap ships the original HTS-AT model code (``clap_module/htsat.py``: the Swin blocks,
WindowAttention, PatchMerging and BasicLayer are the original's), so one patch serves both. Facts
from that code that the replacements rely on:

- ``SwinTransformerBlock``: norm1 (LayerNorm) -> view (B, H, W, C) -> roll by -shift -> partition
  (windows batch-major, row-major) -> attention with the ``attn_mask`` buffer (nW, N, N, 0 / -100)
  -> merge -> roll by +shift -> ``shortcut + drop_path(x)`` -> ``x + drop_path(mlp(norm2(x)))``.
  While that buffer is the grid's own mask (fp32, checked per buffer version), the op gets the grid
  (H, W, shift) instead and the fused kernel computes the mask.
  Where the map is no larger than the window, the block already set shift 0 and window = map.
- ``WindowAttention``: one qkv Linear ([q | k | v], heads contiguous), ``q * scale`` before q k^T,
  bias ``table[index]`` with index (hi-hj+ws-1)(2ws-1) + (wi-wj+ws-1), softmax, dropout, proj.
- ``PatchMerging``: cat of x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2], LayerNorm(4C),
  Linear(4C, 2C) without bias.

Those are exactly the contracts of ``layer_norm_window_partition``, ``window_attention``,
``window_merge_add`` and ``patch_merge``. Not kept: the attention maps the original returns beside
x (blocks and layers return None there; the fused attention never forms them, and forward() drops
them anyway); call ``undo()`` to get them back.
"""

from __future__ import annotations

from typing import Any

import torch.utils.checkpoint
from torch import Tensor, nn

import htsat_kernels as hk

from ._handle import PatchHandle, class_names, patched_forward

TOP_LEVEL = ("CLAP_Module", "CLAP", "HTSAT_Swin_Transformer", "SEDWrapper")


def _drop_path_active(module: nn.Module) -> bool:
    return module.training and float(getattr(module, "drop_prob", 0.0) or 0.0) > 0.0


def window_attention_of(attn: Any, windows: Tensor, mask: Tensor | None, grid: tuple[int, int, int] | None = None) -> Tensor:
    """The original WindowAttention's output (without its attention map) through htsat_kernels; ``grid``
    (H, W, shift) instead of ``mask``: the op builds the shift mask (the fused kernel in registers)."""
    qkv = attn.qkv(windows)
    table = attn.relative_position_bias_table
    p = attn.attn_drop.p
    if attn.training and p > 0.0:
        # the fused op has no dropout: the reference math applies it (same RNG draws as the original)
        out = hk.reference.window_attention(qkv, table, mask, attn.num_heads, attn.scale, p, shifted_grid=grid)
    else:
        out = hk.window_attention(qkv, table, mask, attn.num_heads, attn.scale, shifted_grid=grid)
    return attn.proj_drop(attn.proj(out))


def _mask_is_the_grids(block: Any) -> bool:
    """Whether the block's attn_mask buffer holds exactly the shift mask of its grid, so the grid can be
    passed instead; in any float dtype (a .half() model's buffer: 0 and -100 are exact in each). Checked
    once per buffer version (a load_state_dict into the buffer changes it), never while torch.compile
    traces (the buffer is passed there). A mask that requires grad is passed as it is: its gradient is wanted."""
    mask = block.attn_mask
    if mask is None or not mask.is_floating_point() or mask.requires_grad or mask.is_meta or torch.compiler.is_compiling():
        return False
    key = (mask.data_ptr(), mask._version, mask.device)
    cached = block.__dict__.get("_htsat_kernels_grid_check")
    if cached is None or cached[0] != key:
        H, W = block.input_resolution
        want = hk.reference.shifted_window_mask(H, W, block.window_size, block.shift_size).to(mask.device)
        cached = (key, mask.shape == want.shape and bool(torch.equal(mask.float(), want)))
        block.__dict__["_htsat_kernels_grid_check"] = cached
    return cached[1]


@patched_forward
def block_forward(self, x: Tensor):
    H, W = self.input_resolution
    B, L, C = x.shape
    ws, shift = self.window_size, self.shift_size
    x = x.contiguous()  # no-op for the blocks' own outputs; the fused ops read (B, H, W, C) rows
    shortcut = x
    n1 = self.norm1
    if isinstance(n1, nn.LayerNorm) and n1.elementwise_affine and n1.bias is not None:
        windows = hk.layer_norm_window_partition(x.view(B, H, W, C), n1.weight, n1.bias, n1.eps, ws, shift)
    else:
        windows = hk.window_partition(n1(x).view(B, H, W, C), ws, shift)
    if shift > 0 and _mask_is_the_grids(self):
        windows = window_attention_of(self.attn, windows, None, (H, W, shift))
    else:
        windows = window_attention_of(self.attn, windows, self.attn_mask)
    if _drop_path_active(self.drop_path):
        # drop path scales whole samples: merge first, then the original's shortcut + drop_path(x)
        x = shortcut + self.drop_path(hk.window_merge(windows, H, W, shift).view(B, L, C))
    else:
        x = hk.window_merge_add(windows, shortcut, H, W, shift)
    x = x + self.drop_path(self.mlp(self.norm2(x)))
    return x, None


@patched_forward
def patch_merging_forward(self, x: Tensor) -> Tensor:
    H, W = self.input_resolution
    B, L, C = x.shape
    norm = self.norm
    if H % 2 or W % 2 or not isinstance(norm, nn.LayerNorm) or norm.bias is None:
        return type(self).forward(self, x)  # the original asserts and reports odd sizes itself
    return self.reduction(hk.patch_merge(x.view(B, H, W, C), norm.weight, norm.bias, norm.eps))


def _block_only(block: nn.Module, x: Tensor) -> Tensor:
    return block(x)[0]


@patched_forward
def basic_layer_forward(self, x: Tensor):
    for blk in self.blocks:
        if self.use_checkpoint and self.training:
            # the original passes the (x, attn) tuple on here, which the next block cannot take
            x = torch.utils.checkpoint.checkpoint(_block_only, blk, x, use_reentrant=False)
        else:
            x = blk(x)[0]
    if self.downsample is not None:
        x = self.downsample(x)
    return x, None


def _is_block(m: nn.Module) -> bool:
    attn = getattr(m, "attn", None)
    return (
        "SwinTransformerBlock" in class_names(m)
        and attn is not None
        and "WindowAttention" in class_names(attn)
        and isinstance(getattr(attn, "qkv", None), nn.Linear)
        and hasattr(attn, "relative_position_bias_table")
        and hasattr(m, "input_resolution")
        and hasattr(m, "attn_mask")
    )


def _is_patch_merging(m: nn.Module) -> bool:
    return (
        "PatchMerging" in class_names(m)
        and hasattr(m, "input_resolution")
        and isinstance(getattr(m, "reduction", None), nn.Linear)
        and isinstance(getattr(m, "norm", None), nn.Module)
    )


def _is_basic_layer(m: nn.Module) -> bool:
    return "BasicLayer" in class_names(m) and isinstance(getattr(m, "blocks", None), nn.ModuleList)


def recognises(model: nn.Module) -> bool:
    return bool(class_names(model) & set(TOP_LEVEL))


def patch(model: nn.Module, handle: PatchHandle) -> None:
    """Install the replacement forwards on every Swin block, patch merge and stage of ``model``."""
    for _, m in model.named_modules():
        if _is_block(m):
            handle._install(m, block_forward, "blocks")
        elif _is_patch_merging(m):
            handle._install(m, patch_merging_forward, "patch merges")
        elif _is_basic_layer(m):
            handle._install(m, basic_layer_forward, "stages")
