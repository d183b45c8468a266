"""Learning-rate schedules as LambdaLR multipliers over optimiser steps (docs/model.md §9)."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["original_lr_multiplier", "make_lr_lambda"]

_WARMUP = (0.02, 0.05, 0.1)


def original_lr_multiplier(epoch: int) -> float:
    """The original lr_foo (docs/model.md §9): multiplier on the base LR for an integer epoch."""
    if epoch < 3:
        return _WARMUP[epoch]
    if epoch <= 10:
        return 0.1
    if epoch <= 20:
        return 0.05
    if epoch <= 30:
        return 0.02
    return max(0.02 * 0.98**epoch, 0.03)


def make_lr_lambda(
    schedule: str, steps_per_epoch: int, total_epochs: int, warmup_epochs: float | None = None, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """Multiplier of the base LR as a function of the optimiser step (LambdaLR over steps).

    ``original``: the original's per-epoch multipliers; ``warmup_epochs`` stretches or shrinks its
    three warm-up epochs (the author suggests scaling the warm-up to the dataset size), later
    epochs follow the original table shifted accordingly. ``cosine``: linear warm-up, then cosine
    decay to ``min_ratio``. ``constant``: linear warm-up, then 1.
    """
    spe = max(1, int(steps_per_epoch))
    if schedule == "original":
        w = 3.0 if warmup_epochs is None else float(warmup_epochs)

        def original(step: int) -> float:
            e = step / spe
            if e < w:
                return _WARMUP[min(2, int(3 * e / w))]
            return original_lr_multiplier(3 + int(math.floor(e - w + 1e-9)))

        return original
    w_steps = (0.0 if warmup_epochs is None else float(warmup_epochs)) * spe
    total = max(1, total_epochs * spe)
    if schedule == "constant":
        return lambda step: min(1.0, (step + 1) / w_steps) if w_steps > 0 else 1.0
    if schedule == "cosine":

        def cosine(step: int) -> float:
            if w_steps > 0 and step < w_steps:
                return (step + 1) / w_steps
            t = min(1.0, (step - w_steps) / max(1.0, total - w_steps))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        return cosine
    raise ValueError(f"unknown lr schedule {schedule!r} (original, cosine, constant)")
