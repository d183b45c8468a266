"""Backend choice and per-call dispatch between the reference ops and the fused kernels.

Precedence of the choice: an explicit ``backend=`` argument > the innermost ``use_backend(...)``
context (the model runs its layers inside ``use_backend(model.backend)`` unless that is "auto")
> the env var ``HTSAT_KERNELS_BACKEND`` > "auto". "auto" runs the fused kernel when its capability check accepts the call and the
reference otherwise (the reason is logged at debug level); for CPU tensors an op may declare a faster
implementation of the same contract that "auto" runs instead of that reference (window attention: SDPA). "fused" runs the fused kernel or
raises ``BackendUnavailable`` with the reason: it never falls back silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger("htsat_kernels")

BACKENDS = ("auto", "reference", "fused")
ENV_VAR = "HTSAT_KERNELS_BACKEND"

_context_stack: list[str] = []


class BackendUnavailable(RuntimeError):
    """The fused backend was asked for explicitly but cannot run this call."""


def _validate(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} from {where}; expected one of {BACKENDS}")
    return name


def current_backend() -> str:
    """The backend in force when no per-call choice is given."""
    if _context_stack:
        return _context_stack[-1]
    return _validate(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on ``name``: "reference", "fused" or "auto"."""
    _context_stack.append(_validate(name, "use_backend()"))
    try:
        yield
    finally:
        _context_stack.pop()


@dataclass
class FusedImpl:
    """A fused implementation: ``run(*args)`` and ``unsupported(*args) -> reason or None``.

    ``auto_on_cpu=False`` keeps "auto" on the reference for CPU tensors even where the kernel could
    run there (the Triton interpreter is a test tool, far slower than eager PyTorch).
    """

    run: Callable
    unsupported: Callable[..., str | None]
    auto_on_cpu: bool = True
    # "auto" only: a reason to prefer the reference although the kernel could run (it is slower there)
    auto_declines: Callable[..., str | None] | None = None
    # why the kernel cannot run on the current GPU (its binary has no code for it), or None
    device_reason: Callable[[], str | None] | None = None


@dataclass(frozen=True)
class Decision:
    """One dispatch decision: ``op`` ran fused (``reason`` None) or ran the reference (``reason`` says why:
    the capability check's reason, "auto"'s preference, or the backend asked for)."""

    op: str
    fused: bool
    reason: str | None


# The lists that record_dispatch() blocks are filling (innermost last).
_recorders: list[list[Decision]] = []


@contextlib.contextmanager
def record_dispatch() -> Iterator[list[Decision]]:
    """Record every dispatch decision made inside the block, in call order (the coverage report, tests).

    A call counts once, in the forward: the backward of a fused call is the fused backward. Under
    ``torch.compile`` the decisions are made while Dynamo traces and the recording is replayed by each
    run of the compiled code (a side effect Dynamo keeps), so a compiled step records its calls too."""
    decisions: list[Decision] = []
    _recorders.append(decisions)
    try:
        yield decisions
    finally:
        _recorders.remove(decisions)


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """A backward that re-runs forward ops (save policies): their calls were recorded in the forward."""
    saved = _recorders[:]
    _recorders.clear()
    try:
        yield
    finally:
        _recorders[:] = saved


def _record(op: str, fused: bool, reason: str | None) -> None:
    for decisions in _recorders:
        decisions.append(Decision(op, fused, reason))


# op name -> FusedImpl, or the reason the implementation could not be loaded at all.
_fused: dict[str, FusedImpl | str] = {}
# op name -> the reference implementation (filled from the op table, htsat_kernels.ops)
_reference: dict[str, Callable] = {}
# op name -> what "auto" runs for CPU tensors instead of the reference (faster, same contract)
_cpu_auto: dict[str, FusedImpl] = {}


def register_fused(op: str, impl: FusedImpl | str) -> None:
    _fused[op] = impl


def register_cpu_auto(op: str, impl: FusedImpl) -> None:
    _cpu_auto[op] = impl


def register_reference(op: str, fn: Callable) -> None:
    _reference[op] = fn


def fused_run_of(op: str) -> Callable | None:
    """The fused kernel's entry point registered for ``op`` (None where it could not load)."""
    impl = _fused.get(op)
    return impl.run if isinstance(impl, FusedImpl) else None


def fused_status() -> dict[str, str]:
    """For each op: "available", the reason its fused implementation cannot load, or "available on CPU
    only: <reason>" when it loaded but cannot run on the current GPU."""
    return {op: _status(impl) for op, impl in sorted(_fused.items())}


def _status(impl: FusedImpl | str) -> str:
    if isinstance(impl, str):
        return impl
    why = impl.device_reason() if impl.device_reason is not None else None
    return "available" if why is None else f"available on CPU only: {why}"


def dispatch(op: str, args: tuple, backend: str | None) -> Callable:
    """Pick the function that runs ``op(*args)`` under ``backend`` (None: the ambient choice)."""
    choice = current_backend() if backend is None else _validate(backend, "the backend argument")
    ref = _reference.get(op)
    if ref is None:
        raise ValueError(f"unknown op {op!r}; registered: {sorted(_reference)}")
    if choice == "reference":
        if _recorders:
            _record(op, False, "backend 'reference' was asked for")
        return ref
    impl = _fused.get(op, f"no fused implementation of {op} is registered")
    if isinstance(impl, str):
        reason = impl
    else:
        why = impl.unsupported(*args)
        if why is None and choice == "auto":
            if not impl.auto_on_cpu and args[0].device.type == "cpu":
                why = "auto does not pick this kernel for CPU tensors (use backend='fused' to force it)"
            elif impl.auto_declines is not None:
                why = impl.auto_declines(*args)
        if why is None:
            if _recorders:
                _record(op, True, None)
            return impl.run
        reason = why
    cpu = _cpu_auto.get(op) if choice == "auto" else None
    if cpu is not None and args[0].device.type == "cpu" and cpu.unsupported(*args) is None:
        # where auto would run the reference on CPU: the faster path of the same contract (not the fused kernel)
        if _recorders:
            _record(op, False, f"{reason}; ran its CPU path")
        if not torch.compiler.is_compiling():
            logger.debug("%s: fused declined (%s); running its CPU path", op, reason)
        return cpu.run
    if _recorders:
        _record(op, False, reason)
    return _unavailable(op, choice, reason, ref)


def _unavailable(op: str, choice: str, reason: str, ref: Callable) -> Callable:
    """The fused kernel cannot (or, under "auto", should not) run: raise for "fused", else the reference."""
    if choice == "fused":
        raise BackendUnavailable(f"backend 'fused' was requested for {op} but cannot run: {reason}")
    if not torch.compiler.is_compiling():  # a logging call would split the compiled graph at every decline
        logger.debug("%s: fused declined (%s); running the reference", op, reason)
    return ref
