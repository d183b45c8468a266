"""The output folder of a training run under faults: a kill at every write and every step, then
--resume, gives the files of an uninterrupted run; the folder lock; stale temporaries; file modes;
a full disk and a corrupt last.pt as one-line errors that leave last.pt as it was."""

import csv
import errno
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from cli_helpers import HAVE_AUDIO, _one_thread, tiny_model_json  # noqa: F401 (_one_thread: autouse fixture)
from test_train import htsat_main, make_tones

from htsat.training import TrainConfig, TrainingError, outputs, train
from htsat.training.outputs import LOCK_NAME, OutputLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("clips_per_s", "epoch_time")  # wall-clock figures: the only things allowed to differ


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """16 clips: 12 for training (3 steps of 4 per epoch), 4 for validation."""
    if not HAVE_AUDIO:
        pytest.skip("needs soundfile and soxr")
    folder = tmp_path_factory.mktemp("small")
    return {"manifest": make_tones(str(folder), per_class=4), "model": tiny_model_json(folder / "tiny.json")}


def _cfg(small, out, **kw):
    base = dict(
        manifest=small["manifest"],
        val_fold="0",
        model=small["model"],
        out=str(out),
        epochs=2,
        batch_size=4,
        num_workers=0,
        backend="reference",
        progress=False,
        cache_audio=True,
        log=lambda msg: None,
        checkpoint_every=2,
        mixup="on",
        lr_schedule="constant",
    )
    base.update(kw)
    return TrainConfig(**base)


def _cli(small, out, *extra):
    """``htsat train`` arguments equal to _cfg(small, out) (checkpoint_every aside), plus ``extra``."""
    return [
        "train",
        "--manifest",
        small["manifest"],
        "--val-fold",
        "0",
        "--model",
        small["model"],
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--backend",
        "reference",
        "--no-progress",
        "--cache-audio",
        "--mixup",
        "on",
        "--lr-schedule",
        "constant",
        *extra,
    ]


class Killed(BaseException):
    """A simulated kill -9: not an Exception, so nothing in the run handles it."""


def _train_with_hook(cfg, hook):
    outputs.fault_hook = hook
    try:
        return train(cfg)
    finally:
        outputs.fault_hook = None


def _kill_at(n):
    seen = []

    def hook(point):
        seen.append(point)
        if len(seen) == n:
            raise Killed(point)

    return hook


# ------------------------------------------------------------------------------ comparing folders


def _untimed(row):
    return {k: v for k, v in row.items() if k not in TIMING}


