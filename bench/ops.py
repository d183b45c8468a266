"""Per-op cases: the four hot ops at HTS-AT's stage shapes, every provider, dtype and mode.

Stages (window 8, N = 64 tokens, head dim 24; 10 s input): the block shapes of each stage. Stages
1-3 are benchmarked in their shifted form (shift 4; as the model calls it, the shift mask given by
the grid, ``shifted_grid``, which the peers turn into the additive (nW, N, N) mask), the more
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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from htsat_kernels.fused.cpu_attention import sdpa_window_attention
from htsat_kernels.ops import ALIASES as OP_ALIASES
from htsat_kernels.ops import OPS as OP_SPECS
from htsat_kernels.shapes import STAGES, WINDOW, Stage

from .context import QUICK_COMPILE_REASON, Case, RunContext
from .harness import DTYPES, Prepared, Skip, combine_errors, memory_baseline, reason_of

# The ops, their aliases, inputs, shapes and byte / FLOP formulas come from the op table,
# htsat_kernels.ops.OPS (declaration order: the four public building blocks, then the further
# fusions measured against the same unfused reference composition).
OPS = tuple(OP_SPECS)
PROVIDERS = ("reference", "fused", "compile", "sdpa", "flex")
ATTENTION_ONLY = ("sdpa", "flex")
MODES = ("forward", "backward", "full")

__all__ = ["OPS", "OP_ALIASES", "STAGES", "Stage", "INTERPRETER_STAGES", "build_op_cases", "build_interpreter_cases"]

# Interpreter numerics (CPU only): each stage's channels and heads on a reduced map, one clip:
# a 16x16 map with shift 4 gives 4 windows and the real mask structure; stage 4 keeps its 8x8.
INTERPRETER_STAGES = (
    Stage(1, 16, 16, 96, 4, 4, "s1r"),
    Stage(2, 16, 16, 192, 8, 4, "s2r"),
    Stage(3, 16, 16, 384, 16, 4, "s3r"),
    Stage(4, 8, 8, 768, 32, 0, "s4", downsample=False),
)


def stages_for(op: str, stages=STAGES) -> list[Stage]:
    return OP_SPECS[op].stages(stages)


# --------------------------------------------------------------------------------------------
# Inputs, bytes, FLOPs and shapes of each op (from the op table)


def _gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def make_inputs(op: str, st: Stage, B: int, device: torch.device, seed: int = 0):
    """fp32 master inputs: (differentiable tensors by name, the other arguments by name)."""
    if op not in OP_SPECS:
        raise ValueError(f"unknown op {op!r}")
    spec = OP_SPECS[op]
    values = spec.sample(st, B, device, _gen(device, seed))
    diff = {k: values[k] for k in spec.grad_args}
    return diff, {k: v for k, v in values.items() if k not in diff}


def call_op(op: str, fn: Callable, t: dict, const: dict):
    """Call ``fn`` (any provider, with the reference signature) on the tensors ``t`` and arguments ``const``."""
    return fn(*OP_SPECS[op].args({**const, **t}))


def op_bytes(op: str, st: Stage, B: int, elem: int, mode: str) -> tuple[int, str]:
    """Minimal DRAM traffic of one call and the formula it came from (s = bytes per element)."""
    return OP_SPECS[op].bytes_moved(st, B, elem, mode)


def op_flops(op: str, st: Stage, B: int, mode: str) -> tuple[int, str]:
    """Arithmetic of one call and the formula it came from (see htsat_kernels.ops)."""
    return OP_SPECS[op].flop_count(st, B, mode)


def shape_str(op: str, st: Stage, B: int) -> str:
    return OP_SPECS[op].shape(st, B)


# --------------------------------------------------------------------------------------------
# Peers for window attention (sdpa: the CPU path of auto, device-agnostic itself)


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
                "the Triton kernel runs on CPU only in the Triton interpreter (numerics only: see the interpreter section)"
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
            raise Skip(f"flex_attention unavailable: {reason_of(exc)}") from exc
        compiled = ctx.memoize(("flex", op), lambda: torch.compile(flex_window_attention, dynamic=False))
        index = ctx.memoize(("flex_index", str(ctx.device)), lambda: hk.reference.relative_position_index(WINDOW, ctx.device))

        def flex(qkv, table, mask, num_heads, scale, dropout_p=0.0, shifted_grid=None):  # the op's signature; no dropout
            if shifted_grid is not None:  # flex reads a mask tensor (cached)
                mask = hk.reference.grid_mask(shifted_grid, WINDOW, qkv.device)
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
        nflops, flops_formula = op_flops(self.op, self.stage, self.batch, self.mode)
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
            "flops": nflops,
            "flops_formula": flops_formula,
            "where": self.where,
        }

    def _sticky_keys(self):
        return [(self.provider, self.op, self.section), (self.provider, self.op, self.section, self.mode)]

    def plan_skip(self, ctx: RunContext) -> str | None:
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
            const_lp = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in const.items()}
            import htsat_kernels as hk

            ref = getattr(hk.reference, self.op)
            gold_in = {k: v.detach().float().clone().requires_grad_(True) for k, v in diff_lp.items()}
            gold_out = call_op(self.op, ref, gold_in, const)
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
            return call_op(self.op, fn, leaves, const)

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
