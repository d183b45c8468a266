"""Audio input: read, mix down, resample, check, and fit to a clip length.

Everything here works on float32 numpy arrays of shape (samples,). Files are read with
soundfile (wav, flac, ogg, ... whatever libsndfile supports), mixed down to mono by averaging
the channels and resampled with soxr. Both packages are optional dependencies of the package
(``pip install htsat-kernels[audio]``); they are imported on first use so that the model itself
never needs them.

Errors are :class:`AudioError` (a ``ValueError``) whose message names the file.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Union

import numpy as np

__all__ = [
    "AudioError",
    "load_audio",
    "peak_dbfs",
    "is_silent",
    "check_audio",
    "fit_length",
    "write_audio",
    "stream_audio",
    "wav_declared_frames",
]

PathLike = Union[str, "os.PathLike[str]"]

#: peak level (dBFS) at or below which a signal counts as "silent only"
DEFAULT_SILENCE_DB = -80.0

#: largest sample magnitude accepted (300 dB above full scale). Samples near 1e17 overflow the
#: model's float32 power spectrum (|STFT|^2 reaches (peak * n_fft / 2)^2, float32 ends at 3.4e38)
#: and every output becomes NaN, in the original too; 1e15 keeps clear of that for n_fft up to 16384.
MAX_PEAK = 1e15


class AudioError(ValueError):
    """A file that cannot be used as audio input; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _optional(module: str, purpose: str):
    """Import an optional audio dependency, or say which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{purpose} needs the '{module}' package (pip install {module}, or pip install htsat-kernels[audio])"
        ) from e


def _soundfile():
    return _optional("soundfile", "reading audio files")


def _soxr():
    return _optional("soxr", "resampling")


def resample(wave: np.ndarray, orig_rate: int, target_rate: int, *, quality: str = "HQ") -> np.ndarray:
    """Resample a mono float32 signal with soxr (no-op when the rates match)."""
    if int(orig_rate) == int(target_rate):
        return np.ascontiguousarray(wave, dtype=np.float32)
    out = _soxr().resample(np.ascontiguousarray(wave, dtype=np.float32), int(orig_rate), int(target_rate), quality=quality)
    return np.ascontiguousarray(out, dtype=np.float32)


def _existing_audio_path(path: PathLike) -> str:
    """The path as a str; AudioError when it is missing, a folder or an empty file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(path, "file not found")
    if os.path.isdir(path):
        raise AudioError(path, "is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(path, "empty file (0 bytes)")
    return path


def load_audio(
    path: PathLike,
    sample_rate: int | None = None,
    *,
    quality: str = "HQ",
    return_rate: bool = False,
):
    """Read an audio file as float32 mono at ``sample_rate`` Hz.

    - channels are averaged (mix-down);
    - the signal is resampled with soxr when the file's rate differs (``sample_rate=None`` keeps
      the file's rate);
    - integer formats are scaled to [-1, 1) by soundfile.

    Returns the (samples,) array, or ``(array, rate)`` with ``return_rate=True``.
    Raises :class:`AudioError` naming the file when it is missing, unreadable, corrupt, empty or
    contains non-finite samples.
    """
    path = _existing_audio_path(path)
    sf = _soundfile()
    try:
        data, rate = sf.read(os.fsencode(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(path, f"cannot read audio ({type(e).__name__}: {e})") from e
    if data.ndim != 2 or data.shape[0] == 0:
        raise AudioError(path, "no audio samples (empty file)")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(wave)):
        raise AudioError(path, "contains NaN or infinite samples (corrupt file?)")
    if sample_rate is not None:
        try:
            wave = resample(wave, rate, sample_rate, quality=quality)
        except ImportError:
            raise
        except Exception as e:
            raise AudioError(path, f"cannot resample from {rate} Hz to {sample_rate} Hz ({e})") from e
        rate = int(sample_rate)
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if wave.shape[0] == 0:
        raise AudioError(path, "no audio samples after resampling")
    return (wave, int(rate)) if return_rate else wave


def write_audio(path: PathLike, wave, sample_rate: int, *, subtype: str | None = None) -> None:
    """Write a float signal, (samples,) or (samples, channels), with soundfile (format from the extension)."""
    _soundfile().write(os.fspath(path), np.asarray(wave, dtype=np.float32), int(sample_rate), subtype=subtype)


def peak_dbfs(wave) -> float:
    """Peak level in dB relative to full scale (1.0); ``-inf`` for all zeros."""
    w = np.asarray(wave)
    if w.size == 0:
        return -math.inf
    peak = float(np.max(np.abs(w)))
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def is_silent(wave, threshold_db: float = DEFAULT_SILENCE_DB) -> bool:
    """True when the signal's peak is at or below ``threshold_db`` dBFS (digital silence included)."""
    return peak_dbfs(wave) <= threshold_db


def check_audio(
    wave, path: PathLike = "<array>", *, threshold_db: float | None = DEFAULT_SILENCE_DB, max_peak: float | None = MAX_PEAK
) -> None:
    """Raise :class:`AudioError` for an empty or silent-only signal (``threshold_db=None``: no
    silence check), or one whose samples exceed ``max_peak`` (``None``: no check)."""
    w = np.asarray(wave)
    if w.size == 0:
        raise AudioError(path, "no audio samples (empty)")
    if max_peak is not None:
        peak = float(np.max(np.abs(w)))
        if peak > max_peak:
            raise AudioError(
                path,
                f"samples reach {peak:.3g}, far beyond full scale (audio is expected in [-1, 1]; above {max_peak:g} the "
                "model's float32 power spectrum nears overflow): an unscaled or corrupt file?",
            )
    if threshold_db is not None and is_silent(w, threshold_db):
        peak = peak_dbfs(w)
        level = "digital silence" if peak == -math.inf else f"peak {peak:.1f} dBFS"
        raise AudioError(path, f"silent-only audio ({level}, threshold {threshold_db:g} dBFS)")


def fit_length(
    wave: np.ndarray,
    length: int,
    *,
    pad: str = "tile",
    crop: str = "random",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Bring a 1-D signal to exactly ``length`` samples.

    Shorter signals: ``pad="tile"`` concatenates the clip with itself (the paper's ESC-50 / SCV2
    convention, docs/model.md §6) and cuts at ``length``; ``pad="zeros"`` appends zeros (DESED
    convention); ``pad="repeatpad"`` tiles whole copies then zero-pads the remainder (CLAP's
    convention).
    Longer signals: ``crop="random"`` takes a random window (``rng`` gives the offset; every
    offset 0..len-length is possible), ``"start"`` the first ``length`` samples, ``"center"`` the
    middle ones.
    """
    wave = np.asarray(wave, dtype=np.float32)
    n = wave.shape[0]
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if n == length:
        return wave
    if n > length:
        if crop == "random":
            rng = rng if rng is not None else np.random.default_rng()
            start = int(rng.integers(0, n - length + 1))
        elif crop == "start":
            start = 0
        elif crop == "center":
            start = (n - length) // 2
        else:
            raise ValueError(f"unknown crop mode {crop!r} (random, start, center)")
        return np.ascontiguousarray(wave[start : start + length])
    if n == 0:
        return np.zeros(length, dtype=np.float32)
    if pad == "tile":
        reps = -(-length // n)
        return np.ascontiguousarray(np.tile(wave, reps)[:length])
    if pad == "zeros":
        out = np.zeros(length, dtype=np.float32)
        out[:n] = wave
        return out
    if pad == "repeatpad":
        out = np.zeros(length, dtype=np.float32)
        reps = length // n
        out[: reps * n] = np.tile(wave, reps)
        return out
    raise ValueError(f"unknown pad mode {pad!r} (tile, zeros, repeatpad)")


# -------------------------------------------------------------------------------------------------
# streaming decode: bounded memory for files of any length (issue 12)
# -------------------------------------------------------------------------------------------------


def wav_declared_frames(path: PathLike) -> int | None:
    """Sample frames a RIFF/WAVE header declares (None: not a WAV, or a size left open for streaming).

    libsndfile quietly shortens a truncated WAV to what the file holds; comparing with the header
    is how a truncated file is noticed."""
    try:
        with open(os.fspath(path), "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
                if cid == b"fmt ":
                    fmt = f.read(size)
                    if len(fmt) < 14:
                        return None
                    block_align = int.from_bytes(fmt[12:14], "little")
                    if size % 2:
                        f.seek(1, 1)
                elif cid == b"data":
                    if not block_align or size in (0, 0xFFFFFFFF):
                        return None
                    return size // block_align
                else:
                    f.seek(size + (size % 2), 1)
    except OSError:
        return None


_SALVAGE_STEP = 4096  # frames; a FLAC frame's usual size


def _read_at(sf, path: str, start: int, frames: int) -> np.ndarray | None:
    """``frames`` frames from ``start`` of a freshly opened file, None when decoding fails within them."""
    try:
        with sf.SoundFile(path) as f:
            f.seek(start)
            return f.read(frames, dtype="float32", always_2d=True)
    except Exception:
        return None


def _decodable_prefix(sf, path: str, start: int, limit: int) -> np.ndarray:
    """The longest run of frames from ``start`` (at most ``limit``) that decodes, after a read of them failed: a
    truncated or damaged FLAC decodes up to its last whole frame, which a failed block read would throw away."""
    pieces: list[np.ndarray] = []
    pos = start
    try:  # small steps through one open file up to the step that fails
        with sf.SoundFile(path) as f:
            f.seek(start)
            while pos - start < limit:
                n = min(_SALVAGE_STEP, start + limit - pos)
                piece = f.read(n, dtype="float32", always_2d=True)
                pieces.append(piece)
                pos += piece.shape[0]
                if piece.shape[0] < n:
                    break
    except Exception:
        pass
    lo, hi = 0, min(_SALVAGE_STEP, start + limit - pos) - 1  # then bisect within it, each try on a fresh decoder
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _read_at(sf, path, pos, mid) is not None:
            lo = mid
        else:
            hi = mid - 1
    tail = _read_at(sf, path, pos, lo) if lo > 0 else None
    if tail is not None:
        pieces.append(tail)
    return np.concatenate(pieces) if pieces else np.zeros((0, 1), np.float32)


def stream_audio(path: PathLike, sample_rate: int, *, block_seconds: float = 30.0, quality: str = "HQ", warn=None):
    """Yield a file as float32 mono blocks at ``sample_rate`` Hz, decoded and resampled block by block.

    Memory stays at a block whatever the file's length (soundfile's block reading, soxr's
    ``ResampleStream``). Each block is checked as it comes: non-finite samples and samples beyond
    ``MAX_PEAK`` raise :class:`AudioError`. A file that ends before its header says, or whose decoding
    fails part way, is read as far as it goes: ``warn(message)`` is called with a line naming it.
    """
    path = _existing_audio_path(path)
    sf = _soundfile()
    try:
        f = sf.SoundFile(os.fsencode(path))  # bytes: soundfile cannot encode a name that is not UTF-8
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(path, f"cannot read audio ({type(e).__name__}: {e})") from e
    with f:
        rate = int(f.samplerate)
        declared = wav_declared_frames(path)
        if declared is not None and declared > f.frames and warn is not None:
            warn(
                f"{path}: truncated: the header declares {declared} samples, the file holds {f.frames} "
                f"({f.frames / rate:.2f} of {declared / rate:.2f} s); read as far as it goes"
            )
        stream = None
        if rate != int(sample_rate):
            stream = _soxr().ResampleStream(rate, int(sample_rate), 1, dtype="float32", quality=quality)
        block = max(1, int(block_seconds * rate))
        read = 0
        while True:
            try:
                data = f.read(block, dtype="float32", always_2d=True)
            except Exception as e:
                # the block holds the damage: keep what of it decodes, then stop (the decoder cannot go on past it)
                data = _decodable_prefix(sf, path, read, block)
                if read + data.shape[0] == 0:
                    raise AudioError(path, f"cannot read audio ({type(e).__name__}: {e})") from e
                if warn is not None:
                    warn(
                        f"{path}: decoding stopped at {(read + data.shape[0]) / rate:.2f} s of the {f.frames / rate:.2f} s "
                        f"its header declares ({type(e).__name__}: {e}); using the audio decoded so far"
                    )
                last = True
            else:
                last = data.shape[0] < block
            read += data.shape[0]
            wave = _block_at_rate(data, stream, last, path, rate, sample_rate)
            if wave.size:
                yield wave
            if last:
                break
        if read == 0:
            raise AudioError(path, "no audio samples (empty file)")


def _block_at_rate(data: np.ndarray, stream, last: bool, path: str, rate: int, sample_rate: int) -> np.ndarray:
    """A (samples, channels) block mixed down, checked and resampled by ``stream`` (None: same rate)."""
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(wave)):
        raise AudioError(path, "contains NaN or infinite samples (corrupt file?)")
    if wave.size:
        check_audio(wave, path, threshold_db=None)
    if stream is not None:
        try:
            wave = stream.resample_chunk(np.ascontiguousarray(wave, dtype=np.float32), last=last)
        except Exception as e:
            raise AudioError(path, f"cannot resample from {rate} Hz to {sample_rate} Hz ({e})") from e
    return np.ascontiguousarray(wave, dtype=np.float32)


def stream_array(
    samples, rate: int, sample_rate: int, *, name: str = "<array>", channels_first: bool = True, block_seconds: float = 30.0
):
    """:func:`stream_audio` for samples already decoded (``ray.data.read_audio``'s ``amplitude``: channels x
    samples, or a 1-D array): the same mix-down, checks and block-wise resampling, so the blocks equal
    those of the file they were read from."""
    data = np.asarray(samples, dtype=np.float32)
    if data.ndim == 1:
        data = data[:, None]
    elif data.ndim == 2 and channels_first:
        data = data.T
    elif data.ndim != 2:
        raise AudioError(name, f"expected samples as (channels, samples) or (samples,), got shape {data.shape}")
    if data.shape[0] == 0:
        raise AudioError(name, "no audio samples (empty)")
    rate = int(rate)
    stream = None
    if rate != int(sample_rate):
        stream = _soxr().ResampleStream(rate, int(sample_rate), 1, dtype="float32", quality="HQ")
    block = max(1, int(block_seconds * rate))
    for start in range(0, data.shape[0], block):
        last = start + block >= data.shape[0]
        wave = _block_at_rate(data[start : start + block], stream, last, name, rate, sample_rate)
        if wave.size:
            yield wave
