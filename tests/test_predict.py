"""Inference (htsat.predict, ``htsat predict``): top-k labels, events on the real time axis for
audio of any length (a 30 s file), bad files reported without stopping the others."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import FREQS, HAVE_AUDIO, SR, _one_thread, needs_audio, tiny_model_json  # noqa: F401 (_one_thread: autouse fixture)

import htsat
from htsat.cli import main
from htsat.predict import Predictor, detect_events, format_results, labels_for


def _tone(freq, seconds, amp=0.3, rng=None, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    phase = 0.0 if rng is None else rng.uniform(0, 2 * np.pi)
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on one tone per class (a few seconds on CPU)."""
    if not HAVE_AUDIO:
        pytest.skip("needs soundfile and soxr")
    import soundfile as sf

    from htsat.training import TrainConfig, train

    folder = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(1)
    rows = []
    for name, freq in FREQS.items():
        for k in range(12):
            x = _tone(freq * (1 + rng.uniform(-0.03, 0.03)), rng.uniform(0.5, 1.5), rng.uniform(0.1, 0.5), rng)
            x += 0.005 * rng.standard_normal(len(x)).astype(np.float32)
            path = folder / f"{name}_{k}.wav"
            sf.write(str(path), x, SR)
            rows.append(f"{path},{name}")
    manifest = folder / "train.csv"
    manifest.write_text("path,labels\n" + "\n".join(rows) + "\n")
    model_json = tiny_model_json(folder / "tiny.json")
    cfg = TrainConfig(
        manifest=str(manifest),
        out=str(folder / "run"),
        model=model_json,
        epochs=6,
        batch_size=8,
        lr_schedule="constant",
        num_workers=0,
        backend="reference",
        progress=False,
        cache_audio=True,
        log=lambda m: None,
    )
    train(cfg)
    return {"checkpoint": str(folder / "run" / "last.pt"), "model": model_json, "folder": folder}


def test_detect_events_merges_consecutive_frames():
    fw = np.zeros((40, 3), np.float32)
    fw[10:20, 0] = 0.9
    fw[15, 0] = 0.95
    fw[22:30, 0] = 0.7
    fw[5:8, 2] = 0.6
    fw[38:, 1] = 0.8
    labels = ["a", "b", "c"]
    ev = detect_events(fw, 0.1, labels)
    assert [(e["label"], e["onset"], e["offset"]) for e in ev] == [
        ("c", 0.5, 0.8),
        ("a", 1.0, 2.0),
        ("a", 2.2, 3.0),
        ("b", 3.8, 4.0),
    ]
    assert ev[1]["score"] == pytest.approx(0.95) and ev[2]["score"] == pytest.approx(0.7) and ev[1]["index"] == 0
    merged = detect_events(fw, 0.1, labels, merge_gap=0.2)
    assert [(e["label"], e["onset"], e["offset"]) for e in merged if e["label"] == "a"] == [("a", 1.0, 3.0)]
    assert [e["label"] for e in detect_events(fw, 0.1, labels, threshold=0.8)] == ["a", "b"]
    assert [e["label"] for e in detect_events(fw, 0.1, labels, min_duration=0.5)] == ["a", "a"]
    clipped = detect_events(fw, 0.1, labels, duration=3.9)
    assert clipped[-1]["label"] == "b" and clipped[-1]["offset"] == pytest.approx(3.9)
    assert detect_events(fw, 0.1, labels, duration=3.8)[-1]["label"] == "a"  # starts at the end: dropped
    assert detect_events(np.zeros((5, 2)), 0.1, ["x", "y"]) == []


def test_labels_for():
    assert labels_for(527) == htsat.audioset_labels() and labels_for(527)[0] == "Speech"
    assert labels_for(3) == ["class_0", "class_1", "class_2"]
    assert labels_for(2, {"classes": ["x", "y"]}) == ["x", "y"]
    assert labels_for(3, {"classes": ["x", "y"]}) == ["class_0", "class_1", "class_2"]


