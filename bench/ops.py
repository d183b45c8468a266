"""Per-op cases: the four hot ops at HTS-AT's stage shapes, every provider, dtype and mode.

Stages (window 8, N = 64 tokens, head dim 24; 10 s input): the block shapes of each stage. Stages
1-3 are benchmarked in their shifted form (shift 4, additive (nW, N, N) mask), which is the more
expensive of their two block kinds; stage 4 is one window per clip and never shifted.
``patch_merge`` runs at the end of stages 1-3 (stage 4 has no downsample).

Providers: ``reference`` (eager ``htsat_kernels.reference``), ``fused`` (ours), ``compile``
(``torch.compile`` of the reference), and for window attention two peers: ``sdpa``
(``F.scaled_dot_product_attention`` with the dense (nW*h, N, N) bias+mask tensor built per call)
and ``flex`` (compiled ``flex_attention`` with a score_mod that gathers table and mask).

Modes: ``forward`` (under no_grad), ``backward`` (the backward alone: the forward runs untimed
before each call), ``full`` (forward + backward). Errors are against the reference op in fp32 on
the same dtype-rounded inputs: the output (forward), every input gradient (backward), both (full).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .context import QUICK_COMPILE_REASON, Case, RunContext
from .harness import DTYPES, Prepared, Skip, combine_errors, memory_baseline, reason_of

WINDOW = 8
N_TOK = WINDOW * WINDOW
TABLE_ROWS = (2 * WINDOW - 1) ** 2

# The four public building blocks, then the further fusions (a block's norm1 + shift + partition,
# and merge + unshift + residual add) measured against the same unfused reference composition.
OPS = ("window_attention", "window_partition", "window_merge", "patch_merge", "layer_norm_window_partition", "window_merge_add")
OP_ALIASES = {
    "attention": "window_attention",
    "attn": "window_attention",
    "partition": "window_partition",
    "merge": "window_merge",
    "patchmerge": "patch_merge",
    "pm": "patch_merge",
    "ln_partition": "layer_norm_window_partition",
    "merge_add": "window_merge_add",
}
PROVIDERS = ("reference", "fused", "compile", "sdpa", "flex")
ATTENTION_ONLY = ("sdpa", "flex")
MODES = ("forward", "backward", "full")


@dataclass(frozen=True)
class Stage:
    index: int
    H: int
    W: int
    C: int
    heads: int
    shift: int
    label: str = ""

    @property
    def nW(self) -> int:
        return (self.H // WINDOW) * (self.W // WINDOW)

    @property
    def head_dim(self) -> int:
        return self.C // self.heads

    @property
    def name(self) -> str:
        return self.label or f"s{self.index}"


STAGES = (
    Stage(1, 64, 64, 96, 4, 4),
    Stage(2, 32, 32, 192, 8, 4),
    Stage(3, 16, 16, 384, 16, 4),
    Stage(4, 8, 8, 768, 32, 0),
)

# Interpreter numerics (CPU only): each stage's channels and heads on a reduced map, one clip:
# a 16x16 map with shift 4 gives 4 windows and the real mask structure; stage 4 keeps its 8x8.
INTERPRETER_STAGES = (
    Stage(1, 16, 16, 96, 4, 4, "s1r"),
    Stage(2, 16, 16, 192, 8, 4, "s2r"),
    Stage(3, 16, 16, 384, 16, 4, "s3r"),
    Stage(4, 8, 8, 768, 32, 0, "s4"),
)


def stages_for(op: str, stages=STAGES):
    return [s for s in stages if not (op == "patch_merge" and s.index == 4)]


# --------------------------------------------------------------------------------------------
# Inputs, bytes and shapes of each op


def _gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def make_inputs(op: str, st: Stage, B: int, device: torch.device, seed: int = 0):
    """fp32 master inputs: (differentiable tensors by name, constant tensors by name)."""
    g = _gen(device, seed)
    rnd = functools.partial(torch.randn, generator=g, device=device)
    const: dict = {}
    if op == "window_attention":
        diff = {"qkv": rnd(B * st.nW, N_TOK, 3 * st.C), "table": 0.5 * rnd(TABLE_ROWS, st.heads)}
        if st.shift:
            import htsat_kernels as hk

            const["mask"] = hk.reference.shifted_window_mask(st.H, st.W, WINDOW, st.shift).to(device)
        else:
            const["mask"] = None
    elif op == "window_partition":
        diff = {"x": rnd(B, st.H, st.W, st.C)}
    elif op == "window_merge":
        diff = {"windows": rnd(B * st.nW, N_TOK, st.C)}
    elif op == "patch_merge":
        diff = {"x": rnd(B, st.H, st.W, st.C), "weight": 1.0 + 0.1 * rnd(4 * st.C), "bias": 0.1 * rnd(4 * st.C)}
    elif op == "layer_norm_window_partition":
        diff = {"x": rnd(B, st.H, st.W, st.C), "weight": 1.0 + 0.1 * rnd(st.C), "bias": 0.1 * rnd(st.C)}
    elif op == "window_merge_add":
        diff = {"windows": rnd(B * st.nW, N_TOK, st.C), "shortcut": rnd(B, st.H * st.W, st.C)}
    else:
        raise ValueError(f"unknown op {op!r}")
    return diff, const


def call_op(op: str, fn: Callable, st: Stage, t: dict, const: dict):
    """Call ``fn`` (any provider, with the reference signature) on the tensors ``t``."""
    if op == "window_attention":
        return fn(t["qkv"], t["table"], const["mask"], st.heads, st.head_dim ** -0.5)
    if op == "window_partition":
        return fn(t["x"], WINDOW, st.shift)
    if op == "window_merge":
        return fn(t["windows"], st.H, st.W, st.shift)
    if op == "patch_merge":
        return fn(t["x"], t["weight"], t["bias"], 1e-5)
    if op == "layer_norm_window_partition":
        return fn(t["x"], t["weight"], t["bias"], 1e-5, WINDOW, st.shift)
    if op == "window_merge_add":
        return fn(t["windows"], t["shortcut"], st.H, st.W, st.shift)
    raise ValueError(op)


def op_bytes(op: str, st: Stage, B: int, elem: int, mode: str) -> tuple[int, str]:
    """Minimal DRAM traffic of one call and the formula it came from (s = bytes per element)."""
    N, C, h, nW, HW = N_TOK, st.C, st.heads, st.nW, st.H * st.W
    Bw = B * nW
    if op == "window_attention":
        m = nW * N * N if st.shift else 0
        mtxt = " + nW·N² [mask]" if st.shift else ""
        fwd = Bw * N * 3 * C + Bw * N * C + TABLE_ROWS * h + m
        bwd = 2 * Bw * N * 3 * C + Bw * N * C + 2 * TABLE_ROWS * h + m
        f_fwd = f"fwd (B_·N·3C [qkv] + B_·N·C [out] + 225·h [table]{mtxt})·s"
        f_bwd = f"bwd (B_·N·3C [qkv] + B_·N·C [dout] + B_·N·3C [dqkv] + 2·225·h [table, dtable]{mtxt})·s"
        vals = f"B_={Bw} N={N} C={C} h={h}" + (f" nW={nW}" if st.shift else "") + f" s={elem}"
    elif op in ("window_partition", "window_merge"):
        fwd = 2 * B * HW * C
        bwd = 2 * B * HW * C
        f_fwd = "fwd 2·B·H·W·C·s [read + write]"
        f_bwd = "bwd 2·B·H·W·C·s [read dout + write dx]"
        vals = f"B={B} H={st.H} W={st.W} C={C} s={elem}"
    elif op == "patch_merge":
        fwd = 2 * B * HW * C + 2 * 4 * C
        bwd = 3 * B * HW * C + 3 * 4 * C
        f_fwd = "fwd (2·B·H·W·C [x, out] + 2·4C [weight, bias])·s"
        f_bwd = "bwd (3·B·H·W·C [x, dout, dx] + 3·4C [weight, dweight, dbias])·s"
        vals = f"B={B} H={st.H} W={st.W} C={C} s={elem}"
    elif op == "layer_norm_window_partition":
        fwd = 2 * B * HW * C + 2 * C
        bwd = 3 * B * HW * C + 3 * C
        f_fwd = "fwd (2·B·H·W·C [x, out] + 2·C [weight, bias])·s"
        f_bwd = "bwd (3·B·H·W·C [x, dout, dx] + 3·C [weight, dweight, dbias])·s"
        vals = f"B={B} H={st.H} W={st.W} C={C} s={elem}"
    elif op == "window_merge_add":
        fwd = 3 * B * HW * C
        bwd = 3 * B * HW * C
        f_fwd = "fwd 3·B·H·W·C·s [windows, shortcut, out]"
        f_bwd = "bwd 3·B·H·W·C·s [dout, dwindows, dshortcut]"
        vals = f"B={B} H={st.H} W={st.W} C={C} s={elem}"
    else:
        raise ValueError(op)
    if mode == "forward":
        n, formula = fwd, f_fwd
    elif mode == "backward":
        n, formula = bwd, f_bwd
    else:
        n, formula = fwd + bwd, f"{f_fwd} + {f_bwd}"
    return n * elem, f"{formula}; {vals}"


def shape_str(op: str, st: Stage, B: int) -> str:
    if op == "window_attention":
        mask = f" nW={st.nW} mask" if st.shift else " no mask"
        return f"B={B} B_={B * st.nW} N={N_TOK} C={st.C} h={st.heads} d={st.head_dim}{mask}"
    if op in ("window_partition", "window_merge", "layer_norm_window_partition", "window_merge_add"):
        return f"B={B} H={st.H} W={st.W} C={st.C} ws={WINDOW} shift={st.shift}"
    return f"B={B} H={st.H} W={st.W} C={st.C} -> ({B}, {st.H * st.W // 4}, {4 * st.C})"


# --------------------------------------------------------------------------------------------
# Peers for window attention


def sdpa_window_attention(qkv, table, mask, num_heads: int, scale: float):
    """Window attention through F.scaled_dot_product_attention with a dense bias+mask tensor.

    Windows and heads are folded into one axis, (B, nW*h, N, d), so the (nW*h, N, N) bias+mask
    broadcasts over the clips as a 4-D attn_mask (the layout SDPA's fused kernels accept).
    """
    import htsat_kernels as hk

    B_, N, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    nW = mask.shape[0] if mask is not None else 1
    B = B_ // nW
    parts = qkv.view(B, nW, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, d)
    q, k, v = (p.reshape(B, nW * num_heads, N, d) for p in parts.unbind(0))
    index = hk.reference.relative_position_index(hk.reference.window_size_of(N), qkv.device)
    bias = table[index.view(-1)].view(N, N, num_heads).permute(2, 0, 1)  # (h, N, N)
    if mask is not None:
        dense = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(1, nW * num_heads, N, N)
    else:
        dense = bias.unsqueeze(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense.to(q.dtype), scale=scale)
    return out.view(B, nW, num_heads, N, d).permute(0, 1, 3, 2, 4).reshape(B_, N, C)


def flex_window_attention(qkv, table, mask, num_heads: int, scale: float, index):
    """Window attention through flex_attention; the score_mod adds table[index] and the mask.

    ``index`` is the (N, N) relative-position index (built once, outside the compiled region).
    """
    from torch.nn.attention.flex_attention import flex_attention

    B_, N, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    q, k, v = qkv.view(B_, N, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, h, N, d)

    if mask is None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[index[q_idx, kv_idx], h]

    else:
        nW = mask.shape[0]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[index[q_idx, kv_idx], h] + mask[b % nW, q_idx, kv_idx]

    out = flex_attention(q, k, v, score_mod=score_mod, scale=scale)
    return out.transpose(1, 2).reshape(B_, N, C)


def provider_fn(op: str, provider: str, ctx: RunContext, section: str = "ops") -> Callable:
    """The callable (reference signature) that runs ``op`` on ``provider``; raises Skip."""
    import htsat_kernels as hk

    if not hasattr(hk, op):
        raise Skip(f"htsat_kernels has no op {op}")
    if provider == "reference":
        return functools.partial(getattr(hk, op), backend="reference")
    if provider == "fused":
        status = hk.fused_status().get(op, "not registered")
        if status != "available":
            raise Skip(f"fused {op} unavailable: {status}")
        if section == "interpreter":
            import os

            if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
                raise Skip("TRITON_INTERPRET=1 was not set before htsat_kernels was imported")
        elif op == "window_attention" and ctx.device.type == "cpu":
            raise Skip(
                "the Triton kernel runs on CPU only in the Triton interpreter (numerics only: "
                "see the interpreter section)"
            )
        return functools.partial(getattr(hk, op), backend="fused")
    if provider == "compile":
        ref = getattr(hk.reference, op)
        return ctx.memoize(("compile", op), lambda: torch.compile(ref, dynamic=False))
    if provider == "sdpa":
        return sdpa_window_attention
    if provider == "flex":
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except Exception as exc:
            raise Skip(f"flex_attention unavailable: {reason_of(exc)}")
        compiled = ctx.memoize(("flex", op), lambda: torch.compile(flex_window_attention, dynamic=False))
        index = ctx.memoize(("flex_index", str(ctx.device)), lambda: hk.reference.relative_position_index(WINDOW, ctx.device))

        def flex(qkv, table, mask, num_heads, scale):
            return compiled(qkv, table, mask, num_heads, scale, index)

        return flex
    raise ValueError(f"unknown provider {provider!r}")


def configure_compiler() -> None:
    """Many shapes and dtypes go through one compiled function: raise dynamo's recompile limits."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 4096)
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 8192)


