"""Memory-saving forms of the model's cheap-input Linears and of the reference attention.

A training step keeps, for backward, every tensor its ops save. Most of HTS-AT's activation memory
is the inputs of its Linears: the qkv projection keeps the LayerNorm + partition output, fc1 the
norm2 output, fc2 the GELU output (and GELU its own input besides), the patch-merge reduction the
merged LayerNorm output. Each of these inputs is one cheap elementwise pass away from a tensor that
is kept anyway (the block input, the residual, fc1's output, the stage output). The functions here
compute ``linear(f(inputs), weight, bias)`` but save only ``inputs`` (and the parameters): backward
recomputes ``f`` (one LayerNorm / GELU pass) and never the matmul. ``attention_saving_qkv`` does the
same for the reference attention: it keeps qkv only and recomputes the probabilities in backward, as
the fused kernel does (which keeps qkv and the log-sum-exp).

Each function's reference is the plain composition (``linear_reference``, or the op itself): the
values are the same computation, and the gradients are the same formulas (the Linear's in the dtype
autocast gave its forward). ``SAVE_POLICIES`` names what a model recomputes (docs/design.md §7.5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends

# "all": save what eager PyTorch saves; "recompute-norms": the LayerNorm outputs that feed a Linear
# (norm1 + partition -> qkv, norm2 -> fc1, patch merge -> reduction) and the reference attention's
# probabilities are recomputed; "recompute-norms-mlp": GELU's output (fc2's input) too.
SAVE_POLICIES = ("all", "recompute-norms", "recompute-norms-mlp")
DEFAULT_SAVE_POLICY = "recompute-norms-mlp"


def saves_less(policy: str) -> bool:
    """Whether a forward under ``policy`` should take the recomputing paths now: not when nothing is
    saved (grad disabled), and not under torch.compile, whose partitioner chooses what to recompute
    in the graph it compiles (and traces the plain paths without a graph break)."""
    return policy != "all" and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def check_save_policy(policy: str, where: str = "save_policy") -> str:
    if policy not in SAVE_POLICIES:
        raise ValueError(f"{where} must be one of {SAVE_POLICIES}, got {policy!r}")
    return policy


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _replay(ctx, inputs, needs, dtype_out: torch.dtype | None = None) -> tuple[list[Tensor | None], Tensor]:
    """Leaves of the saved ``inputs`` (requiring grad where ``needs`` says) and ``ctx.fn`` run again on them
    with gradients (cast to ``dtype_out`` if given), under the forward's backend and autocast state; its
    calls are not recorded again."""
    enabled, dtype = ctx.autocast
    with (
        torch.enable_grad(),
        backends.use_backend(ctx.backend),
        backends.recomputing(),
        torch.autocast(ctx.device_type, dtype, enabled),
    ):
        leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(inputs, needs)]
        out = ctx.fn(*leaves)
        return leaves, out if dtype_out is None else out.to(dtype_out)


class _RecomputedInputLinear(torch.autograd.Function):
    """linear(fn(*inputs), weight, bias) keeping ``inputs``; backward reruns ``fn`` (not the matmul)
    under the backend and autocast state of the forward."""

    @staticmethod
    def forward(ctx, fn: Callable[..., Tensor], label: str, n_inputs: int, *args: Tensor | None) -> Tensor:
        inputs, weight, bias = args[:n_inputs], args[n_inputs], args[n_inputs + 1]
        ctx.label = label  # names the node in activation accounting (bench/saved_memory.py)
        assert weight is not None
        device_type = weight.device.type
        ctx.fn, ctx.n_inputs, ctx.has_bias = fn, n_inputs, bias is not None
        ctx.backend = backends.current_backend()
        ctx.device_type, ctx.autocast = device_type, _autocast_state(device_type)
        out = F.linear(fn(*inputs), weight, bias)  # grad mode is off in forward: fn keeps nothing
        ctx.out_dtype = out.dtype
        ctx.save_for_backward(*inputs, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = ctx.saved_tensors
        n = ctx.n_inputs
        inputs, weight, bias = saved[:n], saved[n], saved[n + 1]
        needs = ctx.needs_input_grad[3:]
        leaves, a = _replay(ctx, inputs, needs, ctx.out_dtype)  # the Linear's operand as its forward saw it
        w = weight.detach().to(ctx.out_dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = grad_b = None
        if needs[n]:
            grad_w = (g2.t() @ a.detach().reshape(-1, a.shape[-1])).to(weight.dtype)
        if ctx.has_bias and needs[n + 1]:
            grad_b = g2.sum(0).to(bias.dtype)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads_in: list[Tensor | None] = [None] * n
        if wanted:
            got = iter(torch.autograd.grad(a, wanted, grad_out @ w))
            grads_in = [next(got) if t is not None and t.requires_grad else None for t in leaves]
        return (None, None, None, *grads_in, grad_w, grad_b)


def recomputed_input_linear(
    fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], weight: Tensor, bias: Tensor | None, label: str = "linear"
) -> Tensor:
    """``F.linear(fn(*inputs), weight, bias)`` saving only ``inputs`` (and the parameters) for backward.

    ``fn`` must be deterministic and cheap (a LayerNorm, a GELU, a gather): backward runs it again.
    ``label`` names the op in activation accounting.
    """
    return _RecomputedInputLinear.apply(fn, label, len(inputs), *inputs, weight, bias)


def linear_reference(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], weight: Tensor, bias: Tensor | None) -> Tensor:
    """The reference of :func:`recomputed_input_linear`: the plain composition (saves fn's output)."""
    return F.linear(fn(*inputs), weight, bias)


class _RecomputedOutput(torch.autograd.Function):
    """fn(*inputs) keeping only ``inputs``; backward reruns fn with gradients (a checkpoint whose
    saved tensors go through save_for_backward, so saved-tensor hooks see exactly what is kept)."""

    @staticmethod
    def forward(ctx, fn: Callable[..., Tensor], *inputs: Tensor | None) -> Tensor:
        ref = next(t for t in inputs if t is not None)
        ctx.fn, ctx.backend, ctx.label = fn, backends.current_backend(), "attention, probabilities recomputed"
        ctx.device_type, ctx.autocast = ref.device.type, _autocast_state(ref.device.type)
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        needs = ctx.needs_input_grad[1:]
        leaves, out = _replay(ctx, ctx.saved_tensors, needs)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        if not wanted:
            return (None, *[None] * len(leaves))
        got = iter(torch.autograd.grad(out, wanted, grad_out))
        return (None, *[next(got) if t is not None and t.requires_grad else None for t in leaves])


def attention_saving_qkv(attention: Callable[..., Tensor], qkv: Tensor, table: Tensor, mask: Tensor | None) -> Tensor:
    """``attention(qkv, table, mask)`` keeping qkv, table and mask only: the (B_, h, N, N) scores and
    probabilities (and q, k, v copies) the reference saves, or the q, k, v copies, output and folded
    mask of the CPU SDPA path, are recomputed in backward. Not for the fused kernel (it keeps qkv +
    log-sum-exp itself); no dropout (its mask would differ in the recomputation)."""
    return _RecomputedOutput.apply(attention, qkv, table, mask)


def runs_unfused(op: str, *args) -> bool:
    """Whether ``op(*args)`` dispatches to something other than its fused kernel under the backend in
    force now: the reference, or the CPU path "auto" runs instead of it."""
    return backends.dispatch(op, args, None) is not backends.fused_run_of(op)