@needs_audio
def test_predict_30s_file_framewise_json(trained, tmp_path, capsys):
    import soundfile as sf

    t = np.arange(30 * SR) / SR
    x = 0.003 * np.random.default_rng(0).standard_normal(len(t)).astype(np.float32)
    segments = {"mid": (5.0, 12.0), "top": (20.0, 25.0)}
    for name, (a, b) in segments.items():
        m = (t >= a) & (t < b)
        x[m] += 0.3 * np.sin(2 * np.pi * FREQS[name] * t[m])
    path = str(tmp_path / "long.wav")
    sf.write(path, x.astype(np.float32), SR)
    rc = main(
        [
            "predict",
            path,
            "--checkpoint",
            trained["checkpoint"],
            "--framewise",
            "--json",
            "--top-k",
            "3",
            "--backend",
            "reference",
        ]
    )
    assert rc == 0
    (res,) = json.loads(capsys.readouterr().out)
    assert res["file"] == path and res["duration"] == pytest.approx(30.0)
    assert len(res["top"]) == 3 and {r["label"] for r in res["top"]} <= set(FREQS)
    scores = [r["score"] for r in res["top"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert res["frame_seconds"] == pytest.approx(1.0 / 128)  # clip_seconds / max_frames for long audio
    events = res["events"]
    assert events and all(0 <= e["onset"] < e["offset"] <= 30.0 + 1e-6 for e in events)
    assert all(e["score"] >= 0.5 for e in events)
    for name, (a, b) in segments.items():
        hits = [e for e in events if e["label"] == name and e["onset"] < b and e["offset"] > a]
        assert hits, f"no {name} event overlapping {a}-{b} s: {events}"
        # the event is placed on the real time axis: it covers most of the tone, not the whole file
        covered = sum(min(e["offset"], b) - max(e["onset"], a) for e in hits)
        assert covered >= 0.6 * (b - a)
        assert all(e["onset"] >= a - 1.0 and e["offset"] <= b + 1.0 for e in hits)


@needs_audio
def test_predict_short_files_table_and_bad_files(trained, tmp_path, capsys):
    import soundfile as sf

    paths = []
    for name, freq in FREQS.items():
        p = str(tmp_path / f"{name}.flac")
        sr = 44100 if name == "low" else SR  # one needs resampling
        stereo = np.stack([_tone(freq, 0.7, 0.3, sr=sr), _tone(freq, 0.7, 0.2, sr=sr)], axis=1)
        sf.write(p, stereo, sr)
        paths.append(p)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.ogg").write_bytes(b"OggS not really")
    sf.write(str(tmp_path / "silent.wav"), np.zeros(SR, np.float32), SR)
    bad = [str(tmp_path / n) for n in ("empty.wav", "junk.ogg", "silent.wav", "missing.wav")]
    rc = main(
        ["predict", *paths[:2], *bad, *paths[2:], "--checkpoint", trained["checkpoint"], "--backend", "reference", "--top-k", "2"]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    for p in bad:
        assert p in err and f"{p}: ERROR" in out
    assert "4 of 8 file(s) failed" in err
    assert "silent-only" in out and "file not found" in out and "empty" in out
    # every tone gets its own class at rank 1 (files are 0.7 s: tiled to the 1 s clip as in training)
    blocks = out.split("\n\n")
    for name, p in zip(FREQS, paths):
        block = next(b for b in blocks if b.startswith(p))
        first = block.splitlines()[2].split()
        assert first[0] == "1" and first[2] == name, block
    # the library API agrees and --json lists the errors in place
    pred = Predictor.from_checkpoint(trained["checkpoint"], backend="reference", device="cpu")
    assert pred.labels == sorted(FREQS)
    res = pred.predict_files([paths[1], bad[0]], top_k=1)
    assert res[0]["top"][0]["label"] == "mid" and "error" in res[1]
    assert "mid" in format_results(res)
    stretched = Predictor.from_checkpoint(trained["checkpoint"], backend="reference", device="cpu", short_clips="stretch")
    assert stretched.predict_file(paths[1], top_k=1)["duration"] == pytest.approx(0.7)
    rc = main(
        [
            "predict",
            str(tmp_path / "silent.wav"),
            "--allow-silent",
            "--checkpoint",
            trained["checkpoint"],
            "--json",
            "--framewise",
            "--backend",
            "reference",
        ]
    )
    assert rc == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert all(e["offset"] <= 1.0 + 1e-6 for e in r["events"])


@needs_audio
def test_predict_original_checkpoint_with_model_and_labels(trained, tmp_path, capsys):
    import soundfile as sf

    model = htsat.create_model(trained["model"], num_classes=3, backend="reference")
    ckpt = tmp_path / "orig.ckpt"
    torch.save({"state_dict": {"sed_model." + k: v for k, v in model.state_dict().items()}}, ckpt)
    wav = str(tmp_path / "a.wav")
    sf.write(wav, _tone(600, 2.5), SR)  # longer than one 1 s image: sliding windows
    rc = main(
        [
            "predict",
            wav,
            "--checkpoint",
            str(ckpt),
            "--model",
            trained["model"],
            "--json",
            "--top-k",
            "5",
            "--backend",
            "reference",
        ]
    )
    assert rc == 0
    (res,) = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in res["top"]] and {r["label"] for r in res["top"]} == {"class_0", "class_1", "class_2"}
    assert sum(r["score"] for r in res["top"]) == pytest.approx(1.0, abs=1e-4)  # clip_ce model: softmax scores
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    rc = main(
        [
            "predict",
            wav,
            "--checkpoint",
            str(ckpt),
            "--model",
            trained["model"],
            "--labels",
            str(names),
            "--top-k",
            "1",
            "--backend",
            "reference",
        ]
    )
    assert rc == 0 and capsys.readouterr().out.splitlines()[2].split()[2] in {"cat", "dog", "bird"}
    names.write_text("cat\n")
    rc = main(["predict", wav, "--checkpoint", str(ckpt), "--model", trained["model"], "--labels", str(names)])
    assert rc == 1 and "1 class names for a model with 3 classes" in capsys.readouterr().err
    rc = main(["predict", wav, "--checkpoint", str(tmp_path / "nope.ckpt")])
    assert rc == 1 and "nope.ckpt" in capsys.readouterr().err
