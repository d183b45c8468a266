"""Compiled patch_merge (2x2 gather + LayerNorm(4C)): C++ CPU twin, and CUDA in the requires_cuda class.

Values and every gradient (x, weight, bias) against the reference: tight in float64 / float32; in bf16 and
fp16 the fused error against a float64 truth must stay within 2x the reference's own error in that dtype
(plus a small atol).
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

import htsat_kernels
from htsat_kernels import reference

try:
    from htsat_kernels.fused import patch_merge as pm
except ImportError as exc:  # the compiled extension is optional: say why and skip
    pytest.skip(str(exc), allow_module_level=True)

# (B, H, W, C): tiny, odd channel count, non-square, HTS-AT-like channels, enough rows for several
# gradient chunks (3 * 16 * 16 = 768 rows).
SHAPES = [(1, 2, 2, 1), (1, 4, 6, 5), (3, 8, 8, 96), (2, 16, 12, 3), (3, 32, 32, 8)]


def _inputs(shape, dtype, device, scale=1.0):
    B, H, W, C = shape
    x = (torch.randn(shape, device=device) * scale + 0.5).to(dtype)
    w = (1.0 + 0.5 * torch.randn(4 * C, device=device)).to(dtype)
    b = (0.1 * torch.randn(4 * C, device=device)).to(dtype)
    return x, w, b


def _run(fn, x, w, b, g):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = fn(x, w, b, 1e-5)
    out.backward(g)
    return out.detach(), x.grad, w.grad, b.grad


def _rows_per_chunk(rows):  # gathered_layer_norm_rows_per_chunk (csrc/gathered_layer_norm.h)
    n_chunks = min(max(-(-rows // 32), 1), 1024)
    return max(-(-rows // n_chunks), 1)


def _reduce_lanes(n_chunks):  # gathered_layer_norm_reduce_lanes
    lanes = 1
    while lanes < 64 and 8 * lanes <= n_chunks:
        lanes *= 2
    return lanes


def _ordered_param_grads(dy, xhat):
    """grad_weight, grad_bias of (rows, n) dy and xhat summed in the kernels' documented order: chunks of
    _rows_per_chunk rows, row r_begin + s + 4i into sub-chunk s, sub-chunks added (s0 + s1) + (s2 + s3), the
    chunks' partial rows summed by _reduce_lanes lanes (lane l: rows l, l + L, ...) and the lanes pairwise."""
    rows, n = dy.shape
    per = _rows_per_chunk(rows)
    n_chunks = -(-rows // per)
    parts = []
    for c in range(n_chunks):
        sub = [[torch.zeros(n, dtype=dy.dtype), torch.zeros(n, dtype=dy.dtype)] for _ in range(4)]
        for r in range(c * per, min(rows, (c + 1) * per)):
            s = sub[(r - c * per) % 4]
            s[0] = s[0] + dy[r] * xhat[r]
            s[1] = s[1] + dy[r]
        parts.append([(sub[0][i] + sub[1][i]) + (sub[2][i] + sub[3][i]) for i in range(2)])
    lanes = _reduce_lanes(n_chunks)
    acc = [[torch.zeros(n, dtype=dy.dtype), torch.zeros(n, dtype=dy.dtype)] for _ in range(lanes)]
    for c, p in enumerate(parts):
        acc[c % lanes] = [acc[c % lanes][i] + p[i] for i in range(2)]
    s = lanes // 2
    while s:
        for y in range(s):
            acc[y] = [acc[y][i] + acc[y + s][i] for i in range(2)]
        s //= 2
    return acc[0][0], acc[0][1]


class PatchMergeCases:
    device = "cpu"

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_matches_reference(self, shape, dtype):
        x, w, b = _inputs(shape, dtype, self.device)
        B, H, W, C = shape
        g = torch.randn(B, H * W // 4, 4 * C, device=self.device).to(dtype)
        fused = _run(pm.fused_patch_merge, x, w, b, g)
        ref = _run(reference.patch_merge, x, w, b, g)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        for name, f, r in zip(("out", "grad_x", "grad_weight", "grad_bias"), fused, ref):
            assert f.shape == r.shape and f.dtype == r.dtype, name
            torch.testing.assert_close(f, r, **tol, msg=lambda m, name=name: f"{name}: {m}")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
    @pytest.mark.parametrize("shape", [(3, 8, 8, 96), (2, 16, 12, 3)], ids=str)
    def test_low_precision_error_within_2x_reference(self, shape, dtype):
        x, w, b = _inputs(shape, dtype, self.device, scale=3.0)
        B, H, W, C = shape
        g = torch.randn(B, H * W // 4, 4 * C, device=self.device).to(dtype)
        truth = _run(reference.patch_merge, *(t.double() for t in (x, w, b, g)))
        fused = _run(pm.fused_patch_merge, x, w, b, g)
        ref = _run(reference.patch_merge, x, w, b, g)
        for name, f, r, t in zip(("out", "grad_x", "grad_weight", "grad_bias"), fused, ref, truth):
            assert f.dtype == dtype, name
            err_f = (f.double() - t).abs().max().item()
            err_r = (r.double() - t).abs().max().item()
            atol = 1e-3 * max(1.0, t.abs().max().item())
            assert err_f <= 2 * err_r + atol, f"{name}: fused error {err_f} vs reference {err_r}"

    @pytest.mark.parametrize("C", [96, 192, 384, 2100], ids=lambda c: f"C={c}")
    def test_backward_variants_match_reference(self, C):
        # float32 on CUDA: 16-byte vectors, 1 / 2 / 3 per lane and segment; n = 8400 is too wide for the
        # shared accumulators of one launch (done in column windows); a few rows so every warp gets one
        x, w, b = _inputs((2, 4, 2, C), torch.float32, self.device)
        g = torch.randn(2, 2, 4 * C, device=self.device)
        fused = _run(pm.fused_patch_merge, x, w, b, g)
        ref = _run(reference.patch_merge, x, w, b, g)
        for name, f, r in zip(("out", "grad_x", "grad_weight", "grad_bias"), fused, ref):
            torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")

    def test_saved_statistics(self):
        x, w, b = _inputs((2, 8, 12, 5), torch.float32, self.device)
        out, mean, rstd = torch.ops.htsat_kernels.patch_merge_forward(x, w, b, 1e-5)
        assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (2, 24)
        gathered = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(2, 24, 20)
        torch.testing.assert_close(mean, gathered.mean(-1))
        torch.testing.assert_close(rstd, (gathered.var(-1, unbiased=False) + 1e-5).rsqrt())
        stats64 = torch.ops.htsat_kernels.patch_merge_forward(x.double(), w.double(), b.double(), 1e-5)
        assert stats64[1].dtype == torch.float64

    def test_weight_grad_is_deterministic(self):
        x, w, b = _inputs((4, 32, 32, 24), torch.float32, self.device)
        g = torch.randn(4, 256, 96, device=self.device)
        first = _run(pm.fused_patch_merge, x, w, b, g)
        for _ in range(2):
            again = _run(pm.fused_patch_merge, x, w, b, g)
            for f, a in zip(first, again):
                assert torch.equal(f, a)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_independent_of_thread_count(self, dtype):
        # the CPU kernels split rows over threads; every result (incl. the weight/bias reduction) must not
        # depend on how many
        if self.device != "cpu":
            pytest.skip("thread count is a CPU setting")
        x, w, b = _inputs((2, 32, 32, 48), dtype, self.device)
        g = torch.randn(2, 256, 192, device=self.device).to(dtype)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = _run(pm.fused_patch_merge, x, w, b, g)
            torch.set_num_threads(2)
            two = _run(pm.fused_patch_merge, x, w, b, g)
        finally:
            torch.set_num_threads(threads)
        for a, c in zip(one, two):
            assert torch.equal(a, c)

    def test_gradcheck_float64(self):
        x, w, b = (t.requires_grad_() for t in _inputs((2, 4, 6, 3), torch.float64, self.device))
        assert torch.autograd.gradcheck(pm.fused_patch_merge, (x, w, b, 1e-5))

    def test_opcheck(self):
        x, w, b = _inputs((2, 4, 6, 3), torch.float32, self.device)
        args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5)
        torch.library.opcheck(torch.ops.htsat_kernels.patch_merge_forward.default, args)
        out, mean, rstd = torch.ops.htsat_kernels.patch_merge_forward(*(t.detach() if torch.is_tensor(t) else t for t in args))
        bwd_args = (torch.randn_like(out), x.detach(), w.detach(), mean, rstd)
        torch.library.opcheck(torch.ops.htsat_kernels.patch_merge_backward.default, bwd_args)

    def test_forced_fused_backend(self):
        x, w, b = _inputs((3, 8, 12, 5), torch.float32, self.device)
        assert pm.unsupported_reason(x, w, b, 1e-5) is None
        out = htsat_kernels.patch_merge(x, w, b, 1e-5, backend="fused")
        torch.testing.assert_close(out, reference.patch_merge(x, w, b, 1e-5), rtol=1e-5, atol=1e-5)

    def test_empty_batch(self):
        x, w, b = (t.requires_grad_() for t in _inputs((0, 4, 4, 3), torch.float32, self.device))
        out = pm.fused_patch_merge(x, w, b)
        assert out.shape == (0, 4, 12)
        out.sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w))


