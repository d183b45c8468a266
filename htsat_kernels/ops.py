"""The table of ops: one declaration per op, from which everything else that lists ops is built.

Each :class:`OpSpec` holds the op's public signature (that of its reference function, plus the
keyword ``backend=``), its argument check (``htsat_kernels.checks``), its fused implementation and
capability check (loaded lazily, so a missing extension or Triton only marks the op unavailable),
sample arguments at each HTS-AT stage (``htsat_kernels.shapes``), its bytes-moved and FLOP formulas,
a label and aliases. The public wrappers in ``htsat_kernels`` and their fused registration, the
dispatch tests, ``bench.ops`` and ``bench.report`` all iterate :data:`OPS`. Adding an op = one
declaration here + its reference + its kernels + tests of its numerics.

Cost formulas (per call, for the roofline; B_ = B*nW windows, N tokens per window, C channels, h heads):

- bytes: the minimal DRAM traffic, each tensor read or written once (s bytes per element). The
  attention's shift mask moves none: shifted stages pass their grid and the kernel computes it.
- FLOPs: arithmetic operations counted on the math, not on an implementation's extra work, except
  that the attention backward counts the recomputation of q@kᵀ (as flash-attention does: backward =
  2.5x the forward matmuls). Attention forward 4·B_·N²·C (q@kᵀ and p@v, 2 FLOPs per multiply-add)
  + (6 or 7 with the mask)·B_·h·N² (bias add, mask add, softmax: max, subtract, exp, sum, divide)
  + B_·N·C (q*scale); backward 10·B_·N²·C (five matmuls) + (8 or 9)·B_·h·N² + B_·N·C. LayerNorm
  8 FLOPs per element forward (mean 1, variance 3, normalise 2, affine 2) and 12 backward. Pure
  data movement (partition, merge) is 0 FLOPs; the residual add 1 per element forward, 0 backward.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import checks, reference
from .backends import FusedImpl
from .shapes import Stage

DIRECTIONS = ("forward", "backward")


@dataclass(frozen=True)
class Fused:
    """Where an op's fused implementation lives: ``htsat_kernels.fused.<module>`` and its names."""

    module: str
    run: str
    unsupported: str
    auto_on_cpu: bool = True
    # "auto" only: a reason to prefer the reference although the kernel could run (it is slower there)
    auto_declines: Callable[..., str | None] | None = None

    def load(self) -> FusedImpl:
        """Import the module (raises if the extension / Triton is missing) and wrap its functions; a module
        may say why it cannot run on the current GPU (``device_reason()``, for fused_status())."""
        mod = importlib.import_module(f"htsat_kernels.fused.{self.module}")
        return FusedImpl(
            getattr(mod, self.run),
            getattr(mod, self.unsupported),
            self.auto_on_cpu,
            self.auto_declines,
            getattr(mod, "device_reason", None),
        )


@dataclass(frozen=True)
class Cost:
    """A per-call count for each direction, with its formula (symbols) and the values used."""

    forward: int
    backward: int
    forward_formula: str
    backward_formula: str
    values: str

    def of(self, mode: str) -> tuple[int, str]:
        """(count, "formula; values") of ``mode``: "forward", "backward" or "full" (both)."""
        if mode == "forward":
            return self.forward, f"{self.forward_formula}; {self.values}"
        if mode == "backward":
            return self.backward, f"{self.backward_formula}; {self.values}"
        if mode == "full":
            return self.forward + self.backward, f"{self.forward_formula} + {self.backward_formula}; {self.values}"
        raise ValueError(f"unknown mode {mode!r}; expected forward, backward or full")


