"""Shared state of one benchmark run, and the case interface every suite implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .harness import Prepared, TimingConfig, free_memory

QUICK_COMPILE_REASON = "skipped in --quick to stay under 3 minutes (torch.compile time); runs without --quick"


@dataclass
class RunContext:
    device: torch.device
    quick: bool = False
    timing: TimingConfig = field(default_factory=TimingConfig)
    # Compile the whole model on a CPU-only run too (tens of minutes; off by default).
    model_compile_on_cpu: bool = False
    # Data shared by the cases of one group (inputs, the fp32 reference outputs): rebuilt when
    # the group changes, so at most one group's tensors are alive.
    _group_key: Any = None
    _group_data: Any = None
    # Provider failures that would repeat for every later case (e.g. a compiler error):
    # key -> reason; later cases with the same key are skipped with that reason, not retried.
    sticky: dict = field(default_factory=dict)
    # Memoised objects (compiled functions, models), by key.
    memo: dict = field(default_factory=dict)

    def group(self, key: Any, build: Callable[[], Any]) -> Any:
        if self._group_key != key:
            self._group_key, self._group_data = None, None
            free_memory(self.device)
            self._group_data = build()
            self._group_key = key
        return self._group_data

    def release(self) -> None:
        self._group_key, self._group_data = None, None
        free_memory(self.device)

    def memoize(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]


class Case:
    """One benchmark case: a record's identity, a plan-time skip check and ``prepare``."""

    section: str = ""
    timed: bool = True

    def fields(self) -> dict:  # identity fields of the record (op, provider, mode, dtype, shape, ...)
        raise NotImplementedError

    def test_id(self) -> str:
        f = self.fields()
        return "-".join(str(f[k]) for k in ("op", "stage_label", "batch", "dtype", "mode", "provider") if f.get(k) is not None)

    def plan_skip(self, ctx: RunContext) -> str | None:
        return None

    def prepare(self, ctx: RunContext) -> Prepared:
        raise NotImplementedError
