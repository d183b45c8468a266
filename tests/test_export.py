"""ONNX export (``htsat export``, ``htsat.export.export_onnx``) and the onnxruntime runtime of
``htsat predict`` / ``embed`` / ``Predictor``: the file equals PyTorch, the runtime's results equal the
torch runtime's over a folder of short, odd-length and long files, and a missing extra is one line."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
from cli_helpers import SR, _one_thread, needs_audio, tiny_model_json  # noqa: F401 (_one_thread: autouse fixture)

import htsat
from htsat.cli import main
from htsat.predict import Predictor

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="needs the onnx extra (onnx, onnxruntime, onnxscript)")


def _tone(freq, seconds, amp=0.3, seed=0):
    t = np.arange(int(round(seconds * SR))) / SR
    noise = 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return (amp * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(3)
    model = htsat.create_model(tiny_model_json(folder / "tiny.json", num_classes=3), backend="reference").eval()
    path = folder / "tiny.pt"
    htsat.save_checkpoint(model, path, classes=["a", "b", "c"])
    return {"ckpt": str(path), "model": model, "folder": folder}


@pytest.fixture(scope="module")
def exported(ckpt):
    """The checkpoint's waveform export by the CLI and its mel export from a model on the fused backend
    (two exports, about a minute on one core)."""
    import io
    from contextlib import redirect_stdout

    from htsat.export import export_onnx

    folder = ckpt["folder"]
    out = dict(ckpt, wave=str(folder / "tiny.onnx"), mel=str(folder / "tiny-mel.onnx"))
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["export", out["ckpt"], "-o", out["wave"]]) == 0
    out["cli_stdout"] = buf.getvalue()
    fused = htsat.create_model(tiny_model_json(folder / "tiny.json", num_classes=3), backend="fused").eval()
    fused.load_state_dict(ckpt["model"].state_dict())
    out["mel_report"] = export_onnx(fused, out["mel"], input="mel", labels=["a", "b", "c"])
    return out


@needs_onnx
@pytest.mark.slow
def test_export_cli_checks_and_writes_metadata(exported):
    from htsat.export import read_metadata

    text = exported["cli_stdout"]
    assert f"wrote {exported['wave']}: waveform (batch, " in text
    assert "checked against PyTorch" in text and "within the tolerances" in text
    for name in ("clipwise_output", "framewise_output", "latent_output", "clipwise_logits"):
        assert name in text
    meta = read_metadata(exported["wave"])
    cfg = exported["model"].config
    assert json.loads(meta["labels"]) == ["a", "b", "c"]
    assert int(meta["sample_rate"]) == cfg.sample_rate and meta["input"] == "waveform"
    assert json.loads(meta["config"]) == cfg.to_dict()
    assert meta["version"] and meta["preset"] == cfg.name


@needs_onnx
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wave", "mel"])
def test_exported_file_equals_pytorch_at_any_batch_and_length(exported, kind):
    """Straight through ONNX Runtime (no wrapper): a dynamic batch of 3, three one-image lengths; the
    mel file came from a model on the fused backend (its ops exported as their reference)."""
    import onnxruntime as ort

    model = exported["model"]
    sess = ort.InferenceSession(exported[kind], providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == ["clipwise_output", "framewise_output", "latent_output", "clipwise_logits"]
    if kind == "mel":
        assert exported["mel_report"]["check"]["ok"]
    g = torch.Generator().manual_seed(0)
    hi = model.config.max_frames * model.config.hop_length - 1
    for n in (SR, SR // 3, hi):
        x = 0.1 * torch.randn(3, n, generator=g)
        with torch.no_grad():
            feed = x if kind == "wave" else model.mel_features(x)
            want = model(x) if kind == "wave" else model.forward_mel(feed)
        got = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: feed.numpy()})))
        for k in ("clipwise_output", "framewise_output"):
            np.testing.assert_allclose(got[k], want[k].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(
            got["latent_output"], want["latent_output"].numpy(), atol=1e-5 * float(want["latent_output"].abs().max())
        )


@pytest.fixture(scope="module")
def folder(exported):
    """Short (tiled), exactly one clip, an odd length that still fits one image, and long (windowed) files."""
    import soundfile as sf

    d = exported["folder"] / "audio"
    d.mkdir(exist_ok=True)
    for name, secs, f in (
        ("short", 0.4, 300),
        ("clip", 1.0, 900),
        ("odd", 1.02, 1500),
        ("long", 3.7, 600),
        ("longer", 6.3, 2500),
    ):
        sf.write(str(d / f"{name}.wav"), _tone(f, secs, seed=int(secs * 10)), SR)
    return str(d)


@needs_onnx
@needs_audio
@pytest.mark.slow
@pytest.mark.parametrize("onnx_kind", ["mel", "wave"])
@pytest.mark.parametrize("workers", [0, 1])
def test_runtime_onnxruntime_equals_torch_over_a_folder(exported, folder, onnx_kind, workers):
    """Tags, events, the framewise map and embeddings of every file within 1e-5 of the torch runtime,
    in the main process and in a worker process (sessions opened after the fork)."""
    kw = dict(device="cpu", batch_size=4, num_workers=workers)
    torch_pred = Predictor.from_checkpoint(exported["ckpt"], backend="reference", **kw)
    onnx_pred = Predictor.from_checkpoint(exported["ckpt"], runtime="onnxruntime", onnx=exported[onnx_kind], **kw)
    assert onnx_pred.runtime == "onnxruntime" and type(onnx_pred.model).__name__ == "OnnxModel"
    opts = dict(top_k=3, framewise=True, threshold=0.45, keep_framewise=True)
    want, got = list(torch_pred.iter_files([folder], **opts)), list(onnx_pred.iter_files([folder], **opts))
    assert [r["file"] for r in got] == [r["file"] for r in want] and len(got) == 5
    for a, b in zip(want, got):
        assert "error" not in b, b
        assert b["duration"] == a["duration"] and b["frame_seconds"] == a["frame_seconds"]
        assert [t["index"] for t in b["top"]] == [t["index"] for t in a["top"]]
        np.testing.assert_allclose([t["score"] for t in b["top"]], [t["score"] for t in a["top"]], atol=1e-5)
        np.testing.assert_allclose(b["framewise"], a["framewise"], atol=1e-5)
    embs = [list(p.embed_files([folder])) for p in (torch_pred, onnx_pred)]
    for a, b in zip(*embs):
        np.testing.assert_allclose(b["embedding"], a["embedding"], atol=1e-5 * float(np.abs(a["embedding"]).max()))


@needs_onnx
@pytest.mark.slow
def test_onnx_model_windows_long_audio_like_the_model(exported):
    """OnnxModel.forward on a long tensor: HTSAT's own windowing around the session."""
    from htsat.export import OnnxModel

    model = exported["model"]
    om = OnnxModel(exported["wave"])
    x = 0.1 * torch.randn(2, int(3.3 * SR), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), om(x)
    assert got["framewise_output"].shape == want["framewise_output"].shape
    for k in ("clipwise_output", "framewise_output"):
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)


