"""Inference at scale (issue 12): many files, any length, bounded memory, results streamed.

- :func:`expand_inputs`: files, folders (recursive, audio extensions, sorted), glob patterns and
  ``@list.txt`` files to one list of paths, each path once.
- :func:`file_windows`: a file decoded block by block (``htsat.audio.stream_audio``) and cut into
  the model's windows as the samples come: clips that fit one image as one item (short clips
  fitted to ``clip_seconds``), longer files as windows of ``clip_seconds`` every
  ``long_hop_seconds``, the last one ending at the file's end, exactly as ``HTSAT.forward`` cuts them.
- :func:`run_files`: windows from many files batched together, one result per file yielded in input
  order as soon as its last window is through; clipwise logits, embeddings, framewise maps and events
  accumulated window by window. DataLoader workers decode and resample (GPU: reading overlaps the
  model), or on CPU run the whole pipeline on their own files, model included (``worker_stage``).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import glob
import math
import os
import signal
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .audio import AudioError, check_audio, fit_length, stream_array, stream_audio

__all__ = ["AUDIO_EXTENSIONS", "DecodedAudio", "InferenceError", "InputList", "expand_inputs", "file_windows", "run_files"]


class InferenceError(RuntimeError):
    """A run that cannot go on (a worker process died); the message is one line."""


# extensions of the formats libsndfile reads (soundfile.available_formats()), with their usual aliases
_FORMAT_EXTENSIONS = {
    "WAV": ("wav",),
    "WAVEX": ("wav",),
    "RF64": ("rf64",),
    "W64": ("w64",),
    "AIFF": ("aif", "aiff", "aifc"),
    "AU": ("au", "snd"),
    "FLAC": ("flac",),
    "OGG": ("ogg", "oga", "opus"),
    "MP3": ("mp3",),
    "CAF": ("caf",),
    "VOC": ("voc",),
    "NIST": ("nist", "sph"),
    "IRCAM": ("sf",),
    "HTK": ("htk",),
    "PAF": ("paf",),
    "SVX": ("svx", "iff"),
    "XI": ("xi",),
    "MAT4": ("mat",),
    "MAT5": ("mat",),
    "PVF": ("pvf",),
    "SD2": ("sd2",),
    "SDS": ("sds",),
    "AVR": ("avr",),
    "MPC2K": ("mpc",),
    "WVE": ("wve",),
}


def _audio_extensions() -> frozenset:
    try:
        import soundfile

        formats = soundfile.available_formats()
    except ImportError:  # pragma: no cover - the audio extra is missing; reading will say so
        formats = {"WAV": "", "FLAC": "", "OGG": ""}
    return frozenset(ext for name in formats for ext in _FORMAT_EXTENSIONS.get(name.upper(), (name.lower(),)))


AUDIO_EXTENSIONS = _audio_extensions()

#: seconds of audio decoded at a time: memory per file stays at about a block and a window
BLOCK_SECONDS = 30.0


def _is_audio(name: str) -> bool:
    return os.path.splitext(name)[1][1:].lower() in AUDIO_EXTENSIONS


class DecodedAudio(str):
    """Samples already decoded, in the place of a path in :func:`run_files` (the str is the name that
    results and errors show): ``samples`` (channels x samples, or 1-D) at ``rate`` Hz."""

    def __new__(cls, name: str, samples, rate: int):
        obj = super().__new__(cls, name)
        obj.samples, obj.rate = samples, int(rate)
        return obj


class InputList(list):
    """Paths in order; ``problems`` maps an input that gave no file (empty folder, pattern without a
    match) to why, so that it is reported like a bad file."""

    def __init__(self):
        super().__init__()
        self.problems: dict[str, str] = {}


def _walk_files(top: str) -> Iterator[str]:
    """Every file under ``top``, symbolic links to folders followed but each real folder visited once
    (a link back up the tree would otherwise be walked forever)."""
    seen = set()
    for root, dirs, files in os.walk(top, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        yield from (os.path.join(root, n) for n in files)


def _glob_files(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, but ``**`` walks with :func:`_walk_files` (glob's own
    recursion follows links to folders without end)."""
    if "**" not in pattern:
        return glob.glob(pattern)
    parts = pattern.split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base_parts, pat = parts[:fixed], parts[fixed:]
    base = os.sep.join(base_parts) or ("." if not pattern.startswith(os.sep) else os.sep)
    if not os.path.isdir(base):
        return []

    def match(pat: list[str], names: list[str]) -> bool:  # glob's rules: * never matches a leading dot
        if not pat:
            return not names
        if pat[0] == "**":
            return any(match(pat[1:], names[k:]) for k in range(len(names) + 1) if not any(n.startswith(".") for n in names[:k]))
        if not names or (names[0].startswith(".") and not pat[0].startswith(".")):
            return False
        return fnmatch.fnmatchcase(names[0], pat[0]) and match(pat[1:], names[1:])

    out = []
    for path in _walk_files(base):
        names = os.path.relpath(path, base).split(os.sep)
        if match(pat, names):
            out.append(os.sep.join(base_parts + names))
    return out


