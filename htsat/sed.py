"""Sound event detection scoring: ``htsat evaluate --events REF.tsv``.

Events are DCASE TSV files (header ``filename onset offset event_label``; a row with only a
filename lists a file without events). Two ways to get the estimated events:

- ``--predicted EST.tsv``: score a TSV as it is (e.g. from another system);
- ``--checkpoint C``: run the model on every file of REF (from ``--audio-dir``), take its
  ``framewise_output``, optionally map its classes onto the target labels with a class map
  (``--class-map``: columns source,target; a target's probability is the max over its sources:
  the paper's zero-shot AudioSet -> DESED setting), binarise at ``--threshold``, smooth the
  binary activity with a median filter of ``--median-filter`` frames (the DCASE baseline's
  post-processing) and read events off the runs of active frames. Clips shorter than the
  model's clip are zero-padded (as the original's DESED evaluation) and frames past the real end
  dropped.

Metrics (the definitions of sed_eval, written here because its dcase_util dependency does not
import on current setuptools): event-based with an onset collar of ``t_collar`` (0.2 s) and an
offset collar of max(t_collar, ``percentage_of_length`` x reference length), one-to-one
matching per file and label (maximum bipartite matching); segment-based on ``segment`` (1 s)
segments. Each reports micro (overall) F1/precision/recall and the macro F1 (class-wise
average over the labels with at least one reference or estimated event), the DESED figure.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from typing import Any

import numpy as np

from .data import ManifestError

__all__ = [
    "read_events",
    "write_events",
    "read_class_map",
    "event_based_metrics",
    "segment_based_metrics",
    "framewise_to_events",
    "map_classes",
    "detect_events_with_model",
]

Event = tuple[float, float, str]


def read_events(path: str) -> dict[str, list[Event]]:
    """{filename: [(onset, offset, label), ...]} of a DCASE TSV (every listed file, with or without events)."""
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: event list not found")
    out: dict[str, list[Event]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or [c.strip() for c in rows[0][:4]] != ["filename", "onset", "offset", "event_label"]:
        raise ManifestError(f"{path}: expected a tab-separated header 'filename onset offset event_label'")
    for line, row in enumerate(rows[1:], 2):
        if not row or not row[0].strip():
            continue
        name = row[0].strip()
        events = out.setdefault(name, [])
        cells = [c.strip() for c in row[1:4]] + [""] * (4 - len(row))
        if not any(cells[:3]):
            continue  # a file without events
        try:
            onset, offset = float(cells[0]), float(cells[1])
        except ValueError:
            raise ManifestError(f"{path}:{line}: onset/offset are not numbers: {cells[:2]}") from None
        if not (math.isfinite(onset) and math.isfinite(offset)) or onset < 0:
            raise ManifestError(f"{path}:{line}: onset/offset must be finite seconds >= 0, got {cells[0]}, {cells[1]}")
        if not cells[2] or offset < onset:
            raise ManifestError(f"{path}:{line}: an event needs a label and offset >= onset")
        events.append((onset, offset, cells[2]))
    return out


def write_events(path: str, events: dict[str, list[Event]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["filename", "onset", "offset", "event_label"])
        for name in sorted(events):
            if not events[name]:
                w.writerow([name, "", "", ""])
            for onset, offset, label in sorted(events[name]):
                w.writerow([name, f"{onset:.3f}", f"{offset:.3f}", label])


def read_class_map(path: str) -> dict[str, list[str]]:
    """{target label: [source classes]} from a CSV/TSV with columns source,target."""
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: class map not found")
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    delim = "\t" if "\t" in text.splitlines()[0] else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delim))
    if not rows or "source" not in rows[0] or "target" not in rows[0]:
        raise ManifestError(f"{path}: class map needs columns 'source' and 'target'")
    out: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if (row["source"] or "").strip() and (row["target"] or "").strip():
            out[row["target"].strip()].append(row["source"].strip())
    return dict(out)


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else float("nan")
    r = tp / (tp + fn) if tp + fn else float("nan")
    f = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"f1": f, "precision": p, "recall": r, "tp": tp, "fp": fp, "fn": fn}


def _summary(counts: dict[str, list[int]], labels: list[str]) -> dict[str, Any]:
    per_class = {lab: _prf(*counts[lab]) for lab in labels}
    total = [sum(counts[lab][i] for lab in labels) for i in range(3)]
    scored = [per_class[lab]["f1"] for lab in labels if not math.isnan(per_class[lab]["f1"])]
    return {
        "overall": _prf(*total),
        "macro_f1": float(np.mean(scored)) if scored else float("nan"),
        "per_class": per_class,
    }


def _labels(ref: dict, est: dict) -> list[str]:
    return sorted({e[2] for d in (ref, est) for evs in d.values() for e in evs})


def event_based_metrics(
    ref: dict[str, list[Event]], est: dict[str, list[Event]], *, t_collar: float = 0.2, percentage_of_length: float = 0.2
) -> dict[str, Any]:
    """Event-based F1 (sed_eval's definition; see the module docstring)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    labels = _labels(ref, est)
    counts = {lab: [0, 0, 0] for lab in labels}
    for name in sorted(set(ref) | set(est)):
        for lab in labels:
            r = [e for e in ref.get(name, ()) if e[2] == lab]
            s = [e for e in est.get(name, ()) if e[2] == lab]
            hits = np.zeros((len(r), len(s)), dtype=np.int8)
            for i, (ron, roff, _) in enumerate(r):
                off_collar = max(t_collar, percentage_of_length * (roff - ron))
                for j, (son, soff, _) in enumerate(s):
                    hits[i, j] = abs(son - ron) <= t_collar and abs(soff - roff) <= off_collar
            tp = 0
            if hits.any():
                match = maximum_bipartite_matching(csr_matrix(hits), perm_type="column")
                tp = int((match >= 0).sum())
            counts[lab][0] += tp
            counts[lab][1] += len(s) - tp
            counts[lab][2] += len(r) - tp
    out = _summary(counts, labels)
    out.update(t_collar=t_collar, percentage_of_length=percentage_of_length)
    return out


def _active_segments(events: list[Event], label: str, segment: float) -> list[tuple[int, int]]:
    """The segments where ``label`` is active, as merged [first, stop) ranges of segment indices (an
    event far out in time costs no memory)."""
    ranges = []
    for on, off, lab in events:
        if lab == label:
            first = math.floor(on / segment)
            ranges.append((first, max(math.ceil(off / segment - 1e-9), first + 1)))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _overlap(x: list[tuple[int, int]], y: list[tuple[int, int]]) -> int:
    """Segments in both merged range lists."""
    i = j = total = 0
    while i < len(x) and j < len(y):
        total += max(0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def segment_based_metrics(ref: dict[str, list[Event]], est: dict[str, list[Event]], *, segment: float = 1.0) -> dict[str, Any]:
    """Segment-based F1: a label is active in a segment when an event of it overlaps the segment."""
    labels = _labels(ref, est)
    counts = {lab: [0, 0, 0] for lab in labels}
    for name in sorted(set(ref) | set(est)):
        evs_r, evs_s = ref.get(name, []), est.get(name, [])
        for lab in labels:
            a, b = _active_segments(evs_r, lab, segment), _active_segments(evs_s, lab, segment)
            both = _overlap(a, b)
            counts[lab][0] += both
            counts[lab][1] += sum(e - s for s, e in b) - both
            counts[lab][2] += sum(e - s for s, e in a) - both
    out = _summary(counts, labels)
    out["segment"] = segment
    return out


def framewise_to_events(
    probs: np.ndarray, frame_seconds: float, labels: list[str], *, threshold: float = 0.5, median_filter: int = 1
) -> list[Event]:
    """Events from a (frames, classes) probability map: threshold, median-filter the binary
    activity over ``median_filter`` frames (odd), then each run of active frames is an event."""
    active = np.asarray(probs) >= threshold
    if median_filter > 1:
        from scipy.ndimage import median_filter as medfilt

        active = medfilt(active.astype(np.uint8), size=(median_filter, 1), mode="nearest").astype(bool)
    events: list[Event] = []
    for c, lab in enumerate(labels):
        col = np.r_[False, active[:, c], False].astype(np.int8)
        edges = np.diff(col)
        for start, stop in zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]):
            events.append((start * frame_seconds, stop * frame_seconds, lab))
    return events


