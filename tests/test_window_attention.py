"""Fused (Triton) window attention against the reference: values, gradients, registration, errors.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py) on CPU tensors, so the
shapes here are small; ``TestCUDA`` runs the full HTS-AT stage shapes when a GPU is present.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

import htsat_kernels
from htsat_kernels import reference
from htsat_kernels.backends import BackendUnavailable

wa = pytest.importorskip("htsat_kernels.fused.window_attention")

# (heads, nW) of the four HTS-AT stages (window 8, head dim 24); stage 4 is never shifted.
HTSAT_STAGES = [(4, 64, True), (8, 16, True), (16, 4, True), (32, 1, False)]


def make_inputs(B, nW, ws, heads, d, dtype=torch.float32, masked=True, device="cpu", noncontig=False, seed=0):
    """qkv (B*nW, N, 3C), table ((2ws-1)^2, heads), mask (nW, N, N) of -100/0 or None."""
    g = torch.Generator().manual_seed(seed)
    N, C = ws * ws, heads * d
    if noncontig:  # a strided slice of a bigger tensor, token-major storage
        big = torch.randn(N, B * nW, 3 * C + 8, generator=g, dtype=torch.float64)
        qkv = big.transpose(0, 1)[:, :, 3 : 3 + 3 * C]
    else:
        qkv = torch.randn(B * nW, N, 3 * C, generator=g, dtype=torch.float64)
    table = torch.randn((2 * ws - 1) ** 2, heads, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        if nW == 4:  # the real shifted-window mask of a 2x2-window map
            mask = reference.shifted_window_mask(2 * ws, 2 * ws, ws, ws // 2).double()
        else:
            mask = torch.where(torch.rand(nW, N, N, generator=g) < 0.3, -100.0, 0.0).double()
    qkv = qkv.to(device=device, dtype=dtype)
    table = table.to(device=device, dtype=dtype)
    if mask is not None:
        mask = mask.to(device=device, dtype=dtype)
    return qkv, table, mask


def run(fn, qkv, table, mask, heads, scale, grad_out):
    """(out, dqkv, dtable) of fn on fresh leaves."""
    qkv = qkv.detach().requires_grad_(True)
    table = table.detach().requires_grad_(True)
    out = fn(qkv, table, mask, heads, scale)
    dqkv, dtable = torch.autograd.grad(out, (qkv, table), grad_out)
    return out.detach(), dqkv, dtable


def truth(qkv, table, mask, heads, scale, grad_out):
    """The reference in float64."""
    m = None if mask is None else mask.double()
    return run(reference.window_attention, qkv.double(), table.double(), m, heads, scale, grad_out.double())


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel_err(a, b):
    return max_err(a, b) / max(b.double().abs().max().item(), 1e-30)


def grad_out_like(qkv, heads, seed=1):
    g = torch.Generator().manual_seed(seed)
    B_, N, C3 = qkv.shape
    return torch.randn(B_, N, C3 // 3, generator=g, dtype=torch.float64).to(qkv.device, qkv.dtype)


# ---------------------------------------------------------------------------------------------
# values and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ws,heads,d,nW,B,masked",
    [
        (8, 4, 24, 4, 1, True),
        (8, 2, 24, 1, 1, False),
        (7, 2, 24, 2, 1, True),
        (2, 3, 5, 2, 1, True),  # N = 4 < the 16-token tile minimum; d = 5
    ],
)
def test_matches_reference_fp64(ws, heads, d, nW, B, masked):
    qkv, table, mask = make_inputs(B, nW, ws, heads, d, torch.float64, masked)
    scale = d**-0.5
    go = grad_out_like(qkv, heads)
    got = run(wa.fused_window_attention, qkv, table, mask, heads, scale, go)
    want = truth(qkv, table, mask, heads, scale, go)
    for name, a, b in zip(("out", "dqkv", "dtable"), got, want):
        assert a.dtype == torch.float64
        assert rel_err(a, b) < 1e-12, name


@pytest.mark.parametrize(
    "ws,heads,d,nW,B,masked",
    [
        (4, 4, 24, 4, 2, True),
        (7, 2, 24, 1, 2, False),
        (8, 4, 24, 4, 2, True),  # stage-1 like (mask of a shifted block)
        (8, 4, 24, 2, 1, False),
        (8, 32, 24, 1, 1, False),  # stage-4 heads
        (8, 32, 24, 2, 1, True),
        (12, 2, 16, 1, 1, True),  # N = 144 padded to 256
    ],
)
def test_matches_reference_fp32(ws, heads, d, nW, B, masked):
    qkv, table, mask = make_inputs(B, nW, ws, heads, d, torch.float32, masked)
    scale = d**-0.5
    go = grad_out_like(qkv, heads)
    got = run(wa.fused_window_attention, qkv, table, mask, heads, scale, go)
    want = truth(qkv, table, mask, heads, scale, go)
    assert got[0].shape == (B * nW, ws * ws, heads * d)
    for name, a, b in zip(("out", "dqkv", "dtable"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize(
    "d,dtype,dc",
    [
        (24, torch.float32, 32),  # HTS-AT: the head dim in one chunk
        (24, torch.float32, 16),  # fp32 on either arch
        (64, torch.float32, 16),  # clap-large fp32 (K >= 16: Triton 3.6 rejects 32-bit dots with K = 8)
        (64, torch.bfloat16, 16),  # clap-large bf16 on sm_80
        (64, torch.bfloat16, 32),  # clap-large bf16 on sm_90
        (40, torch.float32, 16),  # d padded to 64: a chunk of padding only
    ],
)
def test_backward_head_dim_chunks(monkeypatch, d, dtype, dc):
    """Every chunk width of the backward (``launch_config``'s DC, chosen per arch) gives the same
    values and gradients: the launcher is made to use ``dc`` whatever the interpreter's default."""
    real = wa.launch_config

    def forced(direction, N, d_, dtype_, has_mask, arch=None):
        cfg = real(direction, N, d_, dtype_, has_mask, arch)
        if direction == "backward":
            assert cfg["BLOCK_D"] % dc == 0
            cfg["DC"] = dc
        return cfg

    monkeypatch.setattr(wa, "launch_config", forced)
    ws, heads, nW = 8, 2, 2
    qkv, table, mask = make_inputs(2, nW, ws, heads, d, dtype, True)
    scale = d**-0.5
    go = grad_out_like(qkv, heads)
    want = truth(qkv, table, mask, heads, scale, go)
    got = run(wa.fused_window_attention, qkv, table, mask, heads, scale, go)
    if dtype == torch.float32:
        for name, a, b in zip(("out", "dqkv", "dtable"), got, want):
            assert rel_err(a, b) < 1e-5, name
        return
    ref = run(reference.window_attention, qkv, table, mask, heads, scale, go)
    for name, a, r, t in zip(("out", "dqkv", "dtable"), got, ref, want):
        tol = 2 * max_err(r, t) + 1e-2 * t.abs().max().item()
        assert max_err(a, t) <= tol, f"{name}: fused {max_err(a, t):.3g} vs reference {max_err(r, t):.3g}"


def test_forward_in_blocks_of_16_query_rows(monkeypatch):
    """The fp32 forward on sm_80 runs 16 query rows per program (``launch_config``): same values."""
    real = wa.launch_config
    monkeypatch.setattr(
        wa, "launch_config", lambda *a, **k: {**real(*a, **k), "BLOCK_M": 16} if a[0] == "forward" else real(*a, **k)
    )
    ws, heads, d, nW = 8, 2, 24, 2
    qkv, table, mask = make_inputs(1, nW, ws, heads, d, torch.float32, True)
    go = grad_out_like(qkv, heads)
    got = run(wa.fused_window_attention, qkv, table, mask, heads, d**-0.5, go)
    want = truth(qkv, table, mask, heads, d**-0.5, go)
    for name, a, b in zip(("out", "dqkv", "dtable"), got, want):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize(
    "H,W,ws,shift,heads,d,B,dtype",
    [
        (8, 8, 4, 2, 2, 8, 1, torch.float64),
        (8, 12, 4, 1, 1, 5, 2, torch.float32),  # non-square grid, shift 1
        (16, 16, 8, 4, 2, 24, 1, torch.float32),  # HTS-AT's window and shift, 2x2 windows
        (24, 16, 8, 3, 2, 24, 1, torch.bfloat16),
        (12, 12, 12, 6, 1, 16, 1, torch.float32),  # one window of 144 tokens padded to 256
    ],
)
def test_shift_mask_from_the_grid_is_the_mask_tensor(H, W, ws, shift, heads, d, B, dtype):
    """shifted_grid computes in the kernel, bit for bit, what the (nW, N, N) mask tensor of the grid gives."""
    nW = (H // ws) * (W // ws)
    qkv, table, _ = make_inputs(B, nW, ws, heads, d, dtype, False, seed=5)
    mask = reference.shifted_window_mask(H, W, ws, shift).to(dtype)
    scale = d**-0.5
    go = grad_out_like(qkv, heads)
    grid = (H, W, shift)
    got = run(lambda q, t, m, h, s: wa.fused_window_attention(q, t, None, h, s, 0.0, grid), qkv, table, None, heads, scale, go)
    tensor = run(wa.fused_window_attention, qkv, table, mask, heads, scale, go)
    ref = run(lambda q, t, m, h, s: reference.window_attention(q, t, None, h, s, 0.0, grid), qkv, table, None, heads, scale, go)
    ref_tensor = run(reference.window_attention, qkv, table, mask, heads, scale, go)
    for name, a, b, r, rt in zip(("out", "dqkv", "dtable"), got, tensor, ref, ref_tensor):
        assert torch.equal(a, b), name
        assert torch.equal(r, rt), name  # the reference builds the same mask
    if dtype != torch.bfloat16:
        want = truth(qkv, table, mask, heads, scale, go)
        for name, a, t in zip(("out", "dqkv", "dtable"), got, want):
            assert rel_err(a, t) < (1e-12 if dtype == torch.float64 else 1e-5), name


def test_shifted_grid_arguments():
    qkv, table, mask, heads, scale = _good()  # 2 windows of 4x4
    assert wa.unsupported_reason(qkv, table, None, heads, scale, 0.0, (4, 8, 2)) is None
    for grid, words in [
        ((8, 8, 2), "nW = 4 windows of a 8x8 map does not divide"),
        ((4, 8, 0), "shift must be in 1 .. window size - 1 = 3, got 0"),
        ((4, 6, 2), "H and W must be positive multiples of the window size 4"),
        ((4, 8), "shifted_grid must be a tuple (H, W, shift)"),
    ]:
        reason = wa.unsupported_reason(qkv, table, None, heads, scale, 0.0, grid)
        assert reason is not None and words in reason, reason
    both = wa.unsupported_reason(qkv, table, mask, heads, scale, 0.0, (4, 8, 2))
    assert "mask and shifted_grid were both given" in both
    with pytest.raises(ValueError, match="both given"):
        htsat_kernels.window_attention(qkv, table, mask, heads, scale, 0.0, (4, 8, 2), backend="reference")


def test_noncontiguous_qkv_and_grad_out():
    ws, heads, d, nW = 8, 2, 24, 2
    qkv, table, mask = make_inputs(1, nW, ws, heads, d, torch.float32, True, noncontig=True)
    assert not qkv.is_contiguous()
    # a non-contiguous table and grad_out as well
    table_t = table.t().contiguous().t()
    scale = d**-0.5
    big_go = torch.randn(nW, ws * ws, 2 * heads * d, dtype=torch.float32)
    go = big_go[:, :, ::2]
    got = run(wa.fused_window_attention, qkv, table_t, mask, heads, scale, go)
    dense = run(wa.fused_window_attention, qkv.contiguous(), table, mask, heads, scale, go.contiguous())
    want = truth(qkv, table, mask, heads, scale, go)
    for name, a, b, c in zip(("out", "dqkv", "dtable"), got, dense, want):
        assert torch.equal(a, b), name  # strides change addressing only, not arithmetic
        assert rel_err(a, c) < 1e-5, name


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_within_twice_reference_error(dtype, atol):
    ws, heads, d, nW = 8, 4, 24, 4
    qkv, table, mask = make_inputs(1, nW, ws, heads, d, dtype, True)
    scale = d**-0.5
    go = grad_out_like(qkv, heads)
    got = run(wa.fused_window_attention, qkv, table, mask, heads, scale, go)
    ref = run(reference.window_attention, qkv, table, mask, heads, scale, go)
    want = truth(qkv, table, mask, heads, scale, go)
    for name, a, r, t in zip(("out", "dqkv", "dtable"), got, ref, want):
        assert a.dtype == dtype, name
        tol = 2 * max_err(r, t) + atol * t.abs().max().item()
        assert max_err(a, t) <= tol, f"{name}: fused {max_err(a, t):.3g} vs reference {max_err(r, t):.3g}"


def test_low_precision_qkv_with_fp32_table_and_mask():
    """Under autocast qkv is bf16 while the table parameter (and a mask buffer) stay fp32."""
    ws, heads, d, nW = 4, 2, 24, 2
    qkv, table, mask = make_inputs(1, nW, ws, heads, d, torch.float32, True)
    qkv = qkv.bfloat16()
    scale = d**-0.5
    go = grad_out_like(qkv, heads)
    out, dqkv, dtable = run(wa.fused_window_attention, qkv, table, mask, heads, scale, go)
    assert out.dtype == dqkv.dtype == torch.bfloat16 and dtable.dtype == torch.float32
    want = truth(qkv, table, mask, heads, scale, go)
    for name, a, t in zip(("out", "dqkv", "dtable"), (out, dqkv, dtable), want):
        assert rel_err(a, t) < 2e-2, name


def test_gradcheck_fp64():
    qkv, table, mask = make_inputs(1, 2, 2, 1, 2, torch.float64, True)
    qkv.requires_grad_(True)
    table.requires_grad_(True)
    fn = lambda q, t: wa.fused_window_attention(q, t, mask, 1, 0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qkv, table))
    # bigger windows, two heads of d = 24 and a mask, in fast mode
    qkv, table, mask = make_inputs(1, 2, 4, 2, 24, torch.float64, True, seed=3)
    qkv.requires_grad_(True)
    table.requires_grad_(True)
    fn = lambda q, t: wa.fused_window_attention(q, t, mask, 2, 24**-0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qkv, table), fast_mode=True)