def expand_inputs(specs: Sequence[str], *, _depth: int = 0) -> InputList:
    """Files, folders (recursive, by the audio extensions soundfile reads, sorted), glob patterns
    and ``@list.txt`` files (one path, folder or pattern per line; blank lines and ``#`` comments
    skipped) -> one list, each file once (the first spelling kept)."""
    out = InputList()
    seen = set()

    def add(path: str, reason: str | None = None) -> None:
        key = os.path.realpath(path)
        if key in seen:
            return
        seen.add(key)
        out.append(path)
        if reason:
            out.problems[path] = reason

    for spec in specs:
        spec = os.fspath(spec)
        if spec.startswith("@") and not os.path.exists(spec):
            listing = spec[1:]
            if _depth > 8:
                raise ValueError(f"{listing}: @list files nested more than 8 deep")
            try:
                with open(listing, encoding="utf-8") as f:
                    lines = [ln.strip() for ln in f]
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{listing}: cannot read the list of inputs ({type(e).__name__}: {e})") from None
            sub = expand_inputs([ln for ln in lines if ln and not ln.startswith("#")], _depth=_depth + 1)
            for p in sub:
                add(p, sub.problems.get(p))
        elif os.path.isdir(spec):
            found = [p for p in _walk_files(spec) if _is_audio(p)]
            if not found:
                add(spec, f"no audio files in this folder (extensions: {', '.join(sorted(AUDIO_EXTENSIONS))})")
            for p in sorted(found):
                add(p)
        elif not os.path.exists(spec) and glob.has_magic(spec):
            matches = sorted(p for p in _glob_files(spec) if os.path.isfile(p))
            if not matches:
                add(spec, "no files match this pattern")
            for p in matches:
                add(p)
        else:
            add(spec)  # a file (or a missing path: reported as "file not found" when read)
    return out


# ------------------------------------------------------------------------------------------------
# reading: a file -> the model's windows, as the samples come
# ------------------------------------------------------------------------------------------------


def window_plan(config) -> dict:
    """What the reader needs of the model's config (plain numbers: cheap to send to workers)."""
    return {
        "sample_rate": int(config.sample_rate),
        "win": int(round(config.clip_seconds * config.sample_rate)),
        "hop": int(round(config.long_hop_seconds * config.sample_rate)),
        "max_frames": int(config.max_frames),
        "hop_length": int(config.hop_length),
        "n_fft": int(config.n_fft),
        "repeatpad": config.clip_fill == "repeatpad",
    }


def _one_image(plan: dict, n: int) -> bool:
    """HTSAT._one_image: whether a clip of n samples runs as one image."""
    if plan["repeatpad"]:
        return n <= plan["win"]
    return 1 + n // plan["hop_length"] <= plan["max_frames"]


