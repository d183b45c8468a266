"""Inference at scale (issue 12): inputs (folders, globs, @lists), batching across files, streamed
decode with results equal to the model's own forward, output formats, embeddings, errors, and memory
that does not grow with the file's duration."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from cli_helpers import SR, _one_thread, needs_audio, tiny_model_json  # noqa: F401 (_one_thread: autouse fixture)

import htsat
from htsat.cli import main
from htsat.inference import expand_inputs
from htsat.predict import Predictor, detect_events

pytestmark = needs_audio
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tone(freq, seconds, amp=0.3, sr=SR, seed=0):
    t = np.arange(int(round(seconds * sr))) / sr
    noise = 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return (amp * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def _write(path, wave, sr=SR, subtype=None):
    import soundfile as sf

    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    sf.write(str(path), wave, sr, subtype=subtype)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    model_json = tiny_model_json(folder / "tiny.json", num_classes=3)
    torch.manual_seed(3)
    model = htsat.create_model(model_json, backend="reference").eval()
    path = folder / "tiny.pt"
    htsat.save_checkpoint(model, path, classes=["a", "b", "c"])
    return {"path": str(path), "json": model_json, "model": model, "folder": folder}


def _predictor(ckpt, **kw):
    return Predictor.from_checkpoint(ckpt["path"], backend="reference", device="cpu", **kw)


# ------------------------------------------------------------------------------------------------
# item 1: inputs
# ------------------------------------------------------------------------------------------------


def test_expand_inputs_folders_globs_lists_and_duplicates(tmp_path):
    a = _write(tmp_path / "d" / "b.wav", _tone(300, 0.2))
    b = _write(tmp_path / "d" / "sub" / "a.flac", _tone(300, 0.2))
    c = _write(tmp_path / "d" / "A.WAV", _tone(300, 0.2))
    (tmp_path / "d" / "notes.txt").write_text("not audio")
    (tmp_path / "empty").mkdir()
    other = _write(tmp_path / "x" / "z.ogg", _tone(300, 0.2))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my files\n{other}\n\n{a}\n{tmp_path / 'x'}/*.ogg\n")
    got = expand_inputs(
        [
            str(tmp_path / "d"),
            a,
            f"@{listing}",
            str(tmp_path / "d" / "sub" / ".." / "b.wav"),
            str(tmp_path / "empty"),
            str(tmp_path / "nomatch*.wav"),
            str(tmp_path / "missing.wav"),
        ]
    )
    assert list(got) == [c, a, b, other, str(tmp_path / "empty"), str(tmp_path / "nomatch*.wav"), str(tmp_path / "missing.wav")]
    assert "no audio files" in got.problems[str(tmp_path / "empty")]
    assert got.problems[str(tmp_path / "nomatch*.wav")] == "no files match this pattern"
    assert str(tmp_path / "missing.wav") not in got.problems  # read later: "file not found"
    with pytest.raises(ValueError, match="nolist.txt: cannot read the list"):
        expand_inputs([f"@{tmp_path / 'nolist.txt'}"])


def test_cli_folder_each_file_once_in_order_with_bad_ones_reported(ckpt, tmp_path, capsys):
    paths = [_write(tmp_path / "in" / f"{i:02d}.wav", _tone(200 + 150 * i, 0.4 + 0.9 * i, seed=i)) for i in range(6)]
    (tmp_path / "in" / "03b.wav").write_bytes(b"RIFF junk")
    bad = str(tmp_path / "in" / "03b.wav")
    rc = main(
        [
            "predict",
            str(tmp_path / "in"),
            paths[2],
            str(tmp_path / "in" / "0*.wav"),
            "--checkpoint",
            ckpt["path"],
            "--format",
            "jsonl",
            "--backend",
            "reference",
            "--batch-size",
            "3",
            "--num-workers",
            "0",
            "--no-progress",
        ]
    )
    out, err = capsys.readouterr()
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["file"] for r in rows] == paths[:4] + [bad] + paths[4:]
    assert rc == 1 and "cannot read audio" in rows[4]["error"]
    assert sum(bad in line for line in err.splitlines()) == 1 and "1 of 7 file(s) failed" in err


# ------------------------------------------------------------------------------------------------
# items 2 and 5: batching across files, streamed decode equal to the model's forward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.6, 2.0, 3.37, 7.5, 12.0])
def test_streamed_result_equals_forward_on_the_whole_file(ckpt, tmp_path, monkeypatch, seconds):
    """Blocks smaller than a window, windows batched with other files: the framewise map, clipwise
    logits and latent equal HTSAT.forward on the whole waveform (7.5 s ends on the hop grid)."""
    import htsat.inference as inference

    monkeypatch.setattr(inference, "BLOCK_SECONDS", 0.37)
    wave = _tone(700, seconds, seed=5) + _tone(2500, seconds, 0.1, seed=6) * (np.arange(int(round(seconds * SR))) > SR)
    path = _write(tmp_path / "x.wav", wave, subtype="FLOAT")
    other = _write(tmp_path / "y.wav", _tone(400, 1.7), subtype="FLOAT")
    pred = _predictor(ckpt, short_clips="zeros" if seconds < 1 else "tile", batch_size=5)
    res = list(pred.iter_files([other, path], keep_framewise=True, framewise=True, threshold=0.5))[1]
    model = ckpt["model"]
    x = torch.from_numpy(wave)[None]
    if seconds < 1:
        x = torch.nn.functional.pad(x, (0, SR - x.shape[1]))
    with torch.no_grad():
        want = model(x)
    np.testing.assert_allclose(res["framewise"], want["framewise_output"][0].numpy(), atol=1e-5, rtol=0)
    assert res["frame_seconds"] == pytest.approx(model.frame_seconds(x.shape[1]))
    scores = torch.softmax(want["clipwise_logits"][0], 0)  # the tiny model is clip_ce
    assert {t["label"]: t["score"] for t in res["top"]} == pytest.approx(dict(zip("abc", scores.tolist())), abs=1e-5)
    # the incremental events are detect_events on the whole map
    whole = detect_events(want["framewise_output"][0].numpy(), res["frame_seconds"], list("abc"), duration=seconds)
    assert [(e["onset"], e["offset"], e["label"]) for e in res["events"]] == [
        (e["onset"], e["offset"], e["label"]) for e in whole
    ]
    assert [e["score"] for e in res["events"]] == pytest.approx([e["score"] for e in whole], abs=1e-5)
    emb = list(pred.embed_files([path]))[0]["embedding"]
    np.testing.assert_allclose(emb, want["latent_output"][0].numpy(), atol=1e-5)


def test_model_forward_framewise_false_keeps_only_clipwise(ckpt):
    model = ckpt["model"]
    x = torch.from_numpy(_tone(500, 4.2))[None].repeat(2, 1)
    with torch.no_grad():
        full, lean = model(x), model(x, framewise=False)
        short = model(x[:, : SR // 2], framewise=False)
    assert "framewise_output" not in lean and "framewise_output" not in short
    for k in lean:
        torch.testing.assert_close(lean[k], full[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("worker_stage", [None, "mel", "audio"])  # None: on CPU the workers run the model
def test_batch_size_and_workers_do_not_change_results(ckpt, tmp_path, worker_stage):
    paths = [_write(tmp_path / f"{i}.wav", _tone(250 * (i + 1), [0.5, 1.0, 2.9, 6.1, 1.0][i], seed=i)) for i in range(5)]
    one = list(_predictor(ckpt, batch_size=1).iter_files(paths, framewise=True, keep_framewise=True))
    many = list(
        _predictor(ckpt, batch_size=8, num_workers=2, worker_stage=worker_stage).iter_files(
            paths, framewise=True, keep_framewise=True
        )
    )
    assert [r["file"] for r in many] == paths
    for a, b in zip(one, many):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert [t["score"] for t in a["top"]] == pytest.approx([t["score"] for t in b["top"]], abs=1e-5)
        assert len(a["events"]) == len(b["events"])
        np.testing.assert_allclose(a["framewise"], b["framewise"], atol=1e-5, rtol=0)


def test_front_end_in_workers_sends_log_mel_not_audio(ckpt, tmp_path):
    """With the front end in the workers, what crosses to the main process is each window's log-mel,
    and forward_mel on it is the model's forward on the window."""
    import htsat.inference as inference

    model = ckpt["model"]
    wave = _tone(900, 6.1, seed=3)
    path = _write(tmp_path / "a.wav", wave, subtype="FLOAT")
    plan = inference.window_plan(model.config)
    ds = inference._FileWindows([path], plan, "tile", None, set(), model.front_end())
    items = [it for it in ds if it["kind"] in ("one", "win")]
    assert len(items) == len(model.window_starts(len(wave))) and all("wave" not in it for it in items)
    mel = torch.from_numpy(np.stack([it["mel"] for it in items]))
    assert mel.shape == (len(items), 1, model.num_frames(plan["win"]), model.config.mel_bins)
    clips = torch.stack([torch.from_numpy(wave[s : s + plan["win"]]) for s in model.window_starts(len(wave))])
    with torch.no_grad():
        got, want = model.forward_mel(mel), model(clips)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


