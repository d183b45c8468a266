"""The front end against librosa and a float64 numpy DFT (docs/model.md §2-3 and §11.16)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import htsat
from htsat.frontend import LogMel, Spectrogram, dft_weights, periodic_hann, slaney_mel_filterbank

librosa = pytest.importorskip("librosa")

# (sample_rate, n_fft, hop, n_mels, fmin, fmax): AudioSet/ESC-50, SCV2 (fmax capped to Nyquist), tiny
SETTINGS = {
    "audioset": (32000, 1024, 320, 64, 50.0, 14000.0),
    "scv2": (16000, 1024, 160, 64, 50.0, 8000.0),
    "tiny": (16000, 512, 160, 32, 50.0, 8000.0),
}


def _tiny(**overrides) -> htsat.HTSAT:
    return htsat.create_model(backend="reference", **{**htsat.TINY_OVERRIDES, "num_classes": 4, **overrides})


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_mel_filterbank_equals_librosa(setting):
    sr, n_fft, _, n_mels, fmin, fmax = SETTINGS[setting]
    want = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, dtype=np.float64)
    got = slaney_mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
    assert got.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # no empty filter once fmax is within Nyquist (the original's SCV2 setting had 9, docs/model.md §11.18)
    assert (want.max(axis=1) > 0).all()
    # the model's frozen weight is the transpose, in float32
    melw = LogMel(sr, n_fft, n_mels, fmin, fmax).melW
    assert melw.shape == (n_fft // 2 + 1, n_mels) and melw.dtype == torch.float32 and not melw.requires_grad
    np.testing.assert_allclose(melw.numpy(), want.T, rtol=0, atol=1e-6)


def test_model_melw_is_the_librosa_filterbank():
    model = _tiny()
    cfg = model.config
    want = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.mel_bins, fmin=cfg.fmin, fmax=cfg.fmax)
    np.testing.assert_allclose(model.logmel_extractor.melW.numpy(), want.T, rtol=0, atol=1e-6)


def test_periodic_hann_equals_librosa():
    want = librosa.filters.get_window("hann", 1024, fftbins=True)
    np.testing.assert_allclose(periodic_hann(1024), want, rtol=0, atol=1e-12)
    assert not np.allclose(periodic_hann(1024), np.hanning(1024))  # the symmetric window is different


def test_stft_weights_are_the_windowed_dft():
    real, imag = dft_weights(1024)
    spec = Spectrogram(1024, 320)
    conv_real = spec.stft.conv_real.weight
    conv_imag = spec.stft.conv_imag.weight
    assert conv_real.shape == conv_imag.shape == (513, 1, 1024)
    assert not conv_real.requires_grad and not conv_imag.requires_grad
    window = librosa.filters.get_window("hann", 1024, fftbins=True)
    # row k of the real/imag kernels, applied to a frame, gives Re/Im of its k-th rfft bin
    frame = np.random.default_rng(0).standard_normal(1024)
    X = np.fft.rfft(frame * window)
    np.testing.assert_allclose(real[:, 0, :] @ frame, X.real, atol=1e-9)
    np.testing.assert_allclose(imag[:, 0, :] @ frame, X.imag, atol=1e-9)
    np.testing.assert_allclose(conv_real.numpy(), real.astype(np.float32))
    np.testing.assert_allclose(conv_imag.numpy(), imag.astype(np.float32))


def _numpy_power(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Reflect-pad n_fft//2, periodic Hann, |rfft|^2 in float64: (frames, bins)."""
    xp = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(xp, n_fft)[::hop]
    window = librosa.filters.get_window("hann", n_fft, fftbins=True)
    return np.abs(np.fft.rfft(frames * window, axis=1)) ** 2