def file_windows(
    path: str,
    index: int,
    plan: dict,
    *,
    short_clips: str = "tile",
    silence_db: float | None = None,
    block_seconds: float | None = None,
) -> Iterator[dict]:
    """Items for one file: ``{"kind": "one"|"win", "file", "wave", "start", "last", ...}`` then
    ``{"kind": "end", "file", "samples", "windows", "warnings"}``, or ``{"kind": "error", ...}``.

    A window is sent once a sample past its end has been read (so it is known not to be the last);
    at the end the last window is the one ending at the file's end, as ``HTSAT.window_starts`` has it.
    """
    warnings: list[str] = []
    win, hop = plan["win"], plan["hop"]
    buf = np.zeros(0, np.float32)
    offset = 0  # sample index of buf[0]
    next_start = 0
    windows = 0
    peak = 0.0
    windowed = False
    try:
        if isinstance(path, DecodedAudio):
            blocks = stream_array(
                path.samples, path.rate, plan["sample_rate"], name=path, block_seconds=block_seconds or BLOCK_SECONDS
            )
        else:
            blocks = stream_audio(path, plan["sample_rate"], block_seconds=block_seconds or BLOCK_SECONDS, warn=warnings.append)
        for block in blocks:
            peak = max(peak, float(np.max(np.abs(block))))
            buf = np.concatenate([buf, block]) if buf.size else block
            total = offset + buf.shape[0]
            if not windowed and not _one_image(plan, total):
                windowed = True
            if windowed:
                while next_start + win < total:  # a sample past the window's end: not the last one
                    a = next_start - offset
                    yield {"kind": "win", "file": index, "wave": buf[a : a + win].copy(), "start": next_start, "last": False}
                    windows += 1
                    next_start += hop
                # keep what later windows (and a last window ending at the end) still need
                keep_from = min(next_start, total - win)
                if keep_from > offset:
                    buf = buf[keep_from - offset :].copy()
                    offset = keep_from
        total = offset + buf.shape[0]
        if silence_db is not None:
            check_audio(np.array([peak], np.float32), path, threshold_db=silence_db)
        if windowed:
            # the final window: the next regular one if it ends exactly at the end, else the last win samples
            start = next_start if next_start + win == total else total - win
            a = start - offset
            yield {"kind": "win", "file": index, "wave": buf[a : a + win].copy(), "start": start, "last": True, "samples": total}
            windows += 1
        else:
            wave = buf
            if plan["repeatpad"] and total < win:
                wave = fit_length(buf, win, pad="repeatpad")  # the model's own repeat_pad, done here so clips batch
            elif total < win and short_clips in ("tile", "zeros"):
                wave = fit_length(buf, win, pad=short_clips)
            elif total < plan["n_fft"]:
                wave = fit_length(buf, plan["n_fft"], pad="tile")  # "stretch" of a clip shorter than one STFT window
            yield {"kind": "one", "file": index, "wave": np.ascontiguousarray(wave), "start": 0, "last": True, "samples": total}
            windows = 1
        yield {"kind": "end", "file": index, "samples": total, "windows": windows, "warnings": warnings}
    except AudioError as e:
        yield {"kind": "error", "file": index, "error": e.reason, "warnings": warnings}


WORKER_STAGES = ("audio", "mel", "model")


