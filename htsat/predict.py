"""Inference on audio files of any length: top-k labels with scores, and sound events (onset,
offset, label, score) on the real time axis from the framewise output.

Scores are probabilities: sigmoid of the mean logits for multi-label models (``clip_bce``, the
model's ``clipwise_output``), softmax of them for single-label models (``clip_ce``, whose
``clipwise_output`` is the raw mean logits). Events come from ``framewise_output`` (sigmoid of the
token-semantic map): frames at or above a threshold, consecutive frames merged into one event
(gaps up to ``merge_gap`` seconds bridged), scored by their peak probability.

Short clips are tiled to the model's ``clip_seconds`` by default, the way training data are fitted
(docs/model.md §6; ``short_clips="stretch"`` gives the original's bicubic time stretch,
``"zeros"`` zero padding); events are reported within the real duration only. Clips longer than
one model image run as sliding windows inside the model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .audio import DEFAULT_SILENCE_DB, AudioError, fit_length

__all__ = ["NonFiniteOutputError", "Predictor", "detect_events", "format_results", "labels_for"]


class NonFiniteOutputError(ValueError):
    """The model gave NaN or inf for an input: an error for that input, never a NaN score."""


def _check_finite(out: Mapping, wave: np.ndarray, keys: Sequence[str]) -> None:
    bad = [k for k in keys if not bool(torch.isfinite(out[k]).all())]
    if not bad:
        return
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    why = ""
    if peak > 1e12:
        # as in the original, the float32 power spectrum overflows from roughly 1e17 on
        why = "; samples this large overflow the front end's float32 power spectrum (audio is expected in [-1, 1])"
    raise NonFiniteOutputError(f"the model output ({', '.join(bad)}) is NaN or infinite for audio with peak {peak:.3g}{why}")


def labels_for(num_classes: int, checkpoint: Mapping | None = None, labels_file: str | None = None) -> list[str]:
    """Class names: an explicit file, else those saved in a training checkpoint, else AudioSet's
    527 names for a 527-class model, else ``class_<i>``."""
    if labels_file:
        from .data import read_class_list

        names = read_class_list(labels_file)
        if len(names) != num_classes:
            raise ValueError(f"{labels_file}: {len(names)} class names for a model with {num_classes} classes")
        return names
    if checkpoint is not None:
        names = checkpoint.get("classes")
        if isinstance(names, (list, tuple)) and len(names) == num_classes and all(isinstance(n, str) for n in names):
            return list(names)
    if num_classes == 527:
        from .labels import audioset_labels

        return list(audioset_labels())
    return [f"class_{i}" for i in range(num_classes)]


def detect_events(
    framewise: np.ndarray,
    frame_seconds: float,
    labels: Sequence[str],
    *,
    threshold: float = 0.5,
    merge_gap: float = 0.0,
    min_duration: float = 0.0,
    duration: float | None = None,
) -> list[dict]:
    """Events from a (frames, classes) probability map: runs of frames >= threshold per class.

    Runs separated by at most ``merge_gap`` seconds are merged; events shorter than
    ``min_duration`` are dropped; times are clipped to ``duration``. Returns dicts with onset,
    offset (seconds), label, index (class) and score (peak probability), sorted by onset.
    """
    probs = np.asarray(framewise, dtype=np.float32)
    if probs.ndim != 2:
        raise ValueError(f"framewise must be (frames, classes), got {probs.shape}")
    tracker = EventTracker(frame_seconds, labels, threshold=threshold, merge_gap=merge_gap, min_duration=min_duration)
    tracker.add(probs)
    return tracker.events(duration)


class EventTracker:
    """Events from a framewise map fed a chunk of frames at a time (an hour of audio never has its
    whole map in memory): per class, runs of frames >= threshold, merged across chunk edges and
    across gaps up to ``merge_gap``; ``events(duration)`` gives what :func:`detect_events` gives."""

    def __init__(self, frame_seconds: float, labels: Sequence[str], *, threshold=0.5, merge_gap=0.0, min_duration=0.0):
        self.frame_seconds, self.labels = frame_seconds, labels
        self.threshold, self.min_duration = threshold, min_duration
        self.merge_gap = merge_gap
        self.set_frame_seconds(frame_seconds)
        self.runs: dict = {}  # class -> [[start, end (exclusive), peak], ...]
        self.frames = 0

    def set_frame_seconds(self, frame_seconds: float) -> None:
        self.frame_seconds = frame_seconds
        self.gap_frames = self.merge_gap / frame_seconds if frame_seconds > 0 else 0.0

    def add(self, probs: np.ndarray) -> None:
        probs = np.asarray(probs, dtype=np.float32)
        active = probs >= self.threshold
        f0 = self.frames
        self.frames += probs.shape[0]
        for c in np.nonzero(active.any(axis=0))[0]:
            edges = np.diff(np.concatenate([[0], active[:, c].astype(np.int8), [0]]))
            runs = self.runs.setdefault(int(c), [])
            for s, e in zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()):
                peak = float(probs[s:e, c].max())
                s, e = s + f0, e + f0
                if runs and s - runs[-1][1] <= self.gap_frames + 1e-9:
                    runs[-1][1] = e
                    runs[-1][2] = max(runs[-1][2], peak)
                else:
                    runs.append([s, e, peak])

    def events(self, duration: float | None = None) -> list[dict]:
        out = []
        for c, runs in self.runs.items():
            for s, e, peak in runs:
                onset, offset = s * self.frame_seconds, e * self.frame_seconds
                if duration is not None:
                    if onset >= duration:
                        continue
                    offset = min(offset, duration)
                if offset - onset < self.min_duration:
                    continue
                out.append(
                    {"onset": round(onset, 4), "offset": round(offset, 4), "label": self.labels[c], "index": c, "score": peak}
                )
        out.sort(key=lambda ev: (ev["onset"], -ev["score"]))
        return out


@dataclass
class Predictor:
    """A model ready for inference plus its class names.

    ``Predictor.from_checkpoint(path)`` accepts our checkpoints (training or saved models, with the
    class names they store), the original's .ckpt files (``name`` picks the preset) and the names that
    ``htsat models`` lists (the cached file, downloaded first where it can be).
    """

    model: torch.nn.Module
    labels: list[str]
    device: torch.device
    short_clips: str = "tile"
    silence_db: float | None = DEFAULT_SILENCE_DB
    precision: str = "fp32"  # "auto": bf16 (fp16 without bf16) autocast on CUDA, fp32 on CPU
    batch_size: int = 16  # windows of clip_seconds per forward, across files
    num_workers: int = 0  # DataLoader workers decoding and resampling
    worker_stage: str | None = None  # what the workers do: audio / mel / model (default: model on CPU, else audio)
    runtime: str = "torch"  # "onnxruntime": the model exported to ONNX and run by ONNX Runtime (htsat.export)
    onnx: str | None = None  # an exported file for the onnxruntime runtime (default: exported into the cache)
    quantize: str | None = None  # "int8": the cached export dynamically quantized (onnxruntime runtime)

    def __post_init__(self) -> None:
        from .export import check_runtime, runtime_model

        check_runtime(self.runtime)
        if self.runtime == "onnxruntime" and self.device.type != "cpu":
            raise ValueError(f"--runtime onnxruntime runs on CPU; the device is {self.device} (use --device cpu)")
        self.model = runtime_model(self.model, runtime=self.runtime, onnx=self.onnx, quantize=self.quantize, labels=self.labels)

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        *,
        name: str | None = None,
        backend: str = "auto",
        device: str | None = None,
        labels_file: str | None = None,
        **kwargs,
    ) -> Predictor:
        from . import pretrained
        from .checkpoint import FORMAT, model_from_checkpoint, read_checkpoint, saved_config
        from .config import load_config

        dev = resolve_device(device)
        entry = None
        if not os.path.exists(path) and os.fspath(path) in pretrained.REGISTRY:
            entry = pretrained.REGISTRY[os.fspath(path)]  # a registry name: its cached (or downloaded) file
            path = pretrained.download(entry)
        obj = read_checkpoint(path)
        overrides: dict = {}
        if entry is not None and obj.get("format") != FORMAT:  # an original-layout file: the entry's preset
            name, overrides = name or entry.preset, dict(entry.overrides)
        if name is not None and obj.get("format") == FORMAT:
            # our checkpoints carry their config: a --model that says otherwise is a mistake, not an override
            saved = saved_config(obj).to_dict()
            asked = load_config(name, num_classes=saved["num_classes"]).to_dict()
            diff = [f"{k} {asked[k]!r} vs {saved[k]!r}" for k in saved if k != "name" and asked.get(k) != saved[k]]
            if diff:
                raise ValueError(
                    f"--model {name} disagrees with the config saved in {os.fspath(path)} ({'; '.join(diff[:4])}"
                    f"{'; ...' if len(diff) > 4 else ''}); leave --model out to use the saved one"
                )
        model = model_from_checkpoint(obj, name=name, backend=backend, source=os.fspath(path), overrides=overrides)
        model.to(dev).eval()
        return cls(model, labels_for(model.config.num_classes, obj, labels_file), dev, **kwargs)

    @classmethod
    def from_onnx(cls, path: str, *, device: str | None = None, labels_file: str | None = None, **kwargs) -> Predictor:
        """A file from ``htsat export`` on the onnxruntime runtime; config and class names from its metadata."""
        from .export import OnnxModel, require_onnxruntime

        require_onnxruntime()
        model = OnnxModel(path)
        names = model.labels or None
        labels = labels_for(model.config.num_classes, {"classes": names} if names else None, labels_file)
        kwargs.update(runtime="onnxruntime", onnx=path)
        return cls(model, labels, resolve_device(device or "cpu"), **kwargs)

    def _autocast(self):
        if self.precision == "auto":
            if self.device.type != "cuda":
                return contextlib.nullcontext()
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "fp16":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def predict_waveform(
        self,
        wave: np.ndarray,
        *,
        top_k: int = 5,
        framewise: bool = False,
        threshold: float = 0.5,
        merge_gap: float = 0.0,
        min_duration: float = 0.0,
    ) -> dict:
        cfg = self.model.config
        duration = len(wave) / cfg.sample_rate
        clip = int(round(cfg.clip_seconds * cfg.sample_rate))
        x = wave
        if len(wave) < clip and self.short_clips in ("tile", "zeros"):
            x = fit_length(wave, clip, pad=self.short_clips)
        elif len(wave) < cfg.n_fft:
            x = fit_length(wave, cfg.n_fft, pad="tile")  # "stretch" of a clip shorter than one STFT window
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(self.device)
        with self._autocast():
            out = self.model(xt)
        _check_finite(out, x, ["clipwise_logits"] + (["framewise_output"] if framewise else []))
        logits = out["clipwise_logits"][0].float()
        scores = torch.sigmoid(logits) if cfg.loss_type == "clip_bce" else torch.softmax(logits, dim=0)
        k = max(1, min(int(top_k), scores.numel()))
        top = torch.topk(scores, k)
        res = {
            "duration": round(duration, 4),
            "top": [
                {"label": self.labels[i], "index": int(i), "score": float(s)}
                for s, i in zip(top.values.tolist(), top.indices.tolist())
            ],
        }
        if framewise:
            fw = out["framewise_output"][0].float().cpu().numpy()
            frame_s = self.model.frame_seconds(xt.shape[1])
            res["frame_seconds"] = frame_s
            res["events"] = detect_events(
                fw, frame_s, self.labels, threshold=threshold, merge_gap=merge_gap, min_duration=min_duration, duration=duration
            )
        return res

    def iter_files(self, inputs: Sequence[str], **kwargs) -> Iterator[dict]:
        """Results for files, folders (recursive), glob patterns and ``@list.txt`` files, one per file in
        order, each as soon as it is done (windows of many files batched together, ``batch_size`` /
        ``num_workers``). Keyword arguments: top_k, framewise, threshold, merge_gap, min_duration,
        keep_framewise (the whole framewise map as ``"framewise"``). A bad file gives
        ``{"file", "error"}`` and the others go on."""
        from .inference import InputList, expand_inputs, run_files

        paths = inputs if isinstance(inputs, InputList) else expand_inputs(inputs)
        kwargs.setdefault("batch_size", self.batch_size)
        kwargs.setdefault("num_workers", self.num_workers)
        kwargs.setdefault("worker_stage", self.worker_stage)
        yield from run_files(self, paths, problems=paths.problems, **kwargs)

    def embed_files(self, inputs: Sequence[str], embedding: str = "latent_output", **kwargs) -> Iterator[dict]:
        """Embeddings ``{"file", "duration", "embedding"}`` (float32 numpy) for files, folders, patterns and
        @lists, as :meth:`iter_files`; ``embedding``: "latent_output" (the pooled HTS-AT features) or
        "clap_embedding" (CLAP presets: the normalised joint-space projection, windows averaged first)."""
        return self.iter_files(inputs, mode="embed", embedding=embedding, **kwargs)

    def predict_file(self, path: str, **kwargs) -> dict:
        """Predictions for one file; raises AudioError naming the file when it cannot be used."""
        from .inference import run_files

        (res,) = list(run_files(self, [os.fspath(path)], batch_size=self.batch_size, **kwargs))
        if "error" in res:
            raise AudioError(path, res["error"])
        return res

    def predict_files(self, paths: Sequence[str], on_error=None, **kwargs) -> list[dict]:
        """Predictions for many files, as a list; a file that fails gives {"file", "error"} and the rest go on."""
        results = []
        for r in self.iter_files(paths, **kwargs):
            results.append(r)
            if "error" in r and on_error is not None:
                on_error(r["file"], AudioError(r["file"], r["error"]))
        return results


def resolve_device(device: str | None) -> torch.device:
    """A torch.device, or a one-line ValueError for a device this machine lacks or a bad name."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def format_results(results: Sequence[dict], *, threshold: float | None = None) -> str:
    """A readable table per file: top-k scores, then events if present."""
    lines: list[str] = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['file']}: ERROR: {r['error']}")
            lines.append("")
            continue
        lines.append(f"{r['file']}  ({r['duration']:.2f} s)")
        lines.append(f"  {'rank':>4}  {'score':>6}  label")
        for i, t in enumerate(r["top"], 1):
            lines.append(f"  {i:>4}  {t['score']:6.3f}  {t['label']}")
        if "events" in r:
            th = f" (threshold {threshold:g})" if threshold is not None else ""
            if not r["events"]:
                lines.append(f"  no events{th}")
            else:
                lines.append(f"  events{th}:")
                lines.append(f"  {'onset':>8}  {'offset':>8}  {'score':>6}  label")
                for ev in r["events"]:
                    lines.append(f"  {ev['onset']:8.2f}  {ev['offset']:8.2f}  {ev['score']:6.3f}  {ev['label']}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")