def _same(a, b, where):
    """Deep equality of checkpoint contents (tensors bit-exact; timing figures left out)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        a, b = {k: v for k, v in a.items() if k not in TIMING}, {k: v for k, v in b.items() if k not in TIMING}
        assert a.keys() == b.keys(), (where, sorted(set(a) ^ set(b)))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _train_config(folder):
    doc = json.load(open(os.path.join(folder, "train_config.json")))
    doc["train"].pop("out")
    return doc


def _load(path):
    ck = torch.load(path, weights_only=True)
    meta = ck.get("train_state", {}).get("meta")
    if meta:
        meta["train_config"]["train"].pop("out")
    return ck


def _csv_rows(path):
    with open(path, newline="") as f:
        return [_untimed(r) for r in csv.DictReader(f)]


def assert_same_outputs(ref, got):
    names = sorted(os.listdir(ref))
    assert sorted(os.listdir(got)) == names  # no temporaries, nothing missing
    for name in ("last.pt", "best.pt"):
        _same(_load(os.path.join(ref, name)), _load(os.path.join(got, name)), name)
    rows = [[_untimed(json.loads(x)) for x in open(os.path.join(d, "metrics.jsonl"))] for d in (ref, got)]
    assert rows[0] == rows[1]
    assert _csv_rows(os.path.join(ref, "metrics.csv")) == _csv_rows(os.path.join(got, "metrics.csv"))
    assert _train_config(ref) == _train_config(got)
    assert open(os.path.join(ref, "classes.txt")).read() == open(os.path.join(got, "classes.txt")).read()


def assert_not_ahead_of_last(folder):
    """What a kill leaves: the derived files hold what last.pt records, or less, never more."""
    last_path = os.path.join(folder, "last.pt")
    if not os.path.exists(last_path):
        assert not {"best.pt", "metrics.jsonl", "metrics.csv"} & set(os.listdir(folder))
        return
    history = [_untimed(r) for r in torch.load(last_path, weights_only=True)["train_state"]["history"]]
    jsonl = os.path.join(folder, "metrics.jsonl")
    rows = [_untimed(json.loads(x)) for x in open(jsonl)] if os.path.exists(jsonl) else []
    assert rows == history[: len(rows)] and len(rows) >= len(history) - 1
    best = os.path.join(folder, "best.pt")
    if os.path.exists(best):
        assert _untimed(torch.load(best, weights_only=True)["metrics"]) in history


# ------------------------------------------------------------------------------ kills


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    points = []
    _train_with_hook(_cfg(small, out), points.append)
    return {"out": str(out), "points": points}


def test_reference_run_writes_in_kill_safe_order(reference):
    points = reference["points"]
    writes = [p.split(":", 1)[1] for p in points if p.startswith("write:")]
    assert writes[:2] == ["classes.txt", "train_config.json"]
    epoch_end = writes[writes.index("metrics.jsonl") - 2 :][:4]
    assert epoch_end == ["last.pt", "best.pt", "metrics.jsonl", "metrics.csv"], writes  # last.pt first: the record
    assert points.count("step") == 6 and writes.count("metrics.csv") == 2


def _kill_points(points):
    """1-based indices into the reference run's fault points, one per state a kill can leave on
    disk: before the first write, after every completed write (so between every pair of writes of
    an epoch end), with a temporary of each kind of file half-done, and mid-epoch after a step
    (a kill inside a step leaves the disk as after the write before it)."""
    last_epoch_end = len(points) - points[::-1].index("write:last.pt")
    chosen = {1, points.index("step") + 2}
    chosen |= {i + 1 for i, p in enumerate(points) if p.startswith("done:")}
    chosen |= {i + 1 for i, p in enumerate(points) if p.startswith("rename:") and i + 1 >= last_epoch_end}
    return sorted(chosen)


def test_kill_at_every_write_then_resume_equals_uninterrupted(small, reference, tmp_path):
    points = reference["points"]
    chosen = _kill_points(points)
    assert len(chosen) >= 18 and {i + 1 for i, p in enumerate(points) if p.startswith("done:")} <= set(chosen)
    for n in chosen:
        out = tmp_path / f"kill{n}"
        with pytest.raises(Killed):
            _train_with_hook(_cfg(small, out), _kill_at(n))
        assert_not_ahead_of_last(out)
        if points[n - 1].startswith("rename:"):
            assert any(name.startswith(".tmp-") for name in os.listdir(out)), points[n - 1]
        train(_cfg(small, out, resume=True))
        try:
            assert_same_outputs(reference["out"], str(out))
        except AssertionError as e:
            raise AssertionError(f"killed at point {n} ({points[n - 1]}): {e}") from None


def test_kill_during_the_repair_of_a_resume(small, reference, tmp_path):
    """Killed after last.pt of an epoch end, then killed again while --resume rewrites best.pt."""
    out = tmp_path / "twice"
    first_best = reference["points"].index("write:best.pt") + 1
    with pytest.raises(Killed):
        _train_with_hook(_cfg(small, out), _kill_at(first_best))
    repair = []

    def hook(point):
        repair.append(point)
        if point == "rename:best.pt":
            raise Killed(point)

    with pytest.raises(Killed):
        _train_with_hook(_cfg(small, out, resume=True), hook)
    assert repair[0] == "write:best.pt"  # the repair comes first
    assert_not_ahead_of_last(out)
    train(_cfg(small, out, resume=True))
    assert_same_outputs(reference["out"], str(out))


def test_real_kill_leaves_a_lock_and_a_temporary_that_resume_handles(small, reference, tmp_path):
    out = tmp_path / "real"
    env = dict(
        os.environ,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        **{outputs.FAULT_ENV: "rename:last.pt#3"},
    )
    cmd = [sys.executable, "-m", "htsat", *_cli(small, out, "--checkpoint-every", "2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 137, proc.stderr[-3000:]
    left = os.listdir(out)
    assert LOCK_NAME in left and any(n.startswith(".tmp-last.pt") for n in left)
    assert json.load(open(out / LOCK_NAME))["pid"] != os.getpid()  # the dead process's record
    messages = []
    train(_cfg(small, out, resume=True, log=messages.append))
    assert any("removed" in m and ".tmp-last.pt" in m for m in messages)
    assert json.load(open(out / LOCK_NAME))["pid"] == os.getpid()
    assert_same_outputs(reference["out"], str(out))


# ------------------------------------------------------------------------------ the lock


def test_second_run_on_a_locked_folder_is_refused(small, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = OutputLock(str(out))
    holder.acquire()
    try:
        with pytest.raises(TrainingError, match=rf"in use by another training run \(pid {os.getpid()} on "):
            train(_cfg(small, out, epochs=1))
        rc = htsat_main(_cli(small, out))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and err[0].startswith("htsat: error: ") and str(out) in err[0], err
        assert not (out / "last.pt").exists() and not (out / "classes.txt").exists()  # nothing written
    finally:
        holder.release()
    run = train(_cfg(small, out, epochs=1))  # free again
    assert run["epochs"] == 1


def test_lock_file_of_a_dead_process_does_not_block(small, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead.strip()), "host": "here", "started": "then"}))
    run = train(_cfg(small, out, epochs=1))
    assert run["epochs"] == 1 and json.load(open(out / LOCK_NAME))["pid"] == os.getpid()


# ------------------------------------------------------------------------------ files


def test_outputs_have_the_users_file_mode_and_stale_temporaries_go(small, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "modes"
        train(_cfg(small, out, epochs=1))
        (out / ".tmp-last.pt-1-dead").write_bytes(b"x" * 100)
        (out / ".tmp-metrics.csv-1-dead").write_bytes(b"x")
        (out / "metrics.csv.tmp").write_bytes(b"x")  # an earlier version's name
        train(_cfg(small, out, epochs=2, resume=True))
    finally:
        os.umask(old)
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.startswith(".tmp-") or n.endswith(".tmp")]
    for name in names:
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name


def test_full_disk_is_one_line_and_keeps_last_pt(small, tmp_path, capsys):
    out = tmp_path / "full"
    train(_cfg(small, out, epochs=1, checkpoint_every=0))
    before = (out / "last.pt").read_bytes()

    def disk_full(point):
        if point == "flush:last.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    outputs.fault_hook = disk_full
    try:
        rc = htsat_main(_cli(small, out, "--resume"))
    finally:
        outputs.fault_hook = None
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("htsat:") or "Traceback" in line]
    assert rc == 1 and len(err) == 1, err
    assert f"cannot write {out / 'last.pt'}: No space left on device" in err[0]
    assert (out / "last.pt").read_bytes() == before
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_write_failure_inside_torch_save_names_the_file(small, tmp_path, capsys):
    """A real failing write: a file-size limit makes torch's stream writer fail (RuntimeError)."""
    resource = pytest.importorskip("resource")
    import signal

    out = tmp_path / "limit"
    train(_cfg(small, out, epochs=1, checkpoint_every=0))
    before = (out / "last.pt").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        rc = htsat_main(_cli(small, out, "--resume"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("htsat:") or "Traceback" in line]
    assert rc == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"htsat: error: cannot write {out / 'last.pt'}: "), lines
    assert (out / "last.pt").read_bytes() == before
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


@pytest.mark.parametrize("damage", ["truncated", "tensor", "list", "garbage", "no_config", "bad_config"])
def test_corrupt_last_pt_on_resume_is_one_line(small, tmp_path, capsys, damage):
    out = tmp_path / damage
    train(_cfg(small, out, epochs=1, checkpoint_every=0))
    path = out / "last.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    elif damage == "tensor":
        torch.save(torch.zeros(3), path)
    elif damage == "list":
        torch.save([1, 2], path)
    elif damage in ("no_config", "bad_config"):
        ck = torch.load(path, weights_only=True)
        if damage == "no_config":
            del ck["config"]
        else:
            ck["config"]["embed_dim"] = "wide"
        torch.save(ck, path)
    else:
        path.write_bytes(b"\x00not a checkpoint\n" * 10)
    before = path.read_bytes()
    rc = htsat_main(_cli(small, out, "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("htsat: error: ") and str(path) in err[0], err
    assert path.read_bytes() == before
