"""Datasets for training and evaluation: CSV manifests, ESC-50 folders, class lists, batching.

(Over 500 lines on purpose: manifests, class lists and datasets share one label grammar and one way
of reporting a bad line, file and label.)

Manifest: a CSV file with a header and the columns ``path`` (audio file, relative paths are
resolved against the manifest's folder or an explicit root) and ``labels`` (class names separated
by ``;``, may be empty for a clip without any positive class in multi-label data), and optionally
``fold``. Other columns are ignored.

ESC-50 folder: ``meta/esc50.csv`` (columns filename, fold, target, category, ...) next to an
``audio/`` folder; the class list is ordered by ``target``.

Clip length (docs/model.md §6, dataset-level conventions): the original trains on fixed 10 s clips.
Short clips are tiled (concatenated with themselves, the ESC-50 / Speech Commands convention) by
default, or zero-padded; longer clips are randomly cropped in training and cropped at the start
for evaluation. All of it is configurable.

Bad files (unreadable, empty, corrupt, silent-only) never kill a run silently: with
``on_error="skip"`` a training item is replaced by the next readable file and reported in the
batch (``batch["bad"]``) so the trainer can count and log it; an evaluation item is marked
invalid (``batch["valid"]``) and left out of the metrics. ``on_error="stop"`` raises the
:class:`~htsat.audio.AudioError` naming the file.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import math
import os
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .audio import DEFAULT_SILENCE_DB, AudioError, check_audio, fit_length, load_audio

__all__ = [
    "ManifestError",
    "Item",
    "read_manifest",
    "read_esc50",
    "read_dataset",
    "read_class_list",
    "read_class_aliases",
    "apply_aliases",
    "write_class_list",
    "classes_from_items",
    "check_labels",
    "split_by_fold",
    "is_multi_label",
    "AudioDataset",
    "collate",
    "ResumableSampler",
]

LABEL_SEP = ";"


class ManifestError(ValueError):
    """A manifest, dataset folder or class list that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Item:
    """One clip: absolute audio path, its labels, optional fold, and where it was declared."""

    path: str
    labels: tuple[str, ...]
    fold: str | None = None
    source: str = ""
    line: int = 0

    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.source else self.path


# --------------------------------------------------------------------------------------------
# reading manifests and class lists
# --------------------------------------------------------------------------------------------