@dataclass(frozen=True)
class OpSpec:
    name: str
    label: str
    reference: Callable
    check: Callable[..., None]
    fused: Fused
    # argument values by parameter name at a stage: sample(stage, B, device, generator)
    sample: Callable[[Stage, int, torch.device, torch.Generator], dict]
    grad_args: tuple[str, ...]  # the differentiable tensor arguments
    traffic: Callable[[Stage, int], Cost]  # elements moved (multiply by bytes per element)
    flops: Callable[[Stage, int], Cost]
    shape: Callable[[Stage, int], str]
    example: Callable[[], tuple]  # small valid CPU arguments
    edge_examples: Callable[[], dict]  # name -> valid arguments at the edges every backend must accept
    aliases: tuple[str, ...] = ()
    applies_to: Callable[[Stage], bool] = field(default=lambda st: True)
    # what "auto" runs for CPU tensors it accepts, before the fused kernel and the reference
    cpu_auto: Fused | None = None

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.reference)

    @functools.cached_property
    def params(self) -> tuple[str, ...]:
        return tuple(self.signature.parameters)

    @functools.cached_property
    def defaults(self) -> dict:
        return {k: p.default for k, p in self.signature.parameters.items() if p.default is not inspect.Parameter.empty}

    def args(self, values: dict) -> tuple:
        """The positional arguments of a call from values by name (defaults filled in)."""
        return tuple(values[p] if p in values else self.defaults[p] for p in self.params)

    def bytes_moved(self, st: Stage, B: int, elem: int, mode: str) -> tuple[int, str]:
        """(bytes, "formula; values") of one call; s = ``elem`` bytes per element."""
        n, formula = self.traffic(st, B).of(mode)
        return n * elem, f"{formula} s={elem}"

    def flop_count(self, st: Stage, B: int, mode: str) -> tuple[int, str]:
        return self.flops(st, B).of(mode)

    def stages(self, stages) -> list[Stage]:
        return [s for s in stages if self.applies_to(s)]


def _slower_on_cpu_in_fp16(x: Tensor, *args) -> str | None:
    """The C++ CPU LayerNorm twins convert fp16 element by element: eager PyTorch is faster there
    (bench/results/cpu_*.json); fp32 and bf16 are faster fused at every HTS-AT shape."""
    if x.device.type == "cpu" and x.dtype == torch.float16:
        return "the reference is faster for float16 on CPU (use backend='fused' to force the C++ twin)"
    return None


def _attention_fp64_on_gpu(qkv: Tensor, *args) -> str | None:
    """The Triton kernel's fp64 dots are a broadcast-and-sum (meant for gradcheck) that spills on a GPU."""
    if qkv.device.type == "cuda" and qkv.dtype == torch.float64:
        return "the fused kernel runs float64 on CUDA without tensor cores (use backend='fused' to force it)"
    return None


# --------------------------------------------------------------------------------------------
# Shared pieces of the declarations


def _values(st: Stage, B: int) -> str:
    return f"B={B} H={st.H} W={st.W} C={st.C}"


def _map_shape(st: Stage, B: int) -> str:
    return f"B={B} H={st.H} W={st.W} C={st.C} ws={st.window} shift={st.shift}"


def _ln_affine(rnd, n: int) -> dict:
    return {"weight": 1.0 + 0.1 * rnd(n), "bias": 0.1 * rnd(n)}


def _layer_norm_flops(st: Stage, B: int) -> Cost:
    n = B * st.H * st.W * st.C
    return Cost(8 * n, 12 * n, "fwd 8·B·H·W·C [LayerNorm]", "bwd 12·B·H·W·C [LayerNorm]", _values(st, B))


def _no_flops(st: Stage, B: int) -> Cost:
    return Cost(0, 0, "fwd 0 [data movement]", "bwd 0 [data movement]", _values(st, B))


def _channels_last(shape) -> Tensor:
    """A (B, H, W, C) tensor whose memory is (B, C, H, W) order: non-contiguous, as torch's channels_last."""
    B, H, W, C = shape
    return torch.randn(B, C, H, W).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------------------------
# window_attention


def _attention_sample(st: Stage, B: int, device, g) -> dict:
    """As the model calls it: a shifted stage passes its grid (the shift mask is computed), no mask tensor."""
    rnd = functools.partial(torch.randn, generator=g, device=device)
    values: dict = {"qkv": rnd(B * st.nW, st.N, 3 * st.C), "table": 0.5 * rnd(st.table_rows, st.heads), "mask": None}
    values["shifted_grid"] = (st.H, st.W, st.shift) if st.shift else None
    return {**values, "num_heads": st.heads, "scale": st.head_dim**-0.5, "dropout_p": 0.0}


def _attention_traffic(st: Stage, B: int) -> Cost:
    """The shift mask of a shifted stage is computed from its grid (``shifted_grid``): no mask bytes."""
    N, C, h, nW, rows = st.N, st.C, st.heads, st.nW, st.table_rows
    Bw = B * nW
    mtxt = " [shift mask computed, not read]" if st.shift else ""
    return Cost(
        Bw * N * 3 * C + Bw * N * C + rows * h,
        2 * Bw * N * 3 * C + Bw * N * C + 2 * rows * h,
        f"fwd (B_·N·3C [qkv] + B_·N·C [out] + {rows}·h [table])·s{mtxt}",
        f"bwd (B_·N·3C [qkv] + B_·N·C [dout] + B_·N·3C [dqkv] + 2·{rows}·h [table, dtable])·s{mtxt}",
        f"B_={Bw} N={N} C={C} h={h}" + (f" nW={nW}" if st.shift else ""),
    )


