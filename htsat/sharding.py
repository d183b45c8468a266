"""``htsat predict`` / ``htsat embed`` under ``torchrun``: the files split between ranks, one output.

``torchrun --nproc_per_node N -m htsat embed DIR -o out.npz`` (or across nodes with ``--nnodes``):

- rank 0 takes the output's lock (the only writer of ``-o``), reads what ``--resume`` keeps, and
  sends every rank the list of files still to do; rank r computes files r, r + N, r + 2N, ... of it
  on its own device (``cuda:LOCAL_RANK`` when CUDA is there, else a CPU process);
- each rank appends its results, one JSON line each as it is done, to a part file in
  ``.htsat-parts-<output name>/`` beside the output (embeddings as JSON floats: float32 values
  read back exactly);
- when all ranks are through (a gloo barrier), rank 0 writes the output from the part files in
  input order, exactly as one process would, then removes the part files.

A rank that dies stops the run (torchrun stops the others; rank 0 fails with one line). The part
files stay: ``--resume`` (under torchrun or not) keeps the results they hold as well as those in
the output, and computes only the files missing. Progress is shown by rank 0 (all ranks' files).
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterator

from .inference import InferenceError, InputList
from .inference_output import _plain, fault_point

__all__ = ["Shards", "leftover_parts", "parts_folder", "remove_parts"]

#: how long rank 0 waits at the end for the slowest rank (the gloo default, 30 min, is too short for
#: a large shard); a dead rank ends the wait at once
BARRIER_TIMEOUT = datetime.timedelta(days=7)


def parts_folder(output: str) -> str:
    folder, name = os.path.split(os.path.abspath(output))
    return os.path.join(folder, f".htsat-parts-{name}")


def _read_part(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if not line.endswith("\n"):  # the last line of a killed rank, half written
                break
            try:
                r = json.loads(line)
            except ValueError:
                break
            if isinstance(r, dict) and isinstance(r.get("file"), str):
                yield r


def leftover_parts(output: str) -> dict[str, dict]:
    """{file: result} of the part files a stopped sharded run left beside ``output`` (errors left out:
    they are computed again, as ``--resume`` does with the output)."""
    done: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(parts_folder(output)), "*.jsonl"))):
        for r in _read_part(path):
            if "error" not in r:
                done[r["file"]] = r
    return done


def remove_parts(output: str) -> None:
    shutil.rmtree(parts_folder(output), ignore_errors=True)


def _local_world() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


class Shards:
    """This process's place in a torchrun launch of ``htsat predict`` / ``htsat embed``."""

    def __init__(self, rank: int, world: int, local_rank: int):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.main = rank == 0

    @classmethod
    def from_env(cls) -> Shards | None:
        """The launch's ranks (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK), or None for one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, asked: str | None) -> str | None:
        """Each rank its own GPU (``cuda`` becomes ``cuda:LOCAL_RANK``); a CPU run as asked."""
        import torch

        if asked in (None, "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return asked

    def default_workers(self, device) -> int:
        """The cores of a node shared between its ranks (one rank per core needs no worker process)."""
        cores = os.cpu_count() or 1
        if device.type == "cpu":
            share = cores // max(1, _local_world())
            return 0 if share <= 1 else min(share, 8)
        return min(4, max(0, cores // max(1, _local_world()) - 1))

    def join(self) -> None:
        """The process group (gloo: results travel through files, only barriers and the file list here)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def _barrier(self, what: str) -> None:
        import torch.distributed as dist

        try:
            dist.barrier()
        except (RuntimeError, dist.DistBackendError) as e:  # a peer's connection closed: it died
            raise InferenceError(f"another rank stopped {what} ({' '.join(str(e).split())[:200]})") from None

    def run(
        self,
        todo: InputList | None,
        output: str | None,
        resume: bool,
        compute: Callable[[InputList], Iterator[dict]],
        progress: bool,
    ) -> Iterator[dict] | None:
        """Compute this rank's share of ``todo`` (rank 0's list; the others pass None) into its part file;
        on rank 0, then the results of all of ``todo`` in its order (None on the other ranks)."""
        import torch.distributed as dist

        if not output:
            raise ValueError("under torchrun, -o FILE is needed: the ranks' results are merged into it")
        folder = parts_folder(output)
        if self.main:
            if not resume:
                remove_parts(output)
            os.makedirs(folder, exist_ok=True)
            run_id = os.urandom(4).hex()
            box = [list(todo), dict(todo.problems), run_id]
        else:
            box = [None, None, None]
        dist.broadcast_object_list(box, src=0)
        paths, problems, run_id = box
        mine = InputList()
        mine.extend(paths[self.rank :: self.world])
        mine.problems = {p: problems[p] for p in mine if p in problems}
        part = os.path.join(folder, f"{run_id}-rank{self.rank:05d}.jsonl")
        bar = _bar(len(paths), progress) if self.main else None
        counter = _PartCounter(folder, run_id, part) if bar is not None else None
        try:
            with open(part, "a", encoding="utf-8", errors="surrogateescape") as f:
                for r in compute(mine):
                    fault_point(f"part:{self.rank}")
                    f.write(json.dumps(_plain(r), allow_nan=False) + "\n")
                    f.flush()
                    if bar is not None:
                        bar.update(1 + counter.new_lines())
            self._barrier("before finishing its files (see the launcher's report for which one and why)")
            if bar is not None:
                bar.update(max(0, len(paths) - bar.n))
        finally:
            if bar is not None:
                bar.close()
        if not self.main:
            return None
        merged: dict[str, dict] = {}
        for p in sorted(glob.glob(os.path.join(glob.escape(folder), f"{run_id}-rank*.jsonl"))):
            for r in _read_part(p):
                merged[r["file"]] = r
        missing = [p for p in paths if p not in merged]
        if missing:
            raise InferenceError(f"{len(missing)} file(s) have no result in {folder} (first: {missing[0]}); add --resume")
        return (merged[p] for p in paths)


class _PartCounter:
    """Results the other ranks have written so far (new bytes of their part files, lines counted)."""

    def __init__(self, folder: str, run_id: str, own: str):
        self.folder, self.run_id, self.own = folder, run_id, own
        self.offsets: dict[str, int] = {}

    def new_lines(self) -> int:
        n = 0
        for p in glob.glob(os.path.join(glob.escape(self.folder), f"{self.run_id}-rank*.jsonl")):
            if p == self.own:
                continue
            try:
                with open(p, "rb") as f:
                    f.seek(self.offsets.get(p, 0))
                    data = f.read()
            except OSError:
                continue
            self.offsets[p] = self.offsets.get(p, 0) + len(data)
            n += data.count(b"\n")
        return n


def _bar(total: int, show: bool):
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    import sys

    return tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True, desc="all ranks")
