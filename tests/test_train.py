"""Training (htsat.training, ``htsat train``): learning on a synthetic dataset, exact resume after a
kill, DDP with two gloo processes, fine-tuning with a new class count, bad input handling."""

import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from cli_helpers import FREQS, HAVE_AUDIO, SR, _one_thread, needs_audio, tiny_model_json  # noqa: F401 (_one_thread: autouse fixture)

import htsat
from htsat.training import TrainConfig, TrainingError, make_lr_lambda, original_lr_multiplier, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tones(folder, per_class=16, seed=0):
    """One class per tone frequency; random length 0.4-1.6 s (tiled or cropped to 1 s), level,
    phase, +-3 % detune and a little noise. Folds k % 4. Returns the manifest path."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
    rows = []
    for name, freq in FREQS.items():
        for k in range(per_class):
            n = int(rng.uniform(0.4, 1.6) * SR)
            t = np.arange(n) / SR
            f = freq * (1 + rng.uniform(-0.03, 0.03))
            x = rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) + 0.005 * rng.standard_normal(n)
            rel = f"audio/{name}_{k}.wav"
            sf.write(os.path.join(folder, rel), x.astype(np.float32), SR)
            rows.append(f"{rel},{name},{k % 4}")
    path = os.path.join(folder, "tones.csv")
    with open(path, "w") as f:
        f.write("path,labels,fold\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    if not HAVE_AUDIO:
        pytest.skip("needs soundfile and soxr")
    folder = tmp_path_factory.mktemp("tones")
    return {"manifest": make_tones(str(folder)), "model": tiny_model_json(folder / "tiny.json"), "folder": str(folder)}


def _cfg(tones, out, **kw):
    base = dict(
        manifest=tones["manifest"],
        val_fold="0",
        model=tones["model"],
        out=str(out),
        epochs=3,
        batch_size=8,
        num_workers=0,
        backend="reference",
        progress=False,
        cache_audio=True,
        log=lambda msg: None,
    )
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------- LR schedules


def test_original_lr_multipliers():
    # docs/model.md §9: 0.02, 0.05, 0.1 warm-up; 0.1 to epoch 10; 0.05 to 20; 0.02 to 30; then 0.03
    expect = {0: 0.02, 1: 0.05, 2: 0.1, 3: 0.1, 10: 0.1, 11: 0.05, 20: 0.05, 21: 0.02, 30: 0.02, 31: 0.03, 99: 0.03}
    for e, m in expect.items():
        assert original_lr_multiplier(e) == pytest.approx(m)
    fn = make_lr_lambda("original", steps_per_epoch=10, total_epochs=100)
    assert [fn(s) for s in (0, 9, 10, 25, 30, 115, 315)] == pytest.approx([0.02, 0.02, 0.05, 0.1, 0.1, 0.05, 0.03])
    # the warm-up scales to the dataset: 6 warm-up epochs, then the post-warm-up table
    fn = make_lr_lambda("original", steps_per_epoch=10, total_epochs=100, warmup_epochs=6)
    assert [fn(s) for s in (0, 19, 20, 40, 60, 140)] == pytest.approx([0.02, 0.02, 0.05, 0.1, 0.1, 0.05])
    cos = make_lr_lambda("cosine", steps_per_epoch=10, total_epochs=10, warmup_epochs=1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(10) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0, abs=1e-12)
    const = make_lr_lambda("constant", steps_per_epoch=10, total_epochs=10)
    assert const(0) == const(1000) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        make_lr_lambda("step", 1, 1)


# ---------------------------------------------------------------------------- learning


@needs_audio
def test_learns_synthetic_tones_via_cli(tones, tmp_path, capsys):
    out = tmp_path / "run"
    rc = htsat_main(
        [
            "train",
            "--manifest",
            tones["manifest"],
            "--val-fold",
            "0",
            "--model",
            tones["model"],
            "--out",
            str(out),
            "--epochs",
            "5",
            "--batch-size",
            "8",
            "--lr-schedule",
            "constant",
            "--lr",
            "1e-3",
            "--num-workers",
            "0",
            "--cache-audio",
            "--no-progress",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    best = max(r["val_accuracy"] for r in rows)
    print(f"synthetic tones: val accuracy per epoch {[r['val_accuracy'] for r in rows]}")
    assert best >= 0.9
    assert rows[-1]["val_accuracy"] >= 0.9
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,")
    assert (out / "classes.txt").read_text().split() == sorted(FREQS)
    assert json.load(open(out / "train_config.json"))["train"]["lr_schedule"] == "constant"
    # best.pt is a regular model checkpoint that also carries the class names
    model = htsat.model_from_checkpoint(str(out / "best.pt"))
    assert model.config.num_classes == 4 and not model.training
    ck = torch.load(out / "best.pt", weights_only=True)
    assert ck["classes"] == sorted(FREQS) and ck["metrics"]["val_accuracy"] >= 0.9
    err = capsys.readouterr()
    assert "done: 30 steps" in err.out
    assert "4 classes, single-label, loss ce, mixup off" in err.err


def htsat_main(argv):
    from htsat.cli import main

    return main(argv)


# ------------------------------------------------------------------------------ resume


@needs_audio
def test_killed_and_resumed_equals_uninterrupted(tones, tmp_path):
    # every source of randomness in play: mixup, SpecAugment, drop path, random crops, shuffling
    kw = dict(epochs=3, checkpoint_every=2, mixup="on", lr_schedule="original", model_overrides={"drop_path_rate": 0.2})
    full = train(_cfg(tones, tmp_path / "full", **kw))
    assert not full["stopped"] and full["global_step"] == 18

    killed = train(_cfg(tones, tmp_path / "killed", stop_after_steps=9, **kw))  # mid-epoch 2, last checkpoint at step 8
    assert killed["stopped"] and killed["global_step"] == 9
    ck = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert ck["train_state"]["global_step"] == 8 and ck["train_state"]["epoch"] == 1 and ck["train_state"]["step_in_epoch"] == 2
    resumed = train(_cfg(tones, tmp_path / "killed", resume=True, **kw))
    assert resumed["global_step"] == 18

    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ta = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["train_state"]
    tb = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["train_state"]
    for p, st in ta["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(value, tb["optimizer"]["state"][p][name]), (p, name)
    assert ta["scheduler"] == tb["scheduler"]
    assert torch.equal(ta["rng"][0]["torch"], tb["rng"][0]["torch"])
    drop = ("clips_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in full["history"]] == [
        {k: v for k, v in r.items() if k not in drop} for r in resumed["history"]
    ]
    # metrics log rewritten from the checkpoint's history: one row per epoch, no duplicates
    assert [json.loads(x)["epoch"] for x in open(tmp_path / "killed" / "metrics.jsonl")] == [1, 2, 3]


@needs_audio
def test_existing_run_needs_resume_and_matching_settings(tones, tmp_path):
    train(_cfg(tones, tmp_path / "r", epochs=1))
    with pytest.raises(TrainingError, match="pass --resume"):
        train(_cfg(tones, tmp_path / "r", epochs=2))
    with pytest.raises(TrainingError, match="batch_size differs"):
        train(_cfg(tones, tmp_path / "r", epochs=2, batch_size=4, resume=True))
    done = train(_cfg(tones, tmp_path / "r", epochs=2, resume=True))  # more epochs on resume
    assert [r["epoch"] for r in done["history"]] == [1, 2]
    fresh = train(_cfg(tones, tmp_path / "new", epochs=1, resume=True))  # --resume without a checkpoint starts fresh
    assert fresh["epochs"] == 1


# ------------------------------------------------------------------------- fine-tuning


@needs_audio
def test_init_checkpoint_with_new_class_count(tones, tmp_path):
    src = htsat.create_model(tones["model"], num_classes=7, backend="reference")
    torch.nn.init.normal_(src.patch_embed.proj.weight)
    original = {"state_dict": {"sed_model." + k: v for k, v in src.state_dict().items()}}  # the original's .ckpt layout
    torch.save(original, tmp_path / "orig.ckpt")
    run = train(_cfg(tones, tmp_path / "ft", epochs=0, init_checkpoint=str(tmp_path / "orig.ckpt")))
    model = run["model"]
    assert model.tscam_conv.weight.shape[0] == 4
    assert torch.equal(model.patch_embed.proj.weight, src.patch_embed.proj.weight)
    with pytest.raises(htsat.CheckpointError, match="drop_head"):
        train(_cfg(tones, tmp_path / "ft2", epochs=0, init_checkpoint=str(tmp_path / "orig.ckpt"), init_drop_head="no"))


# ---------------------------------------------------------------------------- bad input


@needs_audio
def test_bad_files_are_skipped_counted_or_stop(tones, tmp_path):
    import soundfile as sf

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.wav").write_bytes(b"")
    (folder / "corrupt.wav").write_bytes(b"RIFF....WAVEnothing")
    sf.write(str(folder / "silent.wav"), np.zeros(SR, np.float32), SR)
    lines = open(tones["manifest"]).read().splitlines()
    base = os.path.dirname(tones["manifest"])
    rows = [f"{os.path.join(base, line.split(',')[0])},{','.join(line.split(',')[1:])}" for line in lines[1:]]
    rows += [f"{folder / n},low,1" for n in ("empty.wav", "corrupt.wav", "silent.wav")]
    manifest = tmp_path / "with_bad.csv"
    manifest.write_text("path,labels,fold\n" + "\n".join(rows) + "\n")
    messages = []
    run = train(_cfg(tones, tmp_path / "skip", manifest=str(manifest), epochs=1, log=messages.append))
    assert len(run["bad_files"]) == 3
    for n in ("empty.wav", "corrupt.wav", "silent.wav"):
        assert any(n in m for m in run["bad_files"]) and any(n in m for m in messages)
    assert "empty.wav" in (tmp_path / "skip" / "bad_files.txt").read_text()
    assert run["history"][-1]["bad_files"] == 3
    with pytest.raises(TrainingError, match="more than --max-bad-files 1"):
        train(_cfg(tones, tmp_path / "max", manifest=str(manifest), epochs=1, max_bad_files=1))
    with pytest.raises(htsat.audio.AudioError, match=r"(empty|corrupt|silent)\.wav"):
        train(_cfg(tones, tmp_path / "stop", manifest=str(manifest), epochs=1, on_bad_file="stop"))


@needs_audio
def test_cli_reports_manifest_problems(tones, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.wav,x\n")
    rc = htsat_main(["train", "--manifest", str(bad), "--out", str(tmp_path / "o"), "--model", tones["model"]])
    assert rc == 1
    err = capsys.readouterr().err
    assert "htsat: error:" in err and str(bad) in err and "missing column" in err
    classes = tmp_path / "classes.txt"
    classes.write_text("low\nmid\nhigh\n")  # "top" is unknown
    rc = htsat_main(
        [
            "train",
            "--manifest",
            tones["manifest"],
            "--classes",
            str(classes),
            "--out",
            str(tmp_path / "o"),
            "--model",
            tones["model"],
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "unknown label" in err and "'top'" in err and "tones.csv:" in err
    # single-label loss on multi-label data
    multi = tmp_path / "multi.csv"
    multi.write_text(f"path,labels\n{os.path.join(tones['folder'], 'audio', 'low_0.wav')},low;mid\n")
    rc = htsat_main(["train", "--manifest", str(multi), "--out", str(tmp_path / "o2"), "--model", tones["model"]])
    assert rc == 1 and "exactly one label" in capsys.readouterr().err


@needs_audio
def test_nan_loss_names_the_step(tones, tmp_path, monkeypatch):
    import htsat.training.objective as tr

    nan_F = types.SimpleNamespace(
        **{n: getattr(torch.nn.functional, n) for n in dir(torch.nn.functional) if not n.startswith("__")}
    )
    nan_F.cross_entropy = lambda logits, target: logits.sum() * float("nan")
    monkeypatch.setattr(tr, "F", nan_F)
    with pytest.raises(
        TrainingError, match=r"non-finite loss at epoch 1, step 1 \(global step 1\); clips in the batch: \w+_\d+\.wav"
    ):
        train(_cfg(tones, tmp_path / "nan", epochs=1))
    torch.manual_seed(0)  # the run seeds with its --seed (0) before building the model
    before = htsat.create_model(tones["model"], num_classes=4, backend="reference")
    run = train(_cfg(tones, tmp_path / "nanskip", epochs=1, on_nan="skip", specaugment=False))
    assert run["nan_steps"] == 6
    after = dict(run["model"].named_parameters())
    for k, v in before.named_parameters():  # no optimiser step was taken (bn0's running stats do move)
        assert torch.equal(v, after[k]), k


# -------------------------------------------------------------------------------- DDP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_audio
def test_ddp_two_gloo_processes(tones, tmp_path):
    out = tmp_path / "ddp"
    # 15 validation clips: the rank-strided validation shards pad one clip, counted once in the metrics
    lines = open(tones["manifest"]).read().splitlines()
    first_val = next(i for i, line in enumerate(lines) if line.endswith(",0"))
    manifest = os.path.join(tones["folder"], "tones_val15.csv")
    with open(manifest, "w") as f:
        f.write("\n".join(lines[:first_val] + lines[first_val + 1 :]) + "\n")
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "htsat",
        "train",
        "--manifest",
        manifest,
        "--val-fold",
        "0",
        "--model",
        tones["model"],
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr-schedule",
        "constant",
        "--num-workers",
        "0",
        "--backend",
        "reference",
        "--no-progress",
        "--checkpoint-every",
        "3",
        "--record-indices",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, "stderr:\n" + proc.stderr[-4000:] + "\nstdout:\n" + proc.stdout[-2000:]
    assert "2 process(es) on cpu" in proc.stderr
    ck = torch.load(out / "last.pt", weights_only=True)
    ts = ck["train_state"]
    assert ts["epoch"] == 2 and ts["meta"]["world_size"] == 2 and len(ts["rng"]) == 2
    assert ts["global_step"] == 12  # 48 clips / 2 ranks / batch 4 = 6 steps per epoch
    assert not torch.equal(ts["rng"][0]["torch"], ts["rng"][1]["torch"])  # independent augmentation streams
    r0 = json.load(open(out / "indices_rank0.json"))
    r1 = json.load(open(out / "indices_rank1.json"))
    for epoch in ("0", "1"):
        assert len(r0[epoch]) == len(r1[epoch]) == 24
        assert not set(r0[epoch]) & set(r1[epoch])  # different shards
        assert set(r0[epoch]) | set(r1[epoch]) == set(range(48))
    assert r0["0"] != r0["1"]  # reshuffled per epoch
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert rows[-1]["train_clips"] == 48 and rows[-1]["val_clips"] == 15
    model = htsat.model_from_checkpoint(str(out / "last.pt"))
    assert model.config.num_classes == 4


def test_mean_average_precision_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from htsat.training import average_precision, mean_average_precision

    rng = np.random.default_rng(0)
    targets = (rng.random((60, 5)) < 0.3).astype(np.float32)
    targets[:, 4] = 0  # a class without positives is left out
    scores = np.round(rng.random((60, 5)), 1)  # many ties
    for c in range(4):
        assert average_precision(targets[:, c], scores[:, c]) == pytest.approx(
            sklearn_metrics.average_precision_score(targets[:, c], scores[:, c])
        )
    expect = sklearn_metrics.average_precision_score(targets[:, :4], scores[:, :4], average="macro")
    assert mean_average_precision(scores, targets) == pytest.approx(expect)
    assert np.isnan(mean_average_precision(scores, np.zeros_like(targets)))


@needs_audio
def test_sigterm_saves_a_checkpoint_and_resume_finishes(tones, tmp_path):
    import signal
    import time

    out = tmp_path / "term"
    env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )
    args = [
        "--manifest",
        tones["manifest"],
        "--model",
        tones["model"],
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--backend",
        "reference",
        "--no-progress",
        "--checkpoint-every",
        "1",
        "--cache-audio",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "htsat", "train", "--epochs", "1000", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM)" in stderr and "--resume" in stderr
    ts = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert ts["global_step"] >= 1
    done = train(_cfg(tones, out, val_fold=None, epochs=ts["epoch"] + 1, resume=True, checkpoint_every=1))
    assert done["epochs"] == ts["epoch"] + 1 and not done["stopped"] and done["global_step"] > ts["global_step"]


@needs_audio
def test_multi_label_bce_map_mixup_and_class_ids(tmp_path):
    """Multi-label data (tone mixtures): BCE on logits, mixup on by default, mAP as the metric; the
    manifest labels clips by AudioSet-style ids that a mid/display_name class list maps to names."""
    import soundfile as sf

    rng = np.random.default_rng(2)
    names = list(FREQS)
    mids = {n: f"/m/{i:03d}" for i, n in enumerate(names)}
    (tmp_path / "classes.csv").write_text(
        "index,mid,display_name\n" + "".join(f'{i},{mids[n]},"{n.title()} tone"\n' for i, n in enumerate(names))
    )
    rows = []
    for k in range(24):
        chosen = [n for n in names if rng.random() < 0.4] or [names[k % 4]]
        t = np.arange(SR) / SR
        x = sum(0.2 * np.sin(2 * np.pi * FREQS[n] * t + rng.uniform(0, 6)) for n in chosen).astype(np.float32)
        sf.write(str(tmp_path / f"mix{k}.wav"), x, SR)
        rows.append(f"mix{k}.wav,{';'.join(mids[n] for n in chosen)},{k % 3}")
    (tmp_path / "mix.csv").write_text("path,labels,fold\n" + "\n".join(rows) + "\n")
    messages = []
    cfg = TrainConfig(
        manifest=str(tmp_path / "mix.csv"),
        val_fold="0",
        classes=str(tmp_path / "classes.csv"),
        out=str(tmp_path / "run"),
        model=tiny_model_json(tmp_path / "tiny.json", loss_type="clip_bce"),
        epochs=2,
        batch_size=8,
        num_workers=0,
        backend="reference",
        progress=False,
        log=messages.append,
    )
    run = train(cfg)
    assert any("multi-label, loss bce, mixup on" in m for m in messages)
    last = run["history"][-1]
    assert 0.0 < last["val_mAP"] <= 1.0 and "val_accuracy" not in last and np.isfinite(last["val_loss"])
    assert run["best"]["metric"] == "val_mAP"
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["classes"] == [f"{n.title()} tone" for n in names]


# ------------------------------------------------------------------------- the CLI from TrainConfig


def test_train_cli_is_generated_from_train_config():
    import argparse
    import dataclasses

    import htsat_kernels
    from htsat.audio import DEFAULT_SILENCE_DB
    from htsat.cli import build_parser
    from htsat.training.config import config_from_args

    parser = build_parser()
    args = parser.parse_args(["train", "--manifest", "m.csv", "--out", "o"])
    cfg = config_from_args(args)
    # every default as the dataclass states it (stated once)
    defaults = TrainConfig(manifest="m.csv", out="o")
    for f in dataclasses.fields(TrainConfig):
        assert getattr(cfg, f.name) == getattr(defaults, f.name), f.name
    assert cfg.silence_db == DEFAULT_SILENCE_DB
    train_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    by_dest = {a.dest: a for a in train_parser._actions}
    assert tuple(by_dest["backend"].choices) == tuple(htsat_kernels.BACKENDS)
    for f in dataclasses.fields(TrainConfig):  # every field has a flag with its help, except the API-only log
        assert (f.name in by_dest) == (f.name != "log"), f.name
        if f.name in by_dest:
            assert by_dest[f.name].help == (f.metadata["help"] if not f.metadata.get("hidden") else "==SUPPRESS=="), f.name


def test_train_cli_flags_stay_compatible():
    from htsat.cli import build_parser
    from htsat.training.config import config_from_args

    argv = [
        "train", "--esc50", "ESC-50", "--val-manifest", "v.csv", "--classes", "c.txt", "--data-root", "r", "--clip-seconds", "5",
        "--pad", "zeros", "--crop", "center", "--on-bad-file", "stop", "--max-bad-files", "3", "--silence-db", "none",
        "--cache-audio", "--num-workers", "0", "--model", "htsat-esc50", "--set", "drop_path_rate=0.2",
        "--set", "depths=[1,1,1,1]", "--backend", "fused", "--init-checkpoint", "x.ckpt", "--init-drop-head", "yes", "--out", "o",
        "--epochs", "3",
        "--batch-size", "5", "--lr", "0.01", "--weight-decay", "0.1", "--betas", "0.8", "0.99", "--eps", "1e-6",
        "--lr-schedule", "cosine", "--warmup-epochs", "1.5", "--min-lr-ratio", "0.1", "--grad-clip", "0", "--loss", "bce",
        "--mixup", "off", "--mixup-alpha", "0.3", "--mixup-labels", "--no-specaug", "--drop-last", "--precision", "bf16",
        "--device", "cpu", "--seed", "7", "--sync-bn", "--find-unused-parameters", "--on-nan", "skip", "--checkpoint-every", "9",
        "--resume", "--stop-after-steps", "11", "--no-progress", "--record-indices",
    ]  # fmt: skip
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.manifest == "ESC-50" and cfg.silence_db is None
    assert cfg.model_overrides == {"drop_path_rate": 0.2, "depths": [1, 1, 1, 1]}
    assert cfg.betas == (0.8, 0.99) and cfg.specaugment is False and cfg.progress is False and cfg.record_indices is True
    assert (cfg.backend, cfg.init_drop_head, cfg.epochs, cfg.grad_clip, cfg.warmup_epochs) == ("fused", "yes", 3, 0.0, 1.5)
    assert (cfg.checkpoint_every, cfg.stop_after_steps, cfg.seed, cfg.on_nan, cfg.mixup_labels) == (9, 11, 7, "skip", True)
    assert config_from_args(build_parser().parse_args(["train", "--manifest", "m", "--out", "o", "--progress"])).progress is True
    cfg.validate()
    with pytest.raises(ValueError, match="pad must be one of"):
        TrainConfig(manifest="m", out="o", pad="mirror").validate()


@needs_audio
def test_no_specaugment_is_a_model_flag_not_a_replaced_method(tones, tmp_path):
    run = train(_cfg(tones, tmp_path / "noaug", epochs=0, specaugment=False))
    model = run["model"]
    assert model.use_spec_augment is False and "spec_augment" not in vars(model)
