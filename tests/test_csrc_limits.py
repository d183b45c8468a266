"""Hostile sizes for the compiled ops (issue #13 item 6): every size product in csrc/ is overflow-checked.

Each call below must raise RuntimeError / ValueError with a message naming the argument, never crash the
interpreter (before the checks, `window_merge(torch.empty(0, 1, 1), 2**32, 2**32)` died with SIGFPE: the
window count overflowed int64 to 0). A crash would kill pytest, so the calls run in one child interpreter
that reports each outcome as a JSON line; a case it never reported names the signal that ended it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import htsat_kernels
from htsat_kernels import reference
from htsat_kernels.fused import extension

if extension.load_error is not None:  # the compiled extension is optional: say why and skip
    pytest.skip(extension.load_error, allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (call, with ops = torch.ops.htsat_kernels, e = torch.empty, hk = htsat_kernels; regex its message must match)
CASES = {
    # window_merge: the window count (H/ws) * (W/ws) overflowed to 0 and the modulo by it raised SIGFPE
    "merge_window_count_empty": ("ops.window_merge(e(0, 1, 1), 2**32, 2**32, 0)", r"^H and W .*overflows int64"),
    "merge_window_count": ("ops.window_merge(e(4, 1, 1), 2**32, 2**32, 0)", r"^H and W .*overflows int64"),
    "merge_output_size": ("ops.window_merge(e(0, 2**32, 1), 2**32, 2**32, 0)", r"^H and W \(the output.*overflows int64"),
    "merge_negative_H": ("ops.window_merge(e(0, 1, 1), -4, 4, 0)", r"H and W must be positive .* got H=-4, W=4"),
    "merge_zero_W": ("ops.window_merge(e(0, 1, 1), 4, 0, 0)", r"H and W must be positive .* got H=4, W=0"),
    "merge_H_beyond_int64": ("ops.window_merge(e(0, 1, 1), 2**64, 4, 0)", r"argument 'H'"),
    # the window side is the integer square root of dim 1, exact (no overflowing square) up to 2**63 - 1
    "merge_huge_window": ("ops.window_merge(e(0, 2**62, 1), 4, 4, 0)", r"multiples of the window size 2147483648"),
    "merge_max_tokens": ("ops.window_merge(e(0, 2**63 - 1, 1), 4, 4, 0)", r"^windows: tokens per window"),
    "merge_no_tokens": ("ops.window_merge(e(0, 0, 1), 4, 4, 0)", r"^windows: tokens per window .* got 0"),
    "partition_zero_window": ("ops.window_partition(e(1, 8, 8, 1), 0, 0)", r"^window_size must be positive, got 0"),
    "partition_negative_window": ("ops.window_partition(e(1, 8, 8, 1), -8, 0)", r"^window_size must be positive, got -8"),
    "partition_huge_window": ("ops.window_partition(e(1, 8, 8, 1), 2**62, 0)", r"^x: H and W .*window_size=4611686018427387904"),
    "partition_window_beyond_int64": ("ops.window_partition(e(1, 8, 8, 1), 2**63, 0)", r"argument 'window_size'"),
    "partition_zero_H": ("ops.window_partition(e(0, 0, 8, 1), 8, 0)", r"^x: H and W .*got H=0, W=8"),
    # 4 * C overflows for a zero-element x with C = 2**62 (torch allows that shape)
    "patch_merge_width": ("ops.patch_merge_forward(e(0, 0, 0, 2**62), e(4), e(4), 1e-5)", r"^x: the LayerNorm width 4 \* C"),
    "patch_merge_backward_width": (
        "ops.patch_merge_backward(e(0, 0, 4), e(0, 0, 0, 2**62), e(4), e(0, 0), e(0, 0))",
        r"^x: the LayerNorm width 4 \* C",
    ),
    "ln_partition_zero_window": (
        "ops.layer_norm_window_partition(e(1, 8, 8, 4), e(4), e(4), 1e-5, 0, 0)",
        r"^window_size must be positive, got 0",
    ),
    "ln_partition_backward_negative_window": (
        "ops.layer_norm_window_partition_backward(e(4, 16, 4), e(1, 8, 8, 4), e(4), e(4, 16), e(4, 16), -4, 0)",
        r"^window_size must be positive, got -4",
    ),
    # the output's element count fits int64 but its byte count does not
    "merge_add_output_bytes": ("ops.window_merge_add(e(0, 1, 1), e(0, 2**31, 2**31, 1), 0)", r"^shortcut: .*overflows int64"),
    "merge_add_zero_H": ("ops.window_merge_add(e(0, 1, 1), e(0, 0, 4, 1), 0)", r"H and W must be positive .* got H=0"),
    # the public ops with backend="fused": the capability check or the kernel's own check names the argument
    "public_merge": ("hk.window_merge(e(0, 1, 1), 2**32, 2**32, backend='fused')", r"H and W .*overflows int64"),
    "public_partition": ("hk.window_partition(e(1, 8, 8, 1), 0, backend='fused')", r"window_size must be positive"),
    "public_patch_merge": ("hk.patch_merge(e(0, 0, 0, 2**62), e(4), e(4), backend='fused')", r"weight must have shape"),
    "public_ln_partition": (
        "hk.layer_norm_window_partition(e(1, 8, 8, 4), e(4), e(4), 1e-5, -8, backend='fused')",
        r"window_size must be positive",
    ),
    "public_merge_add": (
        "hk.window_merge_add(e(0, 1, 1), e(0, 2**31, 2**31, 1), 2**31, 2**31, backend='fused')",
        r"shortcut: .*overflows int64",
    ),
}

_WORKER = r"""
import json, sys
import torch
import htsat_kernels as hk
import htsat_kernels.fused.patch_merge, htsat_kernels.fused.window_process  # register the fake / autograd impls
ops, e = torch.ops.htsat_kernels, torch.empty
for name, call in json.loads(sys.stdin.read()):
    try:
        eval(call)
        out = {"case": name, "raised": None}
    except Exception as exc:
        out = {"case": name, "raised": type(exc).__name__, "clear": isinstance(exc, (RuntimeError, ValueError)),
               "message": str(exc)}
    print(json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def outcomes() -> dict:
    """Runs the cases in a child interpreter; when one kills it, that case records how, and a new child
    goes on with the next (so one crash hides no other case)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    pending = [(name, call) for name, (call, _) in CASES.items()]
    found: dict = {}
    while pending:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _WORKER], input=json.dumps(pending), capture_output=True, text=True, env=env, timeout=120
            )
            stdout, ended = proc.stdout, f"the child ended with return code {proc.returncode}: {proc.stderr[-2000:]}"
        except subprocess.TimeoutExpired as exc:  # a size loop that never ends is a failure too
            stdout, ended = exc.stdout or "", "the child hung (killed after 120 s)"
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        for line in stdout.splitlines():
            if line.startswith("{"):
                out = json.loads(line)
                found[out["case"]] = out
        pending = [(name, call) for name, call in pending if name not in found]
        if pending:  # the first unreported case ended the child
            found[pending.pop(0)[0]] = {"crashed": ended}
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_size_raises_a_clear_error(outcomes, case):
    out = outcomes[case]
    assert "crashed" not in out, out.get("crashed")
    assert out["raised"] is not None, f"{CASES[case][0]} returned instead of raising"
    assert out["clear"], f"{out['raised']} is not a RuntimeError / ValueError: {out['message']}"
    message = out["message"].splitlines()[0] if out["raised"] != "BackendUnavailable" else out["message"]
    assert re.search(CASES[case][1], message), f"message {out['message']!r} does not match {CASES[case][1]!r}"


@pytest.mark.parametrize("shift", [2**63 - 1, -(2**63), 2**40 + 3])
def test_extreme_shifts_follow_torch_roll(shift):
    """Any int64 shift is reduced mod H and W without overflow, as torch.roll does."""
    from htsat_kernels.fused import window_process  # noqa: F401  (loads the ops)

    x = torch.randn(2, 8, 12, 3)
    ops = torch.ops.htsat_kernels
    windows = ops.window_partition(x, 4, shift)
    expected = reference.window_partition(torch.roll(x, (-(shift % 8), -(shift % 12)), dims=(1, 2)), 4, 0)
    assert torch.equal(windows, expected)
    assert torch.equal(ops.window_merge(windows, 8, 12, shift), x)


def test_empty_batch_is_not_an_error():
    """Zero-size batches are valid inputs (the overflow checks leave zero factors alone)."""
    x = torch.empty(0, 8, 8, 4)
    assert htsat_kernels.window_partition(x, 4, 2, backend="fused").shape == (0, 16, 4)
    assert htsat_kernels.window_merge(torch.empty(0, 16, 4), 8, 8, 2, backend="fused").shape == (0, 8, 8, 4)
    w, b = torch.ones(16), torch.zeros(16)
    assert htsat_kernels.patch_merge(x, w, b, backend="fused").shape == (0, 16, 16)
