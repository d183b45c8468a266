"""Swin Transformer layers of HTS-AT (docs/model.md §4), with every hot op called through htsat_kernels.

Module names and parameter shapes follow the original so its checkpoints load unchanged. Departures
(docs/model.md §11, §14): blocks return only their output (no attention maps are kept or stacked), gradient
checkpointing works, and patch_norm=False only removes the patch-embedding norm.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

import htsat_kernels as hk
from htsat_kernels import recompute
from htsat_kernels.reference import relative_position_index, shifted_window_mask


class DropPath(nn.Module):
    """Stochastic depth per sample (active in training only)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """(B, 1, S, S) image -> (B, (S/stride)^2, embed_dim) tokens, row-major, then LayerNorm."""

    def __init__(self, img_size: int, patch_size: int, patch_stride: tuple, in_chans: int, embed_dim: int, norm: bool):
        super().__init__()
        self.grid_size = (img_size // patch_stride[0], img_size // patch_stride[1])
        padding = ((patch_size - patch_stride[0]) // 2, (patch_size - patch_stride[1]) // 2)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class WindowAttention(nn.Module):
    """Window MHSA with the relative-position bias table; the softmax(QK^T+B+M)V core is one op."""

    def __init__(self, dim: int, window_size: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size).clone())
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = attn_drop  # the op's dropout_p in training (the fused kernel declines it: reference math)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, windows: Tensor, mask: Tensor | None, shifted_grid: tuple[int, int, int] | None = None) -> Tensor:
        return self.attend(self.qkv(windows), mask, shifted_grid)

    def attend(
        self, qkv: Tensor, mask: Tensor | None, shifted_grid: tuple[int, int, int] | None = None, save_probs: bool = True
    ) -> Tensor:
        """Attention and proj from the qkv projection's output. ``save_probs=False``: where the reference
        attention (or its CPU SDPA path) runs, keep qkv only and recompute the rest in backward (the
        fused kernel keeps qkv + log-sum-exp whatever this says)."""
        dropout_p = self.attn_drop if self.training else 0.0
        table = self.relative_position_bias_table
        nh, scale = self.num_heads, self.scale
        args = (qkv, table, mask, nh, scale, dropout_p, shifted_grid)
        if not save_probs and dropout_p == 0.0 and torch.is_grad_enabled() and recompute.runs_unfused("window_attention", *args):
            out = recompute.attention_saving_qkv(
                lambda q, t, m: hk.window_attention(q, t, m, nh, scale, 0.0, shifted_grid), qkv, table, mask
            )
        else:
            out = hk.window_attention(*args)
        return self.proj_drop(self.proj(out))


def _recheck_grid_mask(block: SwinTransformerBlock, incompatible_keys) -> None:
    """After load_state_dict: the block uses its grid only while attn_mask still equals the grid's mask."""
    mask = block.attn_mask
    if mask is None or mask.is_meta:
        block.mask_is_grid = mask is not None
        return
    H, W = block.input_resolution
    want = shifted_window_mask(H, W, block.window_size, block.shift_size).to(mask.device)
    block.mask_is_grid = mask.shape == want.shape and bool(torch.equal(mask.float(), want))


class SwinTransformerBlock(nn.Module):
    """Pre-norm block: (shifted) window attention then MLP, each with a residual and drop path."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        drop: float,
        attn_drop: float,
        drop_path: float,
        save_policy: str = "all",
    ):
        super().__init__()
        self.dim, self.input_resolution, self.num_heads = dim, input_resolution, num_heads
        # what the training forward keeps for backward (htsat_kernels.recompute.SAVE_POLICIES)
        self.save_policy = recompute.check_save_policy(save_policy)
        if min(input_resolution) <= window_size:  # the whole map is one window: no shift (docs/model.md §2)
            shift_size, window_size = 0, min(input_resolution)
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        H, W = input_resolution
        mask = shifted_window_mask(H, W, window_size, shift_size) if shift_size > 0 else None
        self.register_buffer("attn_mask", mask)  # kept: checkpoints hold it (and a changed one is honoured)
        # True while attn_mask holds the mask of this block's grid: the op then gets the grid
        # (H, W, shift) instead and the fused kernel computes the mask, never reading the buffer
        self.mask_is_grid = mask is not None
        self.register_load_state_dict_post_hook(_recheck_grid_mask)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape
        shortcut = x
        # norm1 + cyclic shift + partition is one op, so is merge + unshift + residual add (when
        # drop path is inactive): each a single pass over the activations on the fused backend
        n1 = self.norm1
        ws, shift = self.window_size, self.shift_size
        saving = recompute.saves_less(self.save_policy)
        if saving:  # the normalised windows are not kept for the qkv projection: backward recomputes them
            qkv_linear = self.attn.qkv
            qkv = recompute.recomputed_input_linear(
                lambda x_, w_, b_: hk.layer_norm_window_partition(x_, w_, b_, n1.eps, ws, shift),
                (x.view(B, H, W, C), n1.weight, n1.bias),
                qkv_linear.weight,
                qkv_linear.bias,
                "qkv, norm1 recomputed",
            )
        else:
            qkv = self.attn.qkv(hk.layer_norm_window_partition(x.view(B, H, W, C), n1.weight, n1.bias, n1.eps, ws, shift))
        # the grid's mask (0 and -100) is exact in every float dtype: a .half() / bf16 model keeps its grid;
        # a mask that requires grad is passed as it is (its gradient is wanted)
        if self.mask_is_grid and not self.attn_mask.requires_grad:
            windows = self.attn.attend(qkv, None, (H, W, shift), save_probs=not saving)
        else:
            windows = self.attn.attend(qkv, self.attn_mask, save_probs=not saving)
        if self.training and isinstance(self.drop_path, DropPath):
            x = hk.window_merge(windows, H, W, shift).reshape(B, L, C)
            x = shortcut + self.drop_path(x)
        else:
            x = hk.window_merge_add(windows, shortcut, H, W, shift)
        return x + self.drop_path(self._norm2_mlp(x))

    def _norm2_mlp(self, x: Tensor) -> Tensor:
        mlp, n2 = self.mlp, self.norm2
        if not recompute.saves_less(self.save_policy) or (self.training and mlp.drop.p > 0.0):
            return mlp(n2(x))
        # fc1 recomputes norm2 of the kept residual x; fc2 recomputes GELU of fc1's output, kept once
        C = x.shape[-1]
        h = recompute.recomputed_input_linear(
            lambda t, w, b: F.layer_norm(t, (C,), w, b, n2.eps),
            (x, n2.weight, n2.bias),
            mlp.fc1.weight,
            mlp.fc1.bias,
            "fc1, norm2 recomputed",
        )
        if self.save_policy == "recompute-norms-mlp":
            return recompute.recomputed_input_linear(mlp.act, (h,), mlp.fc2.weight, mlp.fc2.bias, "fc2, GELU recomputed")
        return mlp.fc2(mlp.act(h))


class PatchMerging(nn.Module):
    """2x2 neighbourhood gather + LayerNorm(4C) (one op), then Linear(4C, 2C) without bias."""

    def __init__(self, input_resolution: tuple, dim: int, save_policy: str = "all"):
        super().__init__()
        self.input_resolution, self.dim = input_resolution, dim
        self.save_policy = recompute.check_save_policy(save_policy)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape
        norm = self.norm
        if recompute.saves_less(self.save_policy):  # backward recomputes the gather + LayerNorm
            return recompute.recomputed_input_linear(
                lambda x_, w_, b_: hk.patch_merge(x_, w_, b_, norm.eps),
                (x.view(B, H, W, C), norm.weight, norm.bias),
                self.reduction.weight,
                None,
                "reduction, patch-merge norm recomputed",
            )
        x = hk.patch_merge(x.view(B, H, W, C), norm.weight, norm.bias, norm.eps)
        return self.reduction(x)


def _same_backend_on_recompute():
    """Checkpointed blocks recompute in the backward pass, outside HTSAT.forward's use_backend():
    run the recomputation on the backend in force now, so it saves what the forward saved."""
    return contextlib.nullcontext(), hk.use_backend(hk.current_backend())


class BasicLayer(nn.Module):
    """One stage: blocks alternating W-MSA and SW-MSA, then an optional patch merge."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop: float,
        attn_drop: float,
        drop_path: list,
        downsample: bool,
        use_checkpoint: bool,
        save_policy: str = "all",
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution,
                num_heads,
                window_size,
                0 if i % 2 == 0 else window_size // 2,
                mlp_ratio,
                drop,
                attn_drop,
                drop_path[i],
                save_policy,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(input_resolution, dim, save_policy) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False, context_fn=_same_backend_on_recompute)
            else:
                x = blk(x)
        return self.downsample(x) if self.downsample is not None else x
