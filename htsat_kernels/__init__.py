"""htsat_kernels: the hot ops of HTS-AT, each with a pure-PyTorch reference and a fused kernel.

Public ops (contracts in docs/design.md): ``window_partition``, ``window_merge``, ``patch_merge``,
``window_attention``, and the block-level fusions ``layer_norm_window_partition`` (norm1 + shift +
partition) and ``window_merge_add`` (merge + unshift + residual add). Each is declared once in
``htsat_kernels.ops.OPS``; the functions here are generated from those declarations: the signature
of the op's reference plus the keyword ``backend=None | "auto" | "reference" | "fused"`` (see
``htsat_kernels.backends`` for how the choice is made). Each call checks its arguments once
(``htsat_kernels.checks``), so every backend reports a bad argument with the same error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from . import reference
from .backends import (
    BACKENDS,
    BackendUnavailable,
    Decision,
    FusedImpl,
    current_backend,
    fused_status,
    record_dispatch,
    register_cpu_auto,
    register_fused,
    register_reference,
    use_backend,
)
from .backends import dispatch as _dispatch
from .ops import OPS, OpSpec

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "Decision",
    "FusedImpl",
    "OPS",
    "current_backend",
    "fused_status",
    "record_dispatch",
    "reference",
    "register_fused",
    "use_backend",
]
__all__.extend(OPS)  # the ops themselves, generated below


def _bind(op: str, params: tuple, defaults: dict, args: tuple, kwargs: dict) -> tuple:
    """All positional arguments of a call given partly by keyword (plain Python: torch.compile traces it)."""
    if len(args) > len(params):
        raise TypeError(f"{op}() takes {len(params)} positional arguments but {len(args)} were given")
    values = dict(zip(params, args))
    for k, v in kwargs.items():
        if k not in params:
            raise TypeError(f"{op}() got an unexpected keyword argument {k!r}")
        if k in values:
            raise TypeError(f"{op}() got multiple values for argument {k!r}")
        values[k] = v
    missing = [p for p in params if p not in values and p not in defaults]
    if missing:
        raise TypeError(f"{op}() missing required argument(s): {', '.join(missing)}")
    return tuple(values[p] if p in values else defaults[p] for p in params)


def _public(spec: OpSpec) -> Callable:
    """The public function of one op: bind, check the arguments, dispatch."""
    name, params, defaults, check = spec.name, spec.params, spec.defaults, spec.check

    def op(*args, backend: str | None = None, **kwargs):
        if kwargs or len(args) != len(params):
            args = _bind(name, params, defaults, args, kwargs)
        check(*args)
        return _dispatch(name, args, backend)(*args)

    backend_param = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Optional[str]")
    sig = spec.signature
    op.__signature__ = sig.replace(parameters=[*sig.parameters.values(), backend_param])  # type: ignore[attr-defined]
    op.__name__ = op.__qualname__ = name
    op.__module__ = __name__
    op.__doc__ = (
        f"{spec.label}: {inspect.getdoc(spec.reference)}\n\n"
        '``backend``: None (the ambient choice), "auto", "reference" or "fused"; see htsat_kernels.backends.'
    )
    return op


def _register(spec: OpSpec) -> None:
    """Register the reference and load the fused module; one that cannot load records why instead of
    breaking the import (Triton or the compiled extension missing: the reference path still works)."""
    register_reference(spec.name, spec.reference)
    try:
        impl: FusedImpl | str = spec.fused.load()
    except Exception as exc:
        impl = f"htsat_kernels.fused.{spec.fused.module} failed to load: {exc}"
    register_fused(spec.name, impl)
    if spec.cpu_auto is not None:
        register_cpu_auto(spec.name, spec.cpu_auto.load())


for _spec in OPS.values():
    _register(_spec)
    globals()[_spec.name] = _public(_spec)
del _spec


def __getattr__(name: str) -> Callable:
    """Only reached for names that do not exist (PEP 562). Declared so that type checkers accept the
    ops generated above (``htsat_kernels.window_attention`` ...), which they cannot see."""
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
