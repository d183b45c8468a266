"""Checkpoints: our format round trip, the original's Lightning layout, plain and DDP state_dicts, and
every way a checkpoint can fail to fit (never a silent partial load; always weights_only)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import htsat
from htsat import CheckpointError

HEAD_KEYS = ["head.bias", "head.weight", "tscam_conv.bias", "tscam_conv.weight"]


def tiny(**overrides) -> htsat.HTSAT:
    return htsat.create_model(backend="reference", **{**htsat.TINY_OVERRIDES, "num_classes": 10, **overrides})


def randomised(model: htsat.HTSAT, seed: int = 1) -> htsat.HTSAT:
    """Move every trainable parameter and the bn0 statistics away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.bn0.running_mean.copy_(torch.randn(model.bn0.running_mean.shape, generator=g) - 40)
        model.bn0.running_var.copy_(torch.rand(model.bn0.running_var.shape, generator=g) * 30 + 10)
        model.bn0.num_batches_tracked.fill_(17)
    return model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def n_derived(model) -> int:
    return sum(1 for k in model.state_dict() if htsat.checkpoint.is_derived_key(k))


@pytest.fixture(scope="module")
def source():
    """A tiny model with non-default weights, and its state_dict."""
    torch.manual_seed(5)
    model = randomised(tiny()).eval()
    return model, snapshot(model)


# --------------------------------------------------------------------------------------------
# our format
# --------------------------------------------------------------------------------------------


def test_round_trip(tmp_path, source):
    model, sd = source
    path = tmp_path / "run" / "model.pt"  # the folder is created
    htsat.save_checkpoint(model, path, epoch=3, best_map=0.25, note="hello")
    assert sorted(os.listdir(path.parent)) == ["model.pt"]  # written atomically: no temp file left
    again = htsat.model_from_checkpoint(path, backend="reference")
    assert not again.training
    assert again.config == model.config and again.config.name == model.config.name
    assert_state_equal(again.state_dict(), sd)
    x = 0.1 * torch.randn(2, 40000)
    with torch.no_grad():
        want, got = model(x), again(x)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    raw = torch.load(path, weights_only=True)
    assert (raw["format"], raw["version"], raw["epoch"], raw["best_map"], raw["note"]) == ("htsat-kernels", 1, 3, 0.25, "hello")
    assert raw["config"] == model.config.to_dict()
    # load_checkpoint reads the same file into another model
    other = tiny()
    report = htsat.load_checkpoint(other, path)
    assert report.source_format == "htsat-kernels checkpoint"
    assert_state_equal(other.state_dict(), sd)


def test_round_trip_keeps_the_config_of_a_non_default_model(tmp_path):
    model = tiny(num_classes=3, loss_type="clip_ce", patch_norm=False, depths=(2, 2, 2, 1))
    htsat.save_checkpoint(model, tmp_path / "m.pt")
    again = htsat.model_from_checkpoint(tmp_path / "m.pt")
    assert again.config == model.config
    assert_state_equal(again.state_dict(), model.state_dict())


def test_save_unwraps_ddp_and_compile_wrappers(tmp_path, source):
    model, sd = source

    class Wrapper(torch.nn.Module):  # what DDP looks like to save_checkpoint: the model under .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    htsat.save_checkpoint(Wrapper(model), tmp_path / "ddp.pt")
    raw = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert list(raw["state_dict"]) == list(sd)


def test_save_is_atomic_when_writing_fails(tmp_path, source, monkeypatch):
    model, _ = source
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous checkpoint")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        htsat.save_checkpoint(model, path, epoch=1)
    assert path.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == ["model.pt"]


# --------------------------------------------------------------------------------------------
# the original's layouts
# --------------------------------------------------------------------------------------------


def _lightning(sd: dict) -> dict:
    return {
        "epoch": 7,
        "global_step": 1234,
        "pytorch-lightning_version": "1.5.9",
        "state_dict": {"sed_model." + k: v.clone() for k, v in sd.items()},
    }