def _attention_flops(st: Stage, B: int) -> Cost:
    N, C, h, Bw = st.N, st.C, st.heads, B * st.nW
    masked = 1 if st.shift else 0
    mtxt = " incl. mask add" if masked else ""
    return Cost(
        4 * Bw * N * N * C + (6 + masked) * Bw * h * N * N + Bw * N * C,
        10 * Bw * N * N * C + (8 + masked) * Bw * h * N * N + Bw * N * C,
        f"fwd 4·B_·N²·C [q@kᵀ, p@v] + {6 + masked}·B_·h·N² [bias, softmax{mtxt}] + B_·N·C [scale]",
        f"bwd 10·B_·N²·C [5 matmuls incl. q@kᵀ recompute] + {8 + masked}·B_·h·N² [softmax grad{mtxt}] + B_·N·C",
        f"B_={Bw} N={N} C={C} h={h}",
    )


def _attention_shape(st: Stage, B: int) -> str:
    mask = f" nW={st.nW} shift mask of the grid" if st.shift else " no mask"
    return f"B={B} B_={B * st.nW} N={st.N} C={st.C} h={st.heads} d={st.head_dim}{mask}"


def _attention_example() -> tuple:
    return (torch.randn(4, 16, 3 * 8), torch.randn(49, 2), None, 2, 4**-0.5, 0.0)


def _attention_edges() -> dict:
    mask = reference.shifted_window_mask(8, 8, 4, 2)
    strided = torch.randn(16, 4, 3 * 8 + 5).transpose(0, 1)[:, :, 2 : 2 + 3 * 8]
    return {
        "empty batch": (torch.randn(0, 16, 24), torch.randn(49, 2), mask, 2, 0.25, 0.0),
        "non-contiguous qkv": (strided, torch.randn(49, 2), mask, 2, 0.25, 0.0),
        "one token per window": (torch.randn(3, 1, 12), torch.randn(1, 2), None, 2, 0.5, 0.0),
        "fp32 table with fp64 qkv": (torch.randn(4, 16, 24, dtype=torch.float64), torch.randn(49, 2), None, 2, 0.25, 0.0),
        "shift mask from the grid": (torch.randn(8, 16, 24), torch.randn(49, 2), None, 2, 0.25, 0.0, (8, 8, 2)),
        "non-square grid": (torch.randn(6, 16, 24), torch.randn(49, 2), None, 2, 0.25, 0.0, (8, 12, 1)),
    }


# --------------------------------------------------------------------------------------------
# window_partition / window_merge / the LayerNorm and residual fusions / patch_merge


def _map_sample(st: Stage, B: int, device, g) -> dict:
    return {"x": torch.randn(B, st.H, st.W, st.C, generator=g, device=device), "window_size": st.window, "shift": st.shift}


def _windows_sample(st: Stage, B: int, device, g) -> dict:
    windows = torch.randn(B * st.nW, st.N, st.C, generator=g, device=device)
    return {"windows": windows, "H": st.H, "W": st.W, "shift": st.shift}


def _copy_traffic(st: Stage, B: int) -> Cost:
    n = 2 * B * st.H * st.W * st.C
    return Cost(n, n, "fwd 2·B·H·W·C·s [read + write]", "bwd 2·B·H·W·C·s [read dout + write dx]", _values(st, B))


def _partition_edges() -> dict:
    return {
        "empty batch": (torch.randn(0, 8, 8, 3), 4, 2),
        "no channels": (torch.randn(2, 8, 8, 0), 4, 2),
        "channels-last": (_channels_last((2, 8, 8, 3)), 4, 2),
        "one window": (torch.randn(2, 4, 4, 3), 4, 0),
        "shift over the map": (torch.randn(1, 8, 8, 3), 4, 9),
        "negative shift": (torch.randn(1, 8, 8, 3), 4, -3),
    }


def _merge_edges() -> dict:
    return {
        "empty batch": (torch.randn(0, 16, 3), 8, 8, 2),
        "no channels": (torch.randn(8, 16, 0), 8, 8, 2),
        "non-contiguous": (torch.randn(16, 8, 3).transpose(0, 1), 8, 8, 2),
        "one window": (torch.randn(2, 16, 3), 4, 4, 0),
        "negative shift": (torch.randn(4, 16, 3), 8, 8, -3),
    }


