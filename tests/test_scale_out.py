"""Beyond one process: ``torchrun -m htsat embed|predict`` (files split between ranks, one output in
input order) and the Ray Data classes ``htsat.ray.Embedder`` / ``htsat.ray.Tagger``, each against a
single-process ``htsat`` run over the same 12 files (one of them unreadable)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import SR, _one_thread, needs_audio, tiny_model_json  # noqa: F401 (_one_thread: autouse fixture)

import htsat
from htsat.cli import main

pytestmark = needs_audio
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny model and 12 files: short and long (windowed) clips, one that is not audio."""
    import soundfile as sf

    folder = tmp_path_factory.mktemp("scale_out")
    model_json = tiny_model_json(folder / "tiny.json", num_classes=4)
    torch.manual_seed(5)
    model = htsat.create_model(model_json, backend="reference").eval()
    ckpt = str(folder / "tiny.pt")
    htsat.save_checkpoint(model, ckpt, classes=["a", "b", "c", "d"])
    audio = folder / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for i in range(11):
        seconds = [0.4, 1.0, 2.3][i % 3]
        t = np.arange(int(seconds * SR)) / SR
        wave = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(str(audio / f"f{i:02d}.wav"), wave.astype(np.float32), SR)
    (audio / "f05b.wav").write_bytes(b"RIFF not really a wav file")
    files = sorted(str(p) for p in audio.iterdir())
    assert len(files) == 12
    return {"ckpt": ckpt, "audio": str(audio), "files": files, "folder": folder}


def _single(corpus, command, out, *extra):
    rc = main([command, corpus["audio"], "--checkpoint", corpus["ckpt"], "--backend", "reference", "--device", "cpu",
               "--num-workers", "0", "-o", str(out), *extra])  # fmt: skip
    assert rc == 1  # the bad file fails
    return out


def _torchrun(corpus, command, out, *extra, env_extra=None, nproc=2):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "htsat",
           command, corpus["audio"], "--checkpoint", corpus["ckpt"], "--backend", "reference", "--device", "cpu",
           "-o", str(out), *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def single_embed(corpus):
    out = _single(corpus, "embed", corpus["folder"] / "single.jsonl")
    return [json.loads(line) for line in out.read_text().splitlines()]


def _same_rows(got, want):
    assert [r["file"] for r in got] == [r["file"] for r in want]
    for g, w in zip(got, want):
        assert ("error" in g) == ("error" in w), g["file"]
        if "error" in w:
            assert g["error"] == w["error"]
            continue
        assert g["duration"] == w["duration"]
        if "embedding" in w:
            np.testing.assert_allclose(np.asarray(g["embedding"]), np.asarray(w["embedding"]), atol=1e-5, rtol=0)
        else:
            assert [t["label"] for t in g["top"]] == [t["label"] for t in w["top"]]
            np.testing.assert_allclose([t["score"] for t in g["top"]], [t["score"] for t in w["top"]], atol=1e-5)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(corpus, single_embed, tmp_path):
    proc = _torchrun(corpus, "embed", tmp_path / "two.npz")
    assert proc.returncode != 0  # the bad file fails the run, as in one process
    assert "1 of 12 file(s) failed" in proc.stderr, proc.stderr[-3000:]
    with np.load(tmp_path / "two.npz") as z:
        files, mat = [str(f) for f in z["files"]], z["embeddings"]
    good = [r for r in single_embed if "error" not in r]
    assert files == [r["file"] for r in good]
    np.testing.assert_allclose(mat, np.stack([r["embedding"] for r in good]), atol=1e-5, rtol=0)
    assert not os.path.exists(tmp_path / ".htsat-parts-two.npz")  # merged, then removed
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


@pytest.mark.slow
def test_torchrun_predict_jsonl_keeps_the_error_row(corpus, tmp_path):
    single = _single(corpus, "predict", tmp_path / "one.jsonl", "--top-k", "3")
    proc = _torchrun(corpus, "predict", tmp_path / "two.jsonl", "--top-k", "3", "--progress")
    assert proc.returncode != 0
    # one bar, rank 0's, counting the files of both ranks to the end
    bars = [line for line in re.split(r"[\r\n]", proc.stderr) if "%|" in line]
    assert bars and all(line.startswith("all ranks") for line in bars), proc.stderr[-3000:]
    assert "all ranks: 100%" in proc.stderr and "12/12" in proc.stderr
    got = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in single.read_text().splitlines()]
    _same_rows(got, want)
    assert [r["file"] for r in got if "error" in r] == [os.path.join(corpus["audio"], "f05b.wav")]


