"""Bad input gives one clear error, never a traceback, a NaN score or a silently wrong run (issue 13,
items 8 and 11-14): enormous sample values, the 10.24 s boundary, broken checkpoints, manifests
and class lists, labels that cannot be right, and pickles that weights-only loading refuses."""

import json
import os
import re
import tempfile
import wave

import numpy as np
import pytest
import torch
from cli_helpers import SR, _one_thread, needs_audio, tiny_model_json  # noqa: F401 (_one_thread: autouse fixture)

import htsat
from htsat.audio import MAX_PEAK, AudioError, check_audio
from htsat.checkpoint import CheckpointError
from htsat.cli import main
from htsat.data import (
    AudioDataset,
    Item,
    ManifestError,
    check_labels,
    classes_from_items,
    read_class_list,
    read_manifest,
    write_class_list,
)
from htsat.predict import NonFiniteOutputError, Predictor

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _write_wav(path, samples, sr=SR):
    """16-bit PCM with the standard library (no soundfile needed to make a file that is not a checkpoint)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return str(path)


def _one_error_line(capsys, rc, *needles):
    """The CLI failed with exactly one `htsat: error:` line on stderr that contains every needle."""
    out, err = capsys.readouterr()
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("htsat: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_input")
    model_json = tiny_model_json(folder / "tiny.json", num_classes=3)
    model = htsat.create_model(model_json, backend="reference").eval()
    path = folder / "good.pt"
    htsat.save_checkpoint(model, path, classes=["a", "b", "c"])
    return {"path": str(path), "model": model, "folder": folder}


# --------------------------------------------------------------------------------------------
# item 8: finite audio of enormous amplitude
# --------------------------------------------------------------------------------------------


def test_huge_amplitude_gives_nan_like_the_original():
    """The model stays the original's: fine at 1e15, and NaN (not some other number) at 1e18,
    where the float32 power spectrum overflows in both. Documented in htsat/model.py."""
    from original_htsat import build_original

    cfg = htsat.load_config("htsat-audioset", **dict(htsat.TINY_OVERRIDES, num_classes=5))
    orig = build_original(cfg).eval()
    ours = htsat.HTSAT(cfg, backend="reference").eval()
    htsat.load_checkpoint(ours, orig.state_dict())
    t = torch.arange(2 * cfg.sample_rate) / cfg.sample_rate
    tone = torch.sin(2 * torch.pi * 440 * t)[None]
    with torch.no_grad():
        for amp, finite in ((1e15, True), (1e18, False)):
            want = orig({"waveform": tone * amp})["clipwise_output"]
            got = ours(tone * amp)["clipwise_output"]
            assert bool(torch.isfinite(want).all()) == finite == bool(torch.isfinite(got).all())
            if finite:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_predictor_never_returns_a_nan_score(tiny_ckpt):
    pred = Predictor.from_checkpoint(tiny_ckpt["path"], backend="reference", device="cpu")
    x = (np.sin(np.arange(SR) * 0.05) * 1e18).astype(np.float32)
    with pytest.raises(NonFiniteOutputError, match=r"NaN or infinite.*peak 1e\+18.*float32 power spectrum"):
        pred.predict_waveform(x, framewise=True)
    assert np.isfinite(pred.predict_waveform(x / 1e18)["top"][0]["score"])


@needs_audio
def test_predict_cli_huge_amplitude_is_an_error_and_json_stays_valid(tiny_ckpt, tmp_path, capsys):
    import soundfile as sf

    tone = np.sin(2 * np.pi * 440 * np.arange(SR) / SR).astype(np.float32)
    huge, fine = str(tmp_path / "huge.wav"), str(tmp_path / "fine.wav")
    sf.write(huge, tone * 1e18, SR, subtype="FLOAT")
    sf.write(fine, tone * 0.3, SR)
    rc = main(["predict", huge, fine, "--checkpoint", tiny_ckpt["path"], "--json", "--framewise", "--backend", "reference"])
    out, err = capsys.readouterr()
    assert rc == 1
    results = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))  # strict JSON: no NaN
    assert results[0]["file"] == huge and "samples reach 1e+18, far beyond full scale" in results[0]["error"]
    assert "top" not in results[0]
    assert results[1]["file"] == fine and all(np.isfinite(t["score"]) for t in results[1]["top"])
    assert f"htsat: error: {huge}: " in err and "1 of 2 file(s) failed" in err


@needs_audio
def test_predict_cli_non_finite_model_output_is_an_error(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """The last line of defence: whatever makes the model return NaN (here a patched forward), the
    file gets an error, the others their scores, and --json stays valid JSON."""
    import soundfile as sf

    forward = htsat.HTSAT.forward

    def nan_when_loud(self, waveform, *args, **kwargs):
        out = forward(self, waveform, *args, **kwargs)
        if float(waveform.abs().max()) > 0.5:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    forward_mel = htsat.HTSAT.forward_mel

    def nan_when_loud_mel(self, mel, *args, **kwargs):  # the path of CPU workers computing the log-mel
        out = forward_mel(self, mel, *args, **kwargs)
        if float(mel.amax()) > 12.0:  # dB: the 0.9 tone peaks near 21.6, the 0.1 tone near 2.5
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(htsat.HTSAT, "forward", nan_when_loud)
    monkeypatch.setattr(htsat.HTSAT, "forward_mel", nan_when_loud_mel)
    tone = np.sin(2 * np.pi * 440 * np.arange(SR) / SR).astype(np.float32)
    loud, quiet = str(tmp_path / "loud.wav"), str(tmp_path / "quiet.wav")
    sf.write(loud, tone * 0.9, SR)
    sf.write(quiet, tone * 0.1, SR)
    rc = main(["predict", loud, quiet, "--checkpoint", tiny_ckpt["path"], "--json", "--framewise", "--backend", "reference"])
    out, err = capsys.readouterr()
    assert rc == 1
    results = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    assert "NaN or infinite" in results[0]["error"] and "top" not in results[0] and "events" not in results[0]
    assert all(np.isfinite(t["score"]) for t in results[1]["top"])
    assert f"htsat: error: {loud}: the model output" in err


def test_check_audio_rejects_samples_far_beyond_full_scale():
    check_audio(np.full(10, MAX_PEAK, np.float32), "loud.wav")
    with pytest.raises(AudioError, match=r"loud.wav: samples reach 1e\+18, far beyond full scale"):
        check_audio(np.array([0.0, -1e18], np.float32), "loud.wav")
    check_audio(np.array([0.0, -1e18], np.float32), "loud.wav", max_peak=None)


@needs_audio
def test_training_data_treats_a_huge_file_as_bad(tmp_path):
    import soundfile as sf

    tone = np.sin(np.arange(SR) * 0.1).astype(np.float32)
    sf.write(str(tmp_path / "huge.wav"), tone * 1e18, SR, subtype="FLOAT")
    sf.write(str(tmp_path / "ok.wav"), tone * 0.3, SR)
    items = [Item(str(tmp_path / "huge.wav"), ("a",)), Item(str(tmp_path / "ok.wav"), ("b",))]
    ds = AudioDataset(items, ["a", "b"], SR, SR, train=True)
    sample = ds[0]
    assert sample["source_index"] == 1 and "far beyond full scale" in sample["bad"][0]
    assert bool(torch.isfinite(sample["waveform"]).all())


# --------------------------------------------------------------------------------------------
# item 11: the one-image / long-audio boundary
# --------------------------------------------------------------------------------------------


def test_readme_states_the_boundary_the_model_uses():
    model = htsat.HTSAT(htsat.load_config("htsat-audioset"))
    cfg = model.config
    first_long = cfg.max_frames * cfg.hop_length  # fewest samples that give max_frames + 1 frames
    assert first_long == 327680 == round(10.24 * cfg.sample_rate)
    assert model.num_frames(first_long - 1) == cfg.max_frames and model.num_frames(first_long) == cfg.max_frames + 1
    with open(README, encoding="utf-8") as f:
        text = " ".join(f.read().split())
    bullet = text[text.index("**Any length**") :][:600]
    stated = re.search(r"up to ([\d,]+) samples", bullet)
    assert stated and int(stated.group(1).replace(",", "")) == first_long - 1, bullet
    assert "shorter than 10.24 s" in bullet and "From exactly 10.24 s on" in bullet


def test_boundary_sample_counts_follow_the_original_then_sliding_windows():
    """n - 1 samples (max_frames frames) is one image, equal to the original; n and n + 1 (one
    frame more: the original's own long-audio branch) run as sliding windows on the real time axis."""
    from original_htsat import build_original

    cfg = htsat.load_config("htsat-audioset", **dict(htsat.TINY_OVERRIDES, num_classes=4))
    orig = build_original(cfg).eval()
    ours = htsat.HTSAT(cfg, backend="reference").eval()
    htsat.load_checkpoint(ours, orig.state_dict())
    n = cfg.max_frames * cfg.hop_length
    g = torch.Generator().manual_seed(3)
    x = 0.1 * torch.randn(1, n + 1, generator=g)
    with torch.no_grad():
        for count in (n - 1, n, n + 1):
            frames = orig.spectrogram_extractor(x[:, :count]).shape[2]  # the original's frame count
            assert frames == ours.num_frames(count) == cfg.max_frames + (count >= n)
            got = ours(x[:, :count])
            if count < n:
                want = orig({"waveform": x[:, :count]})
                assert got["framewise_output"].shape[1] == cfg.max_frames
                assert ours.frame_seconds(count) == pytest.approx(count / cfg.sample_rate / cfg.max_frames)
                torch.testing.assert_close(got["clipwise_output"], want["clipwise_output"], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(got["framewise_output"], want["framewise_output"], rtol=1e-4, atol=1e-5)
            else:
                frame_s = cfg.clip_seconds / cfg.max_frames
                assert ours.frame_seconds(count) == pytest.approx(frame_s)
                assert got["framewise_output"].shape[1] == int(np.ceil(count / cfg.sample_rate / frame_s - 1e-9))
                assert len(ours.window_starts(count)) == 2


# --------------------------------------------------------------------------------------------
# items 12 and 14: checkpoints the CLI cannot use
# --------------------------------------------------------------------------------------------


def _variant(tiny_ckpt, name, change):
    obj = torch.load(tiny_ckpt["path"], weights_only=True)
    obj = change(obj)
    path = tiny_ckpt["folder"] / name
    torch.save(obj, path)
    return str(path)


def _set_config(key, value):
    def change(obj):
        obj["config"][key] = value
        return obj

    return change


def _without(key):
    def change(obj):
        del obj[key]
        return obj

    return change


BAD_CHECKPOINTS = {
    "tensor": (lambda obj: torch.zeros(3), "holds a Tensor of shape (3,)"),
    "list": (lambda obj: [1, 2], "holds a list"),
    "no-config": (_without("config"), "without a 'config' entry"),
    "no-state-dict": (_without("state_dict"), "without a 'state_dict'"),
    "bad-config-type": (_set_config("embed_dim", "x"), "embed_dim = 'x' (str), expected an integer"),
    "bad-config-tuple": (_set_config("depths", "abc"), "depths = 'abc' (str), expected a list of integers"),
    "bad-config-value": (_set_config("loss_type", "hinge"), "loss_type must be 'clip_bce' or 'clip_ce'"),
    "unknown-config-field": (_set_config("colour", 3), "unknown HTS-AT config fields ['colour']"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_predict_cli_bad_checkpoint_is_one_line_naming_the_file(tiny_ckpt, tmp_path, capsys, case):
    change, problem = BAD_CHECKPOINTS[case]
    path = _variant(tiny_ckpt, f"{case}.pt", change)
    wav = _write_wav(tmp_path / "a.wav", 0.1 * np.ones(SR))
    rc = main(["predict", wav, "--checkpoint", path, "--backend", "reference"])
    _one_error_line(capsys, rc, path, problem)
    with pytest.raises(CheckpointError, match=re.escape(path)):
        htsat.model_from_checkpoint(path)


def test_checkpoint_that_is_another_kind_of_file(tiny_ckpt, tmp_path, capsys):
    wav = _write_wav(tmp_path / "a.wav", 0.1 * np.ones(SR))
    rc = main(["predict", wav, "--checkpoint", wav])
    line = _one_error_line(capsys, rc, wav, "not a PyTorch checkpoint file", "WAV audio")
    assert "pop from empty list" not in line
    truncated = tmp_path / "truncated.pt"
    with open(tiny_ckpt["path"], "rb") as f:
        truncated.write_bytes(f.read()[:5000])
    rc = main(["predict", wav, "--checkpoint", str(truncated)])
    _one_error_line(capsys, rc, str(truncated), "damaged or truncated")
    rc = main(["predict", wav, "--checkpoint", str(tmp_path)])
    _one_error_line(capsys, rc, str(tmp_path), "is a directory")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_only_refusal_does_not_suggest_unpickling(tiny_ckpt, tmp_path, capsys):
    path = _variant(tiny_ckpt, "pickled.pt", lambda obj: {**obj, "extra": _Payload()})
    with pytest.raises(CheckpointError) as info:
        htsat.model_from_checkpoint(path)
    msg = str(info.value)
    assert path in msg and "refused: it holds a pickled Python object (print)" in msg
    low = msg.lower()
    assert "weights_only=false" not in low and "set to `false`" not in low and "add_safe_globals" not in low
    rc = main(["predict", _write_wav(tmp_path / "a.wav", 0.1 * np.ones(SR)), "--checkpoint", path])
    line = _one_error_line(capsys, rc, path, "refused")
    assert "False" not in line and "this must never run" not in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# items 12 and 13: manifests and class lists
# --------------------------------------------------------------------------------------------


def _train_cli(tmp_path, manifest, *extra):
    out = tempfile.mkdtemp(prefix="run", dir=tmp_path)  # a fresh output folder for every run
    return main(
        [
            "train",
            "--manifest",
            str(manifest),
            "--out",
            out,
            "--model",
            tiny_model_json(tmp_path / "tiny.json"),
            "--epochs",
            "1",
            "--num-workers",
            "0",
            *extra,
        ]
    )


def test_manifest_field_over_the_csv_limit(tmp_path, capsys):
    m = tmp_path / "big.csv"
    m.write_text("path,labels\na.wav,dog\nb.wav," + "x" * 140_000 + "\n")
    with pytest.raises(ManifestError, match=r"big.csv:3: a field is longer than \d+ characters"):
        read_manifest(m)
    _one_error_line(capsys, _train_cli(tmp_path, m), str(m), ":3:", "longer than")


def test_manifest_not_utf8(tmp_path, capsys):
    m = tmp_path / "latin1.csv"
    m.write_bytes("path,labels\na.wav,dog\nb.wav,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin1.csv:3: manifest is not UTF-8 text \(byte 0xe9"):
        read_manifest(m)
    _one_error_line(capsys, _train_cli(tmp_path, m), str(m), "not UTF-8")
    # a UTF-8 BOM is fine, and the line count stays right after it
    m.write_bytes(b"\xef\xbb\xbfpath,labels\na.wav,dog\n")
    assert read_manifest(m)[0].labels == ("dog",)
    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"dog\nca\xe9\n")
    with pytest.raises(ManifestError, match=r"classes.txt:2: class list is not UTF-8"):
        read_class_list(classes)


def test_unbalanced_quote_is_named_not_no_labels_found(tmp_path, capsys):
    m = tmp_path / "quote.csv"
    m.write_text('path,labels\n"a.wav,dog\nb.wav,cat\n')  # this used to read as one path and no labels
    with pytest.raises(ManifestError, match=r"quote.csv:2: .*never closed \(unbalanced quote\)"):
        read_manifest(m)
    line = _one_error_line(capsys, _train_cli(tmp_path, m), str(m), "unbalanced quote")
    assert "no labels found" not in line
    m.write_text('path,labels\na.wav,"dog\nb.wav,cat\nc.wav,"bird"\n')  # closed two lines later
    with pytest.raises(ManifestError, match=r"quote.csv:2: "):
        read_manifest(m)


def test_control_characters_in_labels_and_class_names(tmp_path, capsys):
    m = tmp_path / "nul.csv"
    m.write_text("path,labels\na.wav,dog\nb.wav,c\x00t\n")
    with pytest.raises(ManifestError, match=r"nul.csv:3: label 'c\\x00t' contains the control character '\\x00'"):
        read_manifest(m)
    _one_error_line(capsys, _train_cli(tmp_path, m), str(m), "control character")
    m.write_text("path,labels\na\x00.wav,dog\n")
    with pytest.raises(ManifestError, match="path .* control character"):
        read_manifest(m)
    for name, body in (("c.txt", "dog\nc\x00t\n"), ("c.json", json.dumps(["dog", "c\x00t"])), ("c.csv", "label\ndog\nc\x00t\n")):
        (tmp_path / name).write_text(body)
        with pytest.raises(ManifestError, match="class name .* control character"):
            read_class_list(tmp_path / name)


def test_validation_label_absent_from_training_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text("path,labels\na.wav,dog\nb.wav,cat\n")
    (tmp_path / "val.csv").write_text("path,labels\nc.wav,dog\nd.wav,unicorn\n")
    train, val = read_manifest(tmp_path / "train.csv"), read_manifest(tmp_path / "val.csv")
    with pytest.raises(ManifestError) as info:
        classes_from_items(train, val_items=val)
    msg = str(info.value)
    assert "'unicorn'" in msg and "val.csv:3" in msg and "--classes" in msg
    assert classes_from_items(train, val_items=val[:1]) == ["cat", "dog"]
    # a class list that names it keeps it (a class without training data, asked for)
    check_labels(val, ["cat", "dog", "unicorn"])


def test_train_cli_refuses_a_validation_only_label(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("path,labels\na.wav,dog\nb.wav,cat\n")
    (tmp_path / "val.csv").write_text("path,labels\nc.wav,unicorn\n")
    rc = _train_cli(tmp_path, tmp_path / "train.csv", "--val-manifest", str(tmp_path / "val.csv"))
    _one_error_line(capsys, rc, "'unicorn'", "val.csv:2")


def test_class_list_round_trip_with_hash_and_backslash(tmp_path):
    classes = ["#dog", "\\cat", "bird", "#", "a # b", "\\#x"]
    path = tmp_path / "classes.txt"
    write_class_list(classes, path)
    assert read_class_list(path) == classes
    path.write_text("# a comment\ndog\n  # indented comment\n\\#tag\n")
    assert read_class_list(path) == ["dog", "#tag"]
    with pytest.raises(ManifestError, match="control character"):
        write_class_list(["two\nlines"], tmp_path / "bad.txt")


def test_train_cli_bad_init_checkpoint(tiny_ckpt, tmp_path, capsys):
    m = tmp_path / "m.csv"
    m.write_text("path,labels\na.wav,dog\nb.wav,cat\n")  # never read: the checkpoint fails first
    wav = _write_wav(tmp_path / "a.wav", 0.1 * np.ones(SR))
    as_list = _variant(tiny_ckpt, "as_list.pt", lambda obj: [obj["state_dict"]])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path, problem in ((wav, "not a PyTorch checkpoint file"), (as_list, "holds a list"), (str(empty), "empty file")):
        rc = _train_cli(tmp_path, m, "--init-checkpoint", path)
        _one_error_line(capsys, rc, path, problem)


def test_load_errors_name_the_checkpoint_file(tiny_ckpt):
    other = htsat.HTSAT(tiny_ckpt["model"].config.replace(num_classes=5), backend="reference")
    with pytest.raises(CheckpointError) as info:
        htsat.load_checkpoint(other, tiny_ckpt["path"])
    msg = str(info.value)
    assert msg.startswith(f"{tiny_ckpt['path']}: cannot load htsat-kernels checkpoint") and "drop_head=True" in msg
    obj = torch.load(tiny_ckpt["path"], weights_only=True)
    with pytest.raises(CheckpointError, match=r"^cannot load"):  # an object in memory has no file name to add
        htsat.load_checkpoint(other, obj)
