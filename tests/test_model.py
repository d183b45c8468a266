"""The HTS-AT model against docs/model.md (§2-8 and §11): structure, shapes, outputs, any length, bad input.

Almost everything runs on the tiny config (16 kHz, 5 s clips, 128x128 image, every structural
feature of the real model); the real AudioSet shapes are checked on one module-wide model.
"""

from __future__ import annotations

import ast
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import htsat
import htsat_kernels

DATA = os.path.join(os.path.dirname(__file__), "data")


def tiny(name: str = "htsat-audioset", backend: str = "reference", **overrides) -> htsat.HTSAT:
    """The tiny model (10 classes) on the reference backend: deterministic, independent of the fused kernels."""
    return htsat.create_model(name, backend=backend, **{**htsat.TINY_OVERRIDES, "num_classes": 10, **overrides})


def noise(batch: int, samples: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, samples, generator=g)


def tiny_samples(model: htsat.HTSAT, seconds: float) -> int:
    return int(round(seconds * model.config.sample_rate))


@pytest.fixture(scope="module")
def audioset():
    """The real AudioSet model (527 classes, 32 kHz), eval mode; shared, never modified."""
    torch.manual_seed(0)
    return htsat.create_model("htsat-audioset", backend="reference").eval()


# --------------------------------------------------------------------------------------------
# structure: state_dict, parameter counts, relative position index, attention masks
# --------------------------------------------------------------------------------------------


def _golden_rows():
    rows = []
    with open(os.path.join(DATA, "htsat_state_dict_keys.tsv")) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            key, shape, dtype, kind, requires_grad = line.split("\t")
            rows.append((key, tuple(ast.literal_eval(shape)), dtype, kind, requires_grad))
    return rows


def test_state_dict_keys_order_shapes_dtypes_equal_golden_file(audioset):
    want = _golden_rows()
    assert len(want) == 200
    params = dict(audioset.named_parameters())
    got = []
    for key, value in audioset.state_dict(keep_vars=True).items():
        kind = "param" if key in params else "buffer"
        rg = str(value.requires_grad) if kind == "param" else ""
        got.append((key, tuple(value.shape), str(value.dtype), kind, rg))
    assert [r[0] for r in got] == [r[0] for r in want]  # same keys in the same order
    for g, w in zip(got, want):
        assert g == w, f"{g} != golden {w}"
    assert sum(r[3] == "param" for r in got) == 180
    assert sum(r[3] == "buffer" for r in got) == 20