def test_autocast_precision_runs_the_batched_path(ckpt, tmp_path):
    """--precision bf16 (autocast; on CPU here, the same code path as AMP on GPU) gives the fp32 ranking."""
    paths = [_write(tmp_path / f"{i}.wav", _tone(300 * (i + 1), 2.7, seed=i)) for i in range(3)]
    full = list(_predictor(ckpt).iter_files(paths, top_k=3, framewise=True))
    low = list(_predictor(ckpt, precision="bf16").iter_files(paths, top_k=3, framewise=True))
    for a, b in zip(full, low):
        assert [t["score"] for t in b["top"]] == pytest.approx([t["score"] for t in a["top"]], abs=0.05)
        assert all(np.isfinite(t["score"]) for t in b["top"])


def test_results_come_as_each_file_is_done(ckpt, tmp_path):
    """The iterator yields the first file before the later ones are read."""
    import htsat.inference as inference

    paths = [_write(tmp_path / f"{i}.wav", _tone(300, 1.0)) for i in range(4)]
    read = []
    orig = inference.stream_audio

    def spy(path, *a, **k):
        read.append(path)
        return orig(path, *a, **k)

    inference.stream_audio, saved = spy, inference.stream_audio
    try:
        it = _predictor(ckpt, batch_size=1).iter_files(paths)
        first = next(it)
        assert first["file"] == paths[0] and len(read) <= 2
        it.close()
    finally:
        inference.stream_audio = saved


