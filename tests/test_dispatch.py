"""Backend choice: per-call argument > use_backend() context > $HTSAT_KERNELS_BACKEND > "auto";
forced "fused" never falls back; "auto" falls back when the fused kernel declines; the model's
backend drives every op call (one use_backend() around its layers). Fused implementations are
replaced by recording fakes, so these tests do not depend on the compiled extension or Triton.
Every op of the table (htsat_kernels.ops.OPS) is covered."""

from __future__ import annotations

import pytest
import torch

import htsat
import htsat_kernels
from htsat.layers import BasicLayer, PatchMerging, SwinTransformerBlock, WindowAttention
from htsat_kernels import BackendUnavailable, FusedImpl, backends, reference

# every dispatched op: the four unfused ops of docs/design.md §4 plus the block fusions (norm1 + partition, merge + residual)
OPS = tuple(htsat_kernels.OPS)


def _args(op: str) -> tuple:
    """Small valid CPU arguments for each op (declared with the op)."""
    return htsat_kernels.OPS[op].example()


class Recorder:
    """A fused implementation that runs the reference and records each call."""

    def __init__(self, op: str, reason=None, auto_on_cpu: bool = True):
        self.op, self.reason, self.calls = op, reason, 0
        self.impl = FusedImpl(self.run, self.unsupported, auto_on_cpu=auto_on_cpu)

    def run(self, *args):
        self.calls += 1
        return htsat_kernels.OPS[self.op].reference(*args)

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


@pytest.fixture
def no_cpu_path(monkeypatch):
    """Without the CPU implementations "auto" prefers over the reference (window attention's SDPA),
    for the tests of the fused-or-reference choice itself."""
    monkeypatch.setattr(backends, "_cpu_auto", {})


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
def test_forced_fused_without_an_implementation_raises_with_the_reason(op, monkeypatch, no_cpu_path):
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


def test_auto_falls_back_when_the_fused_impl_declines(monkeypatch, caplog, no_cpu_path):
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


def test_auto_on_cpu_flag(monkeypatch, no_cpu_path):
    """auto_on_cpu=False: auto keeps CPU tensors on the reference, forcing fused still runs the kernel."""
    rec = Recorder("window_attention", auto_on_cpu=False)
    monkeypatch.setitem(backends._fused, "window_attention", rec.impl)
    args = _args("window_attention")
    assert backends.dispatch("window_attention", args, "auto") is reference.window_attention
    htsat_kernels.window_attention(*args, backend="fused")
    assert rec.calls == 1


def test_real_registry_auto_never_picks_triton_on_cpu():
    """Whatever loaded, "auto" on CPU tensors runs window attention through SDPA (its CPU path), never the
    Triton interpreter; with dropout (training) the eager reference."""
    from htsat_kernels.fused.cpu_attention import sdpa_window_attention

    args = _args("window_attention")
    assert backends.dispatch("window_attention", args, "auto") is sdpa_window_attention
    assert backends.dispatch("window_attention", (*args[:5], 0.1), "auto") is reference.window_attention


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


def test_model_backend_is_validated_and_lives_only_on_the_model():
    model = _tiny("reference")
    assert model.backend == "reference"
    model.backend = "fused"
    assert model.backend == "fused"
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        model.backend = "gpu"
    with pytest.raises(ValueError, match="unknown backend"):
        _tiny("gpu")
    assert model.backend == "fused"
    # one place decides: no layer carries a backend of its own
    mods = _op_modules(model)
    assert not any(hasattr(m, "backend") for m in mods)
    assert "backend" not in WindowAttention.forward.__code__.co_varnames


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


def test_checkpointed_blocks_recompute_on_the_models_backend(fakes):
    """Gradient checkpointing recomputes blocks in the backward pass, outside the model's
    use_backend(): the recomputation must still run on the model's backend."""
    model = htsat.create_model(backend="fused", **{**htsat.TINY_OVERRIDES, "num_classes": 3, "use_checkpoint": True})
    model.train()
    assert all(layer.use_checkpoint for layer in model.modules() if isinstance(layer, BasicLayer))
    x = 0.1 * torch.randn(2, 16000)
    with htsat_kernels.use_backend("reference"):
        out = model(x)
        forward_calls = {op: r.calls for op, r in fakes.items()}
        out["clipwise_logits"].sum().backward()
    assert forward_calls["window_attention"] == 8
    # every block ran once more in the backward, again on the fused fakes
    assert fakes["window_attention"].calls == 16
    # patch merges are not checkpointed; the default save policy recomputes each one's gather +
    # LayerNorm once in the backward, on the model's backend too (not the ambient "reference")
    assert htsat.HTSATConfig().save_policy != "all"
    assert fakes["patch_merge"].calls == 2 * forward_calls["patch_merge"] == 6


# --------------------------------------------------------------------------------------------
# the public wrappers: generated from the op table
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_public_signature_is_the_references_plus_backend(op):
    import inspect

    public = inspect.signature(getattr(htsat_kernels, op))
    ref = inspect.signature(htsat_kernels.OPS[op].reference)
    assert list(public.parameters)[:-1] == list(ref.parameters)
    backend = public.parameters["backend"]
    assert backend.kind is inspect.Parameter.KEYWORD_ONLY and backend.default is None
    assert op in htsat_kernels.__all__ and getattr(htsat_kernels, op).__name__ == op