@pytest.mark.parametrize("setting", ["audioset", "tiny"])
def test_power_spectrogram_equals_direct_dft(setting):
    sr, n_fft, hop, *_ = SETTINGS[setting]
    rng = np.random.default_rng(1)
    seconds = 10.0 if setting == "audioset" else 3.0
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    x[: sr // 10] = 0.0  # a silent start: the reflect padding and low-power frames
    with torch.no_grad():
        got = Spectrogram(n_fft, hop)(torch.from_numpy(x)[None])
    want = _numpy_power(x, n_fft, hop)
    assert got.shape == (1, 1, 1 + len(x) // hop, n_fft // 2 + 1) == (1, 1) + want.shape
    if setting == "audioset":
        assert got.shape[2] == 1001
    np.testing.assert_allclose(got[0, 0].double().numpy(), want, rtol=1e-4, atol=1e-4 * want.max())


@pytest.mark.parametrize("samples, frames", [(320000, 1001), (320319, 1001), (320320, 1002), (1024, 4), (96000, 301)])
def test_frame_count(samples, frames):
    with torch.no_grad():
        out = Spectrogram(1024, 320)(torch.zeros(1, samples))
    assert out.shape[2] == frames == 1 + samples // 320


def test_reflect_padding_at_the_edges():
    """Frame 0 is centred on sample 0 with the reflected signal on its left (not zeros)."""
    x = torch.zeros(1, 4096)
    x[0, 1:200] = 1.0  # non-zero just after sample 0: reflect padding mirrors it, zero padding would not
    with torch.no_grad():
        got = Spectrogram(1024, 320)(x)[0, 0, 0]
    want = _numpy_power(x[0].numpy(), 1024, 320)[0]
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-4 * want.max())
    xz = np.pad(x[0].numpy().astype(np.float64), 512, mode="constant")[:1024]
    zero_padded = np.abs(np.fft.rfft(xz * librosa.filters.get_window("hann", 1024, fftbins=True))) ** 2
    assert not np.allclose(got.double().numpy(), zero_padded, rtol=1e-2)


def test_log_mel_equals_librosa_power_to_db():
    sr, n_fft, hop, n_mels, fmin, fmax = SETTINGS["audioset"]
    x = np.random.default_rng(2).standard_normal(3 * sr).astype(np.float32) * 0.1
    # librosa's mel projection and dB conversion on the float64 power spectrogram (librosa.stft itself is
    # slow to warm up; the power spectrogram is checked against numpy above)
    power = _numpy_power(x, n_fft, hop).T  # (bins, frames)
    mel = librosa.feature.melspectrogram(S=power, sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    want = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T  # (frames, mels)
    with torch.no_grad():
        got = LogMel(sr, n_fft, n_mels, fmin, fmax)(Spectrogram(n_fft, hop)(torch.from_numpy(x)[None]))
    assert got.shape == (1, 1) + want.shape
    np.testing.assert_allclose(got[0, 0].double().numpy(), want, rtol=0, atol=2e-3)


def test_silence_hits_the_minus_100_db_floor():
    sr, n_fft, hop, n_mels, fmin, fmax = SETTINGS["audioset"]
    with torch.no_grad():
        out = LogMel(sr, n_fft, n_mels, fmin, fmax)(Spectrogram(n_fft, hop)(torch.zeros(2, 32000)))
    assert out.shape == (2, 1, 101, 64)
    floor = 10 * np.log10(1e-10)
    assert floor == -100.0
    assert torch.equal(out, torch.full_like(out, -100.0))
    # no top_db clipping: a loud frame next to silence keeps its full range
    x = torch.zeros(1, 32000)
    x[0, 16000:] = torch.sin(torch.arange(16000) * 0.3)
    with torch.no_grad():
        out = LogMel(sr, n_fft, n_mels, fmin, fmax)(Spectrogram(n_fft, hop)(x))
    assert float(out.min()) == -100.0 and float(out.max()) > 0.0


def test_model_logmel_applies_bn0_per_mel_bin():
    model = _tiny().eval()
    with torch.no_grad():
        model.bn0.running_mean.copy_(torch.linspace(-60, -20, 32))
        model.bn0.running_var.copy_(torch.linspace(10, 40, 32))
        model.bn0.weight.copy_(torch.linspace(0.5, 2, 32))
        model.bn0.bias.copy_(torch.linspace(-1, 1, 32))
        x = 0.1 * torch.randn(2, 16000)
        raw = model.logmel_extractor(model.spectrogram_extractor(x))
        got = model.logmel(x)
    bn = model.bn0
    want = (raw - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    assert got.shape == (2, 1, 101, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _full_scale_model():
    """Tiny backbone with the AudioSet front end (32 kHz, n_fft 1024), where a full-scale tone overflows fp16."""
    return _tiny(sample_rate=32000, n_fft=1024, hop_length=320, fmax=14000.0).eval()


def _autocast_dtypes():
    dtypes = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            pass
        dtypes.append(torch.float16)
    except Exception:  # older torch: no fp16 CPU autocast
        pass
    return dtypes


@pytest.mark.parametrize("dtype", _autocast_dtypes(), ids=str)
def test_front_end_stays_fp32_under_autocast(dtype):
    model = _full_scale_model()
    t = torch.arange(32000 * 2) / 32000
    x = torch.sin(2 * torch.pi * 1000 * t)[None].repeat(2, 1)  # full scale 1 kHz: bin 32 power = 256^2 > fp16 max
    with torch.no_grad():
        want = model.logmel(x)
        with torch.autocast("cpu", dtype=dtype):
            got = model.logmel(x)
            out = model(x)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    for k, v in out.items():
        assert torch.isfinite(v).all(), k
    if dtype == torch.float16:
        # why it matters: the same STFT under fp16 autocast overflows
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            power = model.spectrogram_extractor(x)
        assert power.dtype == torch.float16 and not torch.isfinite(power).all()


@pytest.mark.parametrize("overrides", [{}, "tiny"])
def test_fft_front_end_equals_the_conv_front_end(overrides):
    """FrontEnd(stft="fft") (torch.stft, used by the inference workers) computes the original's conv
    STFT: the model's outputs from either log-mel agree to 1e-6 (twice the conv's own agreement with the
    original code, 5e-7: the attention path's rounding differs); the log-mel itself to rounding where the
    power is not near silence."""
    import htsat

    torch.manual_seed(0)
    ov = dict(htsat.TINY_OVERRIDES) if overrides == "tiny" else {}
    model = htsat.create_model("htsat-audioset", **ov).eval()
    cfg = model.config
    n = int(cfg.clip_seconds * cfg.sample_rate)
    t = torch.arange(n) / cfg.sample_rate
    x = torch.stack([0.3 * torch.sin(2 * math.pi * 440 * t) + 0.05 * torch.randn(n), 0.5 * torch.randn(n) * (t < 2)])
    with torch.no_grad():
        conv, fft = model.front_end()(x), model.front_end(stft="fft")(x)
        assert conv.shape == fft.shape == (2, 1, model.num_frames(n), cfg.mel_bins)
        loud = conv > conv.amax() - 60  # within 60 dB of the peak
        torch.testing.assert_close(fft[loud], conv[loud], atol=1e-3, rtol=0)
        a, b = model.forward_mel(conv), model.forward_mel(fft)
    for k in ("clipwise_output", "framewise_output", "latent_output"):
        torch.testing.assert_close(b[k], a[k], atol=1e-6 * max(1.0, float(a[k].abs().max())), rtol=0)


def test_front_end_rejects_an_unknown_stft():
    model = htsat.create_model("htsat-audioset", **htsat.TINY_OVERRIDES)
    with pytest.raises(ValueError, match="stft must be"):
        model.front_end(stft="dct")