# ------------------------------------------------------------------------------------------------
# item 3: output formats
# ------------------------------------------------------------------------------------------------


def test_output_formats_json_csv_tsv(ckpt, tmp_path, capsys):
    good = _write(tmp_path / "g.wav", _tone(600, 3.0))
    bad = str(tmp_path / "missing.wav")
    base = ["--checkpoint", ckpt["path"], "--backend", "reference", "--num-workers", "0", "--top-k", "2"]
    out_json = tmp_path / "r.json"
    assert main(["predict", good, bad, "-o", str(out_json), *base]) == 1
    data = json.loads(out_json.read_text())
    assert data[0]["file"] == good and len(data[0]["top"]) == 2 and data[1]["error"] == "file not found"
    assert main(["predict", bad, "-o", str(out_json), *base]) == 1
    assert json.loads(out_json.read_text()) == [{"file": bad, "error": "file not found"}]
    out_csv = tmp_path / "r.csv"
    assert main(["predict", good, bad, "-o", str(out_csv), *base]) == 1
    lines = out_csv.read_text().splitlines()
    assert (
        lines[0] == "file,rank,label,score,error" and lines[1].startswith(f"{good},1,") and lines[3] == f"{bad},,,,file not found"
    )
    out_tsv = tmp_path / "events.tsv"
    assert main(["predict", good, "-o", str(out_tsv), "--threshold", "0.0", *base]) == 0  # tsv implies --framewise
    rows = [r.split("\t") for r in out_tsv.read_text().splitlines()]
    assert rows[0] == ["filename", "onset", "offset", "event_label"]
    assert rows[1:] and all(r[0] == good and 0 <= float(r[1]) < float(r[2]) <= 3.0 and r[3] in "abc" for r in rows[1:])
    capsys.readouterr()
    assert main(["predict", good, "--format", "jsonl", *base]) == 0
    assert json.loads(capsys.readouterr().out)["file"] == good
    assert main(["predict", good, "-o", str(tmp_path / "r.xyz"), *base]) == 1
    assert "cannot tell the format from the extension .xyz" in capsys.readouterr().err