@pytest.mark.parametrize(
    "layout, kind",
    [
        (_lightning, "Lightning checkpoint"),
        (lambda sd: {k: v.clone() for k, v in sd.items()}, "plain state_dict"),
        (lambda sd: {"module." + k: v.clone() for k, v in sd.items()}, "plain state_dict"),
        (lambda sd: {"_orig_mod." + k: v.clone() for k, v in sd.items()}, "plain state_dict"),
        (lambda sd: {"model": {k: v.clone() for k, v in sd.items()}}, "checkpoint with a 'model' entry"),
    ],
    ids=["lightning", "plain", "ddp-module-prefix", "compiled-prefix", "model-entry"],
)
@pytest.mark.parametrize("from_file", [False, True], ids=["dict", "file"])
def test_original_layouts_load(tmp_path, source, layout, kind, from_file):
    _, sd = source
    obj = layout(sd)
    if from_file:
        torch.save(obj, tmp_path / "x.ckpt")
        obj = tmp_path / "x.ckpt"
    model = tiny()
    report = htsat.load_checkpoint(model, obj)
    assert report.source_format == kind
    assert len(report.derived_checked) == n_derived(model) == 13  # 3 front end, 8 rel. index, 2 masks
    assert len(report.loaded) == len(sd) - 13
    assert report.skipped_head == []
    assert sorted(report.loaded + report.derived_checked) == sorted(sd)
    assert_state_equal(model.state_dict(), sd)


def test_audioset_lightning_checkpoint_reports_180_loaded_and_20_derived():
    model = htsat.create_model("htsat-audioset", backend="reference")
    sd = snapshot(model)
    with torch.no_grad():
        changed = {k: (v + 1 if v.is_floating_point() and not htsat.checkpoint.is_derived_key(k) else v) for k, v in sd.items()}
    report = htsat.load_checkpoint(model, _lightning(changed))
    assert (len(report.loaded), len(report.derived_checked)) == (180, 20)
    assert sorted(k for k in report.derived_checked if k.endswith("attn_mask")) == [
        "layers.0.blocks.1.attn_mask",
        "layers.1.blocks.1.attn_mask",
        "layers.2.blocks.1.attn_mask",
        "layers.2.blocks.3.attn_mask",
        "layers.2.blocks.5.attn_mask",
    ]
    assert torch.equal(model.norm.weight, changed["norm.weight"])
    assert "180" in str(report) and "20" in str(report)


def test_model_from_original_checkpoint_reads_the_class_count(tmp_path):
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(htsat.TINY_OVERRIDES))
    src = randomised(tiny(num_classes=7))
    torch.save(_lightning(src.state_dict()), tmp_path / "orig.ckpt")
    model = htsat.model_from_checkpoint(tmp_path / "orig.ckpt", name=str(cfg_path))
    assert model.config.num_classes == 7
    assert_state_equal(model.state_dict(), src.state_dict())


# --------------------------------------------------------------------------------------------
# errors: each one names the problem, and the model is left untouched
# --------------------------------------------------------------------------------------------


def _drop(key):
    def f(sd):
        del sd[key]
        return sd

    return f


def _add(key, value):
    def f(sd):
        sd[key] = value
        return sd

    return f


def _set(key, value):
    def f(sd):
        sd[key] = value
        return sd

    return f


def _bump_rel_index(sd):
    idx = sd["layers.1.blocks.0.attn.relative_position_index"].clone()
    idx[3, 5] += 1
    sd["layers.1.blocks.0.attn.relative_position_index"] = idx
    return sd


def _bump_mask(sd):
    m = sd["layers.0.blocks.1.attn_mask"].clone()
    m[0, 0, 1] = -100.0
    sd["layers.0.blocks.1.attn_mask"] = m
    return sd