@pytest.mark.slow
def test_torchrun_dead_rank_fails_and_resume_redoes_only_the_missing(corpus, single_embed, tmp_path):
    out = tmp_path / "emb.jsonl"
    # rank 1 killed (os._exit(137)) as it writes its 3rd result: it has 2 in its part file
    proc = _torchrun(corpus, "embed", out, env_extra={"HTSAT_INFER_FAULT": "part:1#3"})
    assert proc.returncode != 0
    assert not out.exists()  # nothing half-merged
    assert "add --resume" in proc.stderr, proc.stderr[-3000:]
    parts = tmp_path / ".htsat-parts-emb.jsonl"
    kept = sum(len(p.read_text().splitlines()) for p in parts.iterdir())
    assert kept >= 2
    proc = _torchrun(corpus, "embed", out, "--resume")
    assert "1 of 12 file(s) failed" in proc.stderr, proc.stderr[-3000:]
    # the kept results are not computed again (the bad file's error is)
    done_line = [ln for ln in proc.stderr.splitlines() if "resuming:" in ln]
    assert done_line and int(done_line[0].split("resuming: ")[1].split()[0]) >= 2
    got = [json.loads(line) for line in out.read_text().splitlines()]
    _same_rows(got, single_embed)
    assert not parts.exists()


def test_torchrun_needs_an_output_file(corpus, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["embed", corpus["audio"], "--checkpoint", corpus["ckpt"], "--device", "cpu"])
    assert rc == 1
    assert "under torchrun, -o FILE is needed" in capsys.readouterr().err