def test_progress_bar_on_request(ckpt, tmp_path, capsys):
    paths = [_write(tmp_path / f"{i}.wav", _tone(300, 1.0)) for i in range(3)]
    base = ["--checkpoint", ckpt["path"], "--backend", "reference", "--num-workers", "2", "--format", "jsonl"]
    assert main(["predict", *paths, str(tmp_path / "gone.wav"), "--progress", *base]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 4 and "4/4" in err and "1 failed" in err and "gone.wav: file not found" in err
    assert main(["predict", *paths, *base]) == 0  # not a terminal: no bar
    assert capsys.readouterr().err == ""


def test_embed_npz_npy_jsonl(ckpt, tmp_path, capsys):
    paths = [_write(tmp_path / "in" / f"{i}.wav", _tone(300 * (i + 1), 0.5 + 2 * i)) for i in range(3)]
    base = ["--checkpoint", ckpt["path"], "--backend", "reference", "--num-workers", "0"]
    assert main(["embed", str(tmp_path / "in"), str(tmp_path / "gone.wav"), "-o", str(tmp_path / "e.npz"), *base]) == 1
    z = np.load(tmp_path / "e.npz")
    assert list(z["files"]) == paths and z["embeddings"].shape == (3, ckpt["model"].config.num_features)
    pred = _predictor(ckpt)
    want = np.stack([r["embedding"] for r in pred.embed_files(paths)])
    np.testing.assert_allclose(z["embeddings"], want, atol=1e-6)
    assert main(["embed", *paths, "-o", str(tmp_path / "e.npy"), *base]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), want, atol=1e-6)
    assert (tmp_path / "e.files.txt").read_text().splitlines() == paths
    capsys.readouterr()
    assert main(["embed", paths[0], *base]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["file"] == paths[0] and np.allclose(row["embedding"], want[0], atol=1e-6)
    assert main(["embed", paths[0], "--embedding", "clap_embedding", *base]) == 1
    assert "needs a CLAP model" in capsys.readouterr().err
    assert main(["embed", paths[0], "--format", "npz", *base]) == 1
    assert "write it to a file with -o" in capsys.readouterr().err


def test_clap_embedding_of_a_clap_model_equals_its_forward(tmp_path, capsys):
    """A small CLAP-style model (repeatpad, projection): short clips repeat-padded, long ones windowed,
    projections averaged then normalised, as HTSAT.forward does."""
    cfg = tiny_model_json(tmp_path / "clap.json", clip_fill="repeatpad", projection_dim=16, num_classes=5)
    model = htsat.create_model(cfg, backend="reference").eval()
    htsat.save_checkpoint(model, tmp_path / "clap.pt")
    pred = Predictor.from_checkpoint(str(tmp_path / "clap.pt"), backend="reference", device="cpu", batch_size=4)
    for seconds in (0.3, 1.0, 3.3):
        wave = _tone(900, seconds, seed=2)
        path = _write(tmp_path / f"c{seconds}.wav", wave, subtype="FLOAT")
        (res,) = list(pred.embed_files([path], embedding="clap_embedding"))
        with torch.no_grad():
            want = model(torch.from_numpy(wave)[None])["clap_embedding"][0].numpy()
        np.testing.assert_allclose(res["embedding"], want, atol=1e-5)
        assert np.linalg.norm(res["embedding"]) == pytest.approx(1.0, abs=1e-5)
    # the commands accept it: tags from its head, CLAP embeddings to a file
    base = ["--checkpoint", str(tmp_path / "clap.pt"), "--backend", "reference", "--num-workers", "0"]
    assert main(["predict", path, "--format", "jsonl", "--framewise", *base]) == 0
    assert main(["embed", path, "--embedding", "clap_embedding", "-o", str(tmp_path / "c.npz"), *base]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "c.npz")["embeddings"][0], res["embedding"], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# item 4 (issue item 5): errors
# ------------------------------------------------------------------------------------------------


def _one_line(capsys, rc, *needles):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("htsat: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_arguments_are_one_line(ckpt, tmp_path, capsys, monkeypatch):
    wav = _write(tmp_path / "a.wav", _tone(300, 1.0))
    base = [wav, "--checkpoint", ckpt["path"], "--num-workers", "0"]
    _one_line(capsys, main(["predict", *base, "--top-k", "0"]), "--top-k must be at least 1, got 0")
    _one_line(capsys, main(["predict", *base, "--batch-size", "0"]), "--batch-size must be at least 1")
    _one_line(capsys, main(["predict", *base, "--device", "gpu7"]), "--device 'gpu7' is not a device name")
    if not torch.cuda.is_available():
        _one_line(capsys, main(["predict", *base, "--device", "cuda"]), "--device cuda: no CUDA device is available")
    other = tiny_model_json(tmp_path / "other.json", num_classes=3, embed_dim=16)
    _one_line(
        capsys,
        main(["predict", *base, "--model", other]),
        f"--model {other} disagrees with the config saved in",
        "embed_dim 16 vs 24",
    )
    assert main(["predict", *base, "--model", ckpt["json"], "--backend", "reference"]) == 0  # the same config: fine
    capsys.readouterr()
    from htsat_kernels import backends

    monkeypatch.setitem(backends._fused, "window_attention", "no kernel for this machine (test)")
    _one_line(capsys, main(["predict", *base, "--backend", "fused"]), "backend 'fused' was requested", "cannot run")


def test_a_long_file_failing_part_way_does_not_disturb_the_others(ckpt, tmp_path, monkeypatch):
    """Errors found after some windows were sent (silence at the end, huge samples in block 5): the
    file gets one error, its waiting windows are dropped, the files around it are unchanged."""
    import htsat.inference as inference

    monkeypatch.setattr(inference, "BLOCK_SECONDS", 0.5)
    silent = _write(tmp_path / "silent.wav", np.zeros(5 * SR, np.float32))
    wave = _tone(500, 6.0)
    wave[int(2.6 * SR) :] *= 1e17
    huge = _write(tmp_path / "huge.wav", wave, subtype="FLOAT")
    good = [_write(tmp_path / f"g{i}.wav", _tone(400 * (i + 1), 3.2)) for i in range(2)]
    pred = _predictor(ckpt, batch_size=16)
    res = list(pred.iter_files([good[0], silent, huge, good[1]]))
    assert [r["file"] for r in res] == [good[0], silent, huge, good[1]]
    assert "silent-only" in res[1]["error"] and "far beyond full scale" in res[2]["error"]
    alone = [list(pred.iter_files([g]))[0] for g in good]
    for a, b in zip(alone, (res[0], res[3])):
        assert [t["score"] for t in a["top"]] == pytest.approx([t["score"] for t in b["top"]], abs=1e-6)


def test_truncated_file_is_read_as_far_as_it_goes_with_a_warning(ckpt, tmp_path, capsys):
    full = _write(tmp_path / "full.wav", _tone(600, 4.0), subtype="PCM_16")
    data = open(full, "rb").read()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: 44 + 2 * int(2.5 * SR)])
    rc = main(["predict", str(cut), "--checkpoint", ckpt["path"], "--json", "--backend", "reference", "--num-workers", "0"])
    out, err = capsys.readouterr()
    assert rc == 0
    (res,) = json.loads(out)
    assert res["duration"] == pytest.approx(2.5, abs=1e-3) and res["warnings"]
    assert f"htsat: warning: {cut}: truncated: the header declares 64000 samples, the file holds 40000" in err