def test_backward_is_deterministic():
    qkv, table, mask = make_inputs(2, 4, 8, 2, 24, torch.float32, True)
    go = grad_out_like(qkv, 2)
    first = run(wa.fused_window_attention, qkv, table, mask, 2, 24**-0.5, go)
    second = run(wa.fused_window_attention, qkv, table, mask, 2, 24**-0.5, go)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_saves_only_inputs_and_row_statistics():
    """Nothing N x N per window is saved for the backward: qkv, table, mask and (B_, h, N) lse only."""
    B, nW, ws, heads, d = 1, 4, 8, 2, 8
    qkv, table, mask = make_inputs(B, nW, ws, heads, d, torch.float32, True)
    qkv.requires_grad_(True)
    table.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = wa.fused_window_attention(qkv, table, mask, heads, d**-0.5)
    N = ws * ws
    assert sorted(saved) == sorted([tuple(qkv.shape), tuple(table.shape), tuple(mask.shape), (B * nW, heads, N)])
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and table.grad.shape == table.shape
    saved.clear()  # the mask given by the grid: no mask tensor at all
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        wa.fused_window_attention(qkv, table, None, heads, d**-0.5, 0.0, (2 * ws, 2 * ws, ws // 2))
    assert sorted(saved) == sorted([tuple(qkv.shape), tuple(table.shape), (B * nW, heads, N)])


def test_empty_batch():
    qkv, table, _ = make_inputs(1, 1, 4, 2, 8, torch.float32, False)
    qkv = qkv[:0].requires_grad_(True)
    table.requires_grad_(True)
    out = wa.fused_window_attention(qkv, table, None, 2, 0.5)
    assert out.shape == (0, 16, 16)
    out.sum().backward()
    assert torch.equal(table.grad, torch.zeros_like(table))


# ---------------------------------------------------------------------------------------------
# dispatch, registration, compile
# ---------------------------------------------------------------------------------------------


def test_public_api_forced_fused_matches_reference():
    qkv, table, mask = make_inputs(1, 2, 4, 2, 24, torch.float32, True)
    assert htsat_kernels.fused_status()["window_attention"] == "available"
    assert wa.unsupported_reason(qkv, table, mask, 2, 0.2) is None
    out = htsat_kernels.window_attention(qkv, table, mask, 2, 0.2, backend="fused")
    ref = htsat_kernels.window_attention(qkv, table, mask, 2, 0.2, backend="reference")
    assert rel_err(out, ref) < 1e-5


def test_opcheck():
    qkv, table, mask = make_inputs(1, 2, 4, 2, 8, torch.float32, True)
    qkv.requires_grad_(True)
    table.requires_grad_(True)
    args = (qkv, table, mask, 2, 8**-0.5, 0, 0, 0)
    torch.library.opcheck(torch.ops.htsat_kernels.window_attention_fwd.default, args)
    torch.library.opcheck(torch.ops.htsat_kernels.window_attention_fwd.default, (qkv, table, None, 2, 0.3, 0, 0, 0))
    grid_args = (qkv, table, None, 2, 0.3, 4, 8, 2)  # the shift mask of a 4x8 map computed in the kernel
    torch.library.opcheck(torch.ops.htsat_kernels.window_attention_fwd.default, grid_args)
    out, lse = torch.ops.htsat_kernels.window_attention_fwd(*args)
    go = torch.randn_like(out)
    bwd_args = (go, qkv.detach(), table.detach(), mask, lse, 2, 8**-0.5, 0, 0, 0)
    torch.library.opcheck(torch.ops.htsat_kernels.window_attention_bwd.default, bwd_args)
    out, lse = torch.ops.htsat_kernels.window_attention_fwd(*grid_args)
    bwd_args = (go, qkv.detach(), table.detach(), None, lse, 2, 0.3, 4, 8, 2)
    torch.library.opcheck(torch.ops.htsat_kernels.window_attention_bwd.default, bwd_args)


def test_torch_compile_fullgraph_matches_eager():
    qkv, table, mask = make_inputs(1, 2, 4, 2, 8, torch.float32, True)
    scale = 8**-0.5

    def fn(qkv, table, mask):
        out = htsat_kernels.window_attention(qkv, table, mask, 2, scale, backend="fused")
        return out * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    go = grad_out_like(qkv, 2)
    eager = run(lambda q, t, m, h, s: fn(q, t, m), qkv, table, mask, 2, scale, go)
    comp = run(lambda q, t, m, h, s: compiled(q, t, m), qkv, table, mask, 2, scale, go)
    for name, a, b in zip(("out", "dqkv", "dtable"), comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)

    def grid_fn(qkv, table):  # the shift mask given by the grid (as the model calls it)
        return htsat_kernels.window_attention(qkv, table, None, 2, scale, 0.0, (4, 8, 2), backend="fused") * 2.0

    compiled = torch.compile(grid_fn, fullgraph=True)
    eager = run(lambda q, t, m, h, s: grid_fn(q, t), qkv, table, None, 2, scale, go)
    comp = run(lambda q, t, m, h, s: compiled(q, t), qkv, table, None, 2, scale, go)
    masked = run(lambda q, t, m, h, s: fn(q, t, m), qkv, table, reference.shifted_window_mask(4, 8, 4, 2), 2, scale, go)
    for name, a, b, c in zip(("out", "dqkv", "dtable"), comp, eager, masked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
        assert torch.equal(b, c), name


_TRACE_SCRIPT = r"""
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from htsat_kernels.fused import window_attention as wa
assert not wa._INTERPRETED, "expected compiled (non-interpreted) kernels"
qkv, table, mask = torch.randn(8, 64, 288), torch.randn(225, 4), torch.zeros(4, 64, 64)
def f(qkv, table, mask):
    out, lse = torch.ops.htsat_kernels.window_attention_fwd(qkv, table, mask, 4, 24 ** -0.5, 0, 0, 0)
    grads = torch.ops.htsat_kernels.window_attention_bwd(out, qkv, table, mask, lse, 4, 24 ** -0.5, 0, 0, 0)
    return (out, lse) + tuple(grads)
gm = make_fx(f, tracing_mode="fake")(qkv, table, mask)
shapes = [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "call_function" and "getitem" in n.name]
assert shapes == [(8, 64, 96), (8, 4, 64), (8, 64, 288), (225, 4)], shapes
print("TRACED_OK")
"""


def test_triton_op_registration_traces_without_interpreter():
    """The GPU registration (triton_op + wrap_triton): its fake implementation is the launcher body
    run on fake tensors, which must trace without a GPU and give the right shapes."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=env, cwd=root, capture_output=True, text=True)
    assert "TRACED_OK" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# errors and capability
# ---------------------------------------------------------------------------------------------


def _good():
    qkv, table, mask = make_inputs(1, 2, 4, 2, 8, torch.float32, True)
    return qkv, table, mask, 2, 0.35


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (lambda a: (a[0].long(),) + a[1:], TypeError, "qkv: dtype"),
        (lambda a: (a[0][:, :15],) + a[1:], ValueError, "square"),
        (lambda a: (a[0][..., :-1],) + a[1:], ValueError, "3C"),
        (lambda a: (a[0][0],) + a[1:], ValueError, "qkv must be"),
        (lambda a: a[:3] + (3,) + a[4:], ValueError, "num_heads"),
        (lambda a: (a[0], a[1][:-1]) + a[2:], ValueError, "table must be"),
        (lambda a: (a[0], a[1].int()) + a[2:], TypeError, "table: dtype"),
        (lambda a: a[:2] + (a[2][:1].expand(3, 16, 16),) + a[3:], ValueError, "does not divide"),
        (lambda a: a[:2] + (a[2][:, :8],) + a[3:], ValueError, "mask must be"),
        (lambda a: a[:2] + (a[2] != 0,) + a[3:], TypeError, "mask: dtype"),
        (lambda a: a[:2] + (a[2].clone().requires_grad_(True),) + a[3:], ValueError, "mask requires grad"),
        (lambda a: a[:4] + (float("nan"),), ValueError, "scale"),
    ],
)
def test_bad_arguments_are_named(change, exc, words):
    args = change(_good())
    reason = wa.unsupported_reason(*args)
    assert reason is not None and words in reason
    with pytest.raises(exc, match=words):
        wa.fused_window_attention(*args)


def test_head_dim_too_large():
    qkv = torch.randn(1, 16, 3 * 2 * 80)
    table = torch.randn(49, 2)
    assert "head dim 80" in wa.unsupported_reason(qkv, table, None, 2, 0.1)
    with pytest.raises(ValueError, match="head dim"):
        wa.fused_window_attention(qkv, table, None, 2, 0.1)


def test_window_too_large():
    ws = 17
    qkv = torch.randn(1, ws * ws, 3 * 16)
    table = torch.randn((2 * ws - 1) ** 2, 2)
    assert "window size > 16" in wa.unsupported_reason(qkv, table, None, 2, 0.1)


def test_cpu_without_interpreter(monkeypatch):
    qkv, table, mask, heads, scale = _good()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = wa.unsupported_reason(qkv, table, mask, heads, scale)
    assert reason is not None and "set TRITON_INTERPRET=1 to run the Triton kernel on CPU" in reason
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        htsat_kernels.window_attention(qkv, table, mask, heads, scale, backend="fused")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        wa.fused_window_attention(qkv, table, mask, heads, scale)
    # "auto" quietly runs the reference
    out = htsat_kernels.window_attention(qkv, table, mask, heads, scale, backend="auto")
    torch.testing.assert_close(out, reference.window_attention(qkv, table, mask, heads, scale))


# ---------------------------------------------------------------------------------------------
# GPU: the real HTS-AT shapes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------


@requires_cuda
class TestCUDA:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("batch", [2, 8])
    @pytest.mark.parametrize("heads,nW,masked", HTSAT_STAGES + [(4, 64, False), (16, 4, False)])
    def test_stage_shapes(self, heads, nW, masked, batch, dtype):
        qkv, table, mask = make_inputs(batch, nW, 8, heads, 24, dtype, masked, device="cuda")
        scale = 24**-0.5
        go = grad_out_like(qkv, heads)
        assert htsat_kernels.backends.dispatch("window_attention", (qkv, table, mask, heads, scale), "auto") is (
            wa.fused_window_attention
        )
        got = run(wa.fused_window_attention, qkv, table, mask, heads, scale, go)
        want = truth(qkv, table, mask, heads, scale, go)
        if dtype == torch.float32:
            for name, a, b in zip(("out", "dqkv", "dtable"), got, want):
                assert rel_err(a, b) < 1e-5, name
        else:
            ref = run(reference.window_attention, qkv, table, mask, heads, scale, go)
            for name, a, r, t in zip(("out", "dqkv", "dtable"), got, ref, want):
                assert max_err(a, t) <= 2 * max_err(r, t) + 1e-2 * t.abs().max().item(), name

    @pytest.mark.parametrize("ws", [4, 7, 12])
    def test_other_window_sizes(self, ws):
        qkv, table, mask = make_inputs(2, 4, ws, 4, 24, torch.float32, True, device="cuda")
        go = grad_out_like(qkv, 4)
        got = run(wa.fused_window_attention, qkv, table, mask, 4, 24**-0.5, go)
        want = truth(qkv, table, mask, 4, 24**-0.5, go)
        for name, a, b in zip(("out", "dqkv", "dtable"), got, want):
            assert rel_err(a, b) < 1e-5, name

    def test_noncontiguous_and_deterministic(self):
        qkv, table, mask = make_inputs(4, 16, 8, 8, 24, torch.float32, True, device="cuda", noncontig=True)
        go = grad_out_like(qkv, 8)
        first = run(wa.fused_window_attention, qkv, table, mask, 8, 24**-0.5, go)
        second = run(wa.fused_window_attention, qkv, table, mask, 8, 24**-0.5, go)
        want = truth(qkv, table, mask, 8, 24**-0.5, go)
        for a, b, c in zip(first, second, want):
            assert torch.equal(a, b)
            assert rel_err(a, c) < 1e-5

    def test_gradcheck_fp64(self):
        qkv, table, mask = make_inputs(1, 2, 4, 2, 8, torch.float64, True, device="cuda")
        qkv.requires_grad_(True)
        table.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda q, t: wa.fused_window_attention(q, t, mask, 2, 0.3), (qkv, table))

    def test_opcheck(self):
        qkv, table, mask = make_inputs(2, 4, 8, 4, 24, torch.float32, True, device="cuda")
        qkv.requires_grad_(True)
        table.requires_grad_(True)
        torch.library.opcheck(torch.ops.htsat_kernels.window_attention_fwd.default, (qkv, table, mask, 4, 24**-0.5, 0, 0, 0))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_compile_fullgraph(self, dtype):
        qkv, table, mask = make_inputs(2, 16, 8, 8, 24, dtype, True, device="cuda")

        def fn(qkv, table, mask):
            return htsat_kernels.window_attention(qkv, table, mask, 8, 24**-0.5, backend="fused") + 1.0

        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        go = grad_out_like(qkv, 8)
        eager = run(lambda q, t, m, h, s: fn(q, t, m), qkv, table, mask, 8, 0.0, go)
        comp = run(lambda q, t, m, h, s: compiled(q, t, m), qkv, table, mask, 8, 0.0, go)
        for a, b in zip(comp, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropout_is_declined_with_a_reason():
    qkv, table, mask, heads, scale = _good()
    assert wa.unsupported_reason(qkv, table, mask, heads, scale) is None
    assert "no attention dropout (dropout_p=0.1)" in wa.unsupported_reason(qkv, table, mask, heads, scale, 0.1)
    with pytest.raises(RuntimeError, match="no attention dropout"):
        wa.fused_window_attention(qkv, table, mask, heads, scale, 0.1)
    with pytest.raises(BackendUnavailable, match="dropout_p=0.1"):
        htsat_kernels.window_attention(qkv, table, mask, heads, scale, 0.1, backend="fused")


def test_second_derivative_raises():
    qkv, table, mask = make_inputs(1, 2, 4, 2, 8, torch.float64, True)
    qkv.requires_grad_()
    out = wa.fused_window_attention(qkv, table, mask, 2, 0.35)
    (dqkv,) = torch.autograd.grad(out.pow(2).sum(), (qkv,), create_graph=True)
    with pytest.raises(RuntimeError, match="fused window_attention has no second derivative"):
        torch.autograd.grad(dqkv.sum(), (qkv,))


# ---------------------------------------------------------------------------------------------
# Dot precision and the fp64 choice (selection logic: the interpreter computes every dot exactly)
# ---------------------------------------------------------------------------------------------


def test_fp32_dots_follow_pytorchs_fp32_matmul_setting():
    from types import SimpleNamespace

    # new torch: fp32_precision ("none" defers to the generic torch.backends.fp32_precision)
    assert wa._dot_precision(torch.float32, SimpleNamespace(fp32_precision="tf32")) == "tf32"
    assert wa._dot_precision(torch.float32, SimpleNamespace(fp32_precision="ieee")) == "tf32x3"
    generic = getattr(torch.backends, "fp32_precision", "ieee")
    want = "tf32" if generic == "tf32" else "tf32x3"
    assert wa._dot_precision(torch.float32, SimpleNamespace(fp32_precision="none")) == want
    # older torch: allow_tf32 only
    assert wa._dot_precision(torch.float32, SimpleNamespace(allow_tf32=True)) == "tf32"
    assert wa._dot_precision(torch.float32, SimpleNamespace(allow_tf32=False)) == "tf32x3"
    # never "ieee" for fp32 (no tensor cores); fp16/bf16 precision is exact on tensor cores anyway
    assert wa.launch_config("backward", 64, 24, torch.float32, True)["PREC"] in ("tf32", "tf32x3")
    assert wa.launch_config("forward", 64, 24, torch.float16, True)["PREC"] == "ieee"


def test_fp32_dot_precision_reads_the_live_torch_setting():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without fp32_precision")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert wa.launch_config("forward", 64, 24, torch.float32, False)["PREC"] == "tf32"
        matmul.fp32_precision = "ieee"
        assert wa.launch_config("forward", 64, 24, torch.float32, False)["PREC"] == "tf32x3"
    finally:
        matmul.fp32_precision = before


def test_auto_keeps_the_reference_for_fp64_on_a_gpu():
    from types import SimpleNamespace

    from htsat_kernels import ops

    decline = ops.OPS["window_attention"].fused.auto_declines
    fake_gpu = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64)
    assert "float64" in decline(fake_gpu, None, None, 2, 1.0)
    for dtype in (torch.float32, torch.bfloat16):
        assert decline(SimpleNamespace(device=torch.device("cuda"), dtype=dtype), None, None, 2, 1.0) is None
    assert decline(torch.zeros(1, dtype=torch.float64), None, None, 2, 1.0) is None  # CPU: the interpreter


# ---------------------------------------------------------------------------------------------
# Backward grid sizing and the table-gradient reduction (host side)
# ---------------------------------------------------------------------------------------------


def test_blocks_per_sm_follow_registers_and_shared_memory():
    from types import SimpleNamespace

    h200 = SimpleNamespace(
        regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472
    )
    assert wa._blocks_per_sm(255, 0, 4, h200) == 2  # 8192 registers per warp: 8 warps
    assert wa._blocks_per_sm(128, 33792, 4, h200) == 4
    assert wa._blocks_per_sm(121, 33792, 4, h200) == 4  # 3968 -> 4096 registers per warp
    assert wa._blocks_per_sm(64, 100 * 1024, 4, h200) == 2  # shared memory limits
    assert wa._blocks_per_sm(32, 0, 4, h200) == 16  # threads limit
    # CPU / interpreter: the documented default, no compile
    assert wa._resident_blocks(None, None, {}, torch.device("cpu")) == wa.DEFAULT_BLOCKS_PER_SM


@pytest.mark.parametrize("B_,nW", [(1, 1), (7, 1), (8, 4), (128 * 64, 64), (128 * 4, 4), (3 * 16, 16)])
def test_backward_groups_hold_windows_of_one_position(B_, nW):
    groups = wa._num_groups(B_, nW, 4, torch.device("cpu"), wa.DEFAULT_BLOCKS_PER_SM)
    assert groups % nW == 0 and 1 <= groups // nW <= B_ // nW
    per_group = -(-(B_ // nW) // (groups // nW))
    assert (groups // nW - 1) * per_group < B_ // nW  # every group gets at least one window


def test_table_gradient_index_is_cached_and_matches_a_direct_sum():
    ws, heads = 3, 2
    n, block_n = ws * ws, 16
    slot = block_n * block_n + 4
    index = wa._table_gather_index(ws, heads, block_n, torch.device("cpu"))
    assert wa._table_gather_index(ws, heads, block_n, torch.device("cpu")) is index
    g = torch.Generator().manual_seed(0)
    parts = torch.full((3, heads, 2 * slot), float("nan"))  # unread elements stay NaN
    dbias = torch.randn(3, heads, n, n, generator=g, dtype=torch.float64).float()
    view = parts[:, :, : block_n * block_n].reshape(3, heads, block_n, block_n)
    view.zero_()
    view[:, :, :n, :n] = dbias
    parts[:, :, block_n * block_n] = 0.0
    got = wa._bias_grad_to_table(parts, ws, block_n)
    want = torch.zeros((2 * ws - 1) ** 2, heads, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            r = (i // ws - j // ws + ws - 1) * (2 * ws - 1) + (i % ws - j % ws + ws - 1)
            want[r] += dbias[:, :, i, j].double().sum(0)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_table_gradient_index_is_capture_safe(monkeypatch):
    """While a CUDA graph is captured the index is built on the device and not cached (a host copy
    cannot be captured, and a cached tensor made in the capture would never be filled outside it);
    outside a capture it is built on the host and copied synchronously, complete for every stream."""
    wa._GATHER_INDEX.clear()
    monkeypatch.setattr(wa, "_capturing", lambda device: True)
    captured = wa._table_gather_index(4, 2, 16, torch.device("cpu"))
    assert not wa._GATHER_INDEX
    monkeypatch.setattr(wa, "_capturing", lambda device: False)
    cached = wa._table_gather_index(4, 2, 16, torch.device("cpu"))
    assert wa._GATHER_INDEX and torch.equal(captured, cached)


def test_strides_past_int32_are_copied():
    """The kernels form element offsets within a window in int32: a tensor whose strides reach
    past 2**31 there is copied (contiguous) before launch; the window dim's offsets are int64."""
    big = torch.empty_strided((4, 64, 288), (1, 2**26, 2**20), device="meta")
    assert wa._int32_addressable(big).is_contiguous()
    windows_far_apart = torch.empty_strided((4, 64, 288), (2**40, 288, 1), device="meta")
    assert wa._int32_addressable(windows_far_apart) is windows_far_apart
    table = torch.empty_strided((225, 4), (2**24, 1), device="meta")
    assert wa._int32_addressable(table, 0).is_contiguous()


def test_copied_operands_give_the_same_values(monkeypatch):
    """The copy path end to end: with the int32 bound lowered, strided inputs are copied in the
    forward and the backward and the results are unchanged."""
    monkeypatch.setattr(wa, "_INT32_MAX", 100)
    qkv, table, mask = make_inputs(2, 2, 4, 2, 8, torch.float32, True, noncontig=True)
    go = grad_out_like(qkv, 2)
    got = run(wa.fused_window_attention, qkv, table, mask, 2, 8**-0.5, go)
    want = truth(qkv, table, mask, 2, 8**-0.5, go)
    for name, a, b in zip(("out", "dqkv", "dtable"), got, want):
        assert rel_err(a, b) < 1e-5, name


def test_shapes_over_an_arch_limits_are_declined_before_launch(monkeypatch):
    """On a GPU the capability check knows the arch: a window the kernels cannot run within its
    limits is declined with a reason ("auto" then runs the reference) instead of failing at launch."""
    monkeypatch.setattr(wa, "_device_arch", lambda device: 80)
    qkv = torch.randn(1, 144, 72)
    table = torch.randn(23 * 23, 1)
    reason = wa.unsupported_reason(qkv, table, None, 1, 0.2)
    assert reason and "shared memory" in reason
    with pytest.raises(RuntimeError, match="shared memory"):
        wa.fused_window_attention(qkv, table, None, 1, 0.2)
    assert wa.unsupported_reason(qkv[:, :64].bfloat16(), torch.randn(225, 1), None, 1, 0.2) is None
    assert "spill" in wa.resource_reason(144, 24, torch.bfloat16, 90)
    assert "99 KB" in wa.resource_reason(81, 64, torch.bfloat16, 86) and wa.resource_reason(81, 64, torch.bfloat16, 80) is None
