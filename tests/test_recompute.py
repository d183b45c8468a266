"""The memory-saving Linears and attention (htsat_kernels.recompute): values and every gradient equal
their references in fp32 and under bf16 autocast; they keep only their inputs; the model's save
policies change what a training step saves, not what it computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import htsat
import htsat_kernels as hk
from bench.saved_memory import count_saved, htsat_stages
from htsat_kernels import recompute

WS = 4


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _nullcontext():
    return torch.autocast("cpu", enabled=False)


AUTOCAST = {"fp32": _nullcontext, "bf16": _bf16}


def _leaf(*shape, scale=1.0):
    return (scale * torch.randn(*shape)).requires_grad_()


def _cases():
    """name -> (fn of the inputs, inputs, weight, bias): the four cheap-input Linears of the model."""
    C, B, H, W = 8, 2, 8, 8
    x = _leaf(B, H, W, C)
    ln_w, ln_b = _leaf(C, scale=0.5), _leaf(C, scale=0.5)
    ln4_w, ln4_b = _leaf(4 * C, scale=0.5), _leaf(4 * C, scale=0.5)
    return {
        "norm1+partition -> qkv": (
            lambda x_, w_, b_: hk.layer_norm_window_partition(x_, w_, b_, 1e-5, WS, WS // 2),
            (x, ln_w, ln_b),
            _leaf(3 * C, C, scale=0.3),
            _leaf(3 * C),
        ),
        "norm2 -> fc1": (
            lambda t, w_, b_: F.layer_norm(t, (C,), w_, b_, 1e-5),
            (x.detach().reshape(B, H * W, C).requires_grad_(), ln_w, ln_b),
            _leaf(4 * C, C, scale=0.3),
            _leaf(4 * C),
        ),
        "gelu -> fc2": (F.gelu, (_leaf(B, H * W, 4 * C),), _leaf(C, 4 * C, scale=0.3), _leaf(C)),
        "patch merge -> reduction": (
            lambda x_, w_, b_: hk.patch_merge(x_, w_, b_, 1e-5),
            (x, ln4_w, ln4_b),
            _leaf(2 * C, 4 * C, scale=0.3),
            None,
        ),
    }


def _value_and_grads(linear, fn, inputs, weight, bias, dtype, backend):
    leaves = [t for t in (*inputs, weight, bias) if t is not None]
    with hk.use_backend(backend), AUTOCAST[dtype]():
        out = linear(fn, inputs, weight, bias)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    return out, torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(_cases()))
def test_recomputed_input_linear_matches_reference(case, dtype, backend):
    fn, inputs, weight, bias = _cases()[case]
    out, grads = _value_and_grads(recompute.recomputed_input_linear, fn, inputs, weight, bias, dtype, backend)
    ref_out, ref_grads = _value_and_grads(recompute.linear_reference, fn, inputs, weight, bias, dtype, backend)
    assert out.dtype == ref_out.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # the same computation
    assert len(grads) == len(ref_grads) >= 2
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)  # the same formulas (summation order aside)


@pytest.mark.parametrize("case", list(_cases()))
def test_recomputed_input_linear_keeps_only_its_inputs(case):
    fn, inputs, weight, bias = _cases()[case]
    params = torch.nn.ParameterList([torch.nn.Parameter(t.detach()) for t in (weight, bias) if t is not None])
    holder = torch.nn.Module()
    holder.params = params
    inputs = tuple(t.detach().requires_grad_() for t in inputs)
    kept, _ = count_saved(
        holder, lambda: recompute.recomputed_input_linear(fn, inputs, *params, *(() if bias is not None else (None,)))
    )
    assert kept.total == sum(t.untyped_storage().nbytes() for t in inputs)
    full, _ = count_saved(holder, lambda: recompute.linear_reference(fn, inputs, *params, *(() if bias is not None else (None,))))
    assert full.total > kept.total


def _attention_inputs(shifted: bool, dtype: str):
    B_, heads, C = 8, 2, 16
    N = WS * WS
    qkv = _leaf(B_, N, 3 * C)
    table = _leaf((2 * WS - 1) ** 2, heads, scale=0.1)
    grid = (2 * WS, 2 * WS, WS // 2) if shifted else None
    return qkv, table, heads, grid


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shifted", [False, True])
def test_attention_saving_qkv_matches_reference(shifted, dtype):
    qkv, table, heads, grid = _attention_inputs(shifted, dtype)
    scale = (qkv.shape[-1] // 3 // heads) ** -0.5

    def attn(q, t, m):
        return hk.window_attention(q, t, m, heads, scale, 0.0, grid, backend="reference")

    results = []
    for run in (lambda: recompute.attention_saving_qkv(attn, qkv, table, None), lambda: attn(qkv, table, None)):
        with AUTOCAST[dtype]():
            out = run()
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
        results.append((out, torch.autograd.grad(out, (qkv, table), grad)))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)  # backward reruns the very same reference
    holder = torch.nn.Module()
    holder.table = torch.nn.Parameter(table.detach())
    kept, _ = count_saved(holder, lambda: recompute.attention_saving_qkv(attn, qkv, holder.table, None))
    assert kept.total == qkv.untyped_storage().nbytes()


def test_save_policy_is_validated_and_adds_no_state_dict_keys():
    with pytest.raises(ValueError, match="save_policy must be one of"):
        htsat.load_config("htsat-audioset", save_policy="none")
    keys = {
        p: list(htsat.create_model("htsat-audioset", backend="reference", save_policy=p, **htsat.TINY_OVERRIDES).state_dict())
        for p in recompute.SAVE_POLICIES
    }
    assert keys["recompute-norms"] == keys["all"] == keys["recompute-norms-mlp"]


def _tiny_step(policy: str, backend: str, dtype: str, batch: int = 2):
    """A tiny model's forward + BCE loss (eval mode: no SpecAugment / drop-path randomness, grad on)."""
    torch.manual_seed(0)
    model = htsat.create_model("htsat-audioset", backend=backend, save_policy=policy, **htsat.TINY_OVERRIDES).eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    wave = 0.1 * torch.randn(batch, int(cfg.clip_seconds * cfg.sample_rate), generator=gen)
    target = (torch.rand(batch, cfg.num_classes, generator=gen) < 0.1).float()

    def forward():
        with AUTOCAST[dtype]():
            out = model(wave)
        return F.binary_cross_entropy_with_logits(out["clipwise_logits"].float(), target)

    saved, loss = count_saved(model, forward, htsat_stages(model))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return saved, loss.detach(), grads


