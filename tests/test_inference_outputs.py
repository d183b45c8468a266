"""The outputs of ``htsat predict`` / ``htsat embed`` under faults: an output that is an input, SIGTERM,
symlink loops, a missing folder, no tqdm, two writers, names that are not UTF-8 or hold tabs and line
breaks, a dead worker, a full disk, bad event times, and a kill at every output write followed by
``--resume``."""

import csv
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from cli_helpers import SR, _one_thread, needs_audio, tiny_model_json  # noqa: F401 (_one_thread: autouse fixture)

import htsat
import htsat.inference as inference
import htsat.inference_output as inference_output
from htsat.cli import main

pytestmark = needs_audio
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tone(freq, seconds, amp=0.3, seed=0):
    t = np.arange(int(round(seconds * SR))) / SR
    return (amp * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(seed).standard_normal(len(t))).astype(np.float32)


def _write(path, wave):
    import soundfile as sf

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(os.fsencode(path), wave, SR)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs")
    torch.manual_seed(3)
    model = htsat.create_model(tiny_model_json(folder / "tiny.json", num_classes=3), backend="reference").eval()
    htsat.save_checkpoint(model, folder / "tiny.pt", classes=["a", "b", "c"])
    return str(folder / "tiny.pt")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [_write(folder / f"{i}.wav", _tone(300 * (i + 1), 0.6 + 0.5 * i, seed=i)) for i in range(3)]


def _args(ckpt, *extra, workers="0"):
    return ["--checkpoint", ckpt, "--backend", "reference", "--num-workers", workers, "--no-progress", *extra]  # extra last


