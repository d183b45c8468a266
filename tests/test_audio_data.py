"""Audio input (htsat.audio) and datasets (htsat.data): reading, mixing down, resampling, bad
files, manifests, class lists, ESC-50 folders, clip fitting, batching and the resumable sampler."""

import json
import os

import numpy as np
import pytest
import torch
from cli_helpers import _one_thread, needs_audio  # noqa: F401 (_one_thread: autouse fixture)

from htsat.audio import AudioError, check_audio, fit_length, is_silent, load_audio, peak_dbfs
from htsat.data import (
    AudioDataset,
    Item,
    ManifestError,
    ResumableSampler,
    check_labels,
    classes_from_items,
    collate,
    is_multi_label,
    read_class_list,
    read_dataset,
    read_esc50,
    read_manifest,
    split_by_fold,
)


def _tone(freq, seconds, sr, amp=0.3, channels=1):
    t = np.arange(int(round(seconds * sr))) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)


def _write(path, data, sr, **kw):
    import soundfile as sf

    sf.write(str(path), data, sr, **kw)
    return str(path)


def _dominant_freq(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


# ------------------------------------------------------------------------------------ audio


@needs_audio
@pytest.mark.parametrize("ext,subtype", [("wav", "PCM_16"), ("flac", "PCM_24"), ("ogg", "VORBIS")])
def test_load_audio_formats_mixdown_and_resample(tmp_path, ext, subtype):
    stereo = _tone(1000, 1.0, 44100, channels=2)  # channel 0 at half the amplitude of channel 1
    path = _write(tmp_path / f"x.{ext}", stereo, 44100, subtype=subtype)
    wave = load_audio(path, 16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 16000) <= 1
    assert abs(_dominant_freq(wave, 16000) - 1000) < 5
    # mix-down is the channel mean: 0.75 * 0.3 peak
    assert abs(np.max(np.abs(wave[1000:-1000])) - 0.225) < 0.02
    same, rate = load_audio(path, None, return_rate=True)
    assert rate == 44100 and abs(len(same) - 44100) <= 1


@needs_audio
def test_load_audio_keeps_rate_without_resampling(tmp_path):
    x = _tone(440, 0.5, 16000)
    path = _write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path, 16000), x)


@needs_audio
def test_load_audio_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio")
    text = tmp_path / "notes.flac"
    text.write_text("hello")
    zero = _write(tmp_path / "zero_frames.wav", np.zeros((0,), np.float32), 16000)
    cases = {
        str(tmp_path / "missing.wav"): "not found",
        str(empty): "empty",
        str(junk): "cannot read",
        str(text): "cannot read",
        zero: "no audio samples",
        str(tmp_path): "directory",
    }
    for path, words in cases.items():
        with pytest.raises(AudioError) as info:
            load_audio(path, 16000)
        assert path in str(info.value) and words in str(info.value)
        assert info.value.path == path
        assert isinstance(info.value, ValueError)