def _ln_partition_sample(st: Stage, B: int, device, g) -> dict:
    rnd = functools.partial(torch.randn, generator=g, device=device)
    x = rnd(B, st.H, st.W, st.C)
    return {"x": x, **_ln_affine(rnd, st.C), "eps": 1e-5, "window_size": st.window, "shift": st.shift}


def _ln_partition_traffic(st: Stage, B: int) -> Cost:
    n = B * st.H * st.W * st.C
    return Cost(
        2 * n + 2 * st.C,
        3 * n + 3 * st.C,
        "fwd (2·B·H·W·C [x, out] + 2·C [weight, bias])·s",
        "bwd (3·B·H·W·C [x, dout, dx] + 3·C [weight, dweight, dbias])·s",
        _values(st, B),
    )


def _ln_partition_edges() -> dict:
    def args(x, ws, shift):
        C = x.shape[-1]
        return (x, torch.rand(C) + 0.5, torch.randn(C), 1e-5, ws, shift)

    return {name: args(*a) for name, a in _partition_edges().items()}


def _merge_add_sample(st: Stage, B: int, device, g) -> dict:
    rnd = functools.partial(torch.randn, generator=g, device=device)
    windows = rnd(B * st.nW, st.N, st.C)
    return {"windows": windows, "shortcut": rnd(B, st.H * st.W, st.C), "H": st.H, "W": st.W, "shift": st.shift}


def _merge_add_traffic(st: Stage, B: int) -> Cost:
    n = 3 * B * st.H * st.W * st.C
    return Cost(
        n,
        n,
        "fwd 3·B·H·W·C·s [windows, shortcut, out]",
        "bwd 3·B·H·W·C·s [dout, dwindows, dshortcut]",
        _values(st, B),
    )


def _merge_add_flops(st: Stage, B: int) -> Cost:
    n = B * st.H * st.W * st.C
    return Cost(n, 0, "fwd 1·B·H·W·C [residual add]", "bwd 0 [gradient copies]", _values(st, B))


def _merge_add_edges() -> dict:
    out = {}
    for name, (windows, H, W, shift) in _merge_edges().items():
        n_img = windows.shape[0] // ((H // 4) * (W // 4))
        out[name] = (windows, torch.randn(n_img, H * W, windows.shape[2]), H, W, shift)
    out["4-D shortcut"] = (torch.randn(4, 16, 3), torch.randn(1, 8, 8, 3), 8, 8, 2)
    return out


def _patch_merge_sample(st: Stage, B: int, device, g) -> dict:
    rnd = functools.partial(torch.randn, generator=g, device=device)
    x = rnd(B, st.H, st.W, st.C)
    return {"x": x, **_ln_affine(rnd, 4 * st.C), "eps": 1e-5}


def _patch_merge_traffic(st: Stage, B: int) -> Cost:
    n = B * st.H * st.W * st.C
    return Cost(
        2 * n + 2 * 4 * st.C,
        3 * n + 3 * 4 * st.C,
        "fwd (2·B·H·W·C [x, out] + 2·4C [weight, bias])·s",
        "bwd (3·B·H·W·C [x, dout, dx] + 3·4C [weight, dweight, dbias])·s",
        _values(st, B),
    )


def _patch_merge_shape(st: Stage, B: int) -> str:
    return f"B={B} H={st.H} W={st.W} C={st.C} -> ({B}, {st.H * st.W // 4}, {4 * st.C})"


def _patch_merge_edges() -> dict:
    def args(x):
        C = x.shape[-1]
        return (x, torch.rand(4 * C) + 0.5, torch.randn(4 * C), 1e-5)

    return {
        "empty batch": args(torch.randn(0, 4, 4, 3)),
        "no channels": args(torch.randn(2, 4, 4, 0)),
        "empty batch, no channels": args(torch.randn(0, 4, 4, 0)),
        "channels-last": args(_channels_last((2, 4, 6, 3))),
        "channels-last, one output token": args(_channels_last((1, 2, 2, 5))),
        "strided": args(torch.randn(2, 8, 8, 6)[:, :, :, ::2]),
    }


# --------------------------------------------------------------------------------------------
# The table (declaration order is the order of reports)


def _table(*specs: OpSpec) -> dict[str, OpSpec]:
    return {s.name: s for s in specs}


