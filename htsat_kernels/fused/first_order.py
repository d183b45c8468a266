"""A backward formula that is not itself differentiable raises when a second derivative is taken.

The backward kernels of the fused LayerNorm ops and of the Triton attention are opaque ops with no
autograd formula of their own. Called under ``create_graph=True`` they would otherwise give
gradients that silently act as constants: second derivatives of 0. :func:`first_order_only` wraps
such a backward so that, when the graph of the gradients is being recorded, each gradient gets a
node that raises a clear error if anything differentiates through it (first derivatives and
``create_graph=True`` for other parts of a graph still work). Like torch's ``once_differentiable``,
but the node also links to the saved inputs, so ``torch.autograd.grad(grad, x)`` reaches it too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


class _SecondDerivative(torch.autograd.Function):
    """Identity on the gradients in forward; raises in backward."""

    @staticmethod
    def forward(ctx, message: str, n: int, *tensors: Tensor):
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def first_order_only(op_label: str) -> Callable:
    """Decorator for a ``register_autograd`` backward ``fn(ctx, *grad_outputs) -> grads``."""
    message = (
        f"the fused {op_label} has no second derivative (its backward kernel is not differentiable): "
        "use backend='reference' for double backward (gradient penalties, gradgradcheck, Hessian products)"
    )

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def backward(ctx, *grad_outputs):
            with torch.no_grad():
                grads = fn(ctx, *grad_outputs)
            if not torch.is_grad_enabled():  # the usual backward: nothing records a graph of it
                return grads
            sources = [t for t in (*grad_outputs, *ctx.saved_tensors) if isinstance(t, Tensor) and t.requires_grad]
            if not sources:
                return grads
            present = [i for i, g in enumerate(grads) if isinstance(g, Tensor)]
            guarded = _SecondDerivative.apply(message, len(present), *(grads[i] for i in present), *sources)
            out = list(grads)
            for i, g in zip(present, guarded):
                out[i] = g
            return tuple(out)

        return backward

    return wrap