class _FileWindows(torch.utils.data.IterableDataset):
    """The files of one run; worker w reads files w, w + W, w + 2W, ...

    What leaves a worker (``stage``): "audio", each window's samples (``"wave"``); "mel", its log-mel
    (``"mel"``, by ``front``), so the STFT runs beside the model; "model", the model's outputs for it
    (``"row"``, by ``rows``: windows of this worker's files batched ``batch_size`` at a time), so
    every core runs the whole model on its own files (on CPU, process parallelism beats the
    intra-op threads of one process on a model this size)."""

    def __init__(self, paths, plan, short_clips, silence_db, skip, front=None, rows=None, batch_size=16):
        self.paths, self.plan, self.short_clips, self.silence_db, self.skip = paths, plan, short_clips, silence_db, skip
        self.front, self.rows, self.batch_size = front, rows, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        pending: list[dict] = []
        for i in range(wid, len(self.paths), nw):
            if i in self.skip:
                continue
            for item in file_windows(self.paths[i], i, self.plan, short_clips=self.short_clips, silence_db=self.silence_db):
                item = self._prepare(item)
                if self.rows is None or "n" not in item:
                    yield item
                elif item["n"] != self.plan["win"]:  # an odd length: alone (as in run_files)
                    yield from self._run([item])
                else:
                    pending.append(item)
                    if len(pending) >= self.batch_size:
                        yield from self._run(pending)
                        pending = []
        if pending:
            yield from self._run(pending)

    def _run(self, items: list[dict]) -> Iterator[dict]:
        for it, row in zip(items, self.rows(items)):
            it.pop("mel", None)
            it.pop("wave", None)
            it["row"] = row
            yield it

    def _prepare(self, item: dict) -> dict:
        wave = item.get("wave")
        if wave is None:
            return item
        item["n"] = wave.shape[0]
        item["peak"] = float(np.max(np.abs(wave))) if wave.size else 0.0
        if self.front is not None:
            with torch.inference_mode():
                item["mel"] = self.front(torch.from_numpy(wave)[None])[0].numpy()
            del item["wave"]
        return item


def _forward_rows(model, items: list[dict], want_fw: bool, keys: list[str], device, autocast) -> list[dict[str, np.ndarray]]:
    """The model's outputs for each item (its "mel" or "wave"), one dict of numpy arrays per item. A
    non-finite row is its own file's error, never its neighbours': a batch with one runs again file by file."""
    key = "mel" if "mel" in items[0] else "wave"
    x = torch.from_numpy(np.stack([it[key] for it in items])).to(device, non_blocking=True)
    with torch.inference_mode(), autocast():
        out = model.forward_mel(x, framewise=want_fw) if key == "mel" else model(x, framewise=want_fw)
    arrays = {k: v.float().cpu().numpy() for k, v in out.items()}
    rows = [{k: v[r] for k, v in arrays.items()} for r in range(len(items))]
    files = list(dict.fromkeys(it["file"] for it in items))
    if len(files) > 1 and not all(np.isfinite(row[k]).all() for row in rows for k in keys):
        for f in files:
            idx = [r for r, it in enumerate(items) if it["file"] == f]
            for r, row in zip(idx, _forward_rows(model, [items[r] for r in idx], want_fw, keys, device, autocast)):
                rows[r] = row
    return rows


def _keep_freed_memory(_worker_id: int = 0) -> None:
    """The init of a worker that runs the model (which keeps DataLoader's one torch thread: more OpenMP
    threads in a forked child can deadlock). glibc's malloc hands every activation above its mmap threshold back to the kernel when freed, and
    the next batch faults it in again, zeroed (about a fifth of a CPU worker's time on the tiny model).
    Raise the thresholds (glibc only; elsewhere nothing changes), so the heap is reused from batch to batch."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's ceiling for this threshold on 64-bit
    libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)


def _init_worker(worker_id: int, keep_freed_memory: bool = False) -> None:
    """A SIGTERM sent to the whole process group is the main process's to handle (it writes what was
    done and stops the workers); a worker dying first would only turn it into a dead-worker error."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if keep_freed_memory:
        _keep_freed_memory(worker_id)


def _as_is(item: dict) -> dict:
    """The loader's collate function: items cross from the workers as they are. (The default converts
    every numpy array to a tensor, and each tensor then crosses through its own shared-memory file,
    a socket round trip apiece: most of the main process's time when the workers run the model.)"""
    return item


def _worker_deaths_named(items: Iterator[dict]) -> Iterator[dict]:
    """The loader's items; a worker killed under it (the kernel's OOM killer) becomes one line instead
    of the loader's traceback."""
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except RuntimeError as e:
            died = worker_death(e)
            if died is None:
                raise
            raise died from None
        yield item