ERROR_CASES = {
    "missing-key": (
        _drop("layers.1.blocks.0.mlp.fc1.weight"),
        r"keys missing from the checkpoint: \['layers.1.blocks.0.mlp.fc1.weight'\]",
    ),
    "missing-buffer": (_drop("bn0.running_var"), r"keys missing from the checkpoint: \['bn0.running_var'\]"),
    "unexpected-key": (
        _add("layers.9.blocks.0.norm1.weight", torch.zeros(3)),
        r"keys the model does not have: \['layers.9.blocks.0.norm1.weight'\]",
    ),
    "body-shape": (
        _set("layers.0.blocks.0.attn.qkv.weight", torch.zeros(70, 24)),
        r"shape mismatches: \['layers.0.blocks.0.attn.qkv.weight: checkpoint \(70, 24\) vs model \(72, 24\)'\]",
    ),
    "relative-position-index": (_bump_rel_index, r"derived constants differ.*layers.1.blocks.0.attn.relative_position_index"),
    "attn-mask": (_bump_mask, r"derived constants differ.*layers.0.blocks.1.attn_mask"),
    "not-tensors": (lambda sd: {**sd, "epoch": 3}, r"entries \['epoch'\] are not tensors"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_checkpoint_is_rejected_and_nothing_is_loaded(source, case):
    _, sd = source
    change, match = ERROR_CASES[case]
    bad = change({k: v.clone() for k, v in sd.items()})
    model = tiny()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=match):
        htsat.load_checkpoint(model, bad)
    assert_state_equal(model.state_dict(), before)  # never a partial load


def test_all_problems_are_reported_together(source):
    _, sd = source
    bad = {k: v.clone() for k, v in sd.items()}
    del bad["norm.bias"]
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        htsat.load_checkpoint(tiny(), bad)
    msg = str(info.value)
    assert "norm.bias" in msg and "extra.weight" in msg


def test_class_count_mismatch_suggests_drop_head(source):
    _, sd = source  # 10 classes
    model = tiny(num_classes=4)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"checkpoint has 10 classes.*model has 4.*drop_head=True"):
        htsat.load_checkpoint(model, _lightning(sd))
    assert_state_equal(model.state_dict(), before)


def test_drop_head_loads_the_body_and_keeps_the_fresh_head(source):
    _, sd = source
    model = tiny(num_classes=4)
    fresh = snapshot(model)
    report = htsat.load_checkpoint(model, _lightning(sd), drop_head=True)
    assert sorted(report.skipped_head) == HEAD_KEYS
    assert len(report.loaded) == len(sd) - 13 - 4
    now = model.state_dict()
    for k in now:
        if k in HEAD_KEYS:
            assert torch.equal(now[k], fresh[k]), k  # fresh initialisation kept
        else:
            assert torch.equal(now[k], sd[k]), k
    # drop_head also works with the same class count (re-initialising the head for fine-tuning)
    same = tiny()
    fresh_same = snapshot(same)
    htsat.load_checkpoint(same, sd, drop_head=True)
    assert torch.equal(same.tscam_conv.weight, fresh_same["tscam_conv.weight"])
    assert torch.equal(same.norm.weight, sd["norm.weight"])


def test_front_end_of_another_sample_rate_is_rejected():
    """A 48 kHz model's front end (other mel filterbank) does not load into a 16 kHz model."""
    other = randomised(tiny(sample_rate=48000, hop_length=480))
    model = tiny()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"derived constants differ.*'logmel_extractor.melW") as info:
        htsat.load_checkpoint(model, _lightning(other.state_dict()))
    # the DFT weights depend on n_fft only, which is the same: only the mel matrix is named
    assert "conv_real" not in str(info.value)
    assert_state_equal(model.state_dict(), before)


def test_original_scv2_checkpoint_loads_into_the_scv2_preset_with_cap_fmax_off():
    librosa = pytest.importorskip("librosa")
    with pytest.warns(UserWarning, match="fmax"):
        capped = htsat.create_model("htsat-scv2", backend="reference")
    with pytest.warns(UserWarning, match="kept as asked"):
        model = htsat.create_model("htsat-scv2", backend="reference", cap_fmax=False)
    sd = snapshot(model)
    # what the original (torchlibrosa LogmelFilterBank) holds for its SCV2 settings: fmax left at 14000
    with pytest.warns(UserWarning, match="Empty filters"):
        original_melw = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=50, fmax=14000).T
    assert int((original_melw.max(axis=0) == 0).sum()) == 9
    sd["logmel_extractor.melW"] = torch.tensor(original_melw)
    htsat.load_checkpoint(model, _lightning(sd))
    # the model must then compute the original's features (its weights were trained on them)
    assert torch.allclose(model.logmel_extractor.melW, torch.tensor(original_melw), atol=1e-6)
    # the capped preset refuses it, and the error says how to load it
    with pytest.raises(CheckpointError, match="cap_fmax=False"):
        htsat.load_checkpoint(capped, _lightning(sd))


