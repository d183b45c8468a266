"""Process groups (torchrun / DDP), the collectives the loop needs, and SIGTERM handling."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import TrainingError

__all__ = [
    "Dist",
    "setup_distributed",
    "teardown_distributed",
    "all_gather_objects",
    "all_reduce",
    "all_reduce_min",
    "TermFlag",
    "worker_ignores_sigterm",
]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_hint: str | None) -> Dist:
    """Join the process group of a torchrun launch (NCCL on GPUs, gloo on CPUs); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True, False)
    if world <= 1:
        return Dist()
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but torch.distributed is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_hint is None or device_hint.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, True, True)


def teardown_distributed(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(d: Dist, obj: Any) -> list[Any]:
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce(d: Dist, t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_reduce_min(d: Dist, t: torch.Tensor) -> torch.Tensor:
    return all_reduce(d, t, dist.ReduceOp.MIN) if d.enabled else t


def worker_ignores_sigterm(worker_id: int) -> None:
    """A SIGTERM sent to the whole process group must not kill the loader workers before the main
    process has finished its step and saved; they exit with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TermFlag:
    """SIGTERM (a scheduler pre-empting the job, torchrun shutting down) asks the loop to save a
    checkpoint after the current step and leave; a second SIGTERM terminates at once."""

    def __init__(self) -> None:
        self.requested = False
        self._prev: Any = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.requested = True

    def __enter__(self) -> TermFlag:
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