@needs_onnx
@needs_audio
@pytest.mark.slow
def test_cli_predict_runtime_and_onnx_file(exported, folder, capsys):
    """--runtime onnxruntime --onnx FILE with the checkpoint, and --onnx FILE alone (labels from its metadata)."""
    args = [folder, "--format", "jsonl", "--num-workers", "0", "--top-k", "2"]
    assert main(["predict", *args, "--checkpoint", exported["ckpt"], "--backend", "reference"]) == 0
    want = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert main(["predict", *args, "--checkpoint", exported["ckpt"], "--runtime", "onnxruntime", "--onnx", exported["mel"]]) == 0
    with_ckpt = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert main(["predict", *args, "--onnx", exported["wave"]]) == 0
    alone = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    for got in (with_ckpt, alone):
        assert [r["file"] for r in got] == [r["file"] for r in want]
        for a, b in zip(want, got):
            assert [t["label"] for t in b["top"]] == [t["label"] for t in a["top"]]
            np.testing.assert_allclose([t["score"] for t in b["top"]], [t["score"] for t in a["top"]], atol=1e-5)


@needs_onnx
def test_cached_export_is_reused(exported, tmp_path, monkeypatch):
    """The on-the-fly export lands in $HTSAT_HOME/onnx under a digest of weights and config, once."""
    import shutil

    from htsat import export

    monkeypatch.setenv("HTSAT_HOME", str(tmp_path))
    calls = []

    def fake_export(model, path, **kw):
        calls.append(kw)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copy(exported["mel"], path)

    monkeypatch.setattr(export, "export_onnx", fake_export)
    model = exported["model"]
    p1 = export.cached_export(model)
    p2 = export.cached_export(model)
    assert p1 == p2 and os.path.dirname(p1) == str(tmp_path / "onnx") and len(calls) == 1
    other = htsat.create_model(tiny_model_json(tmp_path / "t.json", num_classes=3), backend="reference")
    assert export.cached_export(other) != p1 and len(calls) == 2  # other weights: another file
    assert export.cached_export(model, quantize="int8") != p1


def test_missing_extra_is_one_line(ckpt, monkeypatch, capsys):
    """Without onnxruntime: Predictor(runtime="onnxruntime") and the CLI name the extra, no traceback."""
    from htsat.export import MissingExtraError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[onnx\]"'):
        Predictor.from_checkpoint(ckpt["ckpt"], device="cpu", runtime="onnxruntime")
    assert main(["predict", "x.wav", "--checkpoint", ckpt["ckpt"], "--runtime", "onnxruntime"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[onnx]"' in err and "Traceback" not in err
    assert main(["export", ckpt["ckpt"], "-o", str(ckpt["folder"] / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[onnx]"' in err


def test_runtime_errors_are_one_line(ckpt, capsys):
    assert main(["predict", "x.wav"]) == 1
    assert "--checkpoint is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="runtime must be one of"):
        Predictor.from_checkpoint(ckpt["ckpt"], device="cpu", runtime="tensorrt")
    with pytest.raises(ValueError, match="need --runtime onnxruntime"):
        Predictor.from_checkpoint(ckpt["ckpt"], device="cpu", quantize="int8")