def _one_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("htsat: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith(".tmp-") or n.endswith(".htsat-lock"))


# ------------------------------------------------------------------------------------------------
# checked before any work: an input as the output, a missing folder, a second writer
# ------------------------------------------------------------------------------------------------


def test_an_output_that_is_an_input_is_refused_untouched(ckpt, tmp_path, capsys):
    wav = _write(tmp_path / "a.wav", _tone(440, 0.5))
    before = open(wav, "rb").read()
    _one_line(capsys, main(["predict", wav, "--json", "-o", wav, *_args(ckpt)]), f"-o {wav}", "is one of the inputs")
    os.link(wav, tmp_path / "hard.wav")  # the same file by another name
    _one_line(
        capsys, main(["predict", str(tmp_path), "--json", "-o", str(tmp_path / "hard.wav"), *_args(ckpt)]), "one of the inputs"
    )
    assert open(wav, "rb").read() == before


def test_binary_output_in_a_missing_folder_fails_before_any_file_is_read(ckpt, clips, tmp_path, capsys, monkeypatch):
    read = []
    monkeypatch.setattr(inference, "stream_audio", lambda path, *a, **k: read.append(path) or iter(()))
    for name in ("e.npz", "e.npy"):
        out = str(tmp_path / "nowhere" / name)
        _one_line(capsys, main(["embed", *clips, "-o", out, *_args(ckpt)]), f"-o {out}", "does not exist")
    _one_line(capsys, main(["embed", *clips, "-o", str(tmp_path), "--format", "npz", *_args(ckpt)]), "is a folder")
    assert read == []


def test_a_second_run_on_the_same_output_is_refused(ckpt, clips, tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("[]\n")
    with inference_output.open_writer("json", str(out), None) as first:
        _one_line(
            capsys,
            main(["predict", *clips, "-o", str(out), *_args(ckpt)]),
            f"{out} is being written by another htsat run (pid {os.getpid()})",
        )
        first.write({"file": "x.wav", "error": "file not found"})
    assert json.loads(out.read_text()) == [{"file": "x.wav", "error": "file not found"}]
    assert _leftovers(tmp_path) == []
    assert main(["predict", *clips, "-o", str(out), *_args(ckpt)]) == 0  # free again
    assert len(json.loads(out.read_text())) == 3


# ------------------------------------------------------------------------------------------------
# signals, a dead worker, resume
# ------------------------------------------------------------------------------------------------


def _sigterm_at(point, nth):
    seen = []

    def hook(p):
        if p == point:
            seen.append(p)
            if len(seen) == nth:
                signal.raise_signal(signal.SIGTERM)

    return hook


@pytest.mark.parametrize("fmt,point", [("json", "write"), ("json", "row"), ("npz", "write"), ("npy", "row")])
def test_sigterm_writes_what_was_done_and_resume_finishes(ckpt, clips, tmp_path, capsys, monkeypatch, fmt, point):
    out = str(tmp_path / f"r.{fmt}")
    cmd = ["embed", *clips, "-o", out, *_args(ckpt)]
    monkeypatch.setattr(inference_output, "fault_hook", _sigterm_at(f"{point}:r.{fmt}", 2))
    assert main(cmd) == 143
    err = capsys.readouterr().err
    assert "htsat: error: terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    kept = inference_output.read_done(fmt, out)
    assert list(kept) == clips[: 2 if point == "row" else 1]  # "row": the signal waits until the row is whole
    assert _leftovers(tmp_path) == []
    monkeypatch.setattr(inference_output, "fault_hook", None)
    assert main([*cmd, "--resume"]) == 0
    assert "resuming" in capsys.readouterr().err
    again = str(tmp_path / f"clean.{fmt}")
    assert main(["embed", *clips, "-o", again, *_args(ckpt)]) == 0
    got, want = inference_output.read_done(fmt, out), inference_output.read_done(fmt, again)
    assert list(got) == list(want) == clips
    for f in clips:
        # (a resumed run batches other windows together: float sums in another order)
        np.testing.assert_allclose(np.asarray(got[f]["embedding"]), np.asarray(want[f]["embedding"]), atol=1e-5)


def test_sigterm_to_the_process_group_with_workers_leaves_a_valid_json(ckpt, tmp_path):
    """A real SIGTERM to the command and its loader workers (as a scheduler sends it), mid-run."""
    paths = [_write(tmp_path / "in" / f"{i:02d}.wav", _tone(300 + 20 * i, 8.0)) for i in range(12)]
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "htsat", "predict", *paths, "-o", str(out), "--batch-size", "1"]
    cmd += _args(ckpt, "--progress", workers="1")  # the last of --no-progress / --progress counts
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env, cwd=ROOT, start_new_session=True)
    seen = b""
    while not any(int(n) >= 2 for n in re.findall(rb" (\d+)/12 ", seen)):  # the bar: two files are through
        byte = proc.stderr.read(1)
        assert byte, seen.decode(errors="replace")
        seen += byte
    os.killpg(proc.pid, signal.SIGTERM)
    err = (seen + proc.stderr.read()).decode()
    assert proc.wait(timeout=120) == 143, err
    assert "htsat: error: terminated (SIGTERM)" in err and "Traceback" not in err, err
    rows = json.loads(out.read_text())
    assert 2 <= len(rows) < 12 and [r["file"] for r in rows] == paths[: len(rows)] and all("top" in r for r in rows)
    assert f"{len(rows)} result(s) kept in {out}" in err
    assert _leftovers(tmp_path) == []


def test_a_killed_worker_is_one_line_and_the_run_resumes(ckpt, clips, tmp_path, capsys, monkeypatch):
    doomed = _write(tmp_path / "in" / "oom.wav", _tone(500, 0.7))
    orig = inference.stream_audio

    def killed_on_oom(path, *a, **k):  # runs in the (forked) worker
        if path == doomed and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(path, *a, **k)

    parent = os.getpid()
    monkeypatch.setattr(inference, "stream_audio", killed_on_oom)
    out = str(tmp_path / "r.jsonl")
    cmd = ["predict", clips[0], doomed, clips[1], "-o", out, *_args(ckpt, workers="1")]
    assert main(cmd) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) <= 2, err
    assert lines[-1].startswith("htsat: error: a worker process died (DataLoader worker") and "out of memory?" in lines[-1]
    kept = inference_output.read_done("jsonl", out) if os.path.exists(out) else {}
    assert list(kept) in ([], [clips[0]])
    monkeypatch.setattr(inference, "stream_audio", orig)
    assert main([*cmd, "--resume"]) == 0
    assert [json.loads(x)["file"] for x in open(out)] == [clips[0], doomed, clips[1]]


