"""Autocast's dtype mix in the fused C++ / CUDA ops: float16 / bfloat16 activations with float32 LayerNorm
parameters (patch_merge, layer_norm_window_partition) or a float32 shortcut (window_merge_add).

The rule (docs/design.md, numerics): the kernels compute in float32; the LayerNorm output has x's dtype (on
CPU the reference's too; under CUDA autocast the reference's is float32, which its only consumer, a Linear,
casts to x's dtype: the same values); window_merge_add returns the shortcut's dtype (torch's promotion);
each gradient has its input's dtype. Values: the 2x rule against a float64 truth; data movement bit-exact.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

import htsat_kernels
from htsat_kernels import reference

try:
    from htsat_kernels.fused import patch_merge as pm
    from htsat_kernels.fused import window_process as wp
except ImportError as exc:  # the compiled extension is optional: say why and skip
    pytest.skip(str(exc), allow_module_level=True)

LOW = [torch.bfloat16, torch.float16]


def _grads(fn, inputs, g):
    leaves = [t.detach().clone().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.backward(g.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves if torch.is_tensor(t) and t.requires_grad]


def _within_2x(fused, ref, truth, names):
    for name, f, r, t in zip(names, fused, ref, truth):
        err_f, err_r = (f.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        atol = 1e-3 * max(1.0, t.abs().max().item())
        assert err_f <= 2 * err_r + atol, f"{name}: fused error {err_f} vs reference {err_r}"


def _ln_inputs(shape, n, dtype, device, scale=3.0):
    x = (torch.randn(shape, device=device) * scale + 0.5).to(dtype)
    w = 1.0 + 0.5 * torch.randn(n, device=device)
    b = 0.1 * torch.randn(n, device=device)
    return x, w, b


class MixedCases:
    device = "cpu"

    @pytest.mark.parametrize("dtype", LOW, ids=str)
    @pytest.mark.parametrize("B,H,W,C,ws,shift", [(2, 16, 16, 96, 8, 4), (1, 8, 12, 5, 4, 2), (2, 8, 8, 24, 8, 0)])
    def test_layer_norm_partition_fp32_params(self, dtype, B, H, W, C, ws, shift):
        x, w, b = _ln_inputs((B, H, W, C), C, dtype, self.device)
        args = (x, w, b, 1e-5, ws, shift)
        assert wp.layer_norm_partition_unsupported_reason(*args) is None
        g = torch.randn(B * (H // ws) * (W // ws), ws * ws, C, device=self.device)
        fused = _grads(wp.fused_layer_norm_window_partition, args, g)
        assert [t.dtype for t in fused] == [dtype, dtype, torch.float32, torch.float32]
        truth = _grads(reference.layer_norm_window_partition, (x.double(), w.double(), b.double(), 1e-5, ws, shift), g.double())
        # the reference with the float32 parameters upcast x: its float32 LayerNorm, rounded as ours
        ref = _grads(lambda x, w, b, *a: reference.layer_norm_window_partition(x.float(), w, b, *a).to(x.dtype), args, g)
        _within_2x(fused, ref, truth, ("windows", "grad_x", "grad_weight", "grad_bias"))

    @pytest.mark.parametrize("dtype", LOW, ids=str)
    @pytest.mark.parametrize("shape", [(3, 8, 8, 96), (2, 16, 12, 3)], ids=str)
    def test_patch_merge_fp32_params(self, dtype, shape):
        B, H, W, C = shape
        x, w, b = _ln_inputs(shape, 4 * C, dtype, self.device)
        assert pm.unsupported_reason(x, w, b, 1e-5) is None
        g = torch.randn(B, H * W // 4, 4 * C, device=self.device)
        fused = _grads(pm.fused_patch_merge, (x, w, b, 1e-5), g)
        assert [t.dtype for t in fused] == [dtype, dtype, torch.float32, torch.float32]
        truth = _grads(reference.patch_merge, (x.double(), w.double(), b.double(), 1e-5), g.double())
        ref = _grads(lambda x, w, b, eps: reference.patch_merge(x.float(), w, b, eps).to(x.dtype), (x, w, b, 1e-5), g)
        _within_2x(fused, ref, truth, ("out", "grad_x", "grad_weight", "grad_bias"))

    @pytest.mark.parametrize("dtype", LOW, ids=str)
    @pytest.mark.parametrize("B,H,W,C,ws,shift", [(2, 16, 16, 96, 8, 4), (1, 8, 12, 5, 4, 2)])
    def test_merge_add_fp32_shortcut_is_bit_exact(self, dtype, B, H, W, C, ws, shift):
        windows = torch.randn(B * (H // ws) * (W // ws), ws * ws, C, device=self.device).to(dtype)
        shortcut = torch.randn(B, H * W, C, device=self.device)
        args = (windows, shortcut, H, W, shift)
        assert wp.merge_add_unsupported_reason(*args) is None
        g = torch.randn(B, H * W, C, device=self.device)
        fused = _grads(wp.fused_window_merge_add, args, g)
        ref = _grads(reference.window_merge_add, args, g)
        assert [t.dtype for t in fused] == [torch.float32, dtype, torch.float32]
        for f, r in zip(fused, ref):
            assert f.dtype == r.dtype and torch.equal(f, r)

    def test_single_window_layer_norm_keeps_x_dtype(self):
        # the last stage (one window across the map) takes the reshape path: the same output dtype rule
        x, w, b = _ln_inputs((2, 8, 8, 16), 16, torch.bfloat16, self.device)
        out = wp.fused_layer_norm_window_partition(x, w, b, 1e-5, 8, 0)
        want = reference.layer_norm_window_partition(x.float(), w, b, 1e-5, 8, 0).bfloat16()
        assert out.dtype == torch.bfloat16 and torch.equal(out, want)

    @pytest.mark.parametrize("dtype", LOW, ids=str)
    def test_autocast_passes_the_ops_through(self, dtype):
        """Autocast neither casts the ops' inputs nor their outputs: the same values with and without it."""
        x, w, b = _ln_inputs((2, 8, 8, 24), 24, dtype, self.device)
        ops = torch.ops.htsat_kernels
        plain = ops.layer_norm_window_partition(x, w, b, 1e-5, 4, 2)
        pm_plain = ops.patch_merge_forward(x, w.repeat(4), b.repeat(4), 1e-5)
        windows = torch.randn(8, 16, 24, device=self.device).to(dtype)
        shortcut = torch.randn(2, 8, 8, 24, device=self.device)
        add_plain = ops.window_merge_add(windows, shortcut, 2)
        with torch.autocast(torch.device(self.device).type, dtype=dtype):
            auto = ops.layer_norm_window_partition(x, w, b, 1e-5, 4, 2)
            pm_auto = ops.patch_merge_forward(x, w.repeat(4), b.repeat(4), 1e-5)
            add_auto = ops.window_merge_add(windows, shortcut, 2)
        for p, a in zip((*plain, *pm_plain, add_plain), (*auto, *pm_auto, add_auto)):
            assert p.dtype == a.dtype and torch.equal(p, a)
        assert auto[0].dtype == pm_auto[0].dtype == dtype and add_auto.dtype == torch.float32

    def test_public_ops_forced_fused_under_autocast(self):
        """backend="fused" under autocast: the model's calls (fp32 parameters, bf16 activations) run fused."""
        dev = self.device
        x, w, b = _ln_inputs((2, 8, 8, 24), 24, torch.bfloat16, dev)
        w4, b4 = w.repeat(4), b.repeat(4)
        windows = torch.randn(8, 16, 24, device=dev).bfloat16()
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16), htsat_kernels.record_dispatch() as rec:
            htsat_kernels.layer_norm_window_partition(x, w, b, 1e-5, 4, 2, backend="fused")
            htsat_kernels.patch_merge(x, w4, b4, 1e-5, backend="fused")
            htsat_kernels.window_merge_add(windows, torch.randn(2, 64, 24, device=dev), 8, 8, 2, backend="fused")
        assert [(d.op, d.fused, d.reason) for d in rec] == [
            ("layer_norm_window_partition", True, None),
            ("patch_merge", True, None),
            ("window_merge_add", True, None),
        ]

    def test_pairs_the_kernels_do_not_take(self):
        dev = self.device
        x, w, b = _ln_inputs((1, 8, 8, 4), 4, torch.float32, dev)
        # float32 x with bf16 parameters, fp16 x with bf16 parameters, float64 x with float32 parameters
        for xd, pd in ((torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16), (torch.float64, torch.float32)):
            reason = wp.layer_norm_partition_unsupported_reason(x.to(xd), w.to(pd), b.to(pd), 1e-5, 4, 2)
            assert reason and "float32 with float16 / bfloat16 x" in reason
            with pytest.raises(RuntimeError, match="weight must have dtype"):
                torch.ops.htsat_kernels.layer_norm_window_partition(x.to(xd), w.to(pd), b.to(pd), 1e-5, 4, 2)
        reason = pm.unsupported_reason(x.bfloat16(), w.repeat(4), b.repeat(4).bfloat16(), 1e-5)
        assert reason == "weight has dtype torch.float32 but bias has torch.bfloat16; the compiled kernel needs them equal"
        with pytest.raises(RuntimeError, match="bias must have dtype Float"):
            torch.ops.htsat_kernels.patch_merge_forward(x.bfloat16(), w.repeat(4), b.repeat(4).bfloat16(), 1e-5)
        windows, shortcut = torch.randn(4, 16, 4, device=dev), torch.randn(1, 8, 8, 4, device=dev)
        assert "float32 shortcut with float16 / bfloat16 windows" in wp.merge_add_unsupported_reason(
            windows, shortcut.bfloat16(), 8, 8, 2
        )
        with pytest.raises(RuntimeError, match="shortcut must have dtype Float"):
            torch.ops.htsat_kernels.window_merge_add(windows, shortcut.bfloat16(), 2)

    def test_opcheck_mixed(self):
        x, w, b = _ln_inputs((2, 4, 6, 3), 3, torch.bfloat16, self.device)
        ops = torch.ops.htsat_kernels
        torch.library.opcheck(ops.layer_norm_window_partition.default, (x.requires_grad_(), w.requires_grad_(), b, 1e-5, 2, 1))
        _, mean, rstd = ops.layer_norm_window_partition(x.detach(), w.detach(), b, 1e-5, 2, 1)
        g = torch.randn(12, 4, 3, device=self.device).bfloat16()
        torch.library.opcheck(ops.layer_norm_window_partition_backward.default, (g, x.detach(), w.detach(), mean, rstd, 2, 1))
        x4, w4, b4 = _ln_inputs((2, 4, 6, 3), 12, torch.float16, self.device)
        torch.library.opcheck(ops.patch_merge_forward.default, (x4.requires_grad_(), w4.requires_grad_(), b4, 1e-5))
        win = torch.randn(6, 4, 3, device=self.device).bfloat16().requires_grad_()
        sc = torch.randn(1, 4, 6, 3, device=self.device).requires_grad_()
        torch.library.opcheck(ops.window_merge_add.default, (win, sc, 1))


