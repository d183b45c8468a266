"""Writers for ``htsat predict`` / ``htsat embed`` results, one result at a time as they come.

Formats (from ``--format`` or the output file's extension): ``table`` (readable, the default on a
terminal), ``jsonl`` (one object per line), ``json`` (an array, valid JSON however many files failed
or were written), ``csv`` (file, rank, label, score, error), ``tsv`` (events in the DCASE layout that
sed_eval and psds_eval read: ``filename onset offset event_label``), and for embeddings ``npy`` /
``npz`` (the matrix in file order; npz holds ``files`` too, npy gets a ``.files.txt`` beside it).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

__all__ = ["PREDICT_FORMATS", "EMBED_FORMATS", "format_for", "open_writer"]

PREDICT_FORMATS = ("table", "jsonl", "json", "csv", "tsv")
EMBED_FORMATS = ("jsonl", "json", "npy", "npz")
_BINARY = ("npy", "npz")


def format_for(output: str | None, fmt: str | None, allowed, default: str) -> str:
    """The format asked for, else the one the output file's extension names, else ``default``."""
    if fmt:
        if fmt not in allowed:
            raise ValueError(f"--format {fmt}: expected one of {', '.join(allowed)}")
        return fmt
    if output and output != "-":
        ext = os.path.splitext(output)[1][1:].lower()
        if ext in allowed:
            return ext
        raise ValueError(f"-o {output}: cannot tell the format from the extension .{ext}; use --format ({', '.join(allowed)})")
    return default


def _plain(obj):
    """JSON-ready: numpy arrays and scalars to lists and floats."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class _Writer:
    def __init__(self, stream, threshold=None):
        self.stream, self.threshold, self.count = stream, threshold, 0

    def write(self, result: dict) -> None:
        self._write(result)
        self.count += 1
        self.stream.flush()  # a result is out as soon as it is done

    def close(self) -> None:
        self.stream.flush()


class _Table(_Writer):
    def _write(self, r):
        from .predict import format_results

        self.stream.write(("\n" if self.count else "") + format_results([r], threshold=self.threshold) + "\n")


class _JsonLines(_Writer):
    def _write(self, r):
        self.stream.write(json.dumps(_plain(r), allow_nan=False) + "\n")  # NaN is not JSON; results never hold one


class _JsonArray(_Writer):
    def _write(self, r):
        body = json.dumps(_plain(r), indent=2, allow_nan=False).replace("\n", "\n  ")
        self.stream.write(("[\n  " if not self.count else ",\n  ") + body)

    def close(self):
        self.stream.write("\n]\n" if self.count else "[]\n")
        super().close()


class _Csv(_Writer):
    def __init__(self, stream, threshold=None):
        super().__init__(stream, threshold)
        self.csv = csv.writer(stream, lineterminator="\n")
        self.csv.writerow(["file", "rank", "label", "score", "error"])

    def _write(self, r):
        if "error" in r:
            self.csv.writerow([r["file"], "", "", "", r["error"]])
            return
        for i, t in enumerate(r["top"], 1):
            self.csv.writerow([r["file"], i, t["label"], f"{t['score']:.6g}", ""])


class _EventsTsv(_Writer):
    """DCASE layout: a header, then one row per event; files without events or with errors add no row."""

    def __init__(self, stream, threshold=None):
        super().__init__(stream, threshold)
        stream.write("filename\tonset\toffset\tevent_label\n")

    def _write(self, r):
        for ev in r.get("events", ()):
            self.stream.write(f"{r['file']}\t{ev['onset']:.3f}\t{ev['offset']:.3f}\t{ev['label']}\n")


class _Matrix(_Writer):
    """Embeddings gathered in file order and written at the end (they are the output: N x D floats)."""

    def __init__(self, path, fmt):
        super().__init__(None)
        self.path, self.fmt = path, fmt
        self.files: list[str] = []
        self.rows: list[np.ndarray] = []

    def _write(self, r):
        if "embedding" in r:
            self.files.append(r["file"])
            self.rows.append(np.asarray(r["embedding"], np.float32))

    def write(self, result):
        self._write(result)
        self.count += 1

    def close(self):
        mat = np.stack(self.rows) if self.rows else np.zeros((0, 0), np.float32)
        if self.fmt == "npz":
            with open(self.path, "wb") as f:
                np.savez(f, embeddings=mat, files=np.array(self.files, dtype=str))
        else:
            with open(self.path, "wb") as f:
                np.save(f, mat)
            with open(os.path.splitext(self.path)[0] + ".files.txt", "w", encoding="utf-8") as f:
                f.write("".join(p + "\n" for p in self.files))


_WRITERS = {"table": _Table, "jsonl": _JsonLines, "json": _JsonArray, "csv": _Csv, "tsv": _EventsTsv}


class open_writer:
    """``with open_writer(fmt, output, stdout) as w: w.write(result)``; the file is closed (and a JSON
    array ended) whatever happens, so what was written stays valid."""

    def __init__(self, fmt: str, output: str | None, stdout, *, threshold=None):
        self.fmt, self.output, self.stdout, self.threshold = fmt, output, stdout, threshold
        self.file = None

    def __enter__(self):
        to_file = self.output and self.output != "-"
        if self.fmt in _BINARY:
            if not to_file:
                raise ValueError(f"--format {self.fmt} is binary: write it to a file with -o FILE.{self.fmt}")
            self.writer = _Matrix(self.output, self.fmt)
            return self.writer
        if to_file:
            newline = "" if self.fmt == "csv" else None
            try:
                self.file = open(self.output, "w", encoding="utf-8", newline=newline)
            except OSError as e:
                raise ValueError(f"-o {self.output}: cannot write ({e.strerror or e})") from None
        self.writer = _WRITERS[self.fmt](self.file or self.stdout, self.threshold)
        return self.writer

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not BrokenPipeError:
                self.writer.close()
        finally:
            if self.file is not None:
                self.file.close()
        return False