def map_classes(probs: np.ndarray, classes: list[str], class_map: dict[str, list[str]]) -> tuple[np.ndarray, list[str]]:
    """(frames, targets) probabilities: each target is the max over its source classes."""
    index = {c: i for i, c in enumerate(classes)}
    targets = sorted(class_map)
    cols = []
    for t in targets:
        unknown = [s for s in class_map[t] if s not in index]
        if unknown:
            raise ManifestError(f"class map: source class(es) {unknown[:3]} of {t!r} are not classes of the model")
        cols.append(probs[:, [index[s] for s in class_map[t]]].max(axis=1))
    return np.stack(cols, axis=1), targets


def detect_events_with_model(
    model, classes: list[str], files: list[str], audio_dir: str, *, class_map: dict[str, list[str]] | None = None,
    threshold: float = 0.5, median_filter: int = 1, device: str = "cpu",
) -> dict[str, list[Event]]:  # fmt: skip
    """Estimated events of every file: framewise output -> (mapped) probabilities -> events."""
    import torch

    from .audio import load_audio

    cfg = model.config
    clip = int(round(cfg.clip_seconds * cfg.sample_rate))
    out: dict[str, list[Event]] = {}
    model.eval()
    for name in files:
        wave = load_audio(os.path.join(audio_dir, name), cfg.sample_rate)
        real = len(wave)
        if real < clip:  # zero-padded like the original's DESED evaluation
            wave = np.concatenate([wave, np.zeros(clip - real, dtype=wave.dtype)])
        with torch.no_grad():
            fw = model(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None].to(device))["framewise_output"]
        probs = fw[0].float().cpu().numpy()
        step = model.frame_seconds(len(wave))
        probs = probs[: min(len(probs), math.ceil(real / cfg.sample_rate / step - 1e-9))]
        labels = classes
        if class_map:
            probs, labels = map_classes(probs, classes, class_map)
        out[name] = framewise_to_events(probs, step, labels, threshold=threshold, median_filter=median_filter)
    return out