@needs_audio
def test_load_audio_rejects_nan_samples(tmp_path):
    x = _tone(440, 0.2, 16000)
    x[10] = np.nan
    path = _write(tmp_path / "nan.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(path, 16000)


def test_silence_detection():
    assert is_silent(np.zeros(100))
    assert is_silent(np.full(100, 1e-5))  # -100 dBFS
    assert not is_silent(np.full(100, 1e-3))  # -60 dBFS
    assert peak_dbfs(np.zeros(3)) == -np.inf
    assert abs(peak_dbfs(np.array([0.5, -1.0])) - 0.0) < 1e-9
    with pytest.raises(AudioError, match="silent-only.*digital silence"):
        check_audio(np.zeros(100), "quiet.wav")
    with pytest.raises(AudioError, match="quiet.wav: silent-only.*peak -100"):
        check_audio(np.full(10, 1e-5), "quiet.wav")
    check_audio(np.zeros(100), "quiet.wav", threshold_db=None)
    with pytest.raises(AudioError, match="empty"):
        check_audio(np.zeros(0), "e.wav", threshold_db=None)


def test_fit_length_tile_pad_crop():
    x = np.arange(1, 4, dtype=np.float32)
    np.testing.assert_array_equal(fit_length(x, 8), [1, 2, 3, 1, 2, 3, 1, 2])  # tile (default)
    np.testing.assert_array_equal(fit_length(x, 8, pad="zeros"), [1, 2, 3, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(fit_length(x, 8, pad="repeatpad"), [1, 2, 3, 1, 2, 3, 0, 0])
    y = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(fit_length(y, 4, crop="start"), [0, 1, 2, 3])
    np.testing.assert_array_equal(fit_length(y, 4, crop="center"), [3, 4, 5, 6])
    starts = {int(fit_length(y, 4, rng=np.random.default_rng(s))[0]) for s in range(200)}
    assert starts == set(range(7))  # every offset, the last one included
    np.testing.assert_array_equal(fit_length(y, 10), y)
    with pytest.raises(ValueError, match="pad mode"):
        fit_length(x, 8, pad="mirror")


# ------------------------------------------------------------------------------ manifests


def _manifest(path, rows, header="path,labels,fold"):
    with open(path, "w") as f:
        f.write(header + "\n")
        for r in rows:
            f.write(",".join(r) + "\n")
    return str(path)


def test_read_manifest_paths_labels_folds(tmp_path):
    (tmp_path / "sub").mkdir()
    m = _manifest(
        tmp_path / "sub" / "m.csv", [("a.wav", "dog;bark", "1"), (str(tmp_path / "b.wav"), "", "2"), ("c/d.wav", " cat ", "1")]
    )
    items = read_manifest(m)
    assert [it.path for it in items] == [
        str(tmp_path / "sub" / "a.wav"),
        str(tmp_path / "b.wav"),
        str(tmp_path / "sub" / "c" / "d.wav"),
    ]
    assert [it.labels for it in items] == [("dog", "bark"), (), ("cat",)]
    assert [it.fold for it in items] == ["1", "2", "1"]
    assert items[0].where() == f"{m}:2"
    assert classes_from_items(items) == ["bark", "cat", "dog"]
    assert is_multi_label(items)
    assert not is_multi_label([items[2]])
    tr, va = split_by_fold(items, 2)
    assert len(tr) == 2 and [it.fold for it in va] == ["2"]
    rooted = read_manifest(m, root=str(tmp_path))
    assert rooted[0].path == str(tmp_path / "a.wav")


def test_manifest_errors_name_the_file(tmp_path):
    bad = _manifest(tmp_path / "bad.csv", [("a.wav", "x")], header="file,label")
    with pytest.raises(ManifestError) as info:
        read_manifest(bad)
    msg = str(info.value)
    assert bad in msg and "path" in msg and "labels" in msg and "file, label" in msg
    only_path = _manifest(tmp_path / "p.csv", [("a.wav",)], header="path")
    with pytest.raises(ManifestError, match="missing column.*labels"):
        read_manifest(only_path)
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(_manifest(tmp_path / "e.csv", []))
    with pytest.raises(ManifestError, match=r"e2.csv:3: row has an empty 'path'"):
        read_manifest(_manifest(tmp_path / "e2.csv", [("a.wav", "x", "1"), ("", "y", "1")]))
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
    items = read_manifest(_manifest(tmp_path / "u.csv", [("a.wav", "dog", "1"), ("b.wav", "dog;unicorn", "1")]))
    with pytest.raises(ManifestError) as info:
        check_labels(items, ["dog", "cat"])
    assert "'unicorn'" in str(info.value) and "u.csv:3" in str(info.value)
    with pytest.raises(ManifestError, match="fold '7' not found"):
        split_by_fold(items, 7)


def test_class_lists(tmp_path):
    (tmp_path / "c.txt").write_text("# comment\ndog\n\ncat\n")
    assert read_class_list(tmp_path / "c.txt") == ["dog", "cat"]
    (tmp_path / "c.json").write_text(json.dumps(["a", "b"]))
    assert read_class_list(tmp_path / "c.json") == ["a", "b"]
    (tmp_path / "d.json").write_text(json.dumps({"classes": ["z"]}))
    assert read_class_list(tmp_path / "d.json") == ["z"]
    (tmp_path / "c.csv").write_text('index,mid,display_name\n0,/m/1,"Speech"\n1,/m/2,"Dog, bark"\n')
    assert read_class_list(tmp_path / "c.csv") == ["Speech", "Dog, bark"]
    (tmp_path / "dup.txt").write_text("a\na\n")
    with pytest.raises(ManifestError, match="duplicates"):
        read_class_list(tmp_path / "dup.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ManifestError, match="empty"):
        read_class_list(tmp_path / "empty.txt")
    # the AudioSet list shipped with the package reads as a class list too
    import htsat

    shipped = os.path.join(os.path.dirname(htsat.__file__), "assets", "audioset_class_labels_indices.csv")
    assert read_class_list(shipped) == htsat.audioset_labels()
    assert len(htsat.audioset_labels()) == 527


def test_esc50_folder(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "audio").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-1-A-1.wav,1,1,rooster,False,1,A\n2-1-A-0.wav,2,0,dog,True,1,A\n3-1-A-1.wav,3,1,rooster,False,1,A\n"
    )
    items, classes = read_esc50(tmp_path)
    assert classes == ["dog", "rooster"]
    assert items[0].path == str(tmp_path / "audio" / "1-1-A-1.wav") and items[0].labels == ("rooster",) and items[0].fold == "1"
    assert read_dataset(str(tmp_path))[1] == classes
    with pytest.raises(ManifestError, match="not an ESC-50 folder"):
        read_esc50(tmp_path / "audio")


# ------------------------------------------------------------------------------- datasets


@needs_audio
def test_dataset_fits_clips_and_builds_targets(tmp_path):
    sr = 16000
    short = _write(tmp_path / "short.wav", _tone(500, 0.3, sr), sr)
    long = _write(tmp_path / "long.wav", np.arange(3 * sr, dtype=np.float32) / (3 * sr), sr, subtype="FLOAT")
    resampled = _write(tmp_path / "r.flac", _tone(500, 0.5, 32000, channels=2), 32000)
    items = [Item(short, ("a",)), Item(long, ("b", "a")), Item(resampled, ())]
    ds = AudioDataset(items, ["a", "b"], sr, sr, train=True, seed=3)
    s0 = ds[0]
    assert s0["waveform"].shape == (sr,) and s0["waveform"].dtype == torch.float32
    w = s0["waveform"].numpy()
    np.testing.assert_allclose(w[4800:9600], w[:4800], atol=1e-4)  # tiled
    assert s0["target"].tolist() == [1.0, 0.0] and s0["valid"] and s0["bad"] == []
    assert ds[1]["target"].tolist() == [1.0, 1.0] and ds[2]["target"].tolist() == [0.0, 0.0]
    # random crops are a function of (seed, epoch, index)
    first = ds[1]["waveform"][0].item()
    assert ds[1]["waveform"][0].item() == first
    ds.set_epoch(1)
    assert ds[1]["waveform"][0].item() != first
    ev = AudioDataset(items, ["a", "b"], sr, sr, train=False)
    assert ev[1]["waveform"][0].item() == 0.0  # start crop
    zeros = AudioDataset(items, ["a", "b"], sr, sr, pad="zeros")
    assert float(zeros[0]["waveform"][4800:].abs().max()) == 0.0
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["waveform"].shape == (3, sr) and batch["target"].shape == (3, 2)
    assert batch["index"].tolist() == [0, 1, 2] and batch["valid"].all() and batch["bad"] == []
    with pytest.raises(ManifestError, match="unknown label"):
        AudioDataset([Item(short, ("zebra",))], ["a"], sr, sr)


@needs_audio
def test_dataset_bad_files_skip_or_stop(tmp_path):
    sr = 16000
    good = _write(tmp_path / "good.wav", _tone(500, 0.5, sr), sr)
    silent = _write(tmp_path / "silent.wav", np.zeros(sr // 2, np.float32), sr)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"garbage" * 10)
    items = [Item(good, ("a",)), Item(str(corrupt), ("a",)), Item(silent, ("b",))]
    ds = AudioDataset(items, ["a", "b"], sr, sr, train=True)
    s = ds[1]  # replaced by the next readable file (silent is bad too -> wraps to good)
    assert s["source_index"] == 0 and s["index"] == 1 and s["valid"]
    assert len(s["bad"]) == 2 and str(corrupt) in s["bad"][0] and silent in s["bad"][1] and "silent" in s["bad"][1]
    ev = AudioDataset(items, ["a", "b"], sr, sr, train=False)
    s = ev[1]
    assert not s["valid"] and str(corrupt) in s["bad"][0]
    keep_silent = AudioDataset(items, ["a", "b"], sr, sr, silence_db=None)
    assert keep_silent[2]["valid"] and keep_silent[2]["bad"] == []
    stop = AudioDataset(items, ["a", "b"], sr, sr, on_error="stop")
    with pytest.raises(AudioError, match="corrupt.wav"):
        stop[1]
    all_bad = AudioDataset([Item(str(corrupt), ("a",))], ["a"], sr, sr)
    with pytest.raises(AudioError, match="no readable audio file"):
        all_bad[0]


# -------------------------------------------------------------------------------- sampler


def test_sampler_matches_distributed_sampler_and_resumes():
    from torch.utils.data import DistributedSampler

    n = 23
    for world in (1, 2, 3):
        shards = []
        for rank in range(world):
            ours = ResumableSampler(n, shuffle=True, seed=5, num_replicas=world, rank=rank)
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
            for epoch in (0, 3):
                ours.set_epoch(epoch)
                ref.set_epoch(epoch)
                assert list(ours) == list(ref)
                assert len(ours) == len(ref)
            ours.set_epoch(0)
            shards.append(list(ours))
            ours.set_start(4)
            assert list(ours) == shards[-1][4:] and len(ours) == len(shards[-1]) - 4
            ours.set_epoch(1)
            assert ours.start == 0
        assert set().union(*map(set, shards)) == set(range(n))
    plain = ResumableSampler(5, shuffle=False)
    assert list(plain) == [0, 1, 2, 3, 4]
    dl = ResumableSampler(5, num_replicas=2, rank=1, drop_last=True)
    assert len(dl) == 2


@needs_audio
@pytest.mark.parametrize("seconds,at_least", [(3, 1.25), (100, 49.9)])
def test_truncated_flac_keeps_everything_decodable(tmp_path, seconds, at_least):
    """A FLAC cut in half decodes up to its last whole frame (1.28 s of a 3 s file, 49.92 s of a 100 s one); reading
    in 30 s blocks used to throw away the whole failing block (the 3 s file was rejected, the 100 s one gave 30 s)."""
    import soundfile as sf

    from htsat.audio import stream_audio

    sr = 16000
    rng = np.random.default_rng(0)
    x = (_tone(440, seconds, sr) + 0.01 * rng.standard_normal(seconds * sr)).astype(np.float32)
    full = tmp_path / "full.flac"
    sf.write(full, x, sr, subtype="PCM_16")
    data = full.read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: len(data) // 2])
    warnings: list[str] = []
    got = np.concatenate(list(stream_audio(cut, sr, block_seconds=30.0, warn=warnings.append)))
    assert got.shape[0] >= at_least * sr
    np.testing.assert_array_equal(got, sf.read(full, dtype="float32")[0][: got.shape[0]])  # the file's own samples
    assert len(warnings) == 1 and f"{cut}: decoding stopped at {got.shape[0] / sr:.2f} s of the {seconds:.2f} s" in warnings[0]
