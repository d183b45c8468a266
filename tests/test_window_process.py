"""Compiled window_partition / window_merge (C++ CPU twins; CUDA kernels in the requires_cuda class).

Data movement is bit-exact: every comparison against the reference is torch.equal, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

import htsat_kernels
from htsat_kernels import reference

try:
    from htsat_kernels.fused import window_process as wp
except ImportError as exc:  # the compiled extension is optional: say why and skip
    pytest.skip(str(exc), allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (H, W, window_size, shift): HTS-AT's stage 1 (64x64, ws 8, shift 4), non-square, other window sizes.
GEOMETRIES = [
    (64, 64, 8, 4),
    (64, 64, 8, 0),
    (16, 24, 8, 4),
    (24, 16, 8, 0),
    (8, 12, 4, 2),
    (14, 21, 7, 3),
    (16, 8, 8, -3),  # negative shift: same cyclic roll semantics as torch.roll
]


def _rand(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float32, device=device).to(dtype)


class WindowProcessCases:
    device = "cpu"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("H,W,ws,shift", GEOMETRIES)
    @pytest.mark.parametrize("B,C", [(1, 5), (3, 96)])
    def test_partition_and_merge_match_reference(self, B, C, H, W, ws, shift, dtype):
        x = _rand((B, H, W, C), dtype, self.device).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        out = wp.fused_window_partition(x, ws, shift)
        ref = reference.window_partition(x_ref, ws, shift)
        assert out.shape == ref.shape == (B * (H // ws) * (W // ws), ws * ws, C)
        assert torch.equal(out, ref)
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        assert torch.equal(x.grad, x_ref.grad)

        win = out.detach().clone().requires_grad_()
        win_ref = win.detach().clone().requires_grad_()
        merged = wp.fused_window_merge(win, H, W, shift)
        merged_ref = reference.window_merge(win_ref, H, W, shift)
        assert torch.equal(merged, merged_ref)
        assert torch.equal(merged, x.detach())  # round trip
        gm = torch.randn_like(merged)
        merged.backward(gm)
        merged_ref.backward(gm)
        assert torch.equal(win.grad, win_ref.grad)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("C", [1, 3, 8, 96])
    def test_misaligned_and_noncontiguous_inputs(self, C, dtype):
        B, H, W, ws, shift = 2, 16, 24, 8, 4
        # a view starting one element into its storage: no 16-byte alignment (scalar / narrow vectors)
        flat = _rand((B * H * W * C + 1,), dtype, self.device)
        x = flat[1:].view(B, H, W, C)
        assert torch.equal(wp.fused_window_partition(x, ws, shift), reference.window_partition(x, ws, shift))
        win = reference.window_partition(x, ws, shift)
        flat_w = _rand((win.numel() + 1,), dtype, self.device)
        flat_w[1:].copy_(win.reshape(-1))
        w_view = flat_w[1:].view(win.shape)
        assert torch.equal(wp.fused_window_merge(w_view, H, W, shift), x)
        # non-contiguous input: the wrapper makes it contiguous
        xt = _rand((B, W, H, C), dtype, self.device).transpose(1, 2)
        assert torch.equal(wp.fused_window_partition(xt, ws, shift), reference.window_partition(xt, ws, shift))

    def test_empty_batch(self):
        x = torch.empty(0, 16, 16, 4, device=self.device)
        assert wp.fused_window_partition(x, 8, 4).shape == (0, 64, 4)
        assert wp.fused_window_merge(torch.empty(0, 64, 4, device=self.device), 16, 16, 4).shape == (0, 16, 16, 4)

    def test_gradcheck_float64(self):
        x = torch.randn(2, 4, 6, 3, dtype=torch.float64, device=self.device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: wp.fused_window_partition(t, 2, 1), (x,))
        w = torch.randn(12, 4, 3, dtype=torch.float64, device=self.device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: wp.fused_window_merge(t, 4, 6, 1), (w,))

    def test_opcheck(self):
        x = torch.randn(2, 8, 12, 5, device=self.device, requires_grad=True)
        torch.library.opcheck(torch.ops.htsat_kernels.window_partition.default, (x, 4, 2))
        w = torch.randn(12, 16, 5, device=self.device, requires_grad=True)
        torch.library.opcheck(torch.ops.htsat_kernels.window_merge.default, (w, 8, 12, 2))

    def test_forced_fused_backend(self):
        x = torch.randn(3, 16, 24, 5, device=self.device)
        out = htsat_kernels.window_partition(x, 8, 4, backend="fused")
        assert torch.equal(out, reference.window_partition(x, 8, 4))
        back = htsat_kernels.window_merge(out, 16, 24, 4, backend="fused")
        assert torch.equal(back, x)
        assert wp.partition_unsupported_reason(x, 8, 4) is None
        assert wp.merge_unsupported_reason(out, 16, 24, 4) is None

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("H,W,ws,shift", [(8, 8, 8, 0), (16, 8, 8, 0), (8, 8, 8, 8), (8, 8, 8, -16)])
    def test_single_window_column_is_a_reshape(self, H, W, ws, shift, dtype):
        # HTS-AT's last stage (the whole 8x8 map is one window, no shift): partition and merge are
        # reshapes, returned as views of the input like the reference's, with no copy kernel.
        x = _rand((2, H, W, 6), dtype, self.device).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        out = wp.fused_window_partition(x, ws, shift)
        ref = reference.window_partition(x_ref, ws, shift)
        assert torch.equal(out, ref)
        assert out.data_ptr() == x.data_ptr()
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        assert torch.equal(x.grad, x_ref.grad)
        win = out.detach().clone().requires_grad_()
        merged = wp.fused_window_merge(win, H, W, shift)
        assert torch.equal(merged, reference.window_merge(win.detach(), H, W, shift))
        assert merged.data_ptr() == win.data_ptr()
        merged.backward(x.detach())
        assert torch.equal(win.grad, reference.window_partition(x.detach(), ws, shift))
        # still a real roll where the shift is not a multiple of the map
        rolled = wp.fused_window_partition(x.detach(), ws, 3)
        assert torch.equal(rolled, reference.window_partition(x.detach(), ws, 3))


class TestWindowProcessCPU(WindowProcessCases):
    device = "cpu"

    def test_compile_fullgraph_matches_eager(self):
        def block(x):
            win = wp.fused_window_partition(x, 4, 2)
            return wp.fused_window_merge(win * 2.0 + 1.0, 8, 12, 2)

        x = torch.randn(2, 8, 12, 5, requires_grad=True)
        x_c = x.detach().clone().requires_grad_()
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True)(x_c)
        assert torch.equal(eager, compiled)
        eager.sum().backward()
        compiled.sum().backward()
        assert torch.equal(x.grad, x_c.grad)

    def test_error_messages_name_the_argument(self):
        ops = torch.ops.htsat_kernels
        with pytest.raises(RuntimeError, match="x must have 4 dimensions"):
            ops.window_partition(torch.randn(16, 16, 4), 8, 0)
        with pytest.raises(RuntimeError, match="x must be float32, float16, bfloat16 or float64"):
            ops.window_partition(torch.zeros(1, 16, 16, 4, dtype=torch.int64), 8, 0)
        with pytest.raises(RuntimeError, match="x: H and W .* multiples of window_size=8"):
            ops.window_partition(torch.randn(1, 12, 16, 4), 8, 0)
        with pytest.raises(RuntimeError, match="x must be contiguous"):
            ops.window_partition(torch.randn(1, 16, 16, 4).transpose(1, 2), 8, 0)
        with pytest.raises(RuntimeError, match="windows: dim 0"):
            ops.window_merge(torch.randn(5, 64, 4), 16, 16, 0)
        with pytest.raises(RuntimeError, match="windows: tokens per window"):
            ops.window_merge(torch.randn(4, 60, 4), 16, 16, 0)
        # the dispatcher's capability check says the same; the public op checks its arguments before
        # dispatch, so forcing "fused" raises the same precise error as every other backend
        assert "x must have 4 dimensions" in wp.partition_unsupported_reason(torch.randn(16, 16, 4), 8, 0)
        assert "x has dtype torch.int64" in wp.partition_unsupported_reason(torch.zeros(1, 16, 16, 4, dtype=torch.int64), 8, 0)
        with pytest.raises(ValueError, match="window_size=8"):
            htsat_kernels.window_partition(torch.randn(1, 12, 16, 4), 8, 0, backend="fused")
        with pytest.raises(ValueError, match="windows: dim 0"):
            htsat_kernels.window_merge(torch.randn(5, 64, 4), 16, 16, 0, backend="fused")

    def test_auto_uses_fused_on_cpu(self):
        from htsat_kernels.backends import dispatch

        assert htsat_kernels.fused_status()["window_partition"] == "available"
        assert htsat_kernels.fused_status()["window_merge"] == "available"
        x = torch.randn(1, 16, 16, 4)
        assert dispatch("window_partition", (x, 8, 4), "auto") is wp.fused_window_partition
        assert dispatch("window_merge", (torch.randn(4, 64, 4), 16, 16, 4), "auto") is wp.fused_window_merge
        # a case the kernel declines goes to the reference under "auto"
        assert dispatch("window_partition", (x.long(), 8, 4), "auto") is reference.window_partition

    def test_unsupported_device_reason(self):
        meta = torch.empty(1, 16, 16, 4, device="meta")
        assert "meta" in wp.partition_unsupported_reason(meta, 8, 0)


@requires_cuda
class TestWindowProcessCUDA(WindowProcessCases):
    device = "cuda"

    def test_compile_fullgraph_matches_eager(self):
        def block(x):
            win = wp.fused_window_partition(x, 8, 4)
            return wp.fused_window_merge(win * 2.0 + 1.0, 16, 24, 4)

        x = torch.randn(2, 16, 24, 96, device="cuda")
        assert torch.equal(block(x), torch.compile(block, fullgraph=True)(x))

    def test_matches_cpu_twin(self):
        x = torch.randn(3, 64, 64, 96)
        assert torch.equal(wp.fused_window_partition(x.cuda(), 8, 4).cpu(), wp.fused_window_partition(x, 8, 4))


# ---------------------------------------------------------------------------------------------------
# Further fusions: norm1 LayerNorm + shift + partition, window merge + unshift + residual add
# ---------------------------------------------------------------------------------------------------


def _grads(fn, inputs, g):
    leaves = [t.detach().clone().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.backward(g)
    return [out.detach()] + [t.grad for t in leaves if torch.is_tensor(t) and t.requires_grad]


class FusedBlockCases:
    device = "cpu"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("H,W,ws,shift", [(64, 64, 8, 4), (16, 24, 8, 0), (14, 21, 7, 3)])
    @pytest.mark.parametrize("B,C", [(1, 5), (3, 96)])
    def test_merge_add_is_bit_exact(self, B, C, H, W, ws, shift, dtype):
        windows = _rand((B * (H // ws) * (W // ws), ws * ws, C), dtype, self.device)
        shortcut = _rand((B, H * W, C), dtype, self.device)
        g = _rand((B, H * W, C), dtype, self.device)
        args = (windows, shortcut, H, W, shift)
        assert wp.merge_add_unsupported_reason(*args) is None
        fused = _grads(wp.fused_window_merge_add, args, g)
        ref = _grads(reference.window_merge_add, args, g)
        for f, r in zip(fused, ref):
            assert torch.equal(f, r)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
    @pytest.mark.parametrize("B,H,W,C,ws,shift", [(1, 16, 24, 5, 8, 4), (3, 8, 8, 96, 4, 2), (2, 14, 21, 3, 7, 3)])
    def test_layer_norm_partition_matches_reference(self, B, H, W, C, ws, shift, dtype):
        x = _rand((B, H, W, C), dtype, self.device) * 2 + 0.5
        w = (1 + 0.5 * torch.randn(C, device=self.device)).to(dtype)
        b = (0.1 * torch.randn(C, device=self.device)).to(dtype)
        g = _rand((B * (H // ws) * (W // ws), ws * ws, C), dtype, self.device)
        args = (x, w, b, 1e-5, ws, shift)
        assert wp.layer_norm_partition_unsupported_reason(*args) is None
        fused = _grads(wp.fused_layer_norm_window_partition, args, g)
        ref = _grads(reference.layer_norm_window_partition, args, g)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        for f, r in zip(fused, ref):
            torch.testing.assert_close(f, r, **tol)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
    def test_layer_norm_partition_low_precision(self, dtype):
        B, H, W, C, ws, shift = 2, 16, 16, 96, 8, 4
        x = _rand((B, H, W, C), dtype, self.device) * 3 + 0.5
        w = (1 + 0.5 * torch.randn(C, device=self.device)).to(dtype)
        b = (0.1 * torch.randn(C, device=self.device)).to(dtype)
        g = _rand((B * 4, 64, C), dtype, self.device)
        truth = _grads(reference.layer_norm_window_partition, (x.double(), w.double(), b.double(), 1e-5, ws, shift), g.double())
        fused = _grads(wp.fused_layer_norm_window_partition, (x, w, b, 1e-5, ws, shift), g)
        ref = _grads(reference.layer_norm_window_partition, (x, w, b, 1e-5, ws, shift), g)
        for f, r, t in zip(fused, ref, truth):
            err_f, err_r = (f.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
            assert err_f <= 2 * err_r + 1e-3 * max(1.0, t.abs().max().item()), (err_f, err_r)

    @pytest.mark.parametrize("C", [8, 256, 512, 9000], ids=lambda c: f"C={c}")
    def test_layer_norm_partition_backward_variants(self, C):
        # float32 on CUDA: 16-byte vectors, 1 / 2 / 4 per lane; C = 9000 is too wide for the shared
        # accumulators of one launch (column windows)
        B, H, W, ws, shift = 1, 4, 4, 2, 1
        x = _rand((B, H, W, C), torch.float32, self.device) * 2 + 0.5
        w = 1 + 0.5 * torch.randn(C, device=self.device)
        b = 0.1 * torch.randn(C, device=self.device)
        g = _rand((B * 4, 4, C), torch.float32, self.device)
        args = (x, w, b, 1e-5, ws, shift)
        fused = _grads(wp.fused_layer_norm_window_partition, args, g)
        ref = _grads(reference.layer_norm_window_partition, args, g)
        for f, r in zip(fused, ref):
            torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_layer_norm_partition_weight_grad_is_deterministic(self, dtype):
        # 41472 rows: 1012 chunks of 41 rows (the last of 21, not a multiple of the 4 sub-chunks), summed
        # over 64 lanes; bit-identical across runs and, on CPU, across thread counts
        B, H, W, C, ws, shift = 9, 64, 72, 3, 8, 4
        x = _rand((B, H, W, C), dtype, self.device) * 2 + 0.5
        w = (1 + 0.5 * torch.randn(C, device=self.device)).to(dtype)
        b = (0.1 * torch.randn(C, device=self.device)).to(dtype)
        g = _rand((B * (H // ws) * (W // ws), ws * ws, C), dtype, self.device)
        args = (x, w, b, 1e-5, ws, shift)
        first = _grads(wp.fused_layer_norm_window_partition, args, g)
        runs = [_grads(wp.fused_layer_norm_window_partition, args, g)]
        if self.device == "cpu":
            threads = torch.get_num_threads()
            try:
                for t in (1, 2):
                    torch.set_num_threads(t)
                    runs.append(_grads(wp.fused_layer_norm_window_partition, args, g))
            finally:
                torch.set_num_threads(threads)
        for again in runs:
            for f, a in zip(first, again):
                assert torch.equal(f, a)
        truth = _grads(reference.layer_norm_window_partition, (x.double(), w.double(), b.double(), 1e-5, ws, shift), g.double())
        ref = _grads(reference.layer_norm_window_partition, args, g)
        for f, r, t in zip(first, ref, truth):  # the 41472-row sums: within 2x the reference's own error
            err_f, err_r = (f.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
            assert err_f <= 2 * err_r + 1e-4 * max(1.0, t.abs().max().item()), (err_f, err_r)

    def test_gradcheck_and_opcheck(self):
        dev = self.device
        x = torch.randn(2, 4, 6, 3, dtype=torch.float64, device=dev, requires_grad=True)
        w = torch.randn(3, dtype=torch.float64, device=dev, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, device=dev, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *t: wp.fused_layer_norm_window_partition(*t, 1e-5, 2, 1), (x, w, b))
        win = torch.randn(12, 4, 3, dtype=torch.float64, device=dev, requires_grad=True)
        sc = torch.randn(2, 24, 3, dtype=torch.float64, device=dev, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, s: wp.fused_window_merge_add(a, s, 4, 6, 1), (win, sc))
        ops = torch.ops.htsat_kernels
        xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))
        torch.library.opcheck(ops.layer_norm_window_partition.default, (xf, wf, bf, 1e-5, 2, 1))
        out, mean, rstd = ops.layer_norm_window_partition(xf.detach(), wf.detach(), bf.detach(), 1e-5, 2, 1)
        torch.library.opcheck(
            ops.layer_norm_window_partition_backward.default,
            (torch.randn_like(out), xf.detach(), wf.detach(), mean, rstd, 2, 1),
        )
        torch.library.opcheck(
            ops.window_merge_add.default,
            (win.detach().float().requires_grad_(), sc.detach().float().view(2, 4, 6, 3).requires_grad_(), 1),
        )

    def test_compile_fullgraph_block(self):
        def block(x, w, b, shortcut):
            win = wp.fused_layer_norm_window_partition(x, w, b, 1e-5, 4, 2)
            return wp.fused_window_merge_add(win * 0.5, shortcut, 8, 12, 2)

        args = [
            torch.randn(2, 8, 12, 5, device=self.device),
            torch.randn(5, device=self.device),
            torch.randn(5, device=self.device),
            torch.randn(2, 96, 5, device=self.device),
        ]
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(*args), block(*args))

    def test_single_window_merge_add_and_compile(self):
        # one window over the whole map: the merge is a reshape, merge_add just the residual add
        windows = _rand((2, 64, 5), torch.float32, self.device).requires_grad_()
        shortcut = _rand((2, 64, 5), torch.float32, self.device).requires_grad_()
        g = _rand((2, 64, 5), torch.float32, self.device)
        args = (windows, shortcut, 8, 8, 0)
        fused = _grads(wp.fused_window_merge_add, args, g)
        ref = _grads(reference.window_merge_add, args, g)
        for f, r in zip(fused, ref):
            assert torch.equal(f, r)

        def block(x, w, b, shortcut):
            win = wp.fused_layer_norm_window_partition(x, w, b, 1e-5, 8, 0)
            win = wp.fused_window_partition(wp.fused_window_merge(win, 8, 8, 0), 8, 0)
            return wp.fused_window_merge_add(win * 0.5, shortcut, 8, 8, 0)

        cargs = [
            torch.randn(2, 8, 8, 5, device=self.device),
            torch.randn(5, device=self.device),
            torch.randn(5, device=self.device),
            torch.randn(2, 64, 5, device=self.device),
        ]
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(*cargs), block(*cargs))

    def test_error_messages(self):
        ops = torch.ops.htsat_kernels
        x = torch.randn(1, 16, 16, 8, device=self.device)
        with pytest.raises(RuntimeError, match=r"weight must have shape \[8\], got \[4\]"):
            ops.layer_norm_window_partition(x, torch.ones(4, device=self.device), torch.zeros(8, device=self.device), 1e-5, 8, 4)
        with pytest.raises(RuntimeError, match=r"shortcut must have shape \[1, 16, 16, 8\]"):
            ops.window_merge_add(torch.randn(4, 64, 8, device=self.device), torch.randn(1, 16, 16, 4, device=self.device), 4)
        assert "weight must have shape (8,)" in wp.layer_norm_partition_unsupported_reason(
            x, torch.ones(4, device=self.device), torch.zeros(8, device=self.device), 1e-5, 8, 4
        )
        assert "shortcut must have shape" in wp.merge_add_unsupported_reason(
            torch.randn(4, 64, 8, device=self.device), torch.randn(1, 256, 4, device=self.device), 16, 16, 4
        )


class TestFusedBlockCPU(FusedBlockCases):
    device = "cpu"


@requires_cuda
class TestFusedBlockCUDA(FusedBlockCases):
    device = "cuda"