def test_front_end_of_another_n_fft_is_rejected():
    other = tiny(n_fft=1024)
    with pytest.raises(
        CheckpointError, match=r"spectrogram_extractor.stft.conv_real.weight \(checkpoint \(513, 1, 1024\)"
    ) as info:
        htsat.load_checkpoint(tiny(), other.state_dict())
    assert "logmel_extractor.melW" in str(info.value)


def test_not_a_checkpoint_file(tmp_path):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(os.urandom(4096))
    model = tiny()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        htsat.load_checkpoint(model, path)
    with pytest.raises(CheckpointError):
        htsat.model_from_checkpoint(path)
    assert_state_equal(model.state_dict(), before)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        htsat.load_checkpoint(tiny(), tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError):
        htsat.model_from_checkpoint(tmp_path / "nope.ckpt")


class _Payload:
    """Unpickling this would create a file: proof that arbitrary code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_is_weights_only(tmp_path, source):
    _, sd = source
    marker = tmp_path / "pwned"
    obj = _lightning(sd)
    obj["callbacks"] = _Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(obj, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only"):
        htsat.load_checkpoint(tiny(), path)
    with pytest.raises(CheckpointError):
        htsat.model_from_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_of_another_model_size_names_the_size_not_the_class_count(source):
    """Same class count, another width: the error named the class count ("7 classes ... the model has 7; pass
    drop_head=True"); it names the size, and the presets of that size or the fields to set."""
    wide = tiny(embed_dim=48)
    before = snapshot(wide)
    with pytest.raises(CheckpointError) as info:
        htsat.load_checkpoint(wide, source[1])
    msg = str(info.value)
    assert "another size (embed_dim 24, depths (2, 2, 2, 2), num_heads (1, 2, 4, 8)) than htsat-audioset (embed_dim 48" in msg
    assert "embed_dim=..., depths=..." in msg and "drop_head" not in msg and "10 classes" not in msg
    assert "more)" in msg  # the per-key shape list is cut short
    assert_state_equal(wide.state_dict(), before)
    # the backbone of htsat-audioset's size (only the keys that tell the size): its presets are suggested
    sd = {"patch_embed.proj.weight": torch.zeros(96, 1, 4, 4)}
    for i, (depth, heads) in enumerate(zip((2, 2, 6, 2), (4, 8, 16, 32))):
        sd.update({f"layers.{i}.blocks.{j}.attn.relative_position_bias_table": torch.zeros(225, heads) for j in range(depth)})
    with pytest.raises(CheckpointError, match=r"preset of its size \(htsat-audioset or htsat-esc50 or htsat-scv2 or "
                       r"clap-htsat-tiny: --model NAME on the command line"):  # fmt: skip
        htsat.load_checkpoint(wide, sd)
    assert_state_equal(wide.state_dict(), before)


def test_bad_safetensors_is_a_checkpoint_error(tmp_path, monkeypatch, capsys):
    import sys

    from htsat.cli import main

    bad = tmp_path / "model.safetensors"
    bad.write_bytes((200).to_bytes(8, "little") + b"{not json" + b"\0" * 300)
    with pytest.raises(CheckpointError, match=rf"cannot read checkpoint {bad} \(safetensors\): SafetensorError"):
        htsat.load_checkpoint(tiny(), bad)
    import numpy as np
    import soundfile as sf

    wav = tmp_path / "a.wav"
    sf.write(wav, np.full(16000, 0.1, np.float32), 16000)
    rc = main(["predict", str(wav), "--checkpoint", str(bad), "--num-workers", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err and str(bad) in err, err
    monkeypatch.setitem(sys.modules, "safetensors", None)  # the package not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match=r"need the safetensors package .*htsat-kernels\[hub\]"):
        htsat.load_checkpoint(tiny(), bad)