def _read_text(path: str, what: str) -> str:
    """A whole UTF-8 text file (a BOM is dropped); ManifestError naming the file, line and byte otherwise."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ManifestError(
            f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None


def _csv_rows(path: str, what: str) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """Header (stripped names) and an iterator of (line, row dict) of a CSV file; blank lines
    skipped, missing trailing cells None. Malformed CSV is a ManifestError naming the file and the
    row's first line: an unbalanced quote (strict parsing), a field over csv's size limit."""
    reader = csv.reader(io.StringIO(_read_text(path, what), newline=""), strict=True)

    def records() -> Iterator[tuple[int, list[str]]]:
        end = 0  # last line of the previous record
        try:
            for row in reader:
                start, end = end + 1, reader.line_num
                if row:
                    yield start, row
        except csv.Error as e:
            if "field larger than field limit" in str(e):
                why = f"a field is longer than {csv.field_size_limit()} characters (an unbalanced quote?)"
            elif "unexpected end of data" in str(e):
                why = "a quoted field that starts on this row is never closed (unbalanced quote)"
            else:
                why = f"malformed CSV ({e}); check the quotes on this row"
            raise ManifestError(f"{path}:{end + 1}: {why}") from None

    rows = records()
    header = next(rows, None)
    if header is None:
        return [], iter(())
    fields = [c.strip() for c in header[1]]
    return fields, ((line, {f: (row[i] if i < len(row) else None) for i, f in enumerate(fields)}) for line, row in rows)


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def check_name(name: str, where: str, what: str = "label") -> str:
    """``name`` unchanged, or ManifestError when it holds a control character (a NUL byte, a line
    break from an unbalanced quote, ...), which no class name or label may contain."""
    bad = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        hint = " (an unbalanced quote in the CSV?)" if bad in "\r\n" else ""
        raise ManifestError(f"{where}: {what} {_short(name)} contains the control character {bad!r}{hint}")
    return name


def _split_labels(text: str, sep: str, where: str = "") -> tuple[str, ...]:
    return tuple(check_name(lab.strip(), where) for lab in (text or "").split(sep) if lab.strip())


def read_manifest(path, *, root: str | None = None, label_sep: str = LABEL_SEP) -> list[Item]:
    """Read a CSV manifest (columns ``path``, ``labels``, optional ``fold``).

    Relative audio paths are resolved against ``root`` (default: the manifest's folder).
    Raises :class:`ManifestError` naming the file (and line) for a missing file, text that is not
    UTF-8, malformed CSV (an unbalanced quote, a field over csv's size limit), missing columns, an
    empty manifest, a row without a path, or a label holding a control character (a NUL byte).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: manifest not found")
    base = os.path.abspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
    items: list[Item] = []
    fields, rows = _csv_rows(path, "manifest")
    missing = [c for c in ("path", "labels") if c not in fields]
    if missing:
        raise ManifestError(
            f"{path}: manifest is missing column(s) {', '.join(missing)} "
            f"(found: {', '.join(fields) if fields else 'no header'}; expected a header with "
            f"'path' and 'labels', labels separated by '{label_sep}', optional 'fold')"
        )
    has_fold = "fold" in fields
    for line, row in rows:
        where = f"{path}:{line}"
        p = (row.get("path") or "").strip()
        if not p:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # a row of empty cells
            raise ManifestError(f"{where}: row has an empty 'path'")
        if "\0" in p or "\n" in p or "\r" in p:
            check_name(p, where, "path")
        full = p if os.path.isabs(p) else os.path.join(base, p)
        fold = ((row.get("fold") or "").strip() or None) if has_fold else None
        items.append(Item(os.path.normpath(full), _split_labels(row.get("labels") or "", label_sep, where), fold, path, line))
    if not items:
        raise ManifestError(f"{path}: manifest has no rows")
    return items


def read_esc50(root, *, meta: str | None = None, audio_dir: str | None = None) -> tuple[list[Item], list[str]]:
    """Read an ESC-50-style folder: ``meta/esc50.csv`` + ``audio/``.

    Returns the items (label = ``category``, fold = ``fold``) and the class list ordered by the
    integer ``target`` column (so class i is ESC-50 target i).
    """
    root = os.fspath(root)
    meta = meta or os.path.join(root, "meta", "esc50.csv")
    audio_dir = audio_dir or os.path.join(root, "audio")
    if not os.path.isfile(meta):
        raise ManifestError(f"{root}: not an ESC-50 folder (no {os.path.relpath(meta, root)})")
    items: list[Item] = []
    by_target = {}
    fields, rows = _csv_rows(meta, "ESC-50 meta file")
    missing = [c for c in ("filename", "fold", "target", "category") if c not in fields]
    if missing:
        raise ManifestError(f"{meta}: ESC-50 meta file is missing column(s) {', '.join(missing)}")
    for line, row in rows:
        try:
            target = int(row["target"])
        except (TypeError, ValueError):
            raise ManifestError(f"{meta}:{line}: 'target' is not an integer: {row.get('target')!r}") from None
        cat = check_name((row["category"] or "").strip(), f"{meta}:{line}", "category")
        if by_target.setdefault(target, cat) != cat:
            raise ManifestError(f"{meta}:{line}: target {target} is both {by_target[target]!r} and {cat!r}")
        items.append(Item(os.path.join(audio_dir, (row["filename"] or "").strip()), (cat,), str(row["fold"]).strip(), meta, line))
    if not items:
        raise ManifestError(f"{meta}: no rows")
    targets = sorted(by_target)
    if targets != list(range(len(targets))):
        raise ManifestError(f"{meta}: targets are not 0..{len(targets) - 1}")
    return items, [by_target[t] for t in targets]


def read_dataset(spec, *, root: str | None = None, label_sep: str = LABEL_SEP) -> tuple[list[Item], list[str] | None]:
    """A manifest CSV or an ESC-50 folder -> (items, classes or None when the source has no list)."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        return read_esc50(spec)
    return read_manifest(spec, root=root, label_sep=label_sep), None


AUDIOSET = "audioset"


def _shipped_audioset_csv() -> str:
    from .labels import AUDIOSET_CSV

    return AUDIOSET_CSV


def read_class_aliases(path) -> dict:
    """Alternative names of classes: for an AudioSet-style CSV (columns ``mid`` and
    ``display_name``) the machine ids, so manifests may label clips with ``/m/09x0r`` or
    ``Speech`` alike. ``"audioset"`` means the list shipped with the package. Empty otherwise."""
    path = _shipped_audioset_csv() if os.fspath(path) == AUDIOSET else os.fspath(path)
    if not path.lower().endswith(".csv") or not os.path.isfile(path):
        return {}
    fields, rows = _csv_rows(path, "class list")
    if "mid" not in fields or "display_name" not in fields:
        return {}
    return {(row["mid"] or "").strip(): (row["display_name"] or "").strip() for _, row in rows}


def apply_aliases(items: Sequence[Item], aliases: dict) -> list[Item]:
    """Items with every label that is an alias (e.g. an AudioSet mid) replaced by its class name."""
    if not aliases:
        return list(items)
    return [
        dataclasses.replace(it, labels=tuple(aliases.get(lab, lab) for lab in it.labels))
        if any(lab in aliases for lab in it.labels)
        else it
        for it in items
    ]


def read_class_list(path) -> list[str]:
    """Read a class list: ``.json`` (a list, or {"classes": [...]}), a CSV with a header (column
    ``display_name`` as in AudioSet's class_labels_indices.csv, or ``label``/``name``/``class``,
    or its only column), or plain text with one class per line. ``"audioset"``: the 527 AudioSet
    names shipped with the package, in the model's output order.

    In plain text, blank lines and lines starting with ``#`` are skipped; a leading backslash
    escapes a name that starts with ``#`` or ``\\`` (``\\#dog`` is the class ``#dog``), which
    is how :func:`write_class_list` writes such names."""
    path = os.fspath(path)
    if path == AUDIOSET:
        path = _shipped_audioset_csv()
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: class list not found")
    classes: list[str]
    if path.lower().endswith(".json"):
        try:
            obj = json.loads(_read_text(path, "class list"))
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: class list is not valid JSON ({e})") from None
        if isinstance(obj, dict):
            obj = obj.get("classes")
        if not isinstance(obj, list) or not all(isinstance(c, str) for c in obj):
            raise ManifestError(f"{path}: expected a JSON list of class names (or {{'classes': [...]}})")
        classes = [check_name(c.strip(), path, "class name") for c in obj]
    elif path.lower().endswith(".csv"):
        fields, rows = _csv_rows(path, "class list")
        col = next((c for c in ("display_name", "label", "name", "class") if c in fields), None)
        if col is None:
            if len(fields) != 1:
                raise ManifestError(f"{path}: class list CSV needs a 'display_name', 'label', 'name' or 'class' column")
            col = fields[0]
        classes = [check_name((row[col] or "").strip(), f"{path}:{line}", "class name") for line, row in rows]
    else:
        classes = []
        for line, text in enumerate(io.StringIO(_read_text(path, "class list"), newline=None), 1):
            name = text.strip()
            if name and not name.startswith("#"):
                classes.append(check_name(name[1:] if name.startswith("\\") else name, f"{path}:{line}", "class name"))
    if not classes:
        raise ManifestError(f"{path}: class list is empty")
    if any(not c for c in classes):
        raise ManifestError(f"{path}: class list has an empty name")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise ManifestError(f"{path}: class list has duplicates: {', '.join(dup[:5])}")
    return classes


def write_class_list(classes: Sequence[str], path) -> None:
    """One class per line, read back unchanged by :func:`read_class_list` (names starting with
    ``#`` or a backslash get a backslash in front, so they are not taken for comments)."""
    for c in classes:
        check_name(c, os.fspath(path), "class name")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(("\\" + c if c.startswith(("#", "\\")) else c) + "\n" for c in classes))


def classes_from_items(items: Sequence[Item], *, val_items: Sequence[Item] | None = None) -> list[str]:
    """Sorted unique labels of the (training) items: the class list when none is given.

    A label of ``val_items`` that no training item has is an error: it would become a class
    without a single training example. A class list file (``--classes``) may still name it.
    """
    classes = sorted({lab for it in items for lab in it.labels})
    if not classes:
        src = items[0].source if items else "dataset"
        raise ManifestError(f"{src}: no labels found in {len(items)} row(s), cannot derive a class list")
    known = set(classes)
    extra = [(it, lab) for it in (val_items or ()) for lab in it.labels if lab not in known]
    if extra:
        labels = sorted({lab for _, lab in extra})
        raise ManifestError(
            f"validation label(s) {', '.join(map(_short, labels[:10]))} never occur in the training data "
            f"(first at {extra[0][0].where()}): each would be a class without training examples; fix the "
            "label, or give a class list (--classes) that names it to keep it"
        )
    return classes


def check_labels(items: Sequence[Item], classes: Sequence[str]) -> None:
    """Raise :class:`ManifestError` listing (file:line) every label not in ``classes``."""
    known = set(classes)
    bad = [(it, lab) for it in items for lab in it.labels if lab not in known]
    if bad:
        shown = "; ".join(f"{it.where()}: {lab!r}" for it, lab in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        labels = sorted({lab for _, lab in bad})
        raise ManifestError(
            f"{len(bad)} unknown label(s) {', '.join(map(repr, labels[:10]))} not in the class list "
            f"of {len(classes)} classes: {shown}{more}"
        )


def split_by_fold(items: Sequence[Item], val_fold: str) -> tuple[list[Item], list[Item]]:
    """Items whose fold differs from / equals ``val_fold`` (as strings)."""
    val_fold = str(val_fold)
    if not any(it.fold is not None for it in items):
        raise ManifestError(f"{items[0].source if items else 'dataset'}: no 'fold' column, cannot hold out fold {val_fold}")
    train = [it for it in items if it.fold != val_fold]
    val = [it for it in items if it.fold == val_fold]
    if not val:
        folds = sorted({str(it.fold) for it in items})
        raise ManifestError(f"fold {val_fold!r} not found (folds: {', '.join(folds)})")
    if not train:
        raise ManifestError(f"holding out fold {val_fold!r} leaves no training data")
    return train, val


def is_multi_label(items: Sequence[Item]) -> bool:
    """True unless every item has exactly one label."""
    return any(len(it.labels) != 1 for it in items)


# --------------------------------------------------------------------------------------------
# dataset, batching, sampling
# --------------------------------------------------------------------------------------------


class AudioDataset(Dataset):
    """Clips of fixed length with multi-hot float targets (C,).

    Args:
        items, classes: from :func:`read_dataset` / :func:`read_class_list`.
        sample_rate: the model's rate; files are resampled to it.
        clip_samples: length of every returned waveform.
        train: random crops (``crop="random"``) and bad-file substitution; otherwise start crops
            and bad items marked invalid.
        pad: ``"tile"`` (default), ``"zeros"`` or ``"repeatpad"`` for short clips.
        crop: ``"random"``, ``"start"`` or ``"center"`` for long clips (default random in
            training, start otherwise).
        on_error: ``"skip"`` (replace/mark and report) or ``"stop"`` (raise AudioError).
        silence_db: peak level in dBFS at or below which a file counts as silent-only and is
            treated as a bad file; None keeps silent files.
        seed: random crops are drawn from (seed, epoch, index), so they do not depend on worker
            processes or on where a resumed run restarted; :meth:`set_epoch` changes them.
        cache: keep decoded, resampled waveforms in memory (per worker process).
    """

    def __init__(
        self,
        items: Sequence[Item],
        classes: Sequence[str],
        sample_rate: int,
        clip_samples: int,
        *,
        train: bool = True,
        pad: str = "tile",
        crop: str | None = None,
        on_error: str = "skip",
        silence_db: float | None = DEFAULT_SILENCE_DB,
        seed: int = 0,
        cache: bool = False,
    ):
        if on_error not in ("skip", "stop"):
            raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
        if pad not in ("tile", "zeros", "repeatpad"):
            raise ValueError(f"unknown pad mode {pad!r} (tile, zeros, repeatpad)")
        crop = crop or ("random" if train else "start")
        if crop not in ("random", "start", "center"):
            raise ValueError(f"unknown crop mode {crop!r} (random, start, center)")
        if not items:
            raise ManifestError("dataset is empty")
        check_labels(items, classes)
        self.items = list(items)
        self.classes = list(classes)
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.sample_rate = int(sample_rate)
        self.clip_samples = int(clip_samples)
        self.train = train
        self.pad = pad
        self.crop = crop
        self.on_error = on_error
        self.silence_db = silence_db
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        self._cache = {}
        self._bad = {}

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def target(self, i: int) -> torch.Tensor:
        t = torch.zeros(len(self.classes), dtype=torch.float32)
        for lab in self.items[i].labels:
            t[self.class_index[lab]] = 1.0
        return t

    def load(self, i: int) -> np.ndarray:
        """Decoded, resampled, checked waveform of item i (any length); AudioError if unusable."""
        if i in self._bad:
            raise self._bad[i]
        if i in self._cache:
            return self._cache[i]
        path = self.items[i].path
        try:
            wave = load_audio(path, self.sample_rate)
            check_audio(wave, path, threshold_db=self.silence_db)
        except AudioError as e:
            self._bad[i] = e
            raise
        if self.cache:
            self._cache[i] = wave
        return wave

    def __getitem__(self, i: int) -> dict:
        bad: list[str] = []
        j = int(i)
        valid = True
        n = len(self.items)
        wave = None
        for _ in range(n):
            try:
                wave = self.load(j)
                break
            except AudioError as e:
                if self.on_error == "stop":
                    raise
                bad.append(str(e))
                if not self.train:
                    valid = False
                    break
                j = (j + 1) % n
        if wave is None and valid:
            raise AudioError(self.items[i].path, "no readable audio file in the whole dataset")
        if not valid:
            wave = np.zeros(self.clip_samples, dtype=np.float32)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, int(i)]) if self.crop == "random" else None
            wave = fit_length(wave, self.clip_samples, pad=self.pad, crop=self.crop, rng=rng)
        return {
            "waveform": torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)),
            "target": self.target(j),
            "index": int(i),
            "source_index": int(j),
            "valid": valid,
            "bad": bad,
        }