def worker_death(exc: BaseException) -> InferenceError | None:
    """The one-line error for torch's dead-worker RuntimeError (raised by the loader, or by its SIGCHLD
    handler wherever the main process happens to be); None for any other error."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if not isinstance(exc, RuntimeError) or not first.startswith("DataLoader worker"):
        return None
    return InferenceError(
        f"a worker process died ({first.rstrip('. ')}; out of memory? try fewer --num-workers or a smaller --batch-size)"
    )


# ------------------------------------------------------------------------------------------------
# running: batches across files, accumulation per file, results in input order
# ------------------------------------------------------------------------------------------------


class _FileState:
    """What one file has gathered so far: sums over its windows and the finished part of its map."""

    def __init__(self, path, want_framewise, tracker, keep_framewise):
        self.path = path
        self.want_framewise, self.tracker, self.keep = want_framewise, tracker, keep_framewise
        self.sums: dict[str, np.ndarray] = {}
        self.seen = 0  # rows through the model (with errors)
        self.read_error = False
        self.expected = None
        self.samples = None
        self.warnings: list[str] = []
        self.error: str | None = None
        self.frame_seconds = None
        self.fw_sum = None  # frames from fw_base on, not yet final
        self.fw_count = None
        self.fw_base = 0
        self.kept: list[np.ndarray] = []

    def add(self, row: dict[str, np.ndarray], item: dict, plan: dict) -> None:
        for k, v in row.items():
            if k != "framewise_output":
                self.sums[k] = self.sums.get(k, 0.0) + v.astype(np.float64)
        self.seen += 1
        if not self.want_framewise:
            return
        fw = row["framewise_output"].astype(np.float64)
        if item["kind"] == "one":
            self.frame_seconds = (
                plan["win"] / plan["sample_rate"] / plan["max_frames"]
                if plan["repeatpad"]
                else item["n"] / plan["sample_rate"] / plan["max_frames"]
            )
            self._final(fw)
            return
        # a window: placed on the frame grid of the whole file as HTSAT._forward_long places it
        frame_sec = self.frame_seconds = plan["win"] / plan["sample_rate"] / plan["max_frames"]
        per_win = fw.shape[0]
        if item["last"]:
            total = math.ceil(item["samples"] / plan["sample_rate"] / frame_sec - 1e-9)
            off = total - per_win
        else:
            off = round(item["start"] / plan["sample_rate"] / frame_sec)
        if self.fw_sum is None:
            self.fw_sum = np.zeros((0, fw.shape[1]))
            self.fw_count = np.zeros(0)
        if off > self.fw_base:  # frames before this window's first one are final
            done = min(off - self.fw_base, self.fw_sum.shape[0])
            self._final(self.fw_sum[:done] / np.maximum(self.fw_count[:done, None], 1))
            self.fw_sum, self.fw_count = self.fw_sum[done:], self.fw_count[done:]
            self.fw_base += done
        need = off + per_win - self.fw_base
        if need > self.fw_sum.shape[0]:
            grow = need - self.fw_sum.shape[0]
            self.fw_sum = np.concatenate([self.fw_sum, np.zeros((grow, fw.shape[1]))])
            self.fw_count = np.concatenate([self.fw_count, np.zeros(grow)])
        a = off - self.fw_base
        self.fw_sum[a : a + per_win] += fw
        self.fw_count[a : a + per_win] += 1
        if item["last"]:
            self._final(self.fw_sum / np.maximum(self.fw_count[:, None], 1))
            self.fw_sum = self.fw_count = None

    def _final(self, probs: np.ndarray) -> None:
        if self.tracker is not None and self.tracker.frames == 0:
            self.tracker.set_frame_seconds(self.frame_seconds)
        if self.tracker is not None:
            self.tracker.add(probs)
        if self.keep:
            self.kept.append(probs.astype(np.float32))

    @property
    def complete(self) -> bool:
        return self.read_error or (self.expected is not None and self.seen >= self.expected)


def run_files(
    predictor,
    paths: Sequence[str],
    *,
    mode: str = "predict",
    top_k: int = 5,
    framewise: bool = False,
    threshold: float = 0.5,
    merge_gap: float = 0.0,
    min_duration: float = 0.0,
    embedding: str = "latent_output",
    batch_size: int = 16,
    num_workers: int = 0,
    worker_stage: str | None = None,
    keep_framewise: bool = False,
    problems: dict[str, str] | None = None,
) -> Iterator[dict]:
    """One result per path, in order, each as soon as it and the ones before it are done.

    ``mode="predict"``: ``{"file", "duration", "top", ["frame_seconds", "events"]}``; ``mode="embed"``:
    ``{"file", "duration", "embedding"}`` (numpy float32). A file that cannot be used gives
    ``{"file", "error"}``; warnings (a truncated file) come as ``"warnings"``. ``keep_framewise`` adds
    the whole framewise map (``"framewise"``, frames x classes), which the events never need.
    ``worker_stage``: what the DataLoader workers do (with ``num_workers`` > 0): "audio" (decode and
    resample; the default on GPU), "mel" (and each window's log-mel, by FFT: ``FrontEnd(stft="fft")``)
    or "model" (and the model itself, on their own files; the default on CPU: one worker per core).
    """
    from .predict import EventTracker, NonFiniteOutputError, _check_finite

    model = predictor.model
    cfg = model.config
    plan = window_plan(cfg)
    if int(top_k) < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if mode == "embed" and embedding == "clap_embedding" and model.audio_projection is None:
        raise ValueError(
            f"embedding 'clap_embedding' needs a CLAP model (clap-htsat-*); {cfg.name or 'this model'} has no projection"
        )
    if mode == "embed" and embedding not in ("latent_output", "clap_embedding"):
        raise ValueError(f"unknown embedding {embedding!r} (latent_output, clap_embedding)")
    want_fw = mode == "predict" and (framewise or keep_framewise)
    paths = [os.fspath(p) for p in paths]
    problems = dict(problems or {})
    skip = {i for i, p in enumerate(paths) if p in problems}
    states: dict[int, _FileState] = {}
    done: dict[int, dict] = {i: {"file": paths[i], "error": problems[paths[i]]} for i in skip}
    next_out = 0
    finished: set = set()

    def state(i) -> _FileState:
        if i not in states:
            tracker = (
                EventTracker(1.0, predictor.labels, threshold=threshold, merge_gap=merge_gap, min_duration=min_duration)
                if framewise
                else None
            )
            states[i] = _FileState(paths[i], want_fw, tracker, keep_framewise)
        return states[i]

    keys = (
        ["clipwise_logits"]
        + (["framewise_output"] if want_fw else [])
        + (["latent_output"] + (["clap_projection"] if model.audio_projection is not None else []) if mode == "embed" else [])
    )

    def rows_of(items: list[dict]) -> list[dict[str, np.ndarray]]:
        return _forward_rows(model, items, want_fw, keys, predictor.device, predictor._autocast)

    def take(it: dict, row: dict[str, np.ndarray]) -> None:
        st = state(it["file"])
        if st.error is None and not all(np.isfinite(row[k]).all() for k in keys):
            try:
                _check_finite({k: torch.from_numpy(row[k]) for k in keys}, np.array([it["peak"]]), keys)
            except NonFiniteOutputError as e:
                st.error = str(e)
        if st.error is not None:
            st.seen += 1  # counted, not used
            return
        st.add(row, it, plan)

    def run(items: list[dict]) -> None:
        items = [it for it in items if it["file"] not in finished]  # a file may fail while its windows wait
        for it, row in zip(items, rows_of(items) if items else []):
            take(it, row)

    def finish(i: int) -> dict:
        st = states.pop(i)
        finished.add(i)
        res: dict = {"file": paths[i]}
        if st.error is not None:
            res["error"] = st.error
        else:
            n = max(st.seen, 1)
            duration = st.samples / cfg.sample_rate
            res["duration"] = round(duration, 4)
            if mode == "embed":
                if embedding == "clap_embedding":
                    proj = torch.from_numpy(st.sums["clap_projection"] / n)
                    emb = torch.nn.functional.normalize(proj, dim=-1).numpy()
                else:
                    emb = st.sums["latent_output"] / n
                res["embedding"] = emb.astype(np.float32)
            else:
                logits = torch.from_numpy(st.sums["clipwise_logits"] / n)
                scores = torch.sigmoid(logits) if cfg.loss_type == "clip_bce" else torch.softmax(logits, dim=0)
                k = max(1, min(int(top_k), scores.numel()))
                top = torch.topk(scores, k)
                res["top"] = [
                    {"label": predictor.labels[j], "index": int(j), "score": float(s)}
                    for s, j in zip(top.values.tolist(), top.indices.tolist())
                ]
                if framewise:
                    res["frame_seconds"] = st.frame_seconds
                    res["events"] = st.tracker.events(duration)
                if keep_framewise:
                    res["framewise"] = np.concatenate(st.kept) if st.kept else np.zeros((0, cfg.num_classes), np.float32)
                    res.setdefault("frame_seconds", st.frame_seconds)
        if st.warnings:
            res["warnings"] = st.warnings
        return res

    def ready() -> Iterator[dict]:
        nonlocal next_out
        for i in [i for i, st in states.items() if st.complete]:
            done[i] = finish(i)
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1

    stage = worker_stage or ("model" if predictor.device.type == "cpu" else "audio")
    if stage not in WORKER_STAGES:
        raise ValueError(f"worker_stage must be one of {', '.join(WORKER_STAGES)}, got {stage!r}")
    if stage == "model" and predictor.device.type != "cpu":
        raise ValueError(f"worker_stage 'model' runs the model in CPU worker processes; the model is on {predictor.device}")
    front = rows = None
    if num_workers > 0 and stage in ("mel", "model") and getattr(model, "accepts_mel", True):
        # the original's DFT by FFT (FrontEnd): on CPU the frozen-conv STFT is a third of the tiny model's work
        front = copy.deepcopy(model.front_end(stft="fft")).cpu().eval()
    if num_workers > 0 and stage == "model":
        rows = rows_of  # called in the worker processes (forked: the model is theirs, copy-on-write)
    dataset = _FileWindows(paths, plan, predictor.short_clips, predictor.silence_db, skip, front, rows, batch_size)
    if num_workers > 0:
        # items are single windows: let the workers run a whole batch ahead (2 per worker would leave them
        # idle while the model runs, then the model idle while they refill)
        ahead = max(2, -(-2 * int(batch_size) // num_workers))
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=False,
            prefetch_factor=ahead,
            worker_init_fn=functools.partial(_init_worker, keep_freed_memory=stage == "model"),
            collate_fn=_as_is,
        )
    else:
        loader = dataset
    batch: list[dict] = []
    it = _worker_deaths_named(iter(loader))
    try:
        yield from ready()
        for item in it:
            if item["file"] in finished:
                continue
            st = state(item["file"])
            kind = item["kind"]
            if kind == "error":
                st.error, st.read_error = item["error"], True
                st.warnings = list(item.get("warnings") or [])
            elif kind == "end":
                st.expected, st.samples = item["windows"], item["samples"]
                st.warnings = list(item["warnings"])
            elif "row" in item:  # a worker ran the model on it
                take(item, item["row"])
            elif item["n"] == plan["win"]:
                batch.append(item)
                if len(batch) >= batch_size:
                    run(batch)
                    batch = []
            else:  # an odd length (a clip of 10.0-10.24 s, a stretched short clip): alone
                run([item])
            if kind in ("error", "end") or not batch:
                yield from ready()
        if batch:
            run(batch)
        yield from ready()
    finally:
        del it  # stops the loader's workers when the caller stops early (a broken pipe)