def test_resume_refuses_what_it_cannot_read_back(ckpt, clips, tmp_path, capsys):
    bad = tmp_path / "r.json"
    bad.write_text('[{"file": "a.wav"')
    _one_line(capsys, main(["predict", *clips, "-o", str(bad), "--resume", *_args(ckpt)]), f"cannot read the results in {bad}")
    assert bad.read_text() == '[{"file": "a.wav"'  # left as it was
    _one_line(capsys, main(["predict", *clips, "-o", str(tmp_path / "e.tsv"), "--resume", *_args(ckpt)]), "resume works with")


# ------------------------------------------------------------------------------------------------
# a full disk
# ------------------------------------------------------------------------------------------------


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(ckpt, clips, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "index.npz")
    assert main(["embed", *clips, "-o", out, *_args(ckpt)]) == 0
    before = open(out, "rb").read()

    def half_then_full(self, paths):
        with open(paths[0], "wb") as f:
            f.write(before[: len(before) // 2])
        _enospc()

    monkeypatch.setattr(inference_output._Matrix, "save", half_then_full)
    _one_line(
        capsys,
        main(["embed", *clips, "-o", out, *_args(ckpt)]),
        f"cannot write {out}: No space left on device (the disk is full); {out} is as it was",
    )
    assert open(out, "rb").read() == before and _leftovers(tmp_path) == []
    # a streamed format: the disk fills on the second result
    js = tmp_path / "r.json"
    js.write_text('[{"file": "old.wav", "error": "file not found"}]\n')
    calls = []
    orig = inference_output._JsonArray._write
    monkeypatch.setattr(
        inference_output._JsonArray, "_write", lambda self, r: (calls.append(r), _enospc() if len(calls) == 2 else orig(self, r))
    )
    capsys.readouterr()
    _one_line(capsys, main(["predict", *clips, "-o", str(js), *_args(ckpt)]), f"cannot write {js}: No space left on device")
    assert json.loads(js.read_text()) == [{"file": "old.wav", "error": "file not found"}] and _leftovers(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="RLIMIT_FSIZE is POSIX")
def test_a_file_size_limit_is_a_real_failed_write_that_keeps_the_previous_file(ckpt, clips, tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) in a real process."""
    out = tmp_path / "index.npz"
    assert main(["embed", *clips, "-o", str(out), *_args(ckpt)]) == 0
    before = out.read_bytes()
    script = textwrap.dedent(
        f"""
        import resource, sys
        from htsat.cli import main
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, resource.RLIM_INFINITY))
        sys.exit(main({["embed", *clips, "-o", str(out), *_args(ckpt)]!r}))
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"htsat: error: cannot write {out}: File too large; {out} is as it was"
    ], proc.stderr
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# names: not UTF-8, tabs and line breaks
# ------------------------------------------------------------------------------------------------


def test_a_name_that_is_not_utf8_is_read_and_written_to_every_format(ckpt, tmp_path, capsysbinary):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.wav")
    name = _write(os.fsdecode(raw), _tone(700, 0.6))
    good = _write(tmp_path / "z.wav", _tone(300, 0.6))
    for fmt in ("csv", "tsv", "jsonl", "json"):
        out = str(tmp_path / f"r.{fmt}")
        assert main(["predict", name, good, "-o", out, "--threshold", "0", *_args(ckpt)]) == 0, capsysbinary.readouterr().err
        data = open(out, "rb").read()
        if fmt in ("csv", "tsv"):
            assert raw in data  # the name's own bytes
        else:
            rows = [json.loads(x) for x in data.splitlines()] if fmt == "jsonl" else json.loads(data)
            assert os.fsencode(rows[0]["file"]) == raw and "top" in rows[0]
    capsysbinary.readouterr()
    assert main(["predict", name, good, "--format", "csv", *_args(ckpt)]) == 0  # stdout, too
    assert capsysbinary.readouterr().out.splitlines()[1].split(b",")[0] == raw
    assert main(["embed", name, good, "-o", str(tmp_path / "e.npz"), *_args(ckpt)]) == 0
    assert os.fsencode(str(np.load(tmp_path / "e.npz")["files"][0])) == raw
    assert main(["embed", name, good, "-o", str(tmp_path / "e.npy"), *_args(ckpt)]) == 0
    assert (tmp_path / "e.files.txt").read_bytes().split(b"\n")[0] == raw
    assert capsysbinary.readouterr().err == b""