def test_keyword_arguments_and_defaults_bind_like_the_reference():
    x = torch.randn(2, 8, 8, 3)
    want = reference.window_partition(x, 4, 0)
    assert torch.equal(htsat_kernels.window_partition(x, 4, backend="reference"), want)
    assert torch.equal(htsat_kernels.window_partition(window_size=4, x=x, backend="reference"), want)
    with pytest.raises(TypeError, match=r"window_partition\(\) missing required argument\(s\): window_size"):
        htsat_kernels.window_partition(x)
    with pytest.raises(TypeError, match="unexpected keyword argument 'size'"):
        htsat_kernels.window_partition(x, size=4)
    with pytest.raises(TypeError, match="multiple values for argument 'x'"):
        htsat_kernels.window_partition(x, 4, x=x)
    with pytest.raises(TypeError, match="takes 3 positional arguments but 4 were given"):
        htsat_kernels.window_partition(x, 4, 0, 1)


def test_bench_and_report_iterate_the_table():
    from bench import ops as bench_ops
    from bench.report import OP_ORDER

    assert bench_ops.OPS == OP_ORDER == tuple(htsat_kernels.OPS)
    for op, spec in htsat_kernels.OPS.items():
        for alias in spec.aliases:
            assert bench_ops.OP_ALIASES[alias] == op


# --------------------------------------------------------------------------------------------
# arguments are checked once, before dispatch: every backend gives the same error
# --------------------------------------------------------------------------------------------


def _swap(args: tuple, i: int, value) -> tuple:
    return args[:i] + (value,) + args[i + 1 :]


# op -> (argument index, bad value or function of the good value, exception, message regex)
BAD_ARGS = {
    "window_partition": [
        (0, lambda x: x[0], ValueError, r"x must have 4 dimensions \(B, H, W, C\), got shape \(8, 8, 3\)"),
        (0, lambda x: x.long(), TypeError, "x has dtype torch.int64"),
        (0, lambda x: x.tolist(), TypeError, "x must be a tensor, got list"),
        (1, 0, ValueError, "window_size must be positive, got 0"),
        (1, 3, ValueError, r"x: H and W \(dims 1 and 2\) must be positive multiples of window_size=3, got H=8, W=8"),
        (1, 4.0, TypeError, "window_size must be an int, got float"),
        (2, "2", TypeError, "shift must be an int, got str"),
    ],
    "window_merge": [
        (0, lambda w: w[:, :15], ValueError, r"windows: tokens per window \(dim 1\) must be a positive square number, got 15"),
        (0, lambda w: w[:5], ValueError, r"windows: dim 0 \(5\) must be a multiple of the number of windows per image \(4"),
        (0, lambda w: w[0], ValueError, "windows must have 3 dimensions"),
        (1, 6, ValueError, "H and W must be positive multiples of the window size 4, got H=6, W=8"),
        (2, 0, ValueError, "H and W must be positive multiples of the window size 4, got H=8, W=0"),
        (3, None, TypeError, "shift must be an int, got NoneType"),
    ],
    "layer_norm_window_partition": [
        (1, lambda w: torch.ones(4), ValueError, r"weight must have shape \(3,\) for C=3, got \(4,\)"),
        (2, None, TypeError, "bias must be a tensor"),
        (3, -1.0, ValueError, "eps must be a finite number >= 0, got -1.0"),
        (4, 0, ValueError, "window_size must be positive, got 0"),
        (4, 3, ValueError, "multiples of window_size=3"),
    ],
    "window_merge_add": [
        (1, lambda s: s[:, :60], ValueError, r"shortcut must have shape \(2, 64, 3\) or \(2, 8, 8, 3\), got \(2, 60, 3\)"),
        (1, lambda s: s.tolist(), TypeError, "shortcut must be a tensor, got list"),
        (1, lambda s: s.int(), TypeError, "shortcut has dtype torch.int32"),
        (0, lambda w: w[:5], ValueError, r"windows: dim 0 \(5\)"),
        (2, 10, ValueError, "H and W must be positive multiples of the window size 4, got H=10, W=8"),
    ],
    "patch_merge": [
        (0, lambda x: torch.randn(2, 3, 4, 3), ValueError, r"x: patch_merge needs even H and W \(dims 1 and 2\), got H=3, W=4"),
        (0, lambda x: x[0], ValueError, "x must have 4 dimensions"),
        (1, lambda w: w[:3], ValueError, r"weight must have shape \(12,\) for C=3, got \(3,\)"),
        (2, lambda b: b.int(), TypeError, "bias has dtype torch.int32"),
        (3, float("nan"), ValueError, "eps must be a finite number >= 0, got nan"),
    ],
    "window_attention": [
        (0, lambda q: q[:, :15], ValueError, "tokens per window N = 15 must be a square number"),
        (0, lambda q: q[..., :-1], ValueError, r"qkv: last dim must be 3C \(\[q \| k \| v\]\), got 23"),
        (0, lambda q: q.long(), TypeError, "qkv has dtype torch.int64"),
        (1, lambda t: t[:48], ValueError, r"table must be \(\(2\*ws-1\)\*\*2, num_heads\) = \(49, 2\) for window size 4"),
        (2, lambda m: torch.zeros(3, 16, 16), ValueError, "mask: nW = 3 windows does not divide qkv's B\\*nW = 4"),
        (2, lambda m: torch.zeros(4, 16, 8), ValueError, r"mask must be \(nW, N, N\) = \(nW, 16, 16\), got \(4, 16, 8\)"),
        (3, 3, ValueError, "C = 8 channels are not divisible by num_heads = 3"),
        (3, 0, ValueError, "num_heads must be a positive int, got 0"),
        (4, float("inf"), ValueError, "scale must be a finite real number, got inf"),
        (5, 1.5, ValueError, r"dropout_p must be a probability in \[0, 1\], got 1.5"),
        (5, -0.1, ValueError, r"dropout_p must be a probability in \[0, 1\], got -0.1"),
        (6, (8, 8), TypeError, r"shifted_grid must be a tuple \(H, W, shift\) or None, got \(8, 8\)"),
        (6, (8, 8.0, 2), TypeError, "shifted_grid: W must be an int, got float"),
        (6, (8, 6, 2), ValueError, "shifted_grid: H and W must be positive multiples of the window size 4, got H=8, W=6"),
        (6, (8, 8, 4), ValueError, r"shifted_grid: shift must be in 1 \.\. window size - 1 = 3, got 4"),
        (6, (12, 12, 2), ValueError, r"shifted_grid: nW = 9 windows of a 12x12 map does not divide qkv's B\*nW = 4"),
    ],
}


