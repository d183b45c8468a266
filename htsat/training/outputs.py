"""The output folder of a run: its lock, atomic file writes, and the fault points tests kill at.

Every file is written to ``.tmp-<name>-*`` in the folder, flushed, fsynced and renamed over the
old one, so a reader (or a resumed run) sees the old file or the new one, never half of one; the
temporaries of a killed run are removed by the next run that takes the lock. Files are created
with mode 0666 minus the umask, like any other file the user writes.

Fault points: :func:`fault_point` is called before, during and after every write (``write:NAME``,
``flush:NAME``, ``rename:NAME``, ``done:NAME``) and after every training step (``step``). Tests
set :data:`fault_hook` (called with the point's name; it may raise) or the environment variable
``HTSAT_TRAIN_FAULT=POINT[#N]``, which ends the process with ``os._exit(137)`` (as ``kill -9``
would) at the N-th time (default: first) the point is reached.
"""

from __future__ import annotations

import csv
import errno
import glob
import io
import json
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import torch

from .config import TrainingError

__all__ = [
    "FAULT_ENV",
    "LOCK_NAME",
    "fault_hook",
    "fault_point",
    "OutputLock",
    "remove_stale_temporaries",
    "short_reason",
    "write_file",
    "write_text",
    "write_json",
    "write_torch",
    "write_metrics",
]

FAULT_ENV = "HTSAT_TRAIN_FAULT"
LOCK_NAME = ".htsat-train.lock"
TMP_PREFIX = ".tmp-"

fault_hook: Callable[[str], None] | None = None
_fault_counts: dict[str, int] = {}


def fault_point(point: str) -> None:
    """A place where a test may kill the run (see the module docstring); a no-op otherwise."""
    if fault_hook is not None:
        fault_hook(point)
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition("#")
    if name != point:
        return
    _fault_counts[point] = _fault_counts.get(point, 0) + 1
    if _fault_counts[point] == int(nth or 1):
        os._exit(137)


# ----------------------------------------------------------------------------------------------
# lock
# ----------------------------------------------------------------------------------------------


class OutputLock:
    """An exclusive lock on an output folder, held while a run writes there.

    ``<out>/.htsat-train.lock`` is locked with ``fcntl.flock``, which the kernel releases when the
    holder dies however it dies, so a lock file left by a killed run never blocks the next one;
    the file records the holder's pid, host and start time for the error message. Where flock
    does not exist (Windows) the file itself is the lock (O_EXCL) and one naming a process that no
    longer runs on this host is taken over.
    """

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                info = json.load(f)
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def _busy(self) -> TrainingError:
        folder = os.path.dirname(self.path)
        return TrainingError(
            f"{folder} is in use by another training run ({self._holder()}; lock {self.path}); "
            "wait for it to finish or choose another --out"
        )

    def _record(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())

    def acquire(self) -> str | None:
        """Take the lock, or raise TrainingError naming its holder. Returns a warning where the
        file system cannot lock (some network file systems): the run goes on unprotected."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows)
            return self._acquire_exclusive_file()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise TrainingError(f"cannot create the lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._busy() from None
            return f"warning: cannot lock {self.path} ({exc.strerror}); nothing stops a second run from writing to this folder"
        self._record(fd)
        self._fd = fd
        return None

    def _acquire_exclusive_file(self) -> str | None:  # pragma: no cover (Windows)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                if self._holder_alive():
                    raise self._busy() from None
                os.unlink(self.path)  # left by a run that died
                continue
            self._record(fd)
            self._fd = fd
            return None
        raise self._busy()

    def _holder_alive(self) -> bool:  # pragma: no cover (Windows)
        try:
            with open(self.path, encoding="utf-8") as f:
                info = json.load(f)
            if info["host"] != socket.gethostname():
                return True
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return False
        except (OSError, ValueError, KeyError, TypeError):
            return True
        return True

    def release(self) -> None:
        """Unlock. With flock the file stays (unlinking it would race a run waiting for it)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)
        if os.name == "nt":  # pragma: no cover (the file is the lock)
            _unlink_quietly(self.path)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the ``.tmp-*`` files a killed run left in ``folder`` (call with the lock held)."""
    removed = []
    patterns = (TMP_PREFIX + "*", "metrics.jsonl.tmp", "metrics.csv.tmp")  # the last two: names of earlier versions
    found = {p for pattern in patterns for p in glob.glob(os.path.join(glob.escape(folder), pattern))}
    for path in sorted(found):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------


def short_reason(exc: BaseException) -> str:
    """The first sentence of an error, without torch's C++ location prefix."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
    return text.split(". ")[0].rstrip(".")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        hint = " (the disk is full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return exc.strerror + hint
    return f"the write failed ({short_reason(exc)}; is the disk full?)"


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible everywhere (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: str, write: Callable[[io.BufferedWriter], Any]) -> None:
    """Write ``path`` atomically with ``write(binary_file)``. A failure (full disk, quota, an
    unwritable folder) raises TrainingError naming the file; the old file stays as it was."""
    folder, name = os.path.split(os.path.abspath(path))
    fault_point("write:" + name)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{name}-{os.getpid()}-{os.urandom(4).hex()}")
    kept = f"; the previous {name} is unchanged" if os.path.exists(path) else ""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            fault_point("flush:" + name)
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:
        _unlink_quietly(tmp)
        raise TrainingError(f"cannot write {path}: {_reason(exc)}{kept}") from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fault_point("rename:" + name)  # outside the cleanup above: a kill here leaves the temporary, as a real one would
    try:
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise TrainingError(f"cannot write {path}: {_reason(exc)}{kept}") from exc
    _fsync_folder(folder)
    fault_point("done:" + name)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_text(path: str, text: str) -> None:
    write_file(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1))


def write_torch(path: str, obj: Any) -> None:
    write_file(path, lambda f: torch.save(obj, f))


def write_metrics(folder: str, history: list[dict]) -> None:
    """metrics.jsonl (one JSON object per epoch) and metrics.csv (a column per key ever seen)."""
    write_text(os.path.join(folder, "metrics.jsonl"), "".join(json.dumps(row) + "\n" for row in history))
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow(row)
    write_text(os.path.join(folder, "metrics.csv"), buf.getvalue())