def test_tabs_and_line_breaks_in_names_follow_each_format(ckpt, tmp_path, capsys):
    tab = _write(tmp_path / "a\tb.wav", _tone(500, 0.6))
    newline = _write(tmp_path / "c\nd.wav", _tone(600, 0.6))
    good = _write(tmp_path / "g.wav", _tone(700, 0.6))
    files = [tab, newline, good]
    assert main(["predict", *files, "-o", str(tmp_path / "e.tsv"), "--threshold", "0", *_args(ckpt)]) == 1
    err = capsys.readouterr().err
    assert err.count("which a .tsv row cannot hold") == 2 and "2 of 3 file(s) failed" in err
    rows = (tmp_path / "e.tsv").read_text().split("\n")[1:-1]
    assert rows and all(r.split("\t")[0] == good and len(r.split("\t")) == 4 for r in rows)
    assert main(["predict", *files, "-o", str(tmp_path / "r.csv"), *_args(ckpt)]) == 0
    with open(tmp_path / "r.csv", newline="") as f:
        assert {r["file"] for r in csv.DictReader(f)} == set(files)
    assert main(["embed", *files, "-o", str(tmp_path / "e.npy"), *_args(ckpt)]) == 1
    assert "which a line of .files.txt cannot hold" in capsys.readouterr().err
    names = (tmp_path / "e.files.txt").read_text().splitlines()
    assert names == [tab, good] and len(np.load(tmp_path / "e.npy")) == 2


# ------------------------------------------------------------------------------------------------
# inputs: symlink loops; no tqdm
# ------------------------------------------------------------------------------------------------