def test_every_op_declares_bad_argument_cases():
    assert set(BAD_ARGS) == set(OPS)  # a new op adds its cases here


@pytest.mark.parametrize("op,i,bad,exc,words", [(op, *case) for op, cases in BAD_ARGS.items() for case in cases])
def test_bad_arguments_give_the_same_error_on_every_backend(op, i, bad, exc, words, monkeypatch):
    """Checked before dispatch: the precise error, whatever the backend (and the real registry)."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    good = _args(op)
    args = _swap(good, i, bad(good[i]) if callable(bad) else bad)
    messages = set()
    for backend in ("auto", "reference", "fused", None):
        with pytest.raises(exc, match=words) as info:
            getattr(htsat_kernels, op)(*args, backend=backend)
        assert type(info.value) is exc, backend  # never BackendUnavailable or an incidental error
        messages.add(str(info.value))
    with htsat_kernels.use_backend("fused"):
        with pytest.raises(exc, match=words):
            getattr(htsat_kernels, op)(*args)
    assert len(messages) == 1, messages


# --------------------------------------------------------------------------------------------
# attention dropout: an argument of the op, which the fused kernel declines
# --------------------------------------------------------------------------------------------


def test_attention_dropout_is_declined_by_the_fused_kernel(monkeypatch, no_cpu_path):
    impl = backends._fused["window_attention"]
    if not isinstance(impl, FusedImpl):
        pytest.skip(f"fused window attention unavailable: {impl}")
    calls = []

    def run(*args):
        calls.append(args)
        return reference.window_attention(*args)

    # the real capability check, with auto allowed on CPU so that only the dropout decides
    monkeypatch.setitem(backends._fused, "window_attention", FusedImpl(run, impl.unsupported, auto_on_cpu=True))
    qkv, table, mask, heads, scale, _ = _args("window_attention")
    assert "dropout" in impl.unsupported(qkv, table, mask, heads, scale, 0.5)
    with pytest.raises(BackendUnavailable, match=r"window_attention .*no attention dropout \(dropout_p=0.5\)"):
        htsat_kernels.window_attention(qkv, table, mask, heads, scale, 0.5, backend="fused")
    torch.manual_seed(1)
    got = htsat_kernels.window_attention(qkv, table, mask, heads, scale, 0.5, backend="auto")
    torch.manual_seed(1)
    want = reference.window_attention(qkv, table, mask, heads, scale, 0.5)
    assert not calls and torch.equal(got, want)  # auto fell back to the reference's dropout
    assert not torch.equal(got, reference.window_attention(qkv, table, mask, heads, scale))
    htsat_kernels.window_attention(qkv, table, mask, heads, scale, 0.0, backend="auto")
    assert len(calls) == 1  # without dropout auto takes the fused kernel


def test_window_attention_module_uses_the_public_op_with_dropout(fakes, monkeypatch):
    seen = _count_dispatches(monkeypatch)
    attn = WindowAttention(dim=8, window_size=4, num_heads=2, attn_drop=0.5)
    x = torch.randn(4, 16, 8)
    attn.train()
    attn(x, None)
    attn.eval()
    attn(x, None)
    assert seen == {"window_attention": 2}  # through dispatch in training too, no direct reference call
