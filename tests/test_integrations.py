"""htsat_kernels.integrations: other projects' HTS-AT models patched in place onto htsat_kernels ops.

Patched vs unpatched: outputs and gradients (input and every parameter) equal to 1e-4 in fp32 on the
reference and the fused backends (C++ twins; Triton attention in the interpreter, so tiny configs),
for transformers' CLAP audio models, laion-clap's HTSAT audio branch and CLAP model, and the
original HTS-AT module; undo restores the original forwards; state_dict keys are kept.
"""

import contextlib
import copy
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
from original_htsat import build_original, load_original_module
from torch import nn

import htsat
import htsat_kernels as hk
import htsat_kernels.integrations as hki

# transformers' import checks torchvision's import spec, which the torchvision stub of
# original_htsat (installed when the original is first loaded) lacks: import it first, at collection.
with contextlib.suppress(ImportError):
    import transformers  # noqa: F401

TOL = dict(rtol=1e-4, atol=1e-4)


def _perturb(model: nn.Module, seed: int = 1) -> None:
    """Move parameters (zero biases, unit norms, zero bias tables) and BatchNorm statistics off their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _outputs(out) -> dict:
    if isinstance(out, dict):
        items = out.items()
    elif isinstance(out, torch.Tensor):
        items = [("out", out)]
    else:  # a transformers ModelOutput
        items = out.items()
    return {k: v for k, v in items if isinstance(v, torch.Tensor)}


def _run(model, make_input, train: bool, seed: int = 3):
    """Outputs, and in training the gradients of a fixed projection of them w.r.t. input and parameters."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = make_input()
    torch.manual_seed(seed)  # same dropout / drop-path / SpecAugment draws in both runs
    with torch.set_grad_enabled(train):
        if train:
            x.requires_grad_(True)
        outs = _outputs(model(x))
    grads = {}
    if train:
        g = torch.Generator().manual_seed(4)
        loss = sum((v * torch.randn(v.shape, generator=g)).sum() for _, v in sorted(outs.items()))
        loss.backward()
        grads = {"input": x.grad}
        grads.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return {k: v.detach() for k, v in outs.items()}, grads


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        # 1e-4 of the tensor's scale (gradients sum many terms, in another order on the fused kernels)
        atol = TOL["atol"] * max(1.0, a[k].abs().max().item())
        torch.testing.assert_close(b[k], a[k], rtol=TOL["rtol"], atol=atol, msg=lambda m, k=k: f"{what} {k}: {m}")


def _check_patch(model, make_input, backend: str, train: bool, patch=hki.patch_clap):
    before_keys = list(model.state_dict().keys())
    want_out, want_grad = _run(model, make_input, train)
    handle = patch(model)
    try:
        assert list(model.state_dict().keys()) == before_keys
        with hk.use_backend(backend):
            got_out, got_grad = _run(model, make_input, train)
    finally:
        handle.undo()
    _assert_same(want_out, got_out, "output")
    if train:
        assert len(want_grad) > 10
        _assert_same(want_grad, got_grad, "gradient")
    return handle


# -------------------------------------------------------------------------------------------------
# transformers CLAP
# -------------------------------------------------------------------------------------------------


def _hf_audio_config(**kw):
    tf = pytest.importorskip("transformers")
    # docs/model.md §32 with 8 mel bins: an 8 x 8 patch grid; window 4: stage 0 shifted (2 x 2 windows),
    # stage 1 (4 x 4) is a single window with shift 0. window 3 pads both stages (9 x 9, 6 x 6).
    base = dict(
        spec_size=32,
        num_mel_bins=8,
        window_size=4,
        depths=[2, 2],
        num_attention_heads=[2, 4],
        patch_embeds_hidden_size=16,
        hidden_size=32,
        projection_dim=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    base.update(kw)
    return tf.ClapAudioConfig(**base)


def _hf_features():
    return torch.randn(2, 1, 20, 8, generator=torch.Generator().manual_seed(5))


def _hf_model(cls_name: str, **kw):
    tf = pytest.importorskip("transformers")
    audio = _hf_audio_config(**kw)
    torch.manual_seed(0)
    if cls_name == "ClapModel":
        text = tf.ClapTextConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=16,
            projection_dim=8,
        )
        model = tf.ClapModel(tf.ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=8))
    else:
        model = getattr(tf, cls_name)(audio)
    _perturb(model)
    return model


