"""The model under autocast: every op fused, and the same result as the reference under the same autocast.

CPU bf16 autocast, training step (train mode: forward, loss, backward), backend "fused" (a decline would
raise). Window attention on a CPU runs fused only in the Triton interpreter, minutes at these sizes: here
its capability check runs as usual (a decline still raises) but its math is the reference's; every other op
runs its C++ kernel. The comparison is the model 2x rule of docs/design.md (numerics): against the fp32
model without autocast, the fused model's norm-relative error of each output and each parameter gradient
is at most twice the reference model's plus 1e-3.

The derived CUDA flow (fake CUDA tensors under CUDA autocast, bench/coverage.py) must show no decline.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

import htsat
import htsat_kernels as hk
from htsat_kernels import backends, reference

try:
    from htsat_kernels.fused import window_process  # noqa: F401
except ImportError as exc:  # the compiled extension is optional: say why and skip
    pytest.skip(str(exc), allow_module_level=True)

from bench import coverage  # noqa: E402

# drop path (the presets' 0.1) is active in every block but the first: merge + add is unfused there
FUSED_IN_TRAINING = {"layer_norm_window_partition", "patch_merge", "window_attention", "window_merge", "window_merge_add"}


def _step(model, wave, weights, autocast: bool):
    """Outputs and parameter gradients of one training step (train mode, the same drop-path draws each time)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(wave)
    outs = {k: v for k, v in out.items() if torch.is_tensor(v) and v.is_floating_point()}
    loss = sum((v.float() * weights[k]).sum() for k, v in outs.items())
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().float() for k, v in outs.items()}, grads


def _rel(a, t):
    return ((a - t).norm() / t.norm().clamp_min(1e-30)).item()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["htsat-audioset", "clap-htsat-base"])
def test_bf16_autocast_training_step_runs_fused_and_matches_the_reference(name, monkeypatch):
    torch.manual_seed(0)
    model = htsat.create_model(name, backend="reference")
    model.check_inputs = False
    model.train()
    wave = 0.1 * torch.randn(1, int(round(model.config.clip_seconds * model.config.sample_rate)))
    with torch.no_grad():
        shapes = {k: v.shape for k, v in model(wave).items() if torch.is_tensor(v) and v.is_floating_point()}
    weights = {k: torch.randn(s) for k, s in shapes.items()}
    truth = _step(model, wave, weights, autocast=False)
    ref = _step(model, wave, weights, autocast=True)

    attention = backends._fused["window_attention"]
    assert isinstance(attention, backends.FusedImpl), attention
    monkeypatch.setitem(backends._fused, "window_attention", dataclasses.replace(attention, run=reference.window_attention))
    model.backend = "fused"
    with hk.record_dispatch() as decisions:
        fused = _step(model, wave, weights, autocast=True)
    assert all(d.fused for d in decisions), [d for d in decisions if not d.fused][:3]
    assert FUSED_IN_TRAINING <= {d.op for d in decisions}

    (f_out, f_grad), (r_out, r_grad), (t_out, t_grad) = fused, ref, truth
    assert set(f_grad) == set(r_grad) == set(t_grad)
    for kind, f, r, t in (("output", f_out, r_out, t_out), ("grad", f_grad, r_grad, t_grad)):
        for k in t:
            err_f, err_r = _rel(f[k], t[k]), _rel(r[k], t[k])
            assert err_f <= 2 * err_r + 1e-3, f"{kind} {k}: fused {err_f:.3g} vs reference {err_r:.3g} (norm-relative)"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_derived_cuda_flow_has_no_dtype_decline(dtype):
    """CUDA autocast's dtype flow (stage 1 fp32 residual stream, bf16 after the first patch merge) through
    every op's capability check: all fused, in training and in inference."""
    model = coverage.build_model("htsat-audioset", tiny=True)
    for mode in coverage.MODES:
        cfg = coverage.Config(coverage.DERIVED, dtype, False, mode)
        decisions = coverage.run_derived(model, cfg)
        declined = Counter((d.op, d.reason) for d in decisions if not d.fused)
        assert not declined, declined
        assert {d.op for d in decisions} >= {"layer_norm_window_partition", "patch_merge", "window_attention"}
    # the fake run leaves the model as it was: real CPU parameters
    assert all(p.device.type == "cpu" and not isinstance(p, torch._subclasses.FakeTensor) for p in model.parameters())
    wave = 0.1 * torch.randn(1, int(round(model.config.clip_seconds * model.config.sample_rate)))
    with torch.no_grad():
        model.eval()(wave)


def test_coverage_records_on_cpu():
    """Eager bf16 autocast on CPU: every op fused except the attention, which "auto" keeps on the reference."""
    model = coverage.build_model("htsat-audioset", tiny=True)
    cfg = coverage.Config("cpu", "bf16", False, "train")
    records = coverage.records_of(cfg, coverage.run_real(model, cfg))
    by_op = {r["op"]: r for r in records}
    assert set(by_op) == set(hk.OPS)
    for op, r in by_op.items():
        assert r["kind"] == "coverage" and r["config"] == "cpu bf16 autocast, eager, train"
        if op == "window_attention":
            assert r["fused_calls"] == 0 and r["reference_calls"] > 0
            (reason,) = r["reasons"]
            assert "auto does not pick this kernel for CPU tensors" in reason
        else:
            assert r["reference_calls"] == 0 and not r["reasons"], r
    assert by_op["layer_norm_window_partition"]["fused_calls"] == 8  # depths (2, 2, 2, 2)
    assert by_op["patch_merge"]["fused_calls"] == 3
    text = coverage.render(records)
    assert "8/8" in text and "auto does not pick" in text


def test_dispatch_records_declines_and_forced_reference():
    x = torch.randn(1, 8, 8, 4)
    w, b = torch.ones(4), torch.zeros(4)
    with hk.record_dispatch() as outer:
        hk.layer_norm_window_partition(x, w, b, 1e-5, 4, 2, backend="reference")
        with hk.record_dispatch() as inner:
            hk.layer_norm_window_partition(x.half(), w.half(), b.half(), 1e-5, 4, 2, backend="auto")
    assert [(d.op, d.fused) for d in outer] == [("layer_norm_window_partition", False)] * 2
    assert outer[0].reason == "backend 'reference' was asked for"
    assert len(inner) == 1 and "the reference is faster for float16 on CPU" in inner[0].reason
    hk.layer_norm_window_partition(x, w, b, 1e-5, 4, 2)
    assert len(outer) == 2  # nothing recorded outside the block


def test_a_decline_does_not_split_the_compiled_graph():
    """ "auto" declining a call (here fp16 on CPU, where the reference is faster) inside torch.compile: the
    reference runs in the same graph (the decline's debug log is skipped while Dynamo traces) and the
    decision is recorded."""
    torch._dynamo.reset()
    w, b = torch.ones(4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16)

    def f(x):
        y = hk.layer_norm_window_partition(x, w, b, 1e-5, 4, 2, backend="auto")
        return hk.window_merge(y * 2, 8, 8, 2, backend="auto").sum()

    x = torch.randn(1, 8, 8, 4, dtype=torch.float16)
    with hk.record_dispatch() as decisions:
        explained = torch._dynamo.explain(f)(x)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert [(d.op, d.fused) for d in decisions] == [("layer_norm_window_partition", False), ("window_merge", True)]