def _counts(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def test_parameter_counts_audioset(audioset):
    assert _counts(audioset) == (31_325_143, 30_241_687)
    groups = {
        "spectrogram_extractor": 1_050_624,
        "logmel_extractor": 32_832,
        "bn0": 128,
        "patch_embed": 1_824,
        "layers.0": 299_976,
        "layers.1": 1_189_776,
        "layers.2": 11_851_104,
        "layers.3": 14_190_144,
        "norm": 1_536,
        "tscam_conv": 2_428_943,
        "head": 278_256,
    }
    for prefix, n in groups.items():
        got = sum(p.numel() for k, p in audioset.named_parameters() if k.startswith(prefix + "."))
        assert got == n, prefix


def test_parameter_counts_esc50_and_scv2():
    esc = htsat.create_model("htsat-esc50")
    assert _counts(esc)[0] == 28_850_944
    del esc
    with pytest.warns(UserWarning, match="fmax"):
        scv2 = htsat.create_model("htsat-scv2")
    assert _counts(scv2)[0] == 28_780_519


def test_relative_position_index_formula_all_pairs(audioset):
    want = torch.empty(64, 64, dtype=torch.int64)
    for i in range(64):
        hi, wi = divmod(i, 8)
        for j in range(64):
            hj, wj = divmod(j, 8)
            want[i, j] = (hi - hj + 7) * 15 + (wi - wj + 7)
    assert int(want.min()) == 0 and int(want.max()) == 224
    blocks = [b for layer in audioset.layers for b in layer.blocks]
    assert len(blocks) == 12
    for blk in blocks:
        idx = blk.attn.relative_position_index
        assert idx.dtype == torch.int64
        assert torch.equal(idx, want)
        assert blk.attn.relative_position_bias_table.shape == (225, blk.num_heads)


def _expected_mask(H: int, W: int, ws: int = 8, shift: int = 4) -> torch.Tensor:
    """The original's SW-MSA mask built the slow, obvious way (docs/model.md §4.3)."""

    def region(y: int, n: int) -> int:
        return 0 if y < n - ws else (1 if y < n - shift else 2)

    masks = []
    for wr in range(H // ws):
        for wc in range(W // ws):
            labels = torch.tensor([region(wr * ws + r, H) * 3 + region(wc * ws + c, W) for r in range(ws) for c in range(ws)])
            diff = labels[None, :] != labels[:, None]
            masks.append(torch.where(diff, -100.0, 0.0))
    return torch.stack(masks)


def test_attention_masks_and_shifts(audioset):
    want_windows = {0: 64, 1: 16, 2: 4}
    for i, layer in enumerate(audioset.layers):
        H = 64 // 2**i
        for j, blk in enumerate(layer.blocks):
            assert blk.input_resolution == (H, H)
            assert blk.window_size == 8
            if i == 3 or j % 2 == 0:
                # stage 4 (8x8 = one window) never shifts; even blocks are plain W-MSA
                assert blk.shift_size == 0
                assert blk.attn_mask is None
                continue
            assert blk.shift_size == 4
            mask = blk.attn_mask
            assert mask.shape == (want_windows[i], 64, 64)
            assert mask.dtype == torch.float32
            assert set(mask.unique().tolist()) == {0.0, -100.0}
            assert torch.equal(mask, _expected_mask(H, H))
    # stage 1: exactly the 15 windows of the last window row or column hold any -100
    mask = audioset.layers[0].blocks[1].attn_mask
    masked = {w for w in range(64) if bool((mask[w] != 0).any())}
    assert len(masked) == 15
    assert masked == {w for w in range(64) if w // 8 == 7 or w % 8 == 7}
    assert [k for k in audioset.state_dict() if k.endswith("attn_mask")] == [
        "layers.0.blocks.1.attn_mask",
        "layers.1.blocks.1.attn_mask",
        "layers.2.blocks.1.attn_mask",
        "layers.2.blocks.3.attn_mask",
        "layers.2.blocks.5.attn_mask",
    ]


def test_shifted_blocks_pass_their_grid_while_the_buffer_is_its_mask(audioset):
    """The op gets (H, W, shift) instead of the attn_mask buffer (same outputs, bit for bit) until a
    load_state_dict puts a different mask in the buffer, which is then honoured."""
    import copy

    blk = copy.deepcopy(audioset.layers[1].blocks[1])  # 32x32 map, 16 windows
    assert blk.mask_is_grid and not audioset.layers[1].blocks[0].mask_is_grid
    calls = []
    attend = blk.attn.attend  # attention + proj from qkv, called by the block
    blk.attn.attend = lambda q, m, g=None, save_probs=True: calls.append((m, g)) or attend(q, m, g, save_probs)
    x = torch.randn(2, 32 * 32, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        by_grid = blk(x)
        assert calls[-1] == (None, (32, 32, 4))
        blk.mask_is_grid = False
        by_buffer = blk(x)
        assert calls[-1][0] is blk.attn_mask and calls[-1][1] is None
    assert torch.equal(by_grid, by_buffer)
    sd = {k: v.clone() for k, v in blk.state_dict().items()}  # state_dict() shares the live buffers
    blk.load_state_dict(sd)
    assert blk.mask_is_grid  # rechecked after loading: still the grid's mask
    changed = sd["attn_mask"].clone()
    changed[0, 0, 1] = -100.0
    blk.load_state_dict({**sd, "attn_mask": changed})
    assert not blk.mask_is_grid
    with torch.no_grad():
        out = blk(x)
    assert calls[-1][0] is blk.attn_mask and torch.equal(blk.attn_mask, changed)
    assert not torch.equal(out, by_grid)
    blk.load_state_dict(sd)
    assert blk.mask_is_grid


def test_a_mask_that_requires_grad_is_passed_and_gets_its_gradient(audioset):
    """A user who trains the mask (requires_grad on the buffer) gets it passed, so its gradient flows."""
    import copy

    blk = copy.deepcopy(audioset.layers[1].blocks[1])
    blk.attn_mask.requires_grad_(True)
    x = torch.randn(1, 32 * 32, 192, generator=torch.Generator().manual_seed(0))
    with htsat_kernels.use_backend("reference"):
        blk(x).square().sum().backward()
    assert blk.attn_mask.grad is not None and blk.attn_mask.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_model_still_passes_its_grid(audioset, dtype):
    """A model cast with .half() / .bfloat16() casts its mask buffer too; the buffer still holds the grid's
    values (0 and -100 are exact in every float dtype), so the op gets the grid (the fused kernel computes
    the mask) with the same outputs as passing the buffer; a changed mask in that dtype is honoured."""
    import copy

    blk = copy.deepcopy(audioset.layers[1].blocks[1]).to(dtype)
    assert blk.attn_mask.dtype == dtype and blk.mask_is_grid
    calls = []
    attend = blk.attn.attend  # attention + proj from qkv, called by the block
    blk.attn.attend = lambda q, m, g=None, save_probs=True: calls.append((m, g)) or attend(q, m, g, save_probs)
    x = torch.randn(2, 32 * 32, 192, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad(), htsat_kernels.use_backend("reference"):
        by_grid = blk(x)
        assert calls[-1] == (None, (32, 32, 4))
        blk.mask_is_grid = False
        by_buffer = blk(x)
        assert calls[-1][0] is blk.attn_mask
        assert torch.equal(by_grid, by_buffer)
        sd = {k: v.clone() for k, v in blk.state_dict().items()}
        blk.load_state_dict(sd)
        assert blk.mask_is_grid
        changed = sd["attn_mask"].clone()
        changed[0, 0, 1] = -100.0
        blk.load_state_dict({**sd, "attn_mask": changed})
        assert not blk.mask_is_grid
        blk(x)
        assert calls[-1][0] is blk.attn_mask and calls[-1][1] is None


# --------------------------------------------------------------------------------------------
# time-frequency folding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["audioset", "tiny"])
def test_reshape_wav2img_identity(which, audioset):
    model = audioset if which == "audioset" else tiny()
    cfg = model.config
    T_in = 1 + int(cfg.clip_seconds * cfg.sample_rate) // cfg.hop_length  # 1001 / 501
    B, Fb, T, R = 2, cfg.mel_bins, cfg.max_frames, cfg.freq_ratio
    chunk = T // R
    x = torch.randn(B, 1, T_in, Fb)
    img = model.reshape_wav2img(x)
    assert img.shape == (B, 1, cfg.spec_size, cfg.spec_size)
    stretched = F.interpolate(x, (T, Fb), mode="bicubic", align_corners=True)
    c, f, t = torch.meshgrid(torch.arange(R), torch.arange(Fb), torch.arange(chunk), indexing="ij")
    assert torch.equal(img[:, 0, c * Fb + f, t], stretched[:, 0, c * chunk + t, f])
    # the stretch keeps the end points (align_corners=True): first and last frames are untouched
    assert torch.equal(img[:, 0, :Fb, 0], x[:, 0, 0, :])
    assert torch.equal(img[:, 0, (R - 1) * Fb :, chunk - 1], x[:, 0, -1, :])


def test_reshape_wav2img_full_image_is_a_pure_permutation():
    model = tiny()
    cfg = model.config
    x = torch.randn(1, 1, cfg.max_frames, cfg.mel_bins)
    img = model.reshape_wav2img(x)
    assert torch.equal(img.flatten().sort().values, x.flatten().sort().values)
    with pytest.raises(ValueError, match="exceeds"):
        model.reshape_wav2img(torch.randn(1, 1, cfg.max_frames + 1, cfg.mel_bins))


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


def test_audioset_outputs_for_10s(audioset):
    B, C = 2, 527
    x = noise(B, 320000)
    captured = {}
    handle = audioset.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", o))
    inner = audioset.forward_features
    audioset.forward_features = lambda img: captured.setdefault("feats", inner(img))
    try:
        with torch.no_grad():
            out = audioset(x)
    finally:
        handle.remove()
        del audioset.forward_features
    assert set(out) == {"framewise_output", "clipwise_output", "latent_output", "clipwise_logits"}
    assert out["framewise_output"].shape == (B, 1024, C)
    assert out["clipwise_output"].shape == (B, C)
    assert out["latent_output"].shape == (B, 768)
    assert out["clipwise_logits"].shape == (B, C)
    assert torch.equal(out["clipwise_output"], torch.sigmoid(out["clipwise_logits"]))
    fw = out["framewise_output"]
    assert ((fw > 0) & (fw < 1)).all()
    # nearest repeat of 32 steps: rows 32j..32j+31 are equal
    steps = fw.view(B, 32, 32, C)
    assert torch.equal(steps, steps[:, :, :1].expand_as(steps))
    # clipwise logit = mean over the 32 steps of logit(framewise), i.e. of the tscam logits
    logit_steps = torch.logit(fw[:, ::32].double())
    torch.testing.assert_close(logit_steps.mean(dim=1), out["clipwise_logits"].double(), atol=1e-4, rtol=1e-4)
    # sigmoid of the MEAN logit, not the mean of the framewise probabilities
    assert not torch.allclose(out["clipwise_output"], fw.mean(dim=1), atol=1e-6)
    # latent = mean of the 64 final tokens
    assert captured["tokens"].shape == (B, 64, 768)
    torch.testing.assert_close(out["latent_output"], captured["tokens"].mean(dim=1), atol=1e-6, rtol=1e-5)
    # the same numbers straight from forward_features
    feats = captured["feats"]
    assert feats["logits_map"].shape == (B, C, 32)
    torch.testing.assert_close(feats["clipwise_logits"], out["clipwise_logits"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.sigmoid(feats["logits_map"]).transpose(1, 2), fw[:, ::32], atol=1e-6, rtol=1e-6)


def test_clip_ce_outputs_raw_mean_logits():
    model = tiny("htsat-esc50", num_classes=None).eval()
    assert model.config.loss_type == "clip_ce" and model.config.num_classes == 50
    with torch.no_grad():
        out = model(noise(2, 80000))
    assert out["clipwise_output"].shape == (2, 50)
    assert torch.equal(out["clipwise_output"], out["clipwise_logits"])
    # framewise stays a probability
    assert ((out["framewise_output"] > 0) & (out["framewise_output"] < 1)).all()


def test_tiny_output_shapes_and_framewise_steps():
    model = tiny().eval()
    cfg = model.config
    assert cfg.max_frames == 512 and cfg.num_features == 192
    with torch.no_grad():
        out = model(noise(3, 80000))
    assert out["framewise_output"].shape == (3, 512, 10)
    assert out["latent_output"].shape == (3, 192)
    fw = out["framewise_output"].view(3, 16, 32, 10)
    assert torch.equal(fw, fw[:, :, :1].expand_as(fw))
    torch.testing.assert_close(torch.logit(fw[:, :, 0].double()).mean(1), out["clipwise_logits"].double(), atol=1e-4, rtol=1e-4)


def test_clips_in_a_batch_are_independent_in_eval():
    model = tiny().eval()
    x = noise(3, 80000)
    with torch.no_grad():
        batched = model(x)
        single = model(x[1:2])
    for k in batched:
        torch.testing.assert_close(batched[k][1:2], single[k], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# training mode: SpecAugment, mixup
# --------------------------------------------------------------------------------------------


def _record_images(model):
    """Record the log-mel that reaches the folding step (after bn0, SpecAugment and mixup)."""
    seen = []
    inner = model._forward_image

    def wrapper(x, *args, **kwargs):
        seen.append(x.detach().clone())
        return inner(x, *args, **kwargs)

    model._forward_image = wrapper
    return seen


def test_spec_augment_only_in_training():
    model = tiny(drop_path_rate=0.0)
    seen = _record_images(model)
    x = noise(4, 80000)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    for k in a:
        assert torch.equal(a[k], b[k]), f"eval is not deterministic: {k}"
    assert int((seen[0] == 0).sum()) == 0  # no stripes in eval
    assert torch.equal(seen[0], seen[1])

    model.train()
    seen.clear()
    torch.manual_seed(1)
    out1 = model(x)
    torch.manual_seed(2)
    out2 = model(x)
    assert not torch.allclose(out1["clipwise_logits"], out2["clipwise_logits"])
    x_aug = seen[0][:, 0]  # (B, T, F)
    zeros = x_aug == 0
    assert zeros.any(), "SpecAugment set nothing to zero in training"
    time_rows = zeros.all(dim=2)  # (B, T): whole frames zeroed
    mel_cols = zeros.all(dim=1)  # (B, F): whole mel bins zeroed
    # every zero lies in a time stripe or a mel stripe
    assert torch.equal(zeros, time_rows[:, :, None] | mel_cols[:, None, :])
    # at most 2 stripes per axis of widths < 64 frames / < 8 bins
    assert int(time_rows.sum(dim=1).max()) <= 2 * 63
    assert int(mel_cols.sum(dim=1).max()) <= 2 * 7
    assert bool(time_rows.any()) and bool(mel_cols.any())


def test_spec_augment_stripes_direct():
    model = tiny()
    x = torch.ones(64, 1, 501, 32)
    y = model.spec_augment(x)
    assert y.shape == x.shape
    zeros = y[:, 0] == 0
    time_rows = zeros.all(dim=2)
    mel_cols = zeros.all(dim=1)
    assert torch.equal(zeros, time_rows[:, :, None] | mel_cols[:, None, :])
    assert torch.equal(y[~zeros.unsqueeze(1)], x[~zeros.unsqueeze(1)])
    # widths vary per sample
    assert len(set(time_rows.sum(1).tolist())) > 1
    assert int(mel_cols.sum(1).max()) <= 14 and int(time_rows.sum(1).max()) <= 126


def test_mixup_in_training_mixes_with_reversed_batch():
    model = tiny(drop_path_rate=0.0).train()
    model.spec_augment = lambda x: x
    x = noise(2, 80000)
    base = model(x)["clipwise_logits"]
    ones = model(x, mixup_lambda=torch.ones(2))["clipwise_logits"]
    zeros = model(x, mixup_lambda=torch.zeros(2))["clipwise_logits"]
    half = model(x, mixup_lambda=torch.full((2,), 0.5))["clipwise_logits"]
    torch.testing.assert_close(ones, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zeros, base.flip(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(half[0], half[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(half, base, atol=1e-4)
    # eval ignores mixup
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, mixup_lambda=torch.zeros(2))["clipwise_logits"], model(x)["clipwise_logits"])


@pytest.mark.parametrize("shape", [(3,), (2, 1), (1,), ()])
def test_mixup_lambda_shape_is_checked(shape):
    model = tiny().train()
    with pytest.raises(ValueError, match=r"mixup_lambda must have shape \(2,\)"):
        model(noise(2, 16000), mixup_lambda=torch.full(shape, 0.5))


# --------------------------------------------------------------------------------------------
# any length
# --------------------------------------------------------------------------------------------


def test_short_clip_is_stretched_to_one_image():
    model = tiny().eval()
    cfg = model.config
    S = tiny_samples(model, 2.0)
    with torch.no_grad():
        out = model(noise(2, S))
    assert out["framewise_output"].shape == (2, cfg.max_frames, 10)
    assert out["clipwise_output"].shape == (2, 10) and out["latent_output"].shape == (2, 192)
    assert model.frame_seconds(S) == pytest.approx(2.0 / cfg.max_frames)
    # the last sample count that still fits one image, and the first that does not
    S_fit = cfg.max_frames * cfg.hop_length - 1
    assert model.num_frames(S_fit) == cfg.max_frames
    with torch.no_grad():
        assert model(noise(1, S_fit))["framewise_output"].shape == (1, cfg.max_frames, 10)
        long = model(noise(1, S_fit + 1))
    assert long["framewise_output"].shape[1] == math.ceil((S_fit + 1) / cfg.sample_rate / model.frame_seconds(S_fit + 1))
    assert model.frame_seconds(S_fit + 1) == pytest.approx(cfg.clip_seconds / cfg.max_frames)


def test_long_clip_runs_sliding_windows():
    model = tiny().eval()
    cfg = model.config
    S = tiny_samples(model, 3.2 * cfg.clip_seconds)  # 16 s
    win = tiny_samples(model, cfg.clip_seconds)
    x = noise(2, S)
    starts = model.window_starts(S)
    assert starts[0] == 0 and starts[-1] + win == S
    assert all(0 < b - a <= tiny_samples(model, cfg.long_hop_seconds) for a, b in zip(starts, starts[1:]))
    with torch.no_grad():
        out = model(x)
        per_window = [model(x[:, s : s + win]) for s in starts]
    frame_sec = model.frame_seconds(S)
    assert frame_sec == pytest.approx(cfg.clip_seconds / cfg.max_frames)
    total = math.ceil(S / cfg.sample_rate / frame_sec)
    assert out["framewise_output"].shape == (2, total, 10)
    assert "latent_output" in out
    for key in ("clipwise_output", "clipwise_logits", "latent_output"):
        want = torch.stack([o[key] for o in per_window]).mean(0)
        torch.testing.assert_close(out[key], want, atol=1e-5, rtol=1e-5)
    fw = out["framewise_output"]
    # frames covered by the first window only equal that window's frames; same for the last window
    second = round(starts[1] / cfg.sample_rate / frame_sec)
    torch.testing.assert_close(fw[:, :second], per_window[0]["framewise_output"][:, :second], atol=1e-5, rtol=1e-5)
    # frames after the second-to-last window hold the last window's frames (its offset may round either way)
    prev_end = round(starts[-2] / cfg.sample_rate / frame_sec) + cfg.max_frames
    last_fw = per_window[-1]["framewise_output"]
    offsets = {round(starts[-1] / cfg.sample_rate / frame_sec), total - cfg.max_frames}
    end = total - 1  # the last (partial) frame is checked by test_long_clip_framewise_covers_every_frame
    assert prev_end < end
    assert any(
        torch.allclose(fw[:, prev_end:end], last_fw[:, prev_end - off : end - off], atol=1e-5, rtol=1e-5) for off in offsets
    )


@pytest.mark.parametrize(
    "seconds",
    [
        7.0,
        15.0,
        16.0,
        5.12,
    ],
)
def test_long_clip_framewise_covers_every_frame(seconds):
    """Every frame of a long clip's framewise output comes from at least one window (a probability, never 0)."""
    model = tiny(num_classes=3).eval()
    S = tiny_samples(model, seconds)
    assert model.num_frames(S) > model.config.max_frames  # the sliding-window path
    with torch.no_grad():
        fw = model(noise(1, S))["framewise_output"]
    assert fw.shape[1] == math.ceil(S / model.config.sample_rate / model.frame_seconds(S))
    uncovered = (fw[0] == 0).all(dim=1).nonzero().flatten().tolist()
    assert uncovered == [], f"frames {uncovered} of {fw.shape[1]} are written by no window"
    assert ((fw > 0) & (fw < 1)).all()


def test_long_clip_framewise_is_on_the_real_time_axis():
    """Changing only the last 0.5 s changes only the frames after the start of the windows that hear it."""
    model = tiny().eval()
    cfg = model.config
    S = tiny_samples(model, 16.0)
    x = noise(1, S)
    y = x.clone()
    y[:, -tiny_samples(model, 0.5) :] = 0.5 * torch.sin(torch.arange(tiny_samples(model, 0.5)) * 0.3)
    with torch.no_grad():
        a = model(x)["framewise_output"]
        b = model(y)["framewise_output"]
    frame_sec = model.frame_seconds(S)
    first_affected = min(
        round(s / cfg.sample_rate / frame_sec)
        for s in model.window_starts(S)
        if s + tiny_samples(model, cfg.clip_seconds) > S - tiny_samples(model, 0.5)
    )
    assert first_affected > 0
    torch.testing.assert_close(a[:, :first_affected], b[:, :first_affected], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, -32:], b[:, -32:], atol=1e-6)


def test_long_clip_rejects_mixup():
    model = tiny().train()
    with pytest.raises(ValueError, match="mixup_lambda"):
        model(noise(2, tiny_samples(model, 7.0)), mixup_lambda=torch.full((2,), 0.5))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_eval():
    torch.manual_seed(0)
    return tiny().eval()


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: torch.zeros(16000), ValueError, r"unsqueeze\(0\)"),
        (lambda: torch.zeros(1, 1, 16000), ValueError, r"shape \(batch, samples\), got \(1, 1, 16000\)"),
        (lambda: torch.zeros(1, 16000, dtype=torch.int16), TypeError, "floating point"),
        (lambda: torch.zeros(1, 16000, dtype=torch.int64), TypeError, "floating point"),
        (lambda: torch.zeros(0, 16000), ValueError, "empty batch"),
        (lambda: torch.zeros(1, 100), ValueError, r"100 samples is shorter than one STFT window \(512 samples"),
        (lambda: [0.0] * 16000, TypeError, "torch.Tensor"),
        (lambda: __import__("numpy").zeros((1, 16000), dtype="float32"), TypeError, "torch.Tensor"),
    ],
    ids=["1d", "3d", "int16", "int64", "empty", "too-short", "list", "numpy"],
)
def test_bad_input_is_rejected_with_a_clear_message(tiny_eval, make, exc, match):
    with pytest.raises(exc, match=match):
        tiny_eval(make())


@pytest.mark.parametrize("value, clips", [(float("nan"), [1]), (float("inf"), [0, 2]), (float("-inf"), [2])])
def test_non_finite_samples_name_the_clip(tiny_eval, value, clips):
    x = noise(3, 16000)
    for c in clips:
        x[c, 1234] = value
    with pytest.raises(ValueError, match=r"NaN or inf samples \(clips " + str(clips).replace("[", r"\[").replace("]", r"\]")):
        tiny_eval(x)


def test_n_fft_samples_is_the_shortest_accepted_clip(tiny_eval):
    with torch.no_grad():
        out = tiny_eval(noise(1, 512))
    assert out["framewise_output"].shape == (1, 512, 10)
    assert torch.isfinite(out["clipwise_output"]).all()


# --------------------------------------------------------------------------------------------
# the original's bugs that are fixed here (docs/model.md §11)
# --------------------------------------------------------------------------------------------


def _bce_step(model, x, y):
    out = model(x)
    loss = F.binary_cross_entropy_with_logits(out["clipwise_logits"], y)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_trains_and_matches(monkeypatch):
    plain = tiny(drop_path_rate=0.0)
    ckpt = tiny(drop_path_rate=0.0, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    for m in (plain, ckpt):
        m.train()
        m.spec_augment = lambda x: x
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    x, y = noise(2, 80000), torch.rand(2, 10)
    torch.manual_seed(3)
    loss_a, grads_a = _bce_step(plain, x, y)
    assert not calls
    torch.manual_seed(3)
    loss_b, grads_b = _bce_step(ckpt, x, y)
    assert len(calls) == sum(ckpt.config.depths)  # every block ran under checkpoint
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], atol=1e-5, rtol=1e-4, msg=k)
    # eval and no_grad never checkpoint
    calls.clear()
    ckpt.eval()
    with torch.no_grad():
        ckpt(x)
    assert not calls


def test_blocks_return_only_a_tensor_in_eval():
    model = tiny().eval()
    x = torch.randn(2, 32 * 32, 24)
    blk = model.layers[0].blocks[1]
    with torch.no_grad():
        out = blk(x)
        layer_out = model.layers[0](x)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    assert isinstance(layer_out, torch.Tensor) and layer_out.shape == (2, 16 * 16, 48)
    # no attention probabilities are kept anywhere on the module
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[-1] == 64 for v in vars(blk.attn).values())


def test_patch_norm_false_builds_and_runs():
    model = tiny(patch_norm=False).eval()
    keys = list(model.state_dict())
    assert not any(k.startswith("patch_embed.norm") for k in keys)
    assert "patch_embed.proj.weight" in keys
    # only the patch norm is gone: every block and merge keeps its LayerNorms
    ref_keys = list(tiny().state_dict())
    assert sorted(set(ref_keys) - set(keys)) == ["patch_embed.norm.bias", "patch_embed.norm.weight"]
    with torch.no_grad():
        out = model(noise(2, 80000))
    assert all(torch.isfinite(v).all() for v in out.values())


def test_gradients_reach_every_used_trainable_parameter():
    model = tiny(drop_path_rate=0.0).train()
    x, y = noise(2, 80000), torch.rand(2, 10)
    _, grads = _bce_step(model, x, y)
    for k, p in model.named_parameters():
        if k.startswith("head."):
            assert p.grad is None, f"{k} is unused in the forward but got a gradient"
        elif not p.requires_grad:
            assert k.startswith(("spectrogram_extractor.", "logmel_extractor.")), k
            assert p.grad is None
        else:
            assert k in grads, f"no gradient reached {k}"
            assert torch.isfinite(grads[k]).all(), k
            assert grads[k].abs().sum() > 0, f"zero gradient for {k}"


def test_block_paths_with_and_without_drop_path_agree():
    """In training a block with DropPath merges then adds the residual; without it the merge and the add are
    one op. With drop probability 0 both paths must give the same outputs and gradients."""
    fused_add = tiny(drop_path_rate=0.0).train()
    with_dp = tiny(drop_path_rate=0.1).train()
    with_dp.load_state_dict(fused_add.state_dict())
    for m in with_dp.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    assert sum(1 for m in with_dp.modules() if hasattr(m, "drop_prob")) == 7  # every block but the first
    for m in (fused_add, with_dp):
        m.spec_augment = lambda x: x
    x, y = noise(2, 40000), torch.rand(2, 10)
    loss_a, grads_a = _bce_step(fused_add, x, y)
    loss_b, grads_b = _bce_step(with_dp, x, y)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_drop_path_trains_and_is_random_per_sample():
    model = tiny(drop_path_rate=0.5).train()
    model.spec_augment = lambda x: x
    x = noise(1, 40000).repeat(8, 1)  # 8 copies of one clip: only drop path makes their outputs differ
    loss, grads = _bce_step(model, x, torch.rand(8, 10))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    with torch.no_grad():
        out = model(x)["clipwise_logits"]
        model.eval()
        ev = model(x)["clipwise_logits"]
    assert not torch.allclose(out[0], out[1:], atol=1e-6)  # samples dropped differently
    torch.testing.assert_close(ev, ev[:1].expand_as(ev))  # eval: no drop path


def test_drop_path_is_linearly_spaced_and_train_only():
    model = tiny(depths=(2, 2, 6, 2))
    probs = [getattr(b.drop_path, "drop_prob", 0.0) for layer in model.layers for b in layer.blocks]
    assert len(probs) == 12
    assert isinstance(model.layers[0].blocks[0].drop_path, torch.nn.Identity)
    for k, p in enumerate(probs):
        assert p == pytest.approx(0.1 * k / 11, abs=1e-7)


def test_model_cast_to_float64_runs_and_matches_float32():
    model = tiny().eval()
    x = noise(1, 16000)
    with torch.no_grad():
        want = model(x)
        m64 = tiny().eval()
        m64.load_state_dict(model.state_dict())
        m64.double()
        got = m64(x.double())
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k], atol=1e-4, rtol=1e-4, msg=k)


# --------------------------------------------------------------------------------------------
# presets and config
# --------------------------------------------------------------------------------------------


def test_scv2_preset_caps_fmax_with_a_warning():
    with pytest.warns(UserWarning, match=r"fmax 14000 Hz exceeds the Nyquist frequency 8000 Hz.*capping fmax to 8000 Hz"):
        cfg = htsat.load_config("htsat-scv2")
    assert cfg.fmax == 8000.0
    assert (cfg.num_classes, cfg.sample_rate, cfg.hop_length, cfg.loss_type) == (35, 16000, 160, "clip_bce")
    assert 1 + 160000 // cfg.hop_length == 1001


def test_presets():
    a = htsat.load_config("htsat-audioset")
    assert (a.sample_rate, a.hop_length, a.num_classes, a.loss_type, a.fmax) == (32000, 320, 527, "clip_bce", 14000.0)
    assert (a.freq_ratio, a.max_frames, a.num_features) == (4, 1024, 768)
    e = htsat.load_config("htsat-esc50")
    assert (e.sample_rate, e.num_classes, e.loss_type) == (32000, 50, "clip_ce")


def test_create_model_from_json_file(tmp_path):
    path = tmp_path / "my_model.json"
    path.write_text(json.dumps({**htsat.TINY_OVERRIDES, "depths": [2, 2, 2, 2], "num_classes": 7, "loss_type": "clip_ce"}))
    model = htsat.create_model(str(path), backend="reference")
    cfg = model.config
    assert cfg.name == "my_model"
    assert (cfg.num_classes, cfg.loss_type, cfg.sample_rate, cfg.depths) == (7, "clip_ce", 16000, (2, 2, 2, 2))
    assert model.tscam_conv.out_channels == 7
    # a preset as the starting point, fields on top
    path2 = tmp_path / "esc.json"
    path2.write_text(json.dumps({"preset": "htsat-esc50", **htsat.TINY_OVERRIDES}))
    cfg2 = htsat.load_config(str(path2))
    assert (cfg2.num_classes, cfg2.loss_type, cfg2.embed_dim) == (50, "clip_ce", 24)
    # keyword overrides win over the file
    assert htsat.load_config(str(path), num_classes=3).num_classes == 3


def test_bad_configs_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_classes": 5, "bogus_field": 1}))
    with pytest.raises(ValueError, match=r"unknown HTS-AT config fields \['bogus_field'\]"):
        htsat.create_model(str(bad))
    with pytest.raises(ValueError, match=r"unknown model 'htsat-nope'"):
        htsat.create_model("htsat-nope")
    with pytest.raises(FileNotFoundError, match="model config file not found"):
        htsat.create_model(str(tmp_path / "missing.json"))
    bad_preset = tmp_path / "p.json"
    bad_preset.write_text(json.dumps({"preset": "htsat-nope"}))
    with pytest.raises(ValueError, match="unknown preset 'htsat-nope'"):
        htsat.load_config(str(bad_preset))
    not_json = tmp_path / "x.json"
    not_json.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        htsat.load_config(str(not_json))
    with pytest.raises(ValueError, match="loss_type"):
        htsat.load_config("htsat-audioset", loss_type="softmax")
    with pytest.raises(ValueError, match="num_classes"):
        htsat.load_config("htsat-audioset", num_classes=0)
    with pytest.raises(ValueError, match="heads"):
        htsat.load_config("htsat-audioset", num_heads=(5, 8, 16, 32))
    with pytest.raises(ValueError, match=r"unknown HTS-AT config fields \['not_a_field'\]"):
        htsat.create_model("htsat-audioset", not_a_field=1)


def test_create_model_num_classes_sets_the_head():
    model = tiny(num_classes=13).eval()
    assert model.config.num_classes == 13
    assert model.tscam_conv.weight.shape == (13, 192, 1, 3)
    assert model.head.weight.shape == (13, 13)
    with torch.no_grad():
        out = model(noise(1, 80000))
    assert out["clipwise_output"].shape == (1, 13) and out["framewise_output"].shape == (1, 512, 13)


def test_config_json_round_trip():
    cfg = htsat.load_config("htsat-esc50", **htsat.TINY_OVERRIDES)
    again = htsat.HTSATConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_matches_eager():
    # 5 blocks instead of 8 to keep the CPU compile short; still one shifted block, 3 merges, a 1-window stage
    model = tiny(depths=(2, 1, 1, 1)).eval()
    x = noise(2, 80000)
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=k)


def test_attention_dropout_applies_only_in_training():
    """attn_drop_rate > 0 (0 in every preset) drops attention probabilities in training only."""
    from htsat.layers import WindowAttention

    attn = WindowAttention(dim=48, window_size=4, num_heads=2, attn_drop=0.5)
    x = torch.randn(3, 16, 48)
    attn.eval()
    plain = attn(x, None)
    with torch.no_grad():
        want = attn.proj(
            htsat_kernels.reference.window_attention(attn.qkv(x), attn.relative_position_bias_table, None, 2, attn.scale)
        )
    torch.testing.assert_close(plain, want)
    attn.train()
    torch.manual_seed(5)
    a = attn(x, None)
    torch.manual_seed(5)
    b = attn(x, None)
    torch.manual_seed(6)
    c = attn(x, None)
    assert torch.equal(a, b) and not torch.allclose(a, plain) and not torch.allclose(a, c)