@pytest.fixture(scope="module")
def eager_steps():
    return {dtype: _tiny_step("all", "reference", dtype) for dtype in ("fp32", "bf16")}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_default_policy_saves_at_most_0_6x_of_eager_with_the_same_values(eager_steps, dtype):
    assert htsat.HTSATConfig().save_policy == "recompute-norms-mlp"
    ref_saved, ref_loss, ref_grads = eager_steps[dtype]
    saved, loss, grads = _tiny_step("recompute-norms-mlp", "auto", dtype)
    assert saved.total <= 0.6 * ref_saved.total, (saved.total / ref_saved.total, saved.by_op)
    for stage in ("stage 1", "stage 2", "stage 3", "stage 4"):
        assert saved.by_stage[stage] < 0.65 * ref_saved.by_stage[stage], stage
    assert "Gelu" not in saved.by_op and "Bmm" not in saved.by_op  # GELU and the probabilities are recomputed
    for label in (
        "qkv, norm1 recomputed",
        "fc1, norm2 recomputed",
        "fc2, GELU recomputed",
        "attention, probabilities recomputed",
    ):
        assert saved.by_op[label] > 0, label
    assert saved.by_op["reduction, patch-merge norm recomputed"] > 0
    tol = {"fp32": dict(rtol=1e-4, atol=1e-5), "bf16": dict(rtol=0.05, atol=2e-3)}[dtype]
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-6)
        assert (g - ref_grads[name]).abs().max() <= tol["rtol"] * scale + tol["atol"], name


@pytest.mark.slow
def test_fused_attention_step_saves_at_most_0_6x_of_eager(eager_steps):
    """backend "fused": the Triton attention (interpreter on CPU) keeps qkv + log-sum-exp; the step
    with the default policy saves at most 0.6x of eager at the same batch, as on a GPU."""
    ref_saved = _tiny_step("all", "reference", "fp32", batch=1)[0]
    saved = _tiny_step("recompute-norms-mlp", "fused", "fp32", batch=1)[0]
    assert saved.total <= 0.6 * ref_saved.total, (saved.total / ref_saved.total, saved.by_op)
    assert "attention, probabilities recomputed" not in saved.by_op  # the attention ran fused
    assert any("window_attention" in name for name in saved.by_op), saved.by_op


def test_blocks_leave_recomputation_to_torch_compile(monkeypatch):
    """Under torch.compile the plain paths run (the compiler's partitioner picks what to recompute):
    a block then saves what save_policy="all" saves."""
    from htsat.layers import SwinTransformerBlock

    def saved(policy: str) -> int:
        torch.manual_seed(0)
        blk = SwinTransformerBlock(16, (8, 8), 2, 4, 2, 4.0, 0.0, 0.0, 0.0, save_policy=policy)
        x = torch.randn(2, 64, 16, requires_grad=True)
        return count_saved(blk, lambda: blk(x))[0].total

    eager_all, eager_default = saved("all"), saved("recompute-norms-mlp")
    assert eager_default < 0.7 * eager_all
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert saved("recompute-norms-mlp") == eager_all


def test_model_save_policy_can_be_changed_in_place():
    model = htsat.create_model("htsat-audioset", backend="reference", save_policy="all", **htsat.TINY_OVERRIDES)
    policies = lambda: {m.save_policy for m in model.modules() if m is not model and hasattr(m, "save_policy")}  # noqa: E731
    assert policies() == {"all"}
    model.save_policy = "recompute-norms"
    assert model.config.save_policy == "recompute-norms" and policies() == {"recompute-norms"}
    with pytest.raises(ValueError, match="save_policy must be one of"):
        model.save_policy = "everything"
    assert policies() == {"recompute-norms"}
