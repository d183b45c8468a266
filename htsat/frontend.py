"""The original's front end: STFT power spectrogram, Slaney mel filterbank, 10*log10 (docs/model.md §2-3).

Module and parameter names match the original (``spectrogram_extractor.stft.conv_real.weight``,
``logmel_extractor.melW``) so its checkpoints load unchanged. These weights are derived constants
(a windowed DFT and a mel filterbank), frozen, and always computed in float32, also under autocast:
a full-scale tone overflows fp16 in the power spectrum (docs/model.md §11.16).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def periodic_hann(n: int) -> np.ndarray:
    """The periodic ("fftbins") Hann window of librosa.get_window('hann', n)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def dft_weights(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    """Hann-windowed DFT rows for bins 0..n_fft//2 as (bins, 1, n_fft) conv kernels: real, imag."""
    n = np.arange(n_fft)
    k = np.arange(n_fft // 2 + 1)
    angle = 2.0 * np.pi * np.outer(k, n) / n_fft  # exp(-i*angle)
    window = periodic_hann(n_fft)
    real = np.cos(angle) * window
    imag = -np.sin(angle) * window
    return real[:, None, :], imag[:, None, :]


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_mels, n_fft//2+1) triangular filters on the Slaney mel scale with Slaney area norm.

    Equal to librosa.filters.mel(sr, n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax) with its defaults
    (htk=False, norm='slaney'), computed in float64.
    """
    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    mel_edges = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    widths = np.diff(mel_edges)
    ramps = mel_edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_edges[2:] - mel_edges[:-2]))[:, None]
    return weights


class STFT(nn.Module):
    """Power-spectrum STFT as two frozen Conv1d (the original's torchlibrosa layout)."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        real, imag = dft_weights(n_fft)
        bins = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, bins, n_fft, stride=hop_length, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, n_fft, stride=hop_length, bias=False)
        self.conv_real.weight = nn.Parameter(torch.tensor(real, dtype=torch.float32), requires_grad=False)
        self.conv_imag.weight = nn.Parameter(torch.tensor(imag, dtype=torch.float32), requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, samples) -> real, imag (B, 1, frames, bins); reflect-padded by n_fft//2 each side."""
        x = F.pad(x[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        # the frozen weights follow the input's precision (fp32 even in a model cast to half)
        real = F.conv1d(x, self.conv_real.weight.to(x.dtype), stride=self.hop_length).transpose(1, 2)[:, None]
        imag = F.conv1d(x, self.conv_imag.weight.to(x.dtype), stride=self.hop_length).transpose(1, 2)[:, None]
        return real, imag


class Spectrogram(nn.Module):
    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.stft = STFT(n_fft, hop_length)

    def forward(self, x: Tensor) -> Tensor:
        real, imag = self.stft(x)
        return real**2 + imag**2


class LogMel(nn.Module):
    """Mel projection and 10*log10(max(mel, 1e-10)); ref 1.0, no top_db (the original's settings)."""

    amin = 1e-10

    def __init__(self, sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float):
        super().__init__()
        melw = slaney_mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).T
        self.melW = nn.Parameter(torch.tensor(melw, dtype=torch.float32), requires_grad=False)

    def forward(self, power: Tensor) -> Tensor:
        mel = torch.matmul(power, self.melW.to(power.dtype))
        return 10.0 * torch.log10(torch.clamp(mel, min=self.amin))


class FrontEnd(nn.Module):
    """Waveform (B, samples) -> log-mel (B, 1, frames, mel_bins): the model's spectrogram and log-mel
    modules (shared, not copied) run in ``dtype`` with autocast off, also under autocast or in a model cast
    to half precision (a full-scale tone overflows fp16 in the power spectrum).

    ``stft="conv"`` is the original's frozen-DFT Conv1d; ``stft="fft"`` computes the same Hann-windowed
    DFT (reflect padding, hop) with ``torch.stft``: 6-7x less CPU time, and the model's outputs stay within
    1e-6 of the conv's (test_frontend; the conv itself matches the original to 5e-7). The
    inference pipeline uses it in its CPU workers, and ``HTSAT.mel_features`` on CPU except on the
    reference backend (which keeps the original's conv; so does the ONNX export).
    """

    def __init__(self, spectrogram: Spectrogram, logmel: LogMel, dtype: torch.dtype = torch.float32, stft: str = "conv"):
        super().__init__()
        if stft not in ("conv", "fft"):
            raise ValueError(f"stft must be 'conv' or 'fft', got {stft!r}")
        self.spectrogram, self.logmel, self.dtype, self.stft = spectrogram, logmel, dtype, stft
        st = spectrogram.stft
        self.n_fft, self.hop_length = st.n_fft, st.hop_length
        self.register_buffer("window", torch.tensor(periodic_hann(st.n_fft), dtype=dtype), persistent=False)

    def forward(self, waveform: Tensor) -> Tensor:
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            x = waveform.to(self.dtype)
            if self.stft == "conv":
                power = self.spectrogram(x)
            else:
                c = torch.stft(
                    x,
                    self.n_fft,
                    self.hop_length,
                    window=self.window.to(x.device),
                    center=True,
                    pad_mode="reflect",
                    return_complex=True,
                )
                power = (c.real**2 + c.imag**2).transpose(1, 2)[:, None]
            return self.logmel(power)


def expected_frontend_constants(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> dict[str, Tensor]:
    """The derived front-end tensors under their state_dict names, for checking imported checkpoints."""
    real, imag = dft_weights(n_fft)
    melw = slaney_mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).T
    return {
        "spectrogram_extractor.stft.conv_real.weight": torch.tensor(real, dtype=torch.float32),
        "spectrogram_extractor.stft.conv_imag.weight": torch.tensor(imag, dtype=torch.float32),
        "logmel_extractor.melW": torch.tensor(melw, dtype=torch.float32),
    }