class _AudioFeatures(nn.Module):
    """ClapModel.get_audio_features as a forward, so _run can drive it."""

    def __init__(self, clap):
        super().__init__()
        self.clap = clap

    def forward(self, x):
        return self.clap.get_audio_features(input_features=x).pooler_output


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "cls_name, backend, overrides",
    [
        ("ClapAudioModelWithProjection", "reference", {}),
        # dropout and drop path on: the patched model draws the same random numbers in the same order
        (
            "ClapAudioModelWithProjection",
            "reference",
            dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, drop_path_rate=0.2),
        ),
        ("ClapAudioModelWithProjection", "reference", dict(window_size=3)),  # zero padding to the window
        ("ClapAudioModel", "reference", {}),
        ("ClapAudioModel", "fused", dict(enable_patch_layer_norm=False)),  # blocks get a transposed view
        ("ClapAudioModelWithProjection", "fused", {}),
        ("ClapAudioModelWithProjection", "fused", dict(hidden_dropout_prob=0.1, drop_path_rate=0.2)),
    ],
)
def test_transformers_patched_matches_unpatched(cls_name, backend, overrides, train):
    model = _hf_model(cls_name, **overrides)
    handle = _check_patch(model, _hf_features, backend, train)
    assert handle.counts == {"blocks": 4, "patch merges": 1}


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_transformers_clap_model_audio_branch(backend):
    clap = _hf_model("ClapModel")
    text_forwards = [m.forward for m in clap.text_model.modules()]
    wrapper = _AudioFeatures(clap)
    before = list(clap.state_dict())
    want_out, want_grad = _run(wrapper, _hf_features, train=True)
    with hki.patch_clap(clap) as handle, hk.use_backend(backend):
        assert handle.counts == {"blocks": 4, "patch merges": 1}
        assert [m.forward for m in clap.text_model.modules()] == text_forwards  # the text branch is untouched
        assert list(clap.state_dict()) == before
        got_out, got_grad = _run(wrapper, _hf_features, train=True)
    _assert_same(want_out, got_out, "output")
    _assert_same(want_grad, got_grad, "gradient")


def test_transformers_mask_equals_get_attn_mask():
    """The patched layer passes its shifted grid; the mask the op builds from it (in the fused kernel too:
    test_window_attention) is transformers' get_attn_mask."""
    layer = _hf_model("ClapAudioModel", window_size=4).audio_encoder.layers[0].blocks[1]
    assert layer.shift_size == 2
    for H, W in [(8, 8), (8, 16), (12, 8)]:
        want = layer.get_attn_mask(H, W, torch.float32, torch.device("cpu"))
        assert torch.equal(hk.reference.shifted_window_mask(H, W, 4, 2), want)


def test_transformers_output_attentions_runs_the_original():
    model = _hf_model("ClapAudioModel").eval()
    x = _hf_features()
    with torch.no_grad():
        want = model(x, output_attentions=True)
        with hki.patch_clap(model):
            got = model(x, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) > 0
    torch.testing.assert_close(got.pooler_output, want.pooler_output, **TOL)


# -------------------------------------------------------------------------------------------------
# laion-clap / original HTS-AT
# -------------------------------------------------------------------------------------------------


