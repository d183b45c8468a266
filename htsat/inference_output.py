"""Writers for ``htsat predict`` / ``htsat embed`` results, one result at a time as they come.

Formats (from ``--format`` or the output file's extension): ``table`` (readable, the default on a
terminal), ``jsonl`` (one object per line), ``json`` (an array, valid JSON however many files failed
or were written), ``csv`` (file, rank, label, score, error), ``tsv`` (events in the DCASE layout that
sed_eval and psds_eval read: ``filename onset offset event_label``), and for embeddings ``npy`` /
``npz`` (the matrix in file order; npz holds ``files`` too, npy gets a ``.files.txt`` beside it).

An output file (``-o FILE``) is never written in place. Results stream into a temporary beside it
(``.tmp-<name>-*``), and the file itself is replaced by rename only: with what was done so far every
:data:`PUBLISH_SECONDS` (less often when copying a big output would take more than
:data:`PUBLISH_SHARE` of the time) and when the run ends, however it ends (done, a bad file,
Ctrl-C, SIGTERM, a dead worker). A reader therefore sees the previous file or a complete valid one,
never half of one; a full disk or a kill leaves the previous file as it was (a kill loses at most
the results since the last replacement). The file is locked against a second run
(``.<name>.htsat-lock`` beside it, released with its process), checked before any work (its folder
exists, it is not a folder and not one of the inputs), and the temporaries of a killed run are
removed by the next run that takes the lock. ``.npy`` and its ``.files.txt`` are two files, which
no rename replaces together: the names go first, the matrix second, and a run's first replacement
removes the old matrix beforehand, so names and a matrix on disk are always of one run (the names
at most ahead of the matrix).

:func:`read_done` reads an output back for ``--resume``: the results without an error are kept and
written again in input order, the files missing or failed are computed; results of files that are
not among the inputs any more are dropped.

Names that a format cannot hold are refused (the file gets an error, the run goes on): a tab or line
break in a ``.tsv`` name, a line break in a name for ``.files.txt``. Names that are not UTF-8 (a file
system's raw bytes, decoded by Python with surrogate escapes) are written as their original bytes
in the text formats and ``\\udcXX``-escaped in JSON, so either reads back to the same path.

Fault points (for the tests that kill a run at every write): :func:`fault_point` is called with
``write:NAME`` before each result, ``row:NAME`` after it, ``rename:NAME`` before each rename and
``done:NAME`` after it; :data:`fault_hook` or ``HTSAT_INFER_FAULT=POINT[#N]`` (``os._exit(137)`` at
the N-th time) act there.
"""

from __future__ import annotations

import csv
import errno
import glob
import io
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "PREDICT_FORMATS",
    "EMBED_FORMATS",
    "OutputError",
    "format_for",
    "open_writer",
    "output_files",
    "read_done",
]

PREDICT_FORMATS = ("table", "jsonl", "json", "csv", "tsv")
EMBED_FORMATS = ("jsonl", "json", "npy", "npz")
RESUMABLE_FORMATS = ("jsonl", "json", "csv", "npy", "npz")
_BINARY = ("npy", "npz")
TMP_PREFIX = ".tmp-"
FAULT_ENV = "HTSAT_INFER_FAULT"

#: a running output file is replaced by what was done so far at most this often (seconds)
PUBLISH_SECONDS = 10.0
#: ... and a big one less often: these replacements take at most this share of the run's time
PUBLISH_SHARE = 0.05

fault_hook: Callable[[str], None] | None = None
_fault_counts: dict[str, int] = {}


class OutputError(ValueError):
    """An output that cannot be written or read back; the message names the file."""


def fault_point(point: str) -> None:
    """A place where a test may kill the run (see the module docstring); a no-op otherwise."""
    if fault_hook is not None:
        fault_hook(point)
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition("#")
    if name == point:
        _fault_counts[point] = _fault_counts.get(point, 0) + 1
        if _fault_counts[point] == int(nth or 1):
            os._exit(137)


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


