"""Process setup that must happen before ``htsat_kernels`` is imported.

Without a CUDA device the Triton kernels can only run in the Triton interpreter, and
``TRITON_INTERPRET`` is read when ``triton.jit`` decorates a kernel, i.e. when ``htsat_kernels``
imports its fused modules. Call :func:`prepare_process` first thing in every entry point.
"""

from __future__ import annotations

import os


def prepare_process() -> bool:
    """Turn on the Triton interpreter when no CUDA device is usable; returns True when it is on. Also
    OpenMP's passive waiting, as ``import htsat`` sets it (before torch loads)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
