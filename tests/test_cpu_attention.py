"""The CPU path of "auto": window attention through SDPA (htsat_kernels.fused.cpu_attention) and the
model's log-mel by FFT equal the references in values and gradients."""

import pytest
import torch

import htsat
import htsat_kernels
from htsat_kernels import backends, reference
from htsat_kernels.fused.cpu_attention import sdpa_unsupported_reason, sdpa_window_attention

# (map side, channels, heads, shift): stage shapes of the tiny model (windows of 8 x 8)
CASES = [(16, 24, 1, 4), (16, 48, 2, 4), (8, 96, 4, 0)]


def _call(fn, qkv, table, H, heads, shift, mask_tensor=False):
    mask = None
    grid = (H, H, shift) if shift else None
    if mask_tensor and shift:
        mask, grid = reference.shifted_window_mask(H, H, 8, shift), None
    return fn(qkv, table, mask, heads, (qkv.shape[-1] // 3 // heads) ** -0.5, 0.0, grid)


@pytest.mark.parametrize("H,C,heads,shift", CASES)
@pytest.mark.parametrize("mask_tensor", [False, True])
def test_sdpa_equals_the_reference_values_and_gradients(H, C, heads, shift, mask_tensor):
    nW = (H // 8) ** 2
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        qkv = torch.randn(2 * nW, 64, 3 * C, dtype=dtype, requires_grad=True)
        table = torch.randn(225, heads, dtype=dtype, requires_grad=True)
        outs, grads = [], []
        for fn in (reference.window_attention, sdpa_window_attention):
            out = _call(fn, qkv, table, H, heads, shift, mask_tensor)
            g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
            outs.append(out)
            grads.append(torch.autograd.grad(out, (qkv, table), g))
        torch.testing.assert_close(outs[1], outs[0], atol=tol, rtol=tol)
        for a, b in zip(grads[1], grads[0]):
            torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)


def test_bf16_within_the_references_own_rounding():
    qkv32 = torch.randn(4, 64, 3 * 48)
    table = torch.randn(225, 2)
    want = _call(reference.window_attention, qkv32.double(), table.double(), 16, 2, 4).float()
    ref = _call(reference.window_attention, qkv32.bfloat16(), table.bfloat16(), 16, 2, 4).float()
    got = _call(sdpa_window_attention, qkv32.bfloat16(), table.bfloat16(), 16, 2, 4).float()
    assert (got - want).abs().max() <= 2 * (ref - want).abs().max()


def test_declines_dropout_fp16_and_autocast():
    args = htsat_kernels.OPS["window_attention"].example()
    assert sdpa_unsupported_reason(*args) is None
    assert "dropout" in sdpa_unsupported_reason(*args[:5], 0.1)
    qkv16 = args[0].half()
    assert "float16" in sdpa_unsupported_reason(qkv16, args[1].half(), *args[2:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in sdpa_unsupported_reason(*args)
    assert backends.dispatch("window_attention", args, "reference") is reference.window_attention


def test_auto_model_on_cpu_equals_the_reference_model():
    """The default CPU path (FFT log-mel, SDPA attention, the C++ twins) against the eager reference on the
    same weights: probabilities within 1e-5, features within 1e-5 of their scale."""
    torch.manual_seed(0)
    cfg = {**htsat.TINY_OVERRIDES, "num_classes": 5}
    auto = htsat.create_model("htsat-audioset", **cfg).eval()
    ref = htsat.create_model("htsat-audioset", backend="reference", **cfg).eval()
    ref.load_state_dict(auto.state_dict())
    n = int(auto.config.clip_seconds * auto.config.sample_rate)
    t = torch.arange(n) / auto.config.sample_rate
    x = torch.stack([0.3 * torch.sin(2 * torch.pi * 440 * t), 0.1 * torch.randn(n)])
    with torch.no_grad():
        a, b = auto(x), ref(x)
    for k in ("clipwise_output", "framewise_output"):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    scale = float(b["latent_output"].abs().max())
    torch.testing.assert_close(a["latent_output"], b["latent_output"], atol=1e-5 * scale, rtol=0)