def output_files(fmt: str, output: str) -> list[str]:
    """The files an output consists of (``.npy`` has its ``.files.txt``)."""
    return [output, os.path.splitext(output)[0] + ".files.txt"] if fmt == "npy" else [output]


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


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc) or type(exc).__name__
    return text + (" (the disk is full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "")


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------


class _Writer:
    cannot_hold = ""  # characters a name in this format cannot hold

    def __init__(self, stream, threshold=None):
        self.stream, self.threshold, self.count = stream, threshold, 0

    def refuses(self, name: str) -> str | None:
        """Why a file name cannot be written in this format, or None."""
        if any(c in name for c in self.cannot_hold):
            return f"its name holds a tab or line break, which {self.what} cannot hold"
        return None

    def write(self, result: dict) -> None:
        self._write(result)
        self.count += 1
        self.stream.flush()  # a result is out as soon as it is done

    def closing(self) -> str:
        """What ends the file (after the last result)."""
        return ""

    def close(self) -> None:
        self.stream.write(self.closing())
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

    def closing(self):
        return "\n]\n" if self.count else "[]\n"


class _Csv(_Writer):
    def __init__(self, stream, threshold=None):
        super().__init__(stream, threshold)
        self.csv = csv.writer(stream, lineterminator="\n")  # quotes a name with a comma, quote or line break
        self.csv.writerow(["file", "rank", "label", "score", "error"])

    def _write(self, r):
        if "error" in r:
            self.csv.writerow([r["file"], "", "", "", r["error"]])
            return
        for i, t in enumerate(r["top"], 1):
            self.csv.writerow([r["file"], i, t["label"], f"{t['score']:.6g}", ""])


class _EventsTsv(_Writer):
    """DCASE layout: a header, then one row per event; files without events or with errors add no row.
    The layout has no quoting, so a name with a tab or line break cannot be written."""

    cannot_hold, what = "\t\n\r", "a .tsv row"

    def __init__(self, stream, threshold=None):
        super().__init__(stream, threshold)
        stream.write("filename\tonset\toffset\tevent_label\n")

    def _write(self, r):
        for ev in r.get("events", ()):
            self.stream.write(f"{r['file']}\t{ev['onset']:.3f}\t{ev['offset']:.3f}\t{ev['label']}\n")


class _Matrix(_Writer):
    """Embeddings gathered in file order and written whole (they are the output: N x D floats)."""

    def __init__(self, fmt):
        super().__init__(None)
        self.fmt = fmt
        if fmt == "npy":  # one name per line in .files.txt
            self.cannot_hold, self.what = "\n\r", "a line of .files.txt"
        self.files: list[str] = []
        self.rows: list[np.ndarray] = []

    def write(self, r):
        if "embedding" in r:
            self.files.append(r["file"])
            self.rows.append(np.asarray(r["embedding"], np.float32))
        self.count += 1

    def save(self, paths: list[str]) -> None:
        """Write to ``paths`` (``output_files`` order: npy writes the names too)."""
        mat = np.stack(self.rows) if self.rows else np.zeros((0, 0), np.float32)
        with open(paths[0], "wb") as f:
            if self.fmt == "npz":
                np.savez(f, embeddings=mat, files=np.array(self.files, dtype=str))
            else:
                np.save(f, mat)
            f.flush()
            os.fsync(f.fileno())
        if self.fmt == "npy":
            with open(paths[1], "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
                f.write("".join(p + "\n" for p in self.files))
                f.flush()
                os.fsync(f.fileno())


_WRITERS = {"table": _Table, "jsonl": _JsonLines, "json": _JsonArray, "csv": _Csv, "tsv": _EventsTsv}


# ------------------------------------------------------------------------------------------------
# the output file: checks, lock, temporaries, signals
# ------------------------------------------------------------------------------------------------


class _signals_deferred:
    """Ctrl-C and SIGTERM wait until a result is written whole (a row is never half in a file)."""

    def __enter__(self):
        self.caught: list[int] = []
        self.old: dict = {}
        if threading.current_thread() is threading.main_thread():
            # SIGCHLD: torch's DataLoader raises its dead-worker error from that handler
            for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGCHLD", None)):
                if s is not None and signal.getsignal(s) is not None:  # None: a handler set outside Python
                    self.old[s] = signal.signal(s, lambda signum, frame: self.caught.append(signum))
        return self

    def __exit__(self, exc_type, exc, tb):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        if exc_type is None:
            for signum in dict.fromkeys(self.caught):
                handler = self.old[signum]
                if callable(handler):
                    handler(signum, None)
                elif handler == signal.SIG_DFL and signum != getattr(signal, "SIGCHLD", None):
                    signal.raise_signal(signum)
        return False


def check_output(fmt: str, output: str, inputs: Sequence[str] = ()) -> None:
    """Before any work: the output's folder exists, it is not a folder, and it is none of the inputs."""
    for target in output_files(fmt, output):
        if os.path.isdir(target):
            raise OutputError(f"-o {output}: {target} is a folder")
        folder = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(folder):
            raise OutputError(f"-o {output}: the folder {folder} does not exist")
        try:
            st = os.stat(target)
        except OSError:
            continue
        for p in inputs:
            try:
                same = os.path.samestat(st, os.stat(p))
            except OSError:
                continue
            if same:
                raise OutputError(f"-o {output}: {target} is one of the inputs ({p}); writing it would destroy it")


class _Lock:
    """``flock`` on ``.<name>.htsat-lock`` beside the output; the kernel drops it when the holder dies."""

    def __init__(self, target: str):
        folder, name = os.path.split(os.path.abspath(target))
        self.target, self.path = target, os.path.join(folder, f".{name}.htsat-lock")
        self.fd: int | None = None

    def _busy(self) -> OutputError:
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = f"pid {int(f.read().strip())}"
        except (OSError, ValueError):
            holder = "another process"
        return OutputError(f"{self.target} is being written by another htsat run ({holder}); wait for it or choose another -o")

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows: no lock)
            return
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise OutputError(f"cannot write {self.target}: cannot create {self.path} ({_reason(e)})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy() from None
                return  # a file system without locks: unprotected, as any other writer would be
            try:  # the holder before us unlinks the file when it is done: ours must still be the one there
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise self._busy()

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a later run cannot lock a file that is going away
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible everywhere; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _FileOutput:
    """The writer of an ``-o FILE`` run (see the module docstring)."""

    def __init__(self, fmt: str, output: str, threshold, inputs: Sequence[str]):
        self.fmt, self.output, self.threshold, self.inputs = fmt, output, threshold, inputs
        self.targets = output_files(fmt, output)
        self.folder = os.path.dirname(os.path.abspath(output))
        self.temps: list[str] = []
        self.stream = None
        self.published = 0  # results in the output file now
        self.published_once = False
        self.publish_seconds = 0.0  # what the last publish took
        self.last_publish = time.monotonic()
        self.broken = False

    @property
    def count(self) -> int:
        return self.writer.count

    def refuses(self, name: str) -> str | None:
        return self.writer.refuses(name)

    def _temp(self, target: str) -> str:
        name = os.path.basename(target)
        path = os.path.join(self.folder, f"{TMP_PREFIX}{name}-{os.getpid()}-{os.urandom(4).hex()}")
        self.temps.append(path)
        return path

    def _fail(self, exc: OSError, target: str | None = None) -> OutputError:
        self.broken = True
        target = target or self.output
        kept = f"; {target} is as it was" if os.path.exists(target) else ""
        return OutputError(f"cannot write {target}: {_reason(exc)}{kept}")

    def open(self):
        check_output(self.fmt, self.output, self.inputs)
        self.lock = _Lock(self.output)
        self.lock.acquire()
        try:
            self._start()
        except BaseException:
            self.broken = True
            self.close(failed=True)
            raise
        return self

    def _start(self) -> None:
        for target in self.targets:  # what a killed run left (we hold the lock: no one else writes them)
            name = os.path.basename(target)
            for stale in glob.glob(os.path.join(glob.escape(self.folder), f"{TMP_PREFIX}{glob.escape(name)}-*")):
                _unlink_quietly(stale)
        if self.fmt in _BINARY:  # written at the first publish: try the folder now
            probe = self._temp(self.output)
            try:
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except OSError as e:
                raise self._fail(e) from None
            _unlink_quietly(probe)
            self.temps.remove(probe)
            self.writer = _Matrix(self.fmt)
            return
        self.stream_path = self._temp(self.output)
        try:
            fd = os.open(self.stream_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            # raw bytes of a name that is not UTF-8 go out as they were (surrogateescape)
            self.stream = open(fd, "w", encoding="utf-8", errors="surrogateescape", newline="" if self.fmt == "csv" else None)
            self.writer = _WRITERS[self.fmt](self.stream, self.threshold)
            self.stream.flush()
        except OSError as e:
            raise self._fail(e) from None

    def write(self, result: dict) -> None:
        name = os.path.basename(self.output)
        fault_point("write:" + name)
        with _signals_deferred():
            try:
                self.writer.write(result)
            except OSError as e:
                raise self._fail(e) from None
            fault_point("row:" + name)
        if time.monotonic() - self.last_publish >= max(PUBLISH_SECONDS, self.publish_seconds / PUBLISH_SHARE):
            self.publish(final=False)

    def publish(self, final: bool) -> None:
        """Replace the output file(s) by what was written so far (by rename: never half a file)."""
        started = time.monotonic()
        with _signals_deferred():
            renames: list[tuple[str, str]] = []
            try:
                if self.fmt in _BINARY:
                    temps = [self._temp(t) for t in self.targets]
                    self.writer.save(temps)
                    renames = list(zip(temps, self.targets))[::-1]  # .files.txt before the matrix
                    if self.fmt == "npy" and not self.published_once and os.path.exists(self.output):
                        # two files cannot be replaced at once: the old matrix goes first, so that names
                        # and a matrix on disk together are always of one run (read_done relies on it)
                        os.unlink(self.output)
                elif final:
                    self.writer.close()
                    os.fsync(self.stream.fileno())
                    self.stream.close()
                    renames = [(self.stream_path, self.output)]
                else:
                    self.stream.flush()
                    snap = self._temp(self.output)
                    shutil.copyfile(self.stream_path, snap)
                    with open(snap, "a", encoding="utf-8") as f:
                        f.write(self.writer.closing())
                        f.flush()
                        os.fsync(f.fileno())
                    renames = [(snap, self.output)]
            except OSError as e:
                raise self._fail(e) from None
            for tmp, target in renames:
                name = os.path.basename(target)
                fault_point("rename:" + name)
                try:
                    os.replace(tmp, target)
                except OSError as e:
                    raise self._fail(e, target) from None
                self.temps.remove(tmp)
                fault_point("done:" + name)
            _fsync_folder(self.folder)
            self.published, self.published_once = self.writer.count, True
            self.last_publish = time.monotonic()
            self.publish_seconds = self.last_publish - started

    def close(self, failed: bool) -> None:
        """The last publish (unless a write failed, or the run failed before writing anything), then
        the temporaries go and the lock is released."""
        try:
            if not self.broken:
                unchanged = self.published_once and self.writer.count == self.published and self.fmt in _BINARY
                if not unchanged and (not failed or self.writer.count > self.published):
                    self.publish(final=True)
        finally:
            if self.stream is not None and not self.stream.closed:
                try:
                    self.stream.close()
                except OSError:
                    pass
            for tmp in self.temps:
                _unlink_quietly(tmp)
            self.lock.release()


class open_writer:
    """``with open_writer(fmt, output, stdout) as w: w.write(result)``. To stdout results go out as
    they come; to a file, as the module docstring says. ``w.refuses(name)`` says why a name cannot be
    written in the format (or None); ``w.published`` counts the results in the output file."""

    def __init__(self, fmt: str, output: str | None, stdout, *, threshold=None, inputs: Sequence[str] = ()):
        self.fmt, self.output, self.stdout, self.threshold, self.inputs = fmt, output, stdout, threshold, inputs
        self.file: _FileOutput | None = None

    def __enter__(self):
        if self.output and self.output != "-":
            self.file = _FileOutput(self.fmt, self.output, self.threshold, self.inputs)
            return self.file.open()
        if self.fmt in _BINARY:
            raise ValueError(f"--format {self.fmt} is binary: write it to a file with -o FILE.{self.fmt}")
        self.writer = _WRITERS[self.fmt](self.stdout, self.threshold)
        return self.writer

    def __exit__(self, exc_type, exc, tb):
        if self.file is not None:
            self.file.close(failed=exc_type is not None)
        elif exc_type is not BrokenPipeError:
            self.writer.close()
        return False


# ------------------------------------------------------------------------------------------------
# reading an output back (--resume)
# ------------------------------------------------------------------------------------------------


def _read_csv(text: str) -> list[dict]:
    rows: dict[str, dict] = {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames != ["file", "rank", "label", "score", "error"]:
        raise ValueError("not the header file,rank,label,score,error")
    for row in reader:
        r = rows.setdefault(row["file"], {"file": row["file"]})
        if row["error"]:
            r["error"] = row["error"]
        else:
            r.setdefault("top", []).append({"label": row["label"], "score": float(row["score"])})
    return list(rows.values())


def read_done(fmt: str, output: str) -> dict[str, dict]:
    """{file: result} of the files an earlier run wrote to ``output`` without an error (empty when
    there is no such file); an output that cannot be read back is a one-line :class:`OutputError`."""
    if fmt not in RESUMABLE_FORMATS:
        raise OutputError(
            f"--resume: a .{fmt} output does not record every file it was given; resume works with {', '.join(RESUMABLE_FORMATS)}"
        )
    targets = output_files(fmt, output)
    if not os.path.exists(targets[0]):
        return {}
    try:
        if fmt == "npz":
            with np.load(output, allow_pickle=False) as z:
                files, mat = [str(f) for f in z["files"]], z["embeddings"]
            rows = [{"file": f, "embedding": m} for f, m in zip(files, mat)]
        elif fmt == "npy":
            mat = np.load(output, allow_pickle=False)
            with open(targets[1], encoding="utf-8", errors="surrogateescape", newline="") as f:
                files = f.read().split("\n")[:-1]
            if len(files) < len(mat):
                raise ValueError(f"{len(mat)} rows but {len(files)} names in {targets[1]}; run without --resume to write both")
            files = files[: len(mat)]  # a kill between the two renames: the names are ahead of the matrix
            rows = [{"file": f, "embedding": m} for f, m in zip(files, mat)]
        else:
            with open(output, encoding="utf-8", errors="surrogateescape", newline="") as f:
                text = f.read()
            if fmt == "json":
                rows = json.loads(text)
            elif fmt == "jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                rows = _read_csv(text)
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("file"), str) for r in rows):
            raise ValueError("not a list of results with a file each")
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise OutputError(f"--resume: cannot read the results in {output} ({e})") from None
    return {r["file"]: r for r in rows if "error" not in r}