def test_symlink_loops_in_folders_and_globs_end_with_each_file_once(tmp_path):
    for d in ("a", "b"):
        _write(tmp_path / "L" / d / f"{d}.wav", _tone(300, 0.1))
        os.symlink("..", tmp_path / "L" / d / "up")
    os.symlink(tmp_path / "L" / "a", tmp_path / "L" / "alias")  # a second name for a real folder
    script = textwrap.dedent(
        f"""
        from htsat.inference import expand_inputs
        print(list(expand_inputs([{str(tmp_path / "L")!r}])))
        print(list(expand_inputs([{str(tmp_path / "L" / "**" / "*.wav")!r}])))
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    folder, pattern = (eval(line) for line in out.stdout.splitlines())
    want = [str(tmp_path / "L" / "a" / "a.wav"), str(tmp_path / "L" / "b" / "b.wav")]
    assert folder == want and pattern == want


def test_glob_double_star_matches_as_glob_does(tmp_path):
    for rel in ("x.wav", "s/y.wav", "s/t/z.wav", ".h/w.wav", "s/.v.wav"):
        _write(tmp_path / rel, _tone(300, 0.05))
    import glob

    for pat in ("**/*.wav", "s/**/*.wav", "**/t/*.wav", "**"):
        spec = str(tmp_path / pat)
        files = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        assert sorted(inference._glob_files(spec)) == sorted(files), pat


def test_progress_without_tqdm_runs_without_a_bar(ckpt, clips, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    assert main(["predict", *clips, "--format", "jsonl", *_args(ckpt, "--progress")]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and err == ""


# ------------------------------------------------------------------------------------------------
# event times
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", ["inf", "nan", "-1"])
def test_event_times_that_are_not_finite_are_one_line_errors(tmp_path, offset):
    from htsat.data import ManifestError
    from htsat.sed import read_events

    path = tmp_path / "ref.tsv"
    onset = "-2" if offset == "-1" else "0.5"
    path.write_text(f"filename\tonset\toffset\tevent_label\na.wav\t0.1\t0.4\tdog\na.wav\t{onset}\t{offset}\tdog\n")
    with pytest.raises(ManifestError, match=rf"{path}:3: onset/offset must be finite seconds >= 0"):
        read_events(str(path))


def test_segment_metrics_of_a_far_event_need_no_memory_per_segment():
    from htsat.sed import segment_based_metrics

    far = 1e12  # an array of a segment per second would be a terabyte
    ref = {"a.wav": [(0.0, 2.5, "dog"), (far - 2, far, "cat")]}
    est = {"a.wav": [(0.2, 1.4, "dog"), (far - 1, far, "cat"), (3.0, 4.0, "dog")]}
    res = segment_based_metrics(ref, est)
    assert res["per_class"]["dog"]["tp"] == 2 and res["per_class"]["dog"]["fp"] == 1 and res["per_class"]["dog"]["fn"] == 1
    assert res["per_class"]["cat"]["tp"] == 1 and res["per_class"]["cat"]["fn"] == 1 and res["per_class"]["cat"]["fp"] == 0


# ------------------------------------------------------------------------------------------------
# a kill at every output write, then --resume
# ------------------------------------------------------------------------------------------------


def _run_killed(cmd, point):
    """``main(cmd)`` in a forked child that dies as ``kill -9`` would at ``point`` ("NAME#N")."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.environ[inference_output.FAULT_ENV] = point
            inference_output._fault_counts.clear()
            os._exit(main(cmd))
        finally:
            os._exit(99)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _valid_prefix(fmt, out, files):
    """The output is absent, or a valid file of the first results (read as a reader would)."""
    if not os.path.exists(out):
        return []
    if fmt == "json":
        rows = [r["file"] for r in json.loads(open(out).read())]
    elif fmt == "csv":
        rows = list(dict.fromkeys(r["file"] for r in csv.DictReader(io.StringIO(open(out).read()))))
    elif fmt == "npz":
        with np.load(out) as z:
            rows = list(z["files"])
            assert z["embeddings"].shape[0] == len(rows)
    else:
        rows = list(inference_output.read_done(fmt, out))
    assert rows == files[: len(rows)]
    return rows


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
@pytest.mark.parametrize("command,fmt", [("predict", "json"), ("embed", "npy")])  # a stream; two files renamed in turn
def test_kill_at_every_output_write_leaves_valid_files_and_resume_finishes(ckpt, clips, tmp_path, monkeypatch, command, fmt):
    monkeypatch.setattr(inference_output, "PUBLISH_SECONDS", 0.0)  # publish after every result: every write is a point
    monkeypatch.setattr(inference_output, "PUBLISH_SHARE", float("inf"))
    clean = str(tmp_path / f"clean.{fmt}")
    points = []
    monkeypatch.setattr(inference_output, "fault_hook", points.append)
    assert main([command, *clips, "-o", clean, *_args(ckpt)]) == 0
    monkeypatch.setattr(inference_output, "fault_hook", None)
    want = inference_output.read_done(fmt, clean)
    name = os.path.basename(clean)
    kinds = [p.replace(name, f"r.{fmt}").replace("clean.files", "r.files") for p in points]
    # a publish after each result, and the last one (a matrix already there whole is not written again)
    assert kinds.count(f"rename:r.{fmt}") == len(clips) + (fmt not in ("npy", "npz"))
    for n_th, point in enumerate(kinds):
        out = str(tmp_path / f"k{n_th}" / f"r.{fmt}")
        os.makedirs(os.path.dirname(out))
        previous = kinds[:n_th].count(point) + 1
        cmd = [command, *clips, "-o", out, *_args(ckpt)]
        assert _run_killed(cmd, f"{point}#{previous}") == 137, point
        _valid_prefix(fmt, out, clips)
        assert main([*cmd, "--resume"]) == 0, point
        got = inference_output.read_done(fmt, out)
        assert list(got) == list(want), point
        for f in clips:
            if fmt in ("npz", "npy"):
                np.testing.assert_allclose(got[f]["embedding"], want[f]["embedding"], atol=1e-5)
            else:
                assert [t["label"] for t in got[f]["top"]] == [t["label"] for t in want[f]["top"]]
                assert [t["score"] for t in got[f]["top"]] == pytest.approx([t["score"] for t in want[f]["top"]], abs=1e-5)
        assert _leftovers(os.path.dirname(out)) == [], point
