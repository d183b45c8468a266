"""Test setup shared by every test module.

Without a GPU the Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET must be
set before triton.jit decorates them, i.e. before htsat_kernels is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
