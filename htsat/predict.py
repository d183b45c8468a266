"""Inference on audio files of any length: top-k labels with scores, and sound events (onset,
offset, label, score) on the real time axis from the framewise output.

Scores are probabilities: sigmoid of the mean logits for multi-label models (``clip_bce``, the
model's ``clipwise_output``), softmax of them for single-label models (``clip_ce``, whose
``clipwise_output`` is the raw mean logits). Events come from ``framewise_output`` (sigmoid of the
token-semantic map): frames at or above a threshold, consecutive frames merged into one event
(gaps up to ``merge_gap`` seconds bridged), scored by their peak probability.

Short clips are tiled to the model's ``clip_seconds`` by default, the way training data are fitted
(spec section 6; ``short_clips="stretch"`` gives the original's bicubic time stretch,
``"zeros"`` zero padding); events are reported within the real duration only. Clips longer than
one model image run as sliding windows inside the model.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import numpy as np
import torch

from .audio import DEFAULT_SILENCE_DB, AudioError, check_audio, fit_length, load_audio

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


def labels_for(num_classes: int, checkpoint: Optional[Mapping] = None, labels_file: Optional[str] = None) -> List[str]:
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
    duration: Optional[float] = None,
) -> List[dict]:
    """Events from a (frames, classes) probability map: runs of frames >= threshold per class.

    Runs separated by at most ``merge_gap`` seconds are merged; events shorter than
    ``min_duration`` are dropped; times are clipped to ``duration``. Returns dicts with onset,
    offset (seconds), label, index (class) and score (peak probability), sorted by onset.
    """
    probs = np.asarray(framewise, dtype=np.float32)
    if probs.ndim != 2:
        raise ValueError(f"framewise must be (frames, classes), got {probs.shape}")
    active = probs >= threshold
    events = []
    gap_frames = merge_gap / frame_seconds if frame_seconds > 0 else 0.0
    for c in np.nonzero(active.any(axis=0))[0]:
        edges = np.diff(np.concatenate([[0], active[:, c].astype(np.int8), [0]]))
        starts = np.nonzero(edges == 1)[0]
        ends = np.nonzero(edges == -1)[0]  # exclusive
        runs: List[List[int]] = []
        for s, e in zip(starts.tolist(), ends.tolist()):
            if runs and s - runs[-1][1] <= gap_frames + 1e-9:
                runs[-1][1] = e
            else:
                runs.append([s, e])
        for s, e in runs:
            onset, offset = s * frame_seconds, e * frame_seconds
            if duration is not None:
                if onset >= duration:
                    continue
                offset = min(offset, duration)
            if offset - onset < min_duration:
                continue
            events.append(
                {
                    "onset": round(onset, 4), "offset": round(offset, 4), "label": labels[c], "index": int(c),
                    "score": float(probs[s:e, c].max()),
                }
            )
    events.sort(key=lambda ev: (ev["onset"], -ev["score"]))
    return events


@dataclass
class Predictor:
    """A model ready for inference plus its class names.

    ``Predictor.from_checkpoint(path)`` accepts our checkpoints (training or saved models, with the
    class names they store) and the original's .ckpt files (``name`` picks the preset).
    """

    model: torch.nn.Module
    labels: List[str]
    device: torch.device
    short_clips: str = "tile"
    silence_db: Optional[float] = DEFAULT_SILENCE_DB
    precision: str = "fp32"

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        *,
        name: Optional[str] = None,
        backend: str = "auto",
        device: Optional[str] = None,
        labels_file: Optional[str] = None,
        **kwargs,
    ) -> "Predictor":
        from .checkpoint import read_checkpoint, model_from_checkpoint

        obj = read_checkpoint(path)
        model = model_from_checkpoint(obj, name=name, backend=backend, source=os.fspath(path))
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(dev).eval()
        return cls(model, labels_for(model.config.num_classes, obj, labels_file), dev, **kwargs)

    def _autocast(self):
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

    def predict_file(self, path: str, **kwargs) -> dict:
        """Predictions for one file; raises AudioError naming the file when it cannot be used."""
        wave = load_audio(path, self.model.config.sample_rate)
        check_audio(wave, path, threshold_db=self.silence_db)
        try:
            return {"file": os.fspath(path), **self.predict_waveform(wave, **kwargs)}
        except NonFiniteOutputError as e:
            raise AudioError(path, str(e)) from e

    def predict_files(self, paths: Sequence[str], on_error=None, **kwargs) -> List[dict]:
        """Predictions for many files; a file that fails gives {"file", "error"} and the rest go on."""
        results = []
        for p in paths:
            try:
                results.append(self.predict_file(p, **kwargs))
            except AudioError as e:
                results.append({"file": os.fspath(p), "error": e.reason})
                if on_error is not None:
                    on_error(p, e)
        return results


def format_results(results: Sequence[dict], *, threshold: Optional[float] = None) -> str:
    """A readable table per file: top-k scores, then events if present."""
    lines: List[str] = []
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