OPS: dict[str, OpSpec] = _table(
    OpSpec(
        name="window_attention",
        label="window attention",
        reference=reference.window_attention,
        check=checks.check_window_attention,
        fused=Fused(
            "window_attention",
            "fused_window_attention",
            "unsupported_reason",
            auto_on_cpu=False,
            auto_declines=_attention_fp64_on_gpu,
        ),
        sample=_attention_sample,
        grad_args=("qkv", "table"),
        traffic=_attention_traffic,
        flops=_attention_flops,
        shape=_attention_shape,
        example=_attention_example,
        edge_examples=_attention_edges,
        aliases=("attention", "attn"),
        cpu_auto=Fused("cpu_attention", "sdpa_window_attention", "sdpa_unsupported_reason"),
    ),
    OpSpec(
        name="window_partition",
        label="window partition (shift + partition)",
        reference=reference.window_partition,
        check=checks.check_window_partition,
        fused=Fused("window_process", "fused_window_partition", "partition_unsupported_reason"),
        sample=_map_sample,
        grad_args=("x",),
        traffic=_copy_traffic,
        flops=_no_flops,
        shape=_map_shape,
        example=lambda: (torch.randn(2, 8, 8, 3), 4, 2),
        edge_examples=_partition_edges,
        aliases=("partition",),
    ),
    OpSpec(
        name="window_merge",
        label="window merge (merge + unshift)",
        reference=reference.window_merge,
        check=checks.check_window_merge,
        fused=Fused("window_process", "fused_window_merge", "merge_unsupported_reason"),
        sample=_windows_sample,
        grad_args=("windows",),
        traffic=_copy_traffic,
        flops=_no_flops,
        shape=_map_shape,
        example=lambda: (torch.randn(8, 16, 3), 8, 8, 2),
        edge_examples=_merge_edges,
        aliases=("merge",),
    ),
    OpSpec(
        name="patch_merge",
        label="patch merge (2x2 gather + LayerNorm(4C))",
        reference=reference.patch_merge,
        check=checks.check_patch_merge,
        fused=Fused("patch_merge", "fused_patch_merge", "unsupported_reason", auto_declines=_slower_on_cpu_in_fp16),
        sample=_patch_merge_sample,
        grad_args=("x", "weight", "bias"),
        traffic=_patch_merge_traffic,
        flops=_layer_norm_flops,
        shape=_patch_merge_shape,
        example=lambda: (torch.randn(2, 4, 4, 3), torch.ones(12), torch.zeros(12), 1e-5),
        edge_examples=_patch_merge_edges,
        aliases=("patchmerge", "pm"),
        applies_to=lambda st: st.downsample,
    ),
    OpSpec(
        name="layer_norm_window_partition",
        label="norm1 LayerNorm + shift + partition",
        reference=reference.layer_norm_window_partition,
        check=checks.check_layer_norm_window_partition,
        fused=Fused(
            "window_process",
            "fused_layer_norm_window_partition",
            "layer_norm_partition_unsupported_reason",
            auto_declines=_slower_on_cpu_in_fp16,
        ),
        sample=_ln_partition_sample,
        grad_args=("x", "weight", "bias"),
        traffic=_ln_partition_traffic,
        flops=_layer_norm_flops,
        shape=_map_shape,
        example=lambda: (torch.randn(2, 8, 8, 3), torch.rand(3) + 0.5, torch.randn(3), 1e-5, 4, 2),
        edge_examples=_ln_partition_edges,
        aliases=("ln_partition",),
    ),
    OpSpec(
        name="window_merge_add",
        label="merge + unshift + residual add",
        reference=reference.window_merge_add,
        check=checks.check_window_merge_add,
        fused=Fused(
            "window_process", "fused_window_merge_add", "merge_add_unsupported_reason", auto_declines=_slower_on_cpu_in_fp16
        ),
        sample=_merge_add_sample,
        grad_args=("windows", "shortcut"),
        traffic=_merge_add_traffic,
        flops=_merge_add_flops,
        shape=_map_shape,
        example=lambda: (torch.randn(8, 16, 3), torch.randn(2, 64, 3), 8, 8, 2),
        edge_examples=_merge_add_edges,
        aliases=("merge_add",),
    ),
)

ALIASES: dict[str, str] = {alias: spec.name for spec in OPS.values() for alias in spec.aliases}


def sample(op: str, st: Stage, B: int, device="cpu", seed: int = 0) -> dict:
    """Argument values by name of ``op`` at stage ``st`` with batch ``B`` (fp32, seeded)."""
    device = torch.device(device)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return OPS[op].sample(st, B, device, g)
