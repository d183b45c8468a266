"""The CUDA part of the extension holds code for the architectures it was built for (setup.py records
them in _C_build.json, ``cuda_archs``); a GPU none of them runs on is declined before launch, with the
reason in fused_status(), the "auto" log and the "fused" error, instead of failing at launch with "no
kernel image is available". The device is faked (compute capability and fake CUDA tensors), so this
runs without a GPU.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import htsat_kernels
from htsat_kernels import BackendUnavailable, backends, reference

extension = pytest.importorskip("htsat_kernels.fused.extension")
needs_extension = pytest.mark.skipif(extension.load_error is not None, reason="needs the compiled extension")


@pytest.mark.parametrize(
    "archs, capability, runs",
    [
        (["sm_80"], (8, 0), True),
        (["sm_80"], (8, 6), True),  # machine code runs on later minors of its major
        (["sm_86"], (8, 0), False),
        (["sm_80"], (9, 0), False),  # an A100 build on an H100
        (["sm_80", "sm_90"], (9, 0), True),
        (["sm_80", "compute_80"], (9, 0), True),  # PTX: JIT-compiled for newer GPUs
        (["sm_80", "sm_90", "compute_90"], (12, 0), True),
        (["compute_90"], (8, 9), False),
        (["sm_90a"], (9, 0), True),  # arch-specific code: that GPU only
        (["sm_90a"], (10, 0), False),
        (["sm_100f"], (10, 3), True),  # family code: the later minors of its major
        (["sm_100"], (12, 0), False),
        (None, (9, 0), True),  # a record without the list (an older build): nothing to compare
        ("8.0 (HTSAT_KERNELS_CUDA_ARCHS)", (9, 0), True),  # an older build's description string: unknown
    ],
)
def test_built_architectures_are_compared_with_the_device(archs, capability, runs):
    reason = extension.arch_reason(archs, capability)
    assert (reason is None) == runs, reason
    if not runs:
        assert f"compute capability {capability[0]}.{capability[1]}" in reason
        assert f'HTSAT_KERNELS_CUDA_ARCHS="{capability[0]}.{capability[1]}"' in reason


@pytest.fixture
def a100_build_on_h100(monkeypatch):
    """An extension whose CUDA part holds sm_80 only, on a GPU of compute capability 9.0."""
    monkeypatch.setattr(extension, "with_cuda", True)
    monkeypatch.setattr(extension, "build_record", {**extension.build_record, "cuda": True, "cuda_archs": ["sm_80"]})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=9, minor=0))


def _cuda_args(op: str) -> tuple:
    """The op's example arguments as fake CUDA tensors (no GPU needed: only the capability check reads them)."""
    args = htsat_kernels.OPS[op].example()
    with FakeTensorMode():
        return tuple(torch.empty(a.shape, dtype=a.dtype, device="cuda") if isinstance(a, torch.Tensor) else a for a in args)


COMPILED_OPS = ["window_partition", "window_merge", "patch_merge", "layer_norm_window_partition", "window_merge_add"]


@needs_extension
@pytest.mark.parametrize("op", COMPILED_OPS)
def test_a_gpu_without_kernel_image_is_declined_before_launch(op, a100_build_on_h100, caplog):
    args = _cuda_args(op)
    with caplog.at_level(logging.DEBUG, logger="htsat_kernels"):
        assert backends.dispatch(op, args, "auto") is getattr(reference, op)
    assert "built for sm_80, which has no kernel image for this GPU (compute capability 9.0)" in caplog.text
    with pytest.raises(BackendUnavailable, match=r"built for sm_80.*compute capability 9\.0"):
        backends.dispatch(op, args, "fused")
    status = htsat_kernels.fused_status()[op]
    assert status.startswith("available on CPU only:") and "compute capability 9.0" in status
    # CPU tensors still run the C++ kernels
    assert backends.dispatch(op, htsat_kernels.OPS[op].example(), "fused") is not getattr(reference, op)


@needs_extension
@pytest.mark.parametrize("archs", [["sm_90"], ["sm_80", "compute_80"]])
def test_a_gpu_with_a_kernel_image_is_accepted(archs, a100_build_on_h100, monkeypatch):
    monkeypatch.setattr(extension, "build_record", {**extension.build_record, "cuda_archs": archs})
    args = _cuda_args("window_merge_add")
    assert backends.dispatch("window_merge_add", args, "fused") is not reference.window_merge_add
    assert htsat_kernels.fused_status()["window_merge_add"] == "available"