# --------------------------------------------------------------------------------------------
# Cases


def _clear(tensors) -> None:
    for t in tensors:
        t.grad = None


@dataclass(frozen=True)
class OpCase(Case):
    op: str
    stage: Stage
    batch: int
    dtype: str
    mode: str
    provider: str
    section: str = "ops"
    # Interpreter numerics cases are not timed (the interpreter's speed means nothing).
    timed: bool = True
    where: str = ""

    def fields(self) -> dict:
        elem = DTYPES[self.dtype].itemsize
        nbytes, formula = op_bytes(self.op, self.stage, self.batch, elem, self.mode)
        return {
            "section": self.section,
            "op": self.op,
            "provider": self.provider,
            "mode": self.mode,
            "dtype": self.dtype,
            "shape": shape_str(self.op, self.stage, self.batch),
            "stage": self.stage.index,
            "stage_label": self.stage.name,
            "batch": self.batch,
            "bytes": nbytes,
            "bytes_formula": formula,
            "where": self.where,
        }

    def _sticky_keys(self):
        return [(self.provider, self.op, self.section), (self.provider, self.op, self.section, self.mode)]

    def plan_skip(self, ctx: RunContext) -> Optional[str]:
        for key in self._sticky_keys():
            if key in ctx.sticky:
                return ctx.sticky[key]
        if ctx.quick and self.provider in ("compile", "flex") and self.section == "ops":
            smallest = stages_for(self.op)[-1].index
            if not (self.stage.index == smallest and self.dtype == "fp32" and self.mode == "forward"):
                return QUICK_COMPILE_REASON
        return None

    def _group(self, ctx: RunContext):
        key = (self.section, self.op, self.stage, self.batch, self.dtype)

        def build():
            dtype = DTYPES[self.dtype]
            diff32, const = make_inputs(self.op, self.stage, self.batch, ctx.device)
            # Inputs rounded to the case dtype; the reference sees the same values in fp32.
            diff_lp = {k: v.to(dtype) for k, v in diff32.items()}
            # The mask (exact in every dtype) is passed in the case dtype, like the activations.
            const_lp = {k: (v.to(dtype) if v is not None else None) for k, v in const.items()}
            import htsat_kernels as hk

            ref = getattr(hk.reference, self.op)
            gold_in = {k: v.detach().float().clone().requires_grad_(True) for k, v in diff_lp.items()}
            gold_out = call_op(self.op, ref, self.stage, gold_in, const)
            g = _gen(ctx.device, 1)
            dout_lp = torch.randn(gold_out.shape, generator=g, device=ctx.device).to(dtype)
            gold_out.backward(dout_lp.float())
            gold_grads = {k: v.grad.detach() for k, v in gold_in.items()}
            return {
                "diff": diff_lp,
                "const": const_lp,
                "dout": dout_lp,
                "gold_out": gold_out.detach(),
                "gold_grads": gold_grads,
            }

        return ctx.group(key, build)

    def prepare(self, ctx: RunContext) -> Prepared:
        data = self._group(ctx)
        baseline = memory_baseline(ctx.device)
        fn = provider_fn(self.op, self.provider, ctx, self.section)
        grad = self.mode != "forward"
        leaves = {k: v.detach().clone().requires_grad_(grad) for k, v in data["diff"].items()}
        const, dout = data["const"], data["dout"]

        def run():
            return call_op(self.op, fn, self.stage, leaves, const)

        # First call: compiles where needed, and gives the numbers the errors come from.
        try:
            if grad:
                out = run()
                out.backward(dout)
                missing = [k for k, v in leaves.items() if v.grad is None]
                if missing:
                    raise RuntimeError(f"{self.provider} gives no gradient for {', '.join(missing)}")
                pairs = {f"grad_{k}": (v.grad, data["gold_grads"][k]) for k, v in leaves.items()}
                if self.mode == "full":
                    pairs = {"out": (out, data["gold_out"]), **pairs}
                _clear(leaves.values())
            else:
                with torch.no_grad():
                    out = run()
                pairs = {"out": (out, data["gold_out"])}
            max_abs, max_rel, detail = combine_errors(pairs)
            del out, pairs
        except Skip:
            raise
        except Exception as exc:
            reason = reason_of(exc)
            # Compiler failures repeat for every shape and cost seconds each: remember them.
            if "out of memory" not in reason.lower() and self.provider in ("compile", "flex"):
                key = self._sticky_keys()[0 if self.mode == "forward" else 1]
                ctx.sticky[key] = f"{reason} (first failure at {self.stage.name} {self.dtype} {self.mode}; not retried)"
            raise Skip(reason) from exc

        fields = {"max_abs_err": max_abs, "max_rel_err": max_rel, "errors": detail}
        if self.mode == "forward":

            def fn_timed():
                with torch.no_grad():
                    run()

            return Prepared(fn_timed, None, fields, timed=self.timed, baseline_alloc=baseline)

        tensors = list(leaves.values())
        if self.mode == "full":

            def setup():
                _clear(tensors)

            def fn_timed():
                run().backward(dout)

            return Prepared(fn_timed, setup, fields, timed=self.timed, baseline_alloc=baseline)

        holder: dict = {}

        def setup_bwd():
            _clear(tensors)
            holder["out"] = None
            holder["out"] = run()

        def fn_bwd():
            holder["out"].backward(dout)

        return Prepared(fn_bwd, setup_bwd, fields, timed=self.timed, baseline_alloc=baseline)


def build_op_cases(
    *,
    device: torch.device,
    ops,
    providers,
    dtypes,
    modes,
    batches,
    stages=None,
) -> list[OpCase]:
    where = "cuda" if device.type == "cuda" else "cpu"
    cases = []
    for op in ops:
        for st in stages_for(op):
            if stages and st.index not in stages:
                continue
            for B in batches:
                for dt in dtypes:
                    for mode in modes:
                        for p in providers:
                            if p not in PROVIDERS or (p in ATTENTION_ONLY and op != "window_attention"):
                                continue
                            cases.append(OpCase(op, st, B, dt, mode, p, "ops", True, where))
    return cases


def build_interpreter_cases(*, dtypes, modes, providers, stages=None) -> list[OpCase]:
    """CPU only: the Triton window attention in the interpreter at reduced shapes, numerics only."""
    cases = []
    for st in INTERPRETER_STAGES:
        if stages and st.index not in stages:
            continue
        for dt in dtypes:
            for mode in [m for m in modes if m in ("forward", "full")] or ["forward"]:
                for p in [p for p in ("reference", "fused") if p in providers]:
                    cases.append(OpCase("window_attention", st, 1, dt, mode, p, "interpreter", False, "cpu (Triton interpreter)"))
    return cases