class TestMixedCPU(MixedCases):
    pass


@requires_cuda
class TestMixedCUDA(MixedCases):
    device = "cuda"

    @pytest.mark.parametrize("dtype", LOW, ids=str)
    def test_matches_cpu_twin(self, dtype):
        x, w, b = _ln_inputs((3, 16, 16, 96), 96, dtype, "cpu")
        g = torch.randn(12, 64, 96).to(dtype)
        cpu = _grads(wp.fused_layer_norm_window_partition, (x, w, b, 1e-5, 8, 4), g)
        gpu = _grads(wp.fused_layer_norm_window_partition, (x.cuda(), w.cuda(), b.cuda(), 1e-5, 8, 4), g.cuda())
        for c, d in zip(cpu, gpu):
            torch.testing.assert_close(d.cpu(), c, rtol=2e-2, atol=2e-2)
        x4, w4, b4 = _ln_inputs((3, 16, 16, 96), 384, dtype, "cpu")
        g4 = torch.randn(3, 64, 384).to(dtype)
        cpu = _grads(pm.fused_patch_merge, (x4, w4, b4, 1e-5), g4)
        gpu = _grads(pm.fused_patch_merge, (x4.cuda(), w4.cuda(), b4.cuda(), 1e-5), g4.cuda())
        for c, d in zip(cpu, gpu):
            torch.testing.assert_close(d.cpu(), c, rtol=2e-2, atol=2e-2)
        windows, shortcut = torch.randn(12, 64, 96).to(dtype), torch.randn(3, 256, 96)
        assert torch.equal(
            wp.fused_window_merge_add(windows.cuda(), shortcut.cuda(), 16, 16, 4).cpu(),
            wp.fused_window_merge_add(windows, shortcut, 16, 16, 4),
        )