def test_resume_in_one_process_keeps_a_stopped_launchs_parts(corpus, single_embed, tmp_path, capsys):
    from htsat.sharding import parts_folder

    out = tmp_path / "e.jsonl"
    folder = parts_folder(str(out))
    os.makedirs(folder)
    kept = [r for r in single_embed if "error" not in r][:3]
    marked = [dict(r, embedding=[7.0] * len(r["embedding"])) for r in kept]  # not what the model gives
    with open(os.path.join(folder, "abcd-rank00001.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in marked) + '{"file": "half a li')
    rc = main(["embed", corpus["audio"], "--checkpoint", corpus["ckpt"], "--backend", "reference", "--device", "cpu",
               "--num-workers", "0", "-o", str(out), "--resume"])  # fmt: skip
    assert rc == 1
    assert "resuming: 3 of 12 file(s) already done" in capsys.readouterr().err
    got = {r["file"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert all(got[r["file"]]["embedding"] == r["embedding"] for r in marked)  # kept, not recomputed
    assert not os.path.exists(folder)


# ------------------------------------------------------------------------------------------------
# Ray Data: the callables alone (no Ray needed), then in a local Ray
# ------------------------------------------------------------------------------------------------


def test_embedder_on_decoded_columns_equals_the_files(corpus, single_embed, tmp_path):
    """``amplitude`` (channels x samples, any rate) gives what the same audio read from a file gives:
    the same mix-down and block-wise resampling; a NaN sample is that row's error, the batch goes on."""
    import soundfile as sf

    from htsat.ray import Embedder

    emb = Embedder(corpus["ckpt"], device="cpu", backend="reference")
    good = [r for r in single_embed if "error" not in r][:3]
    amps, rates, paths = [], [], []
    for r in good:
        wave, rate = sf.read(r["file"], dtype="float32", always_2d=True)
        amps.append(wave.T)
        rates.append(rate)
        paths.append(r["file"])
    stereo_44k = np.stack([np.sin(np.arange(44100) / 7.0), np.cos(np.arange(44100) / 5.0)]).astype(np.float32) * 0.2
    nan = np.full((1, 800), np.nan, np.float32)
    for name, wave, rate in (("nan.wav", nan, SR), ("stereo44k.wav", stereo_44k, 44100)):
        paths.append(str(tmp_path / name))
        sf.write(paths[-1], wave.T, rate, subtype="FLOAT")
        amps.append(wave)
        rates.append(rate)
    column = np.empty(len(amps), dtype=object)
    column[:] = amps
    out = emb({"amplitude": column, "sample_rate": np.array(rates), "id": np.arange(5)})
    assert sorted(out) == ["embedding", "error", "id", "sample_rate"]
    by_path = emb({"path": np.array(paths)})
    assert sorted(by_path) == ["embedding", "error", "file"] and list(by_path["file"]) == paths
    np.testing.assert_array_equal(out["embedding"], by_path["embedding"])  # same windows, same batches
    assert list(out["error"]) == list(by_path["error"])
    assert list(out["error"][:3]) == [None] * 3 and "NaN" in out["error"][3] and out["error"][4] is None
    assert np.isnan(out["embedding"][3]).all() and out["embedding"].shape == (5, len(good[0]["embedding"]))
    # and the files' rows equal htsat embed's (other batches: float32 rounding only)
    np.testing.assert_allclose(out["embedding"][:3], np.stack([r["embedding"] for r in good]), atol=1e-5, rtol=0)


def test_tagger_needs_path_or_amplitude_columns(corpus):
    from htsat.ray import Tagger

    tagger = Tagger(corpus["ckpt"], device="cpu", backend="reference", top_k=2)
    with pytest.raises(ValueError, match="expected a 'path' column"):
        tagger({"audio": np.array(["x.wav"])})
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        Tagger(corpus["ckpt"], device="cpu", top_k=0)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _readme_ray_example() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("```python\nimport os\nimport ray\n") + len("```python\n")
    return text[start : text.index("```", start)]


@needs_ray
@pytest.mark.slow
def test_ray_readme_example_equals_htsat_embed_and_predict(corpus, single_embed, local_ray, tmp_path, monkeypatch):
    """The README's Ray example, as written but for its checkpoint, folder and the ray.init() the
    fixture did (2 CPUs): Embedder rows equal ``htsat embed`` (the bad file an error row), Tagger rows
    on read_audio's columns equal ``htsat predict``."""
    code = _readme_ray_example()
    assert "ray.init()" in code and '"htsat-audioset"' in code
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    for f in corpus["files"]:
        if "f05b" not in f:  # ray's own read_audio stops on a file soundfile cannot open: good files only there
            os.symlink(f, good_dir / os.path.basename(f))
    code = code.replace("ray.init()", "pass").replace('"htsat-audioset"', repr(corpus["ckpt"]))
    code = code.replace(
        'fn_constructor_kwargs={"checkpoint"', 'fn_constructor_kwargs={"backend": "reference", "device": "cpu", "checkpoint"'
    )
    code = code.replace('expand_inputs(["archive/"])', f"expand_inputs([{corpus['audio']!r}])")
    code = code.replace('read_audio("archive/"', f"read_audio({str(good_dir)!r}")
    code = code.replace("tags.take(3)", "tags.take_all()")
    # two actors on two CPUs leave none for read_audio's read tasks (a hang): one Tagger actor here
    code = code.replace('"top_k": 3}, compute=actors', '"top_k": 3}, compute=ray.data.ActorPoolStrategy(size=1)')
    assert code.count("size=1)") == 1
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(code, "README.md", "exec"), {"print": lambda *a: printed.append(a)})
    rows = sorted(local_ray.data.read_parquet(str(tmp_path / "embeddings")).take_all(), key=lambda r: r["file"])
    _same_rows(
        [{k: v for k, v in r.items() if v is not None} | {"duration": w.get("duration")} for r, w in zip(rows, single_embed)],
        single_embed,
    )
    assert [r["file"] for r in rows if r["error"]] == [os.path.join(corpus["audio"], "f05b.wav")]
    # Tagger on read_audio columns against htsat predict (top 3)
    out = tmp_path / "pred.jsonl"
    _single(corpus, "predict", out, "--top-k", "3")
    want = {r["file"]: r for r in map(json.loads, out.read_text().splitlines()) if "error" not in r}
    assert len(printed) == len(want)
    for file, labels, scores, error in printed:
        w = want[os.path.join(corpus["audio"], os.path.basename(file))]
        assert error is None and list(labels) == [t["label"] for t in w["top"]]
        np.testing.assert_allclose(scores, [t["score"] for t in w["top"]], atol=1e-5)
