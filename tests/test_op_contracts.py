"""Contracts every op of the table keeps on every backend: the same inputs accepted (edge shapes and
layouts), and first derivatives everywhere but second derivatives either right or a clear error,
never a silent zero. Runs the real fused implementations (C++ CPU twins; Triton in the interpreter).
"""

from __future__ import annotations

import pytest
import torch

import htsat_kernels
from htsat_kernels import FusedImpl, backends

OPS = tuple(htsat_kernels.OPS)


def _fused_or_skip(op: str) -> None:
    impl = backends._fused.get(op)
    if not isinstance(impl, FusedImpl):
        pytest.skip(f"fused {op} unavailable: {impl}")


def _edge_cases():
    return [(op, name) for op, spec in htsat_kernels.OPS.items() for name in spec.edge_examples()]


@pytest.mark.parametrize("op,edge", _edge_cases())
def test_reference_and_fused_accept_the_same_edge_inputs(op, edge):
    _fused_or_skip(op)
    args = htsat_kernels.OPS[op].edge_examples()[edge]
    fn = getattr(htsat_kernels, op)
    ref = fn(*args, backend="reference")
    fused = fn(*args, backend="fused")
    auto = fn(*args, backend="auto")
    assert fused.shape == ref.shape == auto.shape and fused.dtype == ref.dtype
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auto, ref, rtol=1e-5, atol=1e-5)


def test_every_op_declares_edge_inputs():
    for op, spec in htsat_kernels.OPS.items():
        assert len(spec.edge_examples()) >= 3, op


def test_reference_patch_merge_takes_channels_last_and_empty_inputs():
    """issue 13 item 9: the reference failed on channels-last input, B = 0 and C = 0."""
    x = torch.randn(2, 3, 4, 6).permute(0, 2, 3, 1)  # (B, H, W, C) stored as (B, C, H, W)
    assert not x.is_contiguous()
    w, b = torch.rand(12) + 0.5, torch.randn(12)
    want = htsat_kernels.reference.patch_merge(x.contiguous(), w, b)
    torch.testing.assert_close(htsat_kernels.reference.patch_merge(x, w, b), want)
    x_cl = torch.randn(1, 3, 2, 2).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    out = htsat_kernels.reference.patch_merge(x_cl, w, b)
    assert out.shape == (1, 1, 12)
    assert htsat_kernels.reference.patch_merge(torch.randn(0, 4, 4, 3), w, b).shape == (0, 4, 12)
    empty_c = htsat_kernels.reference.patch_merge(torch.randn(2, 4, 4, 0), torch.ones(0), torch.zeros(0))
    assert empty_c.shape == (2, 4, 0)


# --------------------------------------------------------------------------------------------
# second derivatives (issue 13 item 7)
# --------------------------------------------------------------------------------------------


def _small(op: str) -> tuple:
    """The op's example arguments, shrunk for attention (gradgradcheck costs a backward per element)."""
    if op == "window_attention":  # window 2 (N = 4), C = 4, 2 heads, with a mask
        mask = torch.where(torch.rand(2, 4, 4) < 0.3, -100.0, 0.0)
        return (torch.randn(2, 4, 12), torch.randn(9, 2), mask, 2, 0.7, 0.0)
    return htsat_kernels.OPS[op].example()


def _double(args: tuple, grad_names: tuple, params: tuple) -> tuple:
    """float64 copies of the arguments; the differentiable ones require grad."""
    out = []
    for name, a in zip(params, args):
        if isinstance(a, torch.Tensor):
            a = a.detach().double().requires_grad_(name in grad_names)
        out.append(a)
    return tuple(out)


# the linear data-movement ops have exact double backward (their backward is the other copy op);
# the fused LayerNorm ops and the Triton attention have none and must say so
DIFFERENTIABLE_TWICE = {"window_partition", "window_merge", "window_merge_add"}


@pytest.mark.parametrize("op", OPS)
def test_reference_passes_gradgradcheck(op):
    spec = htsat_kernels.OPS[op]
    args = _double(_small(op), spec.grad_args, spec.params)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*tensors):
        it = iter(tensors)
        full = [next(it) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args]
        return getattr(htsat_kernels, op)(*full, backend="reference")

    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("op", OPS)
def test_fused_second_derivative_is_right_or_raises(op):
    _fused_or_skip(op)
    spec = htsat_kernels.OPS[op]
    args = _double(_small(op), spec.grad_args, spec.params)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    fn = getattr(htsat_kernels, op)
    out = fn(*args, backend="fused")
    g = torch.randn_like(out).requires_grad_()
    grads = torch.autograd.grad(out, inputs, g, create_graph=True)  # first derivatives: always fine
    ref_out = fn(*args, backend="reference")
    ref_grads = torch.autograd.grad(ref_out, inputs, g, create_graph=True)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)
    probe = sum((gr * torch.randn_like(gr)).sum() for gr in grads)
    if op in DIFFERENTIABLE_TWICE:
        second = torch.autograd.grad(probe, [g], allow_unused=True)
        assert second[0] is not None and second[0].abs().sum() > 0
        torch.autograd.gradgradcheck(lambda *t: fn(*_rebuild(args, t), backend="fused"), inputs)
        return
    # a second derivative through the fused backward: a clear error, whichever way it is asked for
    with pytest.raises(RuntimeError, match=f"fused {op} has no second derivative"):
        torch.autograd.grad(probe, inputs, retain_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        probe.backward()


def _rebuild(args: tuple, tensors: tuple) -> tuple:
    it = iter(tensors)
    return tuple(next(it) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)


@pytest.mark.parametrize("op", sorted(set(OPS) - DIFFERENTIABLE_TWICE))
def test_fused_first_derivative_with_create_graph_elsewhere_still_works(op):
    """create_graph=True for another part of the graph (a gradient penalty on the input) is not an error
    as long as nothing differentiates through the fused backward."""
    _fused_or_skip(op)
    spec = htsat_kernels.OPS[op]
    args = _double(_small(op), spec.grad_args, spec.params)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = getattr(htsat_kernels, op)(*args, backend="fused")
    grads = torch.autograd.grad(out.sum(), inputs, create_graph=True)
    ref = getattr(htsat_kernels, op)(*args, backend="reference")
    for a, r in zip(grads, torch.autograd.grad(ref.sum(), inputs)):
        torch.testing.assert_close(a.detach(), r)
