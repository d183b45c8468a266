"""Per-instance forward replacement and the handle that undoes it.

A patched module gets an instance attribute ``forward`` bound with ``types.MethodType`` (so that
``copy.deepcopy`` of a patched model binds the copy's forwards to the copied modules); nothing is
added to its parameters or buffers, so its ``state_dict`` keys are unchanged.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn

# every function this package installs as a forward, to recognise a module that is already patched
_PATCHED_FORWARDS: set[Callable] = set()
_MISSING = object()


def patched_forward(fn: Callable) -> Callable:
    """Register ``fn`` as one of our replacement forwards (a decorator)."""
    _PATCHED_FORWARDS.add(fn)
    return fn


def is_patched(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return getattr(fwd, "__func__", None) in _PATCHED_FORWARDS


class PatchHandle:
    """What ``patch_*`` returns: which modules run on htsat_kernels ops, and ``undo()`` to restore them.

    Usable as a context manager (the patch is undone on exit).
    """

    def __init__(self, model: nn.Module, library: str):
        self.model = model
        self.library = library
        self._saved: list[tuple[nn.Module, object]] = []
        self.counts: dict[str, int] = {}

    def _install(self, module: nn.Module, fn: Callable, kind: str) -> None:
        self._saved.append((module, module.__dict__.get("forward", _MISSING)))
        module.forward = types.MethodType(fn, module)
        self.counts[kind] = self.counts.get(kind, 0) + 1

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def undo(self) -> None:
        """Restore every patched module's forward (idempotent)."""
        while self._saved:
            module, previous = self._saved.pop()
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                setattr(module, "forward", previous)  # noqa: B010 (mypy: forward is a method)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        return f"PatchHandle({self.library}, {type(self.model).__name__}: {parts}; {state})"


def class_names(obj: object) -> set[str]:
    """The names of the classes in obj's MRO: models are recognised by name, since laion-clap's and
    the original HTS-AT's classes may be loaded under any module name (vendored copies, file loaders)."""
    return {cls.__name__ for cls in type(obj).__mro__}


def describe(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