class TestPatchMergeCPU(PatchMergeCases):
    device = "cpu"

    @pytest.mark.parametrize("shape", [(3, 46, 46, 2), (1, 4, 6, 5), (1, 260, 512, 1)], ids=str)
    def test_weight_grad_follows_the_documented_order(self, shape):
        # the CPU twin sums in the CUDA kernels' order (no FMA on either CPU path), so a float32 emulation of
        # that order matches it bit for bit: 50 chunks of 32 rows (the last of 19) on 8 lanes; one chunk of
        # 6 rows; 1009 chunks of 33 rows (33280 rows, the last of 16) on 64 lanes
        B, H, W, C = shape
        x, w, b = _inputs(shape, torch.float32, "cpu")
        g = torch.randn(B, H * W // 4, 4 * C)
        ops = torch.ops.htsat_kernels
        _, mean, rstd = ops.patch_merge_forward(x, w, b, 1e-5)
        _, grad_w, grad_b = ops.patch_merge_backward(g, x, w, mean, rstd)
        gathered = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        rows = B * H * W // 4
        xhat = (gathered.reshape(rows, 4 * C) - mean.reshape(rows, 1)) * rstd.reshape(rows, 1)
        want_w, want_b = _ordered_param_grads(g.reshape(rows, 4 * C), xhat)
        assert torch.equal(grad_w, want_w) and torch.equal(grad_b, want_b)

    def test_compile_fullgraph_matches_eager(self):
        def stage(x, w, b):
            return pm.fused_patch_merge(x * 2.0, w, b).sum(-1)

        x, w, b = (t.requires_grad_() for t in _inputs((2, 8, 12, 5), torch.float32, "cpu"))
        eager = stage(x, w, b)
        grads = torch.autograd.grad(eager.sum(), (x, w, b))
        compiled = torch.compile(stage, fullgraph=True)(x, w, b)
        grads_c = torch.autograd.grad(compiled.sum(), (x, w, b))
        torch.testing.assert_close(compiled, eager)
        for a, e in zip(grads_c, grads):
            torch.testing.assert_close(a, e)

    def test_error_messages_name_the_argument(self):
        op = torch.ops.htsat_kernels.patch_merge_forward
        x, w, b = _inputs((2, 8, 12, 5), torch.float32, "cpu")
        with pytest.raises(RuntimeError, match="x: patch_merge needs even H and W .* got H=7, W=12"):
            op(torch.randn(2, 7, 12, 5), w, b, 1e-5)
        with pytest.raises(RuntimeError, match="x must have 4 dimensions"):
            op(torch.randn(8, 12, 5), w, b, 1e-5)
        with pytest.raises(RuntimeError, match="x must be float32, float16, bfloat16 or float64"):
            op(torch.zeros(2, 8, 12, 5, dtype=torch.int32), w, b, 1e-5)
        with pytest.raises(RuntimeError, match=r"weight must have shape \[20\], got \[5\]"):
            op(x, w[:5].contiguous(), b, 1e-5)
        with pytest.raises(RuntimeError, match=r"bias must have dtype Double"):
            op(x.double(), w.double(), b, 1e-5)
        # the capability check gives the same reasons; forcing "fused" raises them
        odd = torch.randn(2, 7, 12, 5)
        assert "even H and W" in pm.unsupported_reason(odd, w, b)
        assert "x must have 4 dimensions" in pm.unsupported_reason(torch.randn(8, 12, 5), w, b)
        assert "x has dtype torch.int32" in pm.unsupported_reason(torch.zeros(2, 8, 12, 5, dtype=torch.int32), w, b)
        assert "weight must have shape (20,)" in pm.unsupported_reason(x, w[:5], b)
        # the public op checks its arguments before dispatch: the same precise error on every backend
        for backend in ("fused", "auto", "reference"):
            with pytest.raises(ValueError, match="x: patch_merge needs even H and W .* got H=7, W=12"):
                htsat_kernels.patch_merge(odd, w, b, backend=backend)

    def test_autocast_is_accepted(self):
        # autocast's pairs run fused (tests/test_mixed_precision.py): the check does not depend on autocast
        x, w, b = _inputs((1, 4, 4, 3), torch.bfloat16, "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert pm.unsupported_reason(x, w, b) is None
            assert pm.unsupported_reason(x, w.float(), b.float()) is None


@requires_cuda
class TestPatchMergeCUDA(PatchMergeCases):
    device = "cuda"

    def test_compile_fullgraph_matches_eager(self):
        def stage(x, w, b):
            return pm.fused_patch_merge(x * 2.0, w, b).sum(-1)

        x, w, b = _inputs((2, 16, 24, 96), torch.float32, "cuda")
        torch.testing.assert_close(torch.compile(stage, fullgraph=True)(x, w, b), stage(x, w, b))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
    def test_matches_cpu_twin(self, dtype):
        x, w, b = _inputs((3, 16, 16, 96), dtype, "cpu")
        g = torch.randn(3, 64, 384).to(dtype)
        cpu = _run(pm.fused_patch_merge, x, w, b, g)
        gpu = _run(pm.fused_patch_merge, x.cuda(), w.cuda(), b.cuda(), g.cuda())
        tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        for c, d in zip(cpu, gpu):
            torch.testing.assert_close(d.cpu(), c, rtol=tol, atol=tol)