def _tiny_laion_branch(**kw):
    """laion-clap's HTSAT_Swin_Transformer at a tiny size: 16 x 16 patches, window 4, three stages
    (shifted 4 x 4 windows, shifted 2 x 2, then one 4 x 4 window with shift 0)."""
    module = load_original_module()
    audio_cfg = SimpleNamespace(
        sample_rate=16000, window_size=256, hop_size=64, mel_bins=16, fmin=50, fmax=8000, class_num=5, model_name="tiny"
    )
    args = dict(
        spec_size=64,
        patch_size=4,
        patch_stride=(4, 4),
        num_classes=5,
        embed_dim=16,
        depths=[2, 2, 2],
        num_heads=[2, 4, 8],
        window_size=4,
        drop_path_rate=0.0,
        config=audio_cfg,
    )
    args.update(kw)
    torch.manual_seed(0)
    model = module.HTSAT_Swin_Transformer(**args)
    _perturb(model)
    return model


class _WaveformInput(nn.Module):
    """The original takes {"waveform": x}: a plain-tensor forward for _run."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner({"waveform": x})


def _waveform(seconds: float = 0.4, sample_rate: int = 16000, batch: int = 2):
    g = torch.Generator().manual_seed(6)
    return 0.1 * torch.randn(batch, int(seconds * sample_rate), generator=g)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "backend, overrides",
    [
        ("reference", {}),
        ("reference", dict(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)),
        ("fused", {}),
        ("fused", dict(drop_path_rate=0.2)),
    ],
)
def test_laion_htsat_patched_matches_unpatched(backend, overrides, train):
    branch = _tiny_laion_branch(**overrides)
    handle = _check_patch(_WaveformInput(branch), _waveform, backend, train, patch=lambda m: hki.patch_clap(m.inner))
    assert handle.counts == {"blocks": 6, "patch merges": 2, "stages": 3}


def test_laion_htsat_shifted_blocks_pass_their_grid(monkeypatch):
    """Patched shifted blocks give the op their grid while attn_mask is the grid's own mask, the buffer
    once it has been changed (a load into it), and the same outputs either way."""
    branch = _tiny_laion_branch().eval()
    x = _waveform()
    with torch.no_grad():
        want = _WaveformInput(branch)(x)
    hki.patch_clap(branch)
    seen = []
    real = hk.window_attention

    def spy(qkv, table, mask, heads, scale, dropout_p=0.0, shifted_grid=None, **kw):
        seen.append((mask is None, shifted_grid))
        return real(qkv, table, mask, heads, scale, dropout_p, shifted_grid, **kw)

    monkeypatch.setattr(hk, "window_attention", spy)
    with torch.no_grad():
        got = _WaveformInput(branch)(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    grids = [g for none, g in seen if g is not None]
    assert len(grids) == 2 and all(none for none, g in seen if g is not None) and {g[2] for g in grids} == {2}
    block = next(b for b in branch.modules() if type(b).__name__ == "SwinTransformerBlock" and b.shift_size > 0)
    with torch.no_grad():
        block.attn_mask.mul_(2.0)  # in place, as load_state_dict writes a buffer: no longer the grid's mask
    seen.clear()
    with torch.no_grad():
        _WaveformInput(branch)(x)
    assert sum(1 for none, g in seen if g is None and not none) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_laion_htsat_half_blocks_still_pass_their_grid(dtype):
    """A model cast with .half() / .bfloat16() casts attn_mask too; it still holds the grid's mask (0 and
    -100 are exact), so the patched block passes the grid, until the buffer is changed."""
    from htsat_kernels.integrations.laion_clap import _mask_is_the_grids

    branch = _tiny_laion_branch().to(dtype)
    block = next(b for b in branch.modules() if type(b).__name__ == "SwinTransformerBlock" and b.shift_size > 0)
    assert block.attn_mask.dtype == dtype and _mask_is_the_grids(block)
    with torch.no_grad():
        block.attn_mask[0, 0, 1] = -100.0  # in place, as load_state_dict writes a buffer
    assert not _mask_is_the_grids(block)


def test_laion_htsat_use_checkpoint_trains():
    """The original's use_checkpoint path passes (x, attn) tuples on and fails; patched it works."""
    plain = _tiny_laion_branch()
    ckpt = _tiny_laion_branch(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    want_out, want_grad = _run(_WaveformInput(plain), _waveform, train=True)
    with hki.patch_laion_clap(ckpt), hk.use_backend("reference"):
        got_out, got_grad = _run(_WaveformInput(ckpt), _waveform, train=True)
    _assert_same(want_out, got_out, "output")
    _assert_same(
        {k.replace("inner.", ""): v for k, v in want_grad.items()},
        {k.replace("inner.", ""): v for k, v in got_grad.items()},
        "gradient",
    )


def _laion_clap_model():
    """laion-clap's CLAP (clap_module/model.py) with its create_htsat_model HTSAT-tiny audio branch and a
    tiny text transformer of its own code: no download."""
    pytest.importorskip("transformers")  # model.py imports it
    original = load_original_module()
    name = "_orig_htsat_pkg.model"
    if name not in sys.modules:
        folder = original.__file__.rsplit("/", 1)[0]
        spec = importlib.util.spec_from_file_location(name, folder + "/model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    model_py = sys.modules[name]
    audio_cfg = model_py.CLAPAudioCfp(
        model_type="HTSAT",
        model_name="tiny",
        sample_rate=16000,
        window_size=512,
        hop_size=160,
        fmin=50,
        fmax=8000,
        class_num=527,
        mel_bins=64,
    )
    text_cfg = model_py.CLAPTextCfg(context_length=8, vocab_size=50, width=16, heads=2, layers=1, model_type="transformer")
    torch.manual_seed(0)
    clap = model_py.CLAP(embed_dim=768, audio_cfg=audio_cfg, text_cfg=text_cfg, joint_embed_shape=32)
    _perturb(clap)
    return clap


def test_laion_clap_model_and_module():
    clap = _laion_clap_model().eval()

    class CLAP_Module(nn.Module):  # laion_clap.hook's wrapper (its module imports wget, librosa): same shape
        def __init__(self, model):
            super().__init__()
            self.model = model

    wrapper = CLAP_Module(clap)
    x = _waveform(seconds=1.0, batch=1)
    before = list(wrapper.state_dict())
    with torch.no_grad():
        want = clap.get_audio_embedding([{"waveform": x[0]}])
        with hki.patch_clap(wrapper) as handle:  # "auto": the C++ twins on CPU, reference attention
            assert handle.counts == {"blocks": 12, "patch merges": 3, "stages": 4}
            assert list(wrapper.state_dict()) == before
            got = clap.get_audio_embedding([{"waveform": x[0]}])
    torch.testing.assert_close(got, want, **TOL)
    assert want.shape == (1, 32)


def test_original_htsat_module():
    """A module of the original HTS-AT code, built from one of our configs (tests/original_htsat.py)."""
    cfg = htsat.load_config("htsat-audioset", **dict(htsat.TINY_OVERRIDES, num_classes=10))
    orig = build_original(cfg, drop_path_rate=0.0)
    _perturb(orig)
    handle = _check_patch(
        _WaveformInput(orig),
        lambda: _waveform(1.0, cfg.sample_rate, 1),
        "fused",
        train=True,
        patch=lambda m: hki.patch_htsat_original(m.inner),
    )
    assert handle.counts == {"blocks": 8, "patch merges": 3, "stages": 4}


# -------------------------------------------------------------------------------------------------
# The handle, recognition, dispatch
# -------------------------------------------------------------------------------------------------


def _models():
    yield "laion", _tiny_laion_branch(), lambda m: m({"waveform": _waveform()})["clipwise_output"]
    if importlib.util.find_spec("transformers") is not None:
        yield "transformers", _hf_model("ClapAudioModelWithProjection"), lambda m: m(_hf_features()).audio_embeds


@pytest.mark.parametrize("which", ["laion", "transformers"])
def test_undo_restores_the_original_forwards(which):
    if which == "transformers":
        pytest.importorskip("transformers")
    name, model, call = dict((n, (n, m, c)) for n, m, c in _models())[which]
    model.eval()
    with torch.no_grad():
        before = call(model)
        handle = hki.patch_clap(model)
        assert handle.active and all(m.forward.__self__ is m for m in model.modules())
        patched = [m for m in model.modules() if "forward" in m.__dict__]
        assert len(patched) == sum(handle.counts.values())
        with hk.use_backend("reference"):
            torch.testing.assert_close(call(model), before, **TOL)
        handle.undo()
        handle.undo()  # idempotent
        assert not handle.active
        assert all("forward" not in m.__dict__ for m in model.modules())
        assert all(m.forward.__func__ is type(m).forward for m in model.modules())
        assert torch.equal(call(model), before)


def test_patched_model_state_dict_and_deepcopy():
    model = _tiny_laion_branch().eval()
    plain = copy.deepcopy(model)
    with hki.patch_clap(model):
        sd = model.state_dict()
        assert list(sd) == list(plain.state_dict())
        plain.load_state_dict(sd, strict=True)
        twin = copy.deepcopy(model)  # forwards bound to the copy's own modules
        assert all(m.forward.__self__ is m for m in twin.modules())
        with torch.no_grad():
            twin.layers[0].blocks[0].attn.qkv.weight.mul_(2.0)
            x = {"waveform": _waveform()}
            assert not torch.equal(twin(x)["embedding"], model(x)["embedding"])
            torch.testing.assert_close(model(x)["embedding"], plain(x)["embedding"], **TOL)


def test_patched_model_calls_the_public_ops_without_a_backend(monkeypatch):
    """The backend choice (use_backend, HTSAT_KERNELS_BACKEND) reaches the ops: none is forced."""
    calls = []
    for op in ("layer_norm_window_partition", "window_attention", "window_merge_add", "patch_merge"):
        real = getattr(hk, op)

        def spy(*args, _op=op, _real=real, **kwargs):
            calls.append((_op, kwargs.get("backend")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(hk, op, spy)
    model = _tiny_laion_branch().eval()
    with hki.patch_clap(model), torch.no_grad():
        model({"waveform": _waveform()})
    assert {op for op, _ in calls} == {"layer_norm_window_partition", "window_attention", "window_merge_add", "patch_merge"}
    assert all(backend is None for _, backend in calls)
    assert len(calls) == 3 * 6 + 2


def test_env_backend_fused_runs_the_fused_ops(monkeypatch):
    """HTSAT_KERNELS_BACKEND=fused: a call the fused attention cannot take raises instead of falling back."""
    model = _tiny_laion_branch().eval().double()  # float64 runs fused; a requires-grad mask does not
    model.layers[0].blocks[1].attn_mask.requires_grad_(True)
    monkeypatch.setenv("HTSAT_KERNELS_BACKEND", "fused")
    with hki.patch_clap(model), torch.no_grad(), pytest.raises(hk.BackendUnavailable, match="mask requires grad"):
        model({"waveform": _waveform().double()})


def test_unrecognised_models_are_refused():
    with pytest.raises(TypeError, match=r"patch_clap: unrecognised model type torch\.nn\.modules\.linear\.Linear"):
        hki.patch_clap(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="patch_transformers_clap: unrecognised model type .*HTSAT_Swin_Transformer"):
        hki.patch_transformers_clap(_tiny_laion_branch())
    with pytest.raises(TypeError, match="patch_htsat_original: unrecognised model type htsat.model"):
        hki.patch_htsat_original(htsat.create_model("htsat-audioset", **htsat.TINY_OVERRIDES))


def test_patching_twice_is_refused():
    model = _tiny_laion_branch()
    with hki.patch_clap(model):
        with pytest.raises(RuntimeError, match="already patched"):
            hki.patch_clap(model)
    hki.patch_clap(model).undo()  # fine again once undone
