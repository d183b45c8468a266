"""Backend choice: per-call argument > use_backend() context > $HTSAT_KERNELS_BACKEND > "auto";
forced "fused" never falls back; "auto" falls back when the fused kernel declines; the model's
backend reaches every block. Fused implementations are replaced by recording fakes, so these tests
do not depend on the compiled extension or Triton."""

from __future__ import annotations

import pytest
import torch

import htsat
import htsat_kernels
from htsat.layers import PatchMerging, SwinTransformerBlock
from htsat_kernels import BackendUnavailable, FusedImpl, backends, reference

# every dispatched op: the four of DESIGN.md plus the block fusions (norm1 + partition, merge + residual)
OPS = (
    "layer_norm_window_partition",
    "patch_merge",
    "window_attention",
    "window_merge",
    "window_merge_add",
    "window_partition",
)


def _args(op: str) -> tuple:
    """Small valid CPU arguments for each op."""
    if op == "window_partition":
        return (torch.randn(2, 8, 8, 3), 4, 2)
    if op == "window_merge":
        return (torch.randn(8, 16, 3), 8, 8, 2)
    if op == "layer_norm_window_partition":
        return (torch.randn(2, 8, 8, 3), torch.rand(3) + 0.5, torch.randn(3), 1e-5, 4, 2)
    if op == "window_merge_add":
        return (torch.randn(8, 16, 3), torch.randn(2, 64, 3), 8, 8, 2)
    if op == "patch_merge":
        return (torch.randn(2, 4, 4, 3), torch.ones(12), torch.zeros(12), 1e-5)
    if op == "window_attention":
        return (torch.randn(4, 16, 3 * 8), torch.randn(49, 2), None, 2, 4**-0.5)
    raise KeyError(op)


class Recorder:
    """A fused implementation that runs the reference and records each call."""

    def __init__(self, op: str, reason=None, auto_on_cpu: bool = True):
        self.op, self.reason, self.calls = op, reason, 0
        self.impl = FusedImpl(self.run, self.unsupported, auto_on_cpu=auto_on_cpu)

    def run(self, *args):
        self.calls += 1
        return getattr(reference, self.op)(*args)

    def unsupported(self, *args):
        return self.reason