def test_broken_pipe_is_one_line(ckpt, tmp_path):
    paths = [_write(tmp_path / f"{i}.wav", _tone(300, 0.5)) for i in range(40)]
    cmd = [
        sys.executable,
        "-m",
        "htsat",
        "predict",
        *paths,
        "--checkpoint",
        ckpt["path"],
        "--format",
        "jsonl",
        "--backend",
        "reference",
        "--num-workers",
        "0",
        "--batch-size",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    first = proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=300)
    assert json.loads(first)["file"] == paths[0]
    assert rc != 0 and "Traceback" not in err
    assert err.strip().splitlines() == ["htsat: error: output closed by the reader (broken pipe); stopped"]


# ------------------------------------------------------------------------------------------------
# bounded memory
# ------------------------------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    from htsat.predict import Predictor

    def rss_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    ckpt, warm, path = sys.argv[1:4]
    pred = Predictor.from_checkpoint(ckpt, backend="reference", device="cpu", batch_size=16)
    list(pred.iter_files([warm], framewise=True))  # imports, allocator pools, first forward
    before = rss_kb()
    (res,) = list(pred.iter_files([path], framewise=True, threshold=0.0))
    assert "error" not in res, res
    print(rss_kb() - before, res["duration"], len(res["events"]))
    """
)


def _rss_increase(ckpt_path, warm, path):
    # glibc's dynamic mmap threshold otherwise lets large freed buffers fragment the heap: a few MB of
    # drift unrelated to the file's length (measured: 5 MB for 1 min, 10 MB for 60, flat at 4 MB with this)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, ckpt_path, warm, path], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    kb, duration, _ = out.stdout.split()
    return int(kb), float(duration)


def _long_file(path, minutes, sr=8000):
    """A low-rate file written in pieces (it is resampled to the model's 16 kHz as it streams)."""
    import soundfile as sf

    with sf.SoundFile(str(path), "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for m in range(minutes):
            f.write(_tone(300 + 10 * (m % 7), 60.0, sr=sr, seed=m))
    return str(path)


def test_memory_of_a_60_minute_file_stays_that_of_a_1_minute_file(tmp_path):
    """Peak RSS increase (VmHWM) for 60 minutes within 1.5x that of 1 minute (tiny model, events on; ~15 s)."""
    cfg = tiny_model_json(tmp_path / "m.json", num_classes=3, long_hop_seconds=1.0)
    model = htsat.create_model(cfg, backend="reference").eval()
    htsat.save_checkpoint(model, tmp_path / "m.pt", classes=["a", "b", "c"])
    warm = _write(tmp_path / "warm.wav", _tone(300, 40.0, sr=8000), sr=8000)  # the same path as the measured runs
    one, d1 = _rss_increase(str(tmp_path / "m.pt"), warm, _long_file(tmp_path / "one.wav", 1))
    sixty, d60 = _rss_increase(str(tmp_path / "m.pt"), warm, _long_file(tmp_path / "sixty.wav", 60))
    assert d1 == pytest.approx(60.0) and d60 == pytest.approx(3600.0)
    assert sixty <= 1.5 * one, (one, sixty)  # KiB


def test_streamed_decode_matches_whole_file_decode(tmp_path):
    """Block reading + soxr's ResampleStream give the samples load_audio gives (stereo 44.1 kHz -> 16 kHz)."""
    from htsat.audio import load_audio, stream_audio

    rng = np.random.default_rng(0)
    x = np.stack([_tone(440, 7.3, sr=44100), 0.1 * rng.standard_normal(int(round(7.3 * 44100))).astype(np.float32)], axis=1)
    path = _write(tmp_path / "s.flac", x, sr=44100)
    whole = load_audio(path, SR)
    streamed = np.concatenate(list(stream_audio(path, SR, block_seconds=0.77)))
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, atol=1e-4)


def test_workers_running_the_model_keep_a_bad_file_from_its_batch_neighbours(ckpt, tmp_path, monkeypatch):
    """worker_stage "model": one worker batches windows of two files; the file whose rows are NaN gets the
    error, its neighbour in the same batch its scores (the batch runs again file by file, in the worker)."""
    import htsat

    forward_mel = htsat.HTSAT.forward_mel

    def nan_when_loud(self, mel, *args, **kwargs):
        out = forward_mel(self, mel, *args, **kwargs)
        loud = mel.flatten(1).amax(1) > 12.0  # dB: the 0.9 tone, not the 0.1 one
        return {k: torch.where(loud.view(-1, *[1] * (v.ndim - 1)), v * float("nan"), v) for k, v in out.items()}

    monkeypatch.setattr(htsat.HTSAT, "forward_mel", nan_when_loud)
    tone = np.sin(2 * np.pi * 440 * np.arange(int(2.5 * SR)) / SR).astype(np.float32)
    loud, quiet = _write(tmp_path / "loud.wav", 0.9 * tone), _write(tmp_path / "quiet.wav", 0.1 * tone)
    res = list(_predictor(ckpt, batch_size=8, num_workers=1, worker_stage="model").iter_files([loud, quiet]))
    assert "NaN or infinite" in res[0]["error"] and "top" not in res[0]
    assert "error" not in res[1] and all(np.isfinite(t["score"]) for t in res[1]["top"])


def test_worker_stage_is_checked(ckpt, tmp_path):
    path = _write(tmp_path / "a.wav", _tone(300, 1.0))
    with pytest.raises(ValueError, match="worker_stage must be one of audio, mel, model"):
        list(_predictor(ckpt, num_workers=1, worker_stage="gpu").iter_files([path]))