def collate(samples: Sequence[dict]) -> dict:
    """Stack dataset samples: waveform (B, S), target (B, C), index (B,), valid (B,) bool, bad (list of messages)."""
    return {
        "waveform": torch.stack([s["waveform"] for s in samples]),
        "target": torch.stack([s["target"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "source_index": torch.tensor([s["source_index"] for s in samples], dtype=torch.long),
        "valid": torch.tensor([s["valid"] for s in samples], dtype=torch.bool),
        "bad": [m for s in samples for m in s["bad"]],
    }


class ResumableSampler(Sampler):
    """DistributedSampler semantics (seeded shuffle per epoch, padding to a multiple of the
    number of replicas, rank-strided shards) that can also start part-way through an epoch.

    The permutation is ``torch.randperm(n, generator seeded with seed + epoch)``, exactly as in
    ``torch.utils.data.DistributedSampler``, so one process and many see the same global order.
    :meth:`set_start` skips the first ``start`` indices of this rank's shard: a resumed run
    continues with the very next batch.
    """

    def __init__(
        self,
        num_items: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        if num_items <= 0:
            raise ValueError("sampler over an empty dataset")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.n = int(num_items)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = drop_last
        if drop_last and self.n % self.num_replicas:
            self.num_samples = self.n // self.num_replicas
        else:
            self.num_samples = math.ceil(self.n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = max(0, min(int(start), self.num_samples))

    def order(self) -> list[int]:
        """This epoch's order of the ``n`` indices, the same on every rank (subclasses draw others)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def shard(self) -> list[int]:
        """This rank's full index list for the current epoch."""
        idx = self.order()
        if self.total_size > len(idx):
            pad = self.total_size - len(idx)
            idx += (idx * math.ceil(pad / len(idx)))[:pad]
        else:
            idx = idx[: self.total_size]
        return idx[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}