@pytest.fixture
def fakes(monkeypatch):
    """Every op's fused implementation replaced by an accepting Recorder (restored after the test)."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    recs = {op: Recorder(op) for op in OPS}
    for op, rec in recs.items():
        monkeypatch.setitem(backends._fused, op, rec.impl)
    return recs


def _picked(op: str, backend=None):
    return backends.dispatch(op, _args(op), backend)


def _is_fused(fn, fakes, op) -> bool:
    if fn == fakes[op].impl.run:
        return True
    assert fn is getattr(reference, op)
    return False


# --------------------------------------------------------------------------------------------
# precedence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_default_is_auto_and_uses_an_accepting_fused_impl(fakes, op):
    assert htsat_kernels.current_backend() == "auto"
    assert _is_fused(_picked(op), fakes, op)
    out = getattr(htsat_kernels, op)(*_args(op))
    assert fakes[op].calls == 1
    assert out.shape == getattr(reference, op)(*_args(op)).shape


def test_env_var(fakes, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert htsat_kernels.current_backend() == "reference"
    assert not _is_fused(_picked("window_partition"), fakes, "window_partition")
    monkeypatch.setenv(backends.ENV_VAR, "fused")
    assert _is_fused(_picked("window_partition"), fakes, "window_partition")
    monkeypatch.setenv(backends.ENV_VAR, "")  # empty means unset
    assert htsat_kernels.current_backend() == "auto"


def test_context_beats_env_and_nests(fakes, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fused")
    with htsat_kernels.use_backend("reference"):
        assert htsat_kernels.current_backend() == "reference"
        assert not _is_fused(_picked("patch_merge"), fakes, "patch_merge")
        with htsat_kernels.use_backend("fused"):
            assert _is_fused(_picked("patch_merge"), fakes, "patch_merge")
        assert htsat_kernels.current_backend() == "reference"
    assert htsat_kernels.current_backend() == "fused"
    # the context is popped when the block raises
    with pytest.raises(RuntimeError):
        with htsat_kernels.use_backend("reference"):
            raise RuntimeError("boom")
    assert htsat_kernels.current_backend() == "fused"


def test_per_call_beats_context_and_env(fakes, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    with htsat_kernels.use_backend("reference"):
        assert _is_fused(_picked("window_merge", "fused"), fakes, "window_merge")
        assert _is_fused(_picked("window_merge", "auto"), fakes, "window_merge")
        htsat_kernels.window_merge(*_args("window_merge"), backend="fused")
        assert fakes["window_merge"].calls == 1
    with htsat_kernels.use_backend("fused"):
        assert not _is_fused(_picked("window_merge", "reference"), fakes, "window_merge")
        htsat_kernels.window_merge(*_args("window_merge"), backend="reference")
        assert fakes["window_merge"].calls == 1


def test_invalid_names_say_where_they_came_from(fakes, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown backend 'cuda' from use_backend\(\)"):
        with htsat_kernels.use_backend("cuda"):
            pass
    assert htsat_kernels.current_backend() == "auto"  # nothing was pushed
    with pytest.raises(ValueError, match="unknown backend 'triton' from the backend argument"):
        htsat_kernels.window_partition(*_args("window_partition"), backend="triton")
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"unknown backend 'fast' from \$HTSAT_KERNELS_BACKEND"):
        htsat_kernels.window_partition(*_args("window_partition"))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        htsat_kernels.current_backend()
    # an explicit choice does not need the env var
    htsat_kernels.window_partition(*_args("window_partition"), backend="reference")
    with htsat_kernels.use_backend("reference"):
        htsat_kernels.window_partition(*_args("window_partition"))


# --------------------------------------------------------------------------------------------
# fused unavailable / declining
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_forced_fused_without_an_implementation_raises_with_the_reason(op, monkeypatch):
    monkeypatch.setitem(backends._fused, op, "extension not built: no compiler here")
    with pytest.raises(BackendUnavailable, match=rf"'fused' was requested for {op}.*no compiler here"):
        getattr(htsat_kernels, op)(*_args(op), backend="fused")
    with htsat_kernels.use_backend("fused"):
        with pytest.raises(BackendUnavailable, match="no compiler here"):
            getattr(htsat_kernels, op)(*_args(op))
    # auto and reference still run, on the reference
    args = _args(op)
    want = getattr(reference, op)(*args)
    for b in ("auto", "reference"):
        assert torch.equal(getattr(htsat_kernels, op)(*args, backend=b), want)
    assert htsat_kernels.fused_status()[op] == "extension not built: no compiler here"


def test_unregistered_op_is_unavailable(monkeypatch):
    monkeypatch.delitem(backends._fused, "patch_merge", raising=False)
    with pytest.raises(BackendUnavailable, match="no fused implementation of patch_merge is registered"):
        htsat_kernels.patch_merge(*_args("patch_merge"), backend="fused")
    assert backends.dispatch("patch_merge", _args("patch_merge"), "auto") is reference.patch_merge


def test_register_fused_string_reason_is_restored(monkeypatch):
    """register_fused with a reason string, restored afterwards (the public registration API)."""
    saved = backends._fused.get("window_partition")
    assert saved is not None  # every op is registered at import, as an implementation or a reason
    try:
        htsat_kernels.register_fused("window_partition", "disabled for this test")
        assert htsat_kernels.fused_status()["window_partition"] == "disabled for this test"
        with pytest.raises(BackendUnavailable, match="disabled for this test"):
            htsat_kernels.window_partition(*_args("window_partition"), backend="fused")
    finally:
        backends._fused["window_partition"] = saved
    assert backends._fused.get("window_partition") is saved


def test_auto_falls_back_when_the_fused_impl_declines(monkeypatch, caplog):
    rec = Recorder("window_attention", reason="head_dim 4 is not supported")
    monkeypatch.setitem(backends._fused, "window_attention", rec.impl)
    args = _args("window_attention")
    with caplog.at_level("DEBUG", logger="htsat_kernels"):
        out = htsat_kernels.window_attention(*args, backend="auto")
    assert rec.calls == 0
    assert torch.equal(out, reference.window_attention(*args))
    assert "head_dim 4 is not supported" in caplog.text
    with pytest.raises(BackendUnavailable, match="head_dim 4 is not supported"):
        htsat_kernels.window_attention(*args, backend="fused")
    assert rec.calls == 0


def test_auto_on_cpu_flag(monkeypatch):
    """auto_on_cpu=False: auto keeps CPU tensors on the reference, forcing fused still runs the kernel."""
    rec = Recorder("window_attention", auto_on_cpu=False)
    monkeypatch.setitem(backends._fused, "window_attention", rec.impl)
    args = _args("window_attention")
    assert backends.dispatch("window_attention", args, "auto") is reference.window_attention
    htsat_kernels.window_attention(*args, backend="fused")
    assert rec.calls == 1


def test_real_registry_auto_never_picks_triton_on_cpu():
    """Whatever loaded, "auto" on CPU tensors keeps window attention on the eager reference."""
    assert backends.dispatch("window_attention", _args("window_attention"), "auto") is reference.window_attention


def test_fused_status_lists_every_op():
    status = htsat_kernels.fused_status()
    assert sorted(status) == sorted(OPS)
    for op, s in status.items():
        assert isinstance(s, str) and s, op
        assert s == "available" or len(s) > 10  # a reason, not an empty marker


# --------------------------------------------------------------------------------------------
# the model's backend
# --------------------------------------------------------------------------------------------


def _tiny(backend="auto") -> htsat.HTSAT:
    return htsat.create_model(backend=backend, **{**htsat.TINY_OVERRIDES, "num_classes": 3}).eval()


def _op_modules(model):
    mods = [m for m in model.modules() if isinstance(m, (SwinTransformerBlock, PatchMerging))]
    assert len(mods) == 8 + 3
    return mods


def test_model_backend_reaches_every_block():
    model = _tiny("reference")
    assert model.backend == "reference"
    assert all(m.backend == "reference" for m in _op_modules(model))
    model.backend = "fused"
    assert all(m.backend == "fused" for m in _op_modules(model))
    model.backend = "auto"
    assert model.backend == "auto"
    assert all(m.backend is None for m in _op_modules(model))  # auto defers to the context / env var
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        model.backend = "gpu"
    with pytest.raises(ValueError, match="unknown backend"):
        _tiny("gpu")
    assert model.backend == "auto"


def _count_dispatches(monkeypatch):
    """Count every op call the model makes through the public htsat_kernels functions."""
    seen: dict[str, int] = {}
    real = htsat_kernels._dispatch

    def counting(op, args, backend):
        seen[op] = seen.get(op, 0) + 1
        return real(op, args, backend)

    monkeypatch.setattr(htsat_kernels, "_dispatch", counting)
    return seen


def test_model_backend_drives_the_ops(fakes, monkeypatch):
    seen = _count_dispatches(monkeypatch)
    x = 0.1 * torch.randn(1, 16000)
    model = _tiny("reference")
    with torch.no_grad():
        want = model(x)
        # the model's explicit choice beats the context
        with htsat_kernels.use_backend("fused"):
            model(x)
    assert all(r.calls == 0 for r in fakes.values())
    assert sum(seen.values()) > 0

    seen.clear()
    model.backend = "fused"
    with torch.no_grad(), htsat_kernels.use_backend("reference"):
        got = model(x)
    fused_calls = {op: r.calls for op, r in fakes.items() if r.calls}
    assert fused_calls == seen  # every op call of the model ran the fused implementation
    # per block one partition-type op, one attention, one merge-type op; one patch merge per merge
    assert seen["window_attention"] == 8 and seen["patch_merge"] == 3
    assert seen.get("window_partition", 0) + seen.get("layer_norm_window_partition", 0) == 8
    assert seen.get("window_merge", 0) + seen.get("window_merge_add", 0) == 8
    torch.testing.assert_close(got["clipwise_logits"], want["clipwise_logits"])

    for r in fakes.values():
        r.calls = 0
    model.backend = "auto"
    with torch.no_grad(), htsat_kernels.use_backend("reference"):
        model(x)
    assert all(r.calls == 0 for r in fakes.values())  # auto follows the context
    seen.clear()
    with torch.no_grad():
        model(x)
    assert {op: r.calls for op, r in fakes.items() if r.calls} == seen  # and uses accepting fused impls without one


def test_model_forced_fused_raises_when_unavailable(fakes, monkeypatch):
    monkeypatch.setitem(backends._fused, "patch_merge", "patch_merge kernel missing")  # every model runs patch_merge
    model = _tiny("fused")
    with pytest.raises(BackendUnavailable, match="patch_merge kernel missing"):
        with torch.no_grad():
            model(0.1 * torch.randn(1, 16000))
    model.backend = "auto"
    with torch.no_grad():
        out = model(0.1 * torch.randn(1, 16000))
    assert torch.isfinite(out["clipwise_output"]).all()


def test_auto_prefers_the_reference_where_the_fused_kernel_is_slower():
    """fp16 on CPU: "auto" keeps the reference for the LayerNorm twins, "fused" still runs them."""
    from htsat_kernels import backends

    status = htsat_kernels.fused_status()
    if status["patch_merge"] != "available":
        pytest.skip(f"compiled extension not available: {status['patch_merge']}")
    x = torch.randn(1, 4, 4, 8)
    w, b = torch.ones(32), torch.zeros(32)
    half = (x.half(), w.half(), b.half(), 1e-5)
    assert backends.dispatch("patch_merge", half, "auto") is htsat_kernels.reference.patch_merge
    assert backends.dispatch("patch_merge", half, "fused") is not htsat_kernels.reference.patch_merge
    assert backends.dispatch("patch_merge", (x, w, b, 1e-5), "auto") is not htsat_kernels.reference.patch_merge
