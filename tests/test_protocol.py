"""The paper's evaluation protocol (issue 15): scikit-learn metrics, checkpoint averaging, the
class-balanced sampler, the test-time roll ensemble and ``htsat evaluate``."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

skm = pytest.importorskip("sklearn.metrics")

from htsat.training.metrics import (  # noqa: E402
    average_precision,
    d_prime,
    labelled_rows,
    mean_average_precision,
    multilabel_metrics,
    singlelabel_metrics,
)

# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_multilabel_metrics_equal_sklearn_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n, c = 80, 7
    targets = (rng.random((n, c)) < 0.25).astype(np.float32)
    targets[:, 0] = 1  # one class positive everywhere: AP defined, AUC not
    targets[:, 1] = 0  # one class without positives: left out of both
    scores = np.round(rng.random((n, c)), 1)  # ties
    m = multilabel_metrics(scores, targets)
    keep = targets.sum(axis=1) > 0
    y, s = targets[keep], scores[keep]
    ap = skm.average_precision_score(y[:, [0, *range(2, c)]], s[:, [0, *range(2, c)]], average=None)
    auc = skm.roc_auc_score(y[:, 2:], s[:, 2:], average=None)
    assert m["mAP"] == pytest.approx(np.mean(ap))
    assert m["mAUC"] == pytest.approx(np.mean(auc))
    assert m["dprime"] == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(np.mean(auc)))
    assert m["clips"] == int(keep.sum()) and m["clips_without_labels"] == int((~keep).sum())
    assert m["classes_without_positives"] == 1 and m["classes_without_negatives"] == 1
    assert math.isnan(m["per_class_ap"][1]) and math.isnan(m["per_class_auc"][1]) and math.isnan(m["per_class_auc"][0])
    assert m["per_class_ap"][3] == pytest.approx(skm.average_precision_score(y[:, 3], s[:, 3]))
    # every class with positives and negatives: exactly the original's np.mean(sklearn(average=None))
    full = targets[:, 2:]
    keep2 = full.sum(axis=1) > 0
    m2 = multilabel_metrics(scores[:, 2:], full)
    assert m2["mAP"] == pytest.approx(np.mean(skm.average_precision_score(full[keep2], scores[keep2, 2:], average=None)))
    assert m2["mAUC"] == pytest.approx(np.mean(skm.roc_auc_score(full[keep2], scores[keep2, 2:], average=None)))


def test_multilabel_metrics_hand_computed():
    # class 0: positives score 0.9 and 0.4, negatives 0.8 and 0.1 -> ranking +,-,+,-
    #   AP = (1/2)*1 + (1/2)*(2/3) = 5/6; AUC = pairs (pos>neg): (0.9>0.8, 0.9>0.1, 0.4>0.1) = 3/4
    # class 1: its positive 0.7 is above every negative -> AP 1, AUC 1
    # class 2: every score tied at 0.5, 2 positives of 4 -> AP 1/2, AUC 1/2
    # the fifth clip has no label: dropped, as the original's eval set drops it
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.4, 0.7, 0.5], [0.1, 0.3, 0.5], [0.95, 0.99, 0.5]])
    targets = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 0, 1], [0, 0, 0]])
    m = multilabel_metrics(scores, targets)
    assert m["clips"] == 4 and m["clips_without_labels"] == 1
    assert m["per_class_ap"][0] == pytest.approx(5 / 6)
    assert m["per_class_auc"][0] == pytest.approx(3 / 4)
    assert m["per_class_ap"][1] == pytest.approx(1.0) and m["per_class_auc"][1] == pytest.approx(1.0)
    assert m["per_class_ap"][2] == pytest.approx(0.5) and m["per_class_auc"][2] == pytest.approx(0.5)  # all tied
    assert m["mAP"] == pytest.approx((5 / 6 + 1 + 0.5) / 3)
    assert m["mAUC"] == pytest.approx((0.75 + 1 + 0.5) / 3)
    assert m["dprime"] == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(0.75))


def test_d_prime_formula():
    assert d_prime(0.5) == 0.0
    assert d_prime(0.9) == pytest.approx(math.sqrt(2) * 1.2815515655446004)
    assert d_prime(1.0) == math.inf and math.isnan(d_prime(float("nan")))


def test_no_positive_anywhere_is_nan_and_labelled_rows():
    scores = np.random.default_rng(0).random((6, 3))
    m = multilabel_metrics(scores, np.zeros((6, 3)), drop_unlabelled=False)
    assert math.isnan(m["mAP"]) and math.isnan(m["mAUC"]) and m["classes_without_positives"] == 3
    assert labelled_rows(np.array([[0, 1], [0, 0], [1, 1]])).tolist() == [0, 2]
    assert math.isnan(average_precision(np.zeros(4), np.arange(4.0)))
    assert mean_average_precision(scores, np.eye(6, 3)) == pytest.approx(
        np.mean(skm.average_precision_score(np.eye(6, 3), scores, average=None))
    )


def test_singlelabel_metrics_equal_sklearn():
    rng = np.random.default_rng(1)
    scores = rng.random((50, 4))
    y = rng.integers(0, 4, 50)
    m = singlelabel_metrics(scores, np.eye(4)[y])
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, scores.argmax(1)))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, scores.argmax(1), labels=range(4)).tolist()
    hand = singlelabel_metrics(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1]))
    assert hand["accuracy"] == pytest.approx(2 / 3) and hand["confusion_matrix"] == [[1, 0], [1, 1]]


# ----------------------------------------------------------------------------------------------
# weight averaging and --keep-top
# ----------------------------------------------------------------------------------------------

import os  # noqa: E402

import torch  # noqa: E402
from cli_helpers import HAVE_AUDIO, _one_thread, tiny_model_json  # noqa: E402, F401 (_one_thread: autouse fixture)

import htsat  # noqa: E402
from htsat.average import average_checkpoints, average_state_dicts  # noqa: E402
from htsat.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from htsat.cli import main  # noqa: E402
from htsat.training import (  # noqa: E402
    TrainConfig,
    outputs,  # noqa: E402
    train,
)


def _tiny(tmp_path, seed):
    torch.manual_seed(seed)
    model = htsat.create_model(tiny_model_json(tmp_path / "tiny.json"), num_classes=3, backend="reference")
    with torch.no_grad():  # make the BatchNorm statistics differ too
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("num_batches_tracked"):
                buf.fill_(seed + 1)
    return model


def test_average_equals_manual_average(tmp_path, capsys):
    models = [_tiny(tmp_path, s) for s in range(3)]
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"m{i}.pt"))
        save_checkpoint(m, paths[-1], classes=["a", "b", "c"])
    out = tmp_path / "avg.pt"
    assert main(["average", *paths, "-o", str(out)]) == 0
    assert "averaged 3 checkpoint(s)" in capsys.readouterr().out
    avg = torch.load(out, weights_only=True)
    assert avg["classes"] == ["a", "b", "c"] and avg["averaged_from"] == paths
    sds = [m.state_dict() for m in models]
    assert set(avg["state_dict"]) == set(sds[0])
    for key, value in avg["state_dict"].items():
        stack = torch.stack([sd[key] for sd in sds])
        if value.is_floating_point():
            torch.testing.assert_close(value, stack.double().mean(0).to(value.dtype), rtol=0, atol=1e-7)
        else:
            assert torch.equal(value, stack.sum(0) // 3), key
    counts = [k for k in avg["state_dict"] if k.endswith("num_batches_tracked")]
    assert counts and all(int(avg["state_dict"][k]) == 2 for k in counts)  # (1 + 2 + 3) // 3
    # loadable for inference; a folder stands for its checkpoints
    model = htsat.model_from_checkpoint(str(out), backend="reference")
    assert model.config.num_classes == 3
    folder = tmp_path / "top"
    folder.mkdir()
    for i, p in enumerate(paths):
        os.link(p, folder / f"m{i}.pt")
    again = average_checkpoints([str(folder)])
    for key, value in avg["state_dict"].items():
        assert torch.equal(again["state_dict"][key], value)


def test_average_of_original_style_checkpoints(tmp_path):
    # Lightning-style files with 'sed_model.' prefixes, as the original saves them
    models = [_tiny(tmp_path, s) for s in (3, 4)]
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"orig{i}.ckpt"))
        torch.save({"state_dict": {"sed_model." + k: v for k, v in m.state_dict().items()}, "epoch": i}, paths[-1])
    avg = average_checkpoints(paths)
    assert set(avg) == {"state_dict", "averaged_from"}
    key = "tscam_conv.weight"
    torch.testing.assert_close(avg["state_dict"][key], (models[0].state_dict()[key] + models[1].state_dict()[key]) / 2)
    target = _tiny(tmp_path, 9)
    htsat.load_checkpoint(target, avg)
    torch.testing.assert_close(target.state_dict()[key], avg["state_dict"][key], rtol=0, atol=0)


def test_average_is_strict(tmp_path, capsys):
    a = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="missing"):
        average_state_dicts([a, {"w": torch.ones(2, 2)}])
    with pytest.raises(CheckpointError, match=r"w is \(2, 3\)"):
        average_state_dicts([a, {"w": torch.ones(2, 3), "b": torch.zeros(2)}])
    with pytest.raises(CheckpointError, match="float64"):
        average_state_dicts([a, {"w": torch.ones(2, 2, dtype=torch.float64), "b": torch.zeros(2)}])
    m1, m2 = _tiny(tmp_path, 0), _tiny(tmp_path, 1)
    save_checkpoint(m1, tmp_path / "a.pt", classes=["a", "b", "c"])
    save_checkpoint(m2, tmp_path / "b.pt", classes=["a", "b", "x"])
    assert main(["average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", str(tmp_path / "o.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("htsat: error: ") and "classes differs" in err and err.count("\n") == 1
    assert not (tmp_path / "o.pt").exists()
    assert main(["average", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "o.pt")]) == 1
    assert "missing.pt" in capsys.readouterr().err


needs_audio = pytest.mark.skipif(not HAVE_AUDIO, reason="needs soundfile and soxr")


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    if not HAVE_AUDIO:
        pytest.skip("needs soundfile and soxr")
    from test_train import make_tones

    folder = tmp_path_factory.mktemp("tones")
    return {
        "manifest": make_tones(str(folder), per_class=8),
        "model": tiny_model_json(folder / "tiny.json"),
        "folder": str(folder),
    }


def _cfg(tones, out, **kw):
    base = dict(
        manifest=tones["manifest"], val_fold="0", model=tones["model"], out=str(out), epochs=3, batch_size=8, num_workers=0,
        backend="reference", progress=False, cache_audio=True, log=lambda msg: None, lr_schedule="constant", lr=3e-3,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _top_files(out):
    folder = os.path.join(out, "top")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


class Killed(BaseException):
    """A simulated kill -9 (not an Exception: nothing in the run handles it)."""


def test_keep_top_keeps_the_k_best_and_survives_a_kill(tones, tmp_path):
    ref = train(_cfg(tones, tmp_path / "ref", keep_top=2, epochs=4))
    hist = ref["history"]
    best2 = sorted(hist, key=lambda r: (-r["val_accuracy"], r["epoch"]))[:2]
    want = sorted(f"epoch-{r['epoch']:03d}_val_accuracy-{r['val_accuracy']:.4f}.pt" for r in best2)
    assert _top_files(ref["out"]) == want
    for name in want:
        ck = torch.load(os.path.join(ref["out"], "top", name), weights_only=True)
        assert ck["metrics"]["epoch"] == int(name[6:9]) and ck["classes"] == ["high", "low", "mid", "top"]
    # killed right after last.pt of an epoch that entered the top list, before its file: resume rebuilds it
    seen = []

    def hook(point):
        if point == "done:last.pt":
            seen.append(point)
            if len(seen) == 2:
                raise Killed()

    outputs.fault_hook = hook
    try:
        with pytest.raises(Killed):
            train(_cfg(tones, tmp_path / "run", keep_top=2, epochs=4))
    finally:
        outputs.fault_hook = None
    resumed = train(_cfg(tones, tmp_path / "run", keep_top=2, epochs=4, resume=True))
    assert [(r["val_accuracy"], r["train_loss"]) for r in resumed["history"]] == [
        (r["val_accuracy"], r["train_loss"]) for r in hist
    ]
    assert _top_files(resumed["out"]) == want
    for name in want:
        a = torch.load(os.path.join(ref["out"], "top", name), weights_only=True)["state_dict"]
        b = torch.load(os.path.join(resumed["out"], "top", name), weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_top_needs_validation(tones, tmp_path):
    from htsat.training import TrainingError

    with pytest.raises(TrainingError, match="--keep-top needs validation"):
        train(_cfg(tones, tmp_path / "run", keep_top=2, val_fold=None, epochs=1))


# ----------------------------------------------------------------------------------------------
# the class-balanced sampler
# ----------------------------------------------------------------------------------------------

from htsat.data import Item, ResumableSampler  # noqa: E402
from htsat.training.sampling import BalancedSampler, class_members, resolve_sampler  # noqa: E402


def _skewed_items():
    counts = {"a": 400, "b": 40, "c": 8, "d": 2}
    return [Item(f"/x/{c}{i}.wav", (c,)) for c, n in counts.items() for i in range(n)], list(counts)


def test_balanced_sampler_makes_class_frequencies_uniform():
    items, classes = _skewed_items()
    members = class_members(items, classes)
    s = BalancedSampler(members, len(items), seed=3)
    draws = []
    for epoch in range(10):
        s.set_epoch(epoch)
        draws += list(s)
    assert len(draws) == 10 * len(items)
    freq = np.bincount([classes.index(items[i].labels[0]) for i in draws], minlength=4) / len(draws)
    n = len(draws)
    bound = 4 * math.sqrt(0.25 * 0.75 / n)  # 4 sigma of an i.i.d. uniform draw; the queue is tighter still
    assert np.all(np.abs(freq - 0.25) < bound), freq
    # within a class, clips are drawn uniformly: each of the 2 'd' clips about half the time
    d = [i for i in draws if items[i].labels[0] == "d"]
    assert abs(np.mean([items[i].path.endswith("d0.wav") for i in d]) - 0.5) < 4 * math.sqrt(0.25 / len(d))
    # the plain shuffle keeps the skew
    sh = ResumableSampler(len(items), seed=3)
    assert np.mean([items[i].labels[0] == "a" for i in sh]) == pytest.approx(400 / 450)
    # each epoch's queue differs (regenerated), and the same (seed, epoch) gives the same queue
    s.set_epoch(0)
    q0 = list(s)
    s.set_epoch(1)
    assert list(s) != q0
    t = BalancedSampler(members, len(items), seed=3)
    t.set_epoch(0)
    assert list(t) == q0


def test_balanced_sampler_multi_label_and_empty_classes():
    items = [Item("/x/1.wav", ("a", "b")), Item("/x/2.wav", ("a",)), Item("/x/3.wav", ()), Item("/x/4.wav", ("c",))]
    members = class_members(items, ["a", "b", "c", "e"])
    assert members == [[0, 1], [0], [3], []]
    s = BalancedSampler(members, 4000, seed=0)  # the class 'e' without clips is never drawn
    drawn = np.bincount(list(s), minlength=4)
    assert drawn[2] == 0  # a clip without labels belongs to no class
    # classes a, b, c drawn equally: clip 0 via a (half of a's draws) and via b (all of b's)
    assert drawn[3] == pytest.approx(4000 / 3, abs=2) and drawn[0] == pytest.approx(4000 / 2, rel=0.08)
    assert resolve_sampler("auto", True, ["a", "b"]) == "shuffle" and resolve_sampler("balanced", False, ["a"]) == "balanced"
    from htsat.data import read_class_list

    assert resolve_sampler("auto", True, read_class_list("audioset")) == "balanced"
    assert resolve_sampler("auto", False, read_class_list("audioset")) == "shuffle"


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_balanced_sampler_resume_mid_epoch_and_shards(replicas):
    items, classes = _skewed_items()
    members = class_members(items, classes)
    shards = []
    for rank in range(replicas):
        s = BalancedSampler(members, len(items), seed=5, num_replicas=replicas, rank=rank)
        s.set_epoch(2)
        full = list(s)
        for start in (0, 1, 17, len(full) - 1, len(full)):
            r = BalancedSampler(members, len(items), seed=5, num_replicas=replicas, rank=rank)
            r.set_epoch(2)
            r.set_start(start)
            assert list(r) == full[start:] and len(r) == len(full) - start
        shards.append(full)
    s.set_epoch(2)
    queue = s.order()
    merged = [shards[k % replicas][k // replicas] for k in range(sum(map(len, shards)))]
    assert merged[: len(queue)] == queue  # rank-strided like DistributedSampler, padding at the end


def _skewed_manifest(tones):
    import csv

    rows = list(csv.DictReader(open(tones["manifest"])))
    repeat = {"low": 6, "mid": 3, "high": 1, "top": 1}
    out = []
    for r in rows:
        if r["fold"] != "0":
            out += [f"{r['path']},{r['labels']},{r['fold']}"] * repeat[r["labels"]]
    path = os.path.join(tones["folder"], "skewed.csv")
    with open(path, "w") as f:
        f.write("path,labels,fold\n" + "\n".join(out) + "\n")
    return path, [r.split(",")[1] for r in out]


def test_train_with_balanced_sampler_resumes_exactly(tones, tmp_path):
    import json

    manifest, labels = _skewed_manifest(tones)  # 66 clips: 36 low, 18 mid, 6 high, 6 top
    kw = dict(manifest=manifest, val_fold=None, sampler="balanced", epochs=2, checkpoint_every=2, record_indices=True)
    messages = []
    full = train(_cfg(tones, tmp_path / "full", log=messages.append, **kw))
    assert "sampler: balanced (the original's class-balanced queue)" in messages
    ia = json.load(open(tmp_path / "full" / "indices_rank0.json"))
    for epoch in ("0", "1"):  # 66 draws = 16 full rounds of the 4 classes + 2: every class 16 or 17 times
        counts = {c: sum(labels[i] == c for i in ia[epoch]) for c in ("low", "mid", "high", "top")}
        assert set(counts.values()) <= {16, 17} and sum(counts.values()) == 66, counts
    killed = train(_cfg(tones, tmp_path / "killed", stop_after_steps=5, **kw))  # 9 steps/epoch; last.pt at step 4
    assert killed["stopped"]
    resumed = train(_cfg(tones, tmp_path / "killed", resume=True, **kw))
    ib = json.load(open(tmp_path / "killed" / "indices_rank0.json"))
    assert ib["0"] == ia["0"][4 * 8 :] and ib["1"] == ia["1"]
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming with the other sampler is refused: the data order would differ
    from htsat.training import TrainingError

    with pytest.raises(TrainingError, match="sampler differs"):
        train(_cfg(tones, tmp_path / "killed", resume=True, **{**kw, "sampler": "shuffle", "epochs": 3}))


# ----------------------------------------------------------------------------------------------
# test-time roll ensemble and htsat evaluate
# ----------------------------------------------------------------------------------------------

from htsat.evaluate import ensemble_scores, roll_shifts  # noqa: E402


def test_roll_ensemble_equals_mean_of_manually_rolled_passes(tmp_path):
    assert roll_shifts(10) == [0, 100, 300, 600, 1000, 1500, 2100, 2800, 3600, 4500]
    model = _tiny(tmp_path, 0).eval()
    n = int(model.config.clip_seconds * model.config.sample_rate)
    wave = torch.randn(2, n, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        manual = []
        for shift in roll_shifts(10):
            # the original's time_shifting: cat(x[:, s:], x[:, :s]), applied cumulatively
            rolled = torch.cat([wave[:, shift:], wave[:, :shift]], dim=1)
            manual.append(model(rolled)["clipwise_output"])
        want = torch.stack(manual).mean(0)
        plain = model(wave)["clipwise_output"]
    torch.testing.assert_close(ensemble_scores(model, wave, 10), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ensemble_scores(model, wave, 1), plain, rtol=0, atol=0)
    assert not torch.allclose(want, plain)  # the rolls change the output: the test can fail
    with pytest.raises(ValueError, match="rolls"):
        ensemble_scores(model, wave, 0)


def _eval_setup(tones, tmp_path):
    torch.manual_seed(1)
    model = htsat.create_model(tones["model"], num_classes=4, backend="reference")
    ck = tmp_path / "model.pt"
    save_checkpoint(model, ck, classes=["high", "low", "mid", "top"])
    return str(ck)


def test_evaluate_single_label_cli(tones, tmp_path, capsys):
    import json

    ck = _eval_setup(tones, tmp_path)
    out = tmp_path / "eval"
    argv = ["evaluate", "--manifest", tones["manifest"], "--checkpoint", ck, "--fold", "0", "-o", str(out), "--plot",
            "--save-scores", "--ensemble-rolls", "3", "--backend", "reference"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    m = json.load(open(out / "metrics.json"))
    scores, targets = np.load(out / "scores.npy"), np.load(out / "targets.npy")
    assert m["task"] == "single-label" and m["clips"] == 8 and m["ensemble_rolls"] == 3 and m["roll_shifts"] == [0, 100, 300]
    y = targets.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, scores.argmax(1)))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, scores.argmax(1), labels=range(4)).tolist()
    assert f"accuracy {m['accuracy']:.4f} over 8 clips" in printed
    rows = (out / "confusion_matrix.csv").read_text().splitlines()
    assert rows[0] == "true \\ predicted,high,low,mid,top" and len(rows) == 5
    assert (out / "per_class_ap.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_multi_label_drops_unlabelled_clips(tones, tmp_path):
    import json

    ck = _eval_setup(tones, tmp_path)
    rows = open(tones["manifest"]).read().splitlines()
    body = [r for r in rows[1:] if r.endswith(",0")]
    path0, label0, _ = body[0].split(",")
    path1, label1, _ = body[1].split(",")
    extra = [f"{path0},{label0};{label1 if label1 != label0 else 'top'},0", f"{path1},,0"]  # two labels; no label
    manifest = os.path.join(tones["folder"], "multi.csv")
    with open(manifest, "w") as f:
        f.write(rows[0] + "\n" + "\n".join(body + extra) + "\n")
    out = tmp_path / "eval"
    argv = ["evaluate", "--manifest", manifest, "--checkpoint", ck, "-o", str(out), "--save-scores", "--plot",
            "--backend", "reference"]  # fmt: skip
    assert main(argv) == 0
    m = json.load(open(out / "metrics.json"))
    assert m["task"] == "multi-label" and m["clips_without_labels"] == 1 and m["clips"] == 9
    s, t = np.load(out / "scores.npy"), np.load(out / "targets.npy")
    keep = t.sum(1) > 0
    assert m["mAP"] == pytest.approx(np.mean(skm.average_precision_score(t[keep], s[keep], average=None)))
    assert m["mAUC"] == pytest.approx(np.mean(skm.roc_auc_score(t[keep], s[keep], average=None)))
    assert m["dprime"] == pytest.approx(d_prime(m["mAUC"]))
    csv_rows = (out / "per_class.csv").read_text().splitlines()
    assert csv_rows[0] == "class,positives,ap,auc" and len(csv_rows) == 5


def test_evaluate_bad_input_is_one_line(tones, tmp_path, capsys):
    ck = _eval_setup(tones, tmp_path)
    assert main(["evaluate", "--manifest", str(tmp_path / "none.csv"), "--checkpoint", ck]) == 1
    err = capsys.readouterr().err
    assert err.startswith("htsat: error: ") and "none.csv" in err and err.count("\n") == 1
    assert main(["evaluate", "--manifest", tones["manifest"], "--checkpoint", str(tmp_path / "x.pt")]) == 1
    assert "x.pt" in capsys.readouterr().err
    assert main(["evaluate", "--manifest", tones["manifest"], "--checkpoint", ck, "--ensemble-rolls", "0"]) == 1
    assert "--ensemble-rolls" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", ck]) == 1  # neither --manifest nor --events
    assert "give --manifest (clip-level) or --events" in capsys.readouterr().err
    assert main(["evaluate", "--manifest", tones["manifest"]]) == 1
    assert "--checkpoint is required" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["single-label", "multi-label"])
def test_evaluate_refuses_a_checkpoint_that_outputs_nan(tones, tmp_path, capsys, task):
    """A NaN checkpoint gave accuracy 0.5000 (argmax of NaN) or sklearn's bare "Input contains NaN."."""
    model = htsat.create_model(tones["model"], num_classes=4, backend="reference")
    with torch.no_grad():
        model.tscam_conv.weight.fill_(float("nan"))
    ck = tmp_path / "nan.pt"
    save_checkpoint(model, ck, classes=["high", "low", "mid", "top"])
    out = tmp_path / "eval"
    argv = ["evaluate", "--manifest", tones["manifest"], "--checkpoint", str(ck), "--fold", "0", "--task", task,
            "-o", str(out), "--backend", "reference"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"htsat: error: {ck}: NaN or infinite weights in tscam_conv.weight") and err.count("\n") == 1, err
    assert not out.exists()
    ref = tmp_path / "ref.tsv"  # the event path likewise
    ref.write_text("filename\tonset\toffset\tevent_label\nx.wav\t0.0\t0.5\thigh\n")
    assert main(["evaluate", "--events", str(ref), "--checkpoint", str(ck), "-o", str(out), "--backend", "reference"]) == 1
    assert f"{ck}: NaN or infinite weights" in capsys.readouterr().err and not out.exists()


def test_evaluate_refuses_non_finite_scores_of_finite_weights(tones, tmp_path, capsys, monkeypatch):
    """Finite weights can still overflow to NaN scores: caught at the first batch, naming the checkpoint and clip."""
    from htsat import evaluate

    ck = _eval_setup(tones, tmp_path)
    monkeypatch.setattr(evaluate, "ensemble_scores", lambda model, wave, rolls: torch.full((wave.shape[0], 4), float("nan")))
    out = tmp_path / "eval"
    argv = ["evaluate", "--manifest", tones["manifest"], "--checkpoint", ck, "--fold", "0", "-o", str(out),
            "--backend", "reference"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"htsat: error: {ck}: the model outputs NaN or infinite scores (first on ") and "audio/" in err
    assert err.count("\n") == 1 and not out.exists()


def test_evaluate_events_refuses_reference_labels_the_model_does_not_have(tones, tmp_path, capsys):
    """Without --class-map a reference label that is no model class could only score F1 0: refused, as the
    clip-level path refuses unknown labels; with a map, labels that are no target of it likewise."""
    ck = _eval_setup(tones, tmp_path)
    wav = open(tones["manifest"]).read().splitlines()[1].split(",")[0]
    ref = tmp_path / "ref.tsv"
    ref.write_text(f"filename\tonset\toffset\tevent_label\n{wav}\t0.0\t0.5\tdog\n{wav}\t0.5\t0.9\thigh\n")
    out = tmp_path / "sed"
    argv = ["evaluate", "--events", str(ref), "--checkpoint", ck, "--audio-dir", tones["folder"], "-o", str(out),
            "--backend", "reference"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{ref}: 1 reference label(s) 'dog' not among the classes of the model (4); give --class-map" in err, err
    assert err.count("\n") == 1 and not out.exists()
    cmap = tmp_path / "map.csv"
    cmap.write_text("source,target\nhigh,high\n")
    assert main([*argv, "--class-map", str(cmap)]) == 1
    assert f"'dog' not among the targets of the class map {cmap}" in capsys.readouterr().err
    cmap.write_text("source,target\nhigh,high\nlow,dog\n")  # every reference label mapped: scored
    assert main([*argv, "--class-map", str(cmap)]) == 0
    assert "event-based F1" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Speech Commands V2 official split
# ----------------------------------------------------------------------------------------------


def test_speech_commands_official_split(tmp_path, capsys):
    from htsat.data import read_class_list, read_manifest
    from htsat.speech_commands import main as scv2_main

    root = tmp_path / "sc"
    for word in ("yes", "no", "up"):
        (root / word).mkdir(parents=True)
        for k in range(4):
            (root / word / f"s{k}_nohash_0.wav").write_bytes(b"")
    (root / "_background_noise_").mkdir()
    (root / "_background_noise_" / "noise.wav").write_bytes(b"")
    (root / "validation_list.txt").write_text("yes/s0_nohash_0.wav\nno/s0_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/s1_nohash_0.wav\nup/s1_nohash_0.wav\nup/s2_nohash_0.wav\n")
    assert scv2_main([str(root), "-o", str(tmp_path / "m")]) == 0
    assert "train 9 clips, valid 2 clips, test 3 clips" in capsys.readouterr().out
    train_items = read_manifest(tmp_path / "m" / "train.csv")
    test_items = read_manifest(tmp_path / "m" / "test.csv")
    rel = lambda items: sorted(os.path.relpath(it.path, root) for it in items)  # noqa: E731
    assert rel(test_items) == ["up/s1_nohash_0.wav", "up/s2_nohash_0.wav", "yes/s1_nohash_0.wav"]
    assert "yes/s0_nohash_0.wav" in rel(train_items) and not set(rel(train_items)) & set(rel(test_items))
    assert all(it.labels == (os.path.basename(os.path.dirname(it.path)),) for it in train_items)
    assert read_class_list(tmp_path / "m" / "classes.txt") == ["no", "up", "yes"]
    (root / "testing_list.txt").write_text("yes/missing.wav\n")
    assert scv2_main([str(root), "-o", str(tmp_path / "m2")]) == 1
    assert "missing.wav" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# K-fold cross-validation (ESC-50 --cv 5)
# ----------------------------------------------------------------------------------------------


def test_cv_trains_each_fold_and_writes_mean_and_std(tones, tmp_path, capsys):
    import json

    out = tmp_path / "cv"
    argv = ["train", "--manifest", tones["manifest"], "--model", tones["model"], "--out", str(out), "--cv", "2",
            "--epochs", "2", "--batch-size", "8", "--num-workers", "0", "--backend", "reference", "--no-progress",
            "--cache-audio"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.load(open(out / "cv_summary.json"))
    assert [r["fold"] for r in res["folds"]] == ["0", "1"] and res["metric"] == "val_accuracy"
    for r in res["folds"]:
        hist = [json.loads(x) for x in open(out / f"fold{r['fold']}" / "metrics.jsonl")]
        assert r["best"] == max(h["val_accuracy"] for h in hist) and r["last"] == hist[-1]["val_accuracy"]
        assert json.load(open(out / f"fold{r['fold']}" / "train_config.json"))["train"]["val_fold"] == r["fold"]
    best = [r["best"] for r in res["folds"]]
    assert res["best_mean"] == pytest.approx(np.mean(best)) and res["best_std"] == pytest.approx(np.std(best, ddof=1))
    assert f"2-fold val_accuracy: best {res['best_mean']:.4f} +- {res['best_std']:.4f}" in printed
    assert (out / "cv_summary.csv").read_text().splitlines()[0] == "fold,out,metric,best,best_epoch,last"
    # --resume keeps finished folds as they are
    assert main([*argv, "--resume"]) == 0
    assert json.load(open(out / "cv_summary.json")) == res
    assert main([*argv[:-1], "--cache-audio", "--val-fold", "1"]) == 1
    assert "--cv holds out each fold" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# sound event detection scoring
# ----------------------------------------------------------------------------------------------

from htsat import sed  # noqa: E402

REF_TSV = """filename\tonset\toffset\tevent_label
a.wav\t1.0\t2.0\tdog
a.wav\t5.0\t6.0\tdog
a.wav\t3.0\t4.0\tcat
b.wav\t0.0\t1.0\tcat
c.wav\t\t\t
"""
EST_TSV = """filename\tonset\toffset\tevent_label
a.wav\t1.1\t2.1\tdog
a.wav\t5.5\t6.0\tdog
a.wav\t3.0\t4.5\tcat
b.wav\t0.1\t0.9\tcat
c.wav\t2.0\t3.0\tdog
"""


def test_event_and_segment_f1_on_a_constructed_case(tmp_path, capsys):
    import json

    (tmp_path / "ref.tsv").write_text(REF_TSV)
    (tmp_path / "est.tsv").write_text(EST_TSV)
    ref, est = sed.read_events(str(tmp_path / "ref.tsv")), sed.read_events(str(tmp_path / "est.tsv"))
    assert ref["c.wav"] == [] and len(ref["a.wav"]) == 3
    ev = sed.event_based_metrics(ref, est)
    # dog: 1.1-2.1 hits 1-2 (collars 0.2); 5.5-6 misses 5-6 (onset 0.5 off); c's dog is a false alarm
    assert (ev["per_class"]["dog"]["tp"], ev["per_class"]["dog"]["fp"], ev["per_class"]["dog"]["fn"]) == (1, 2, 1)
    # cat: 3-4.5 misses 3-4 (offset 0.5 > max(0.2, 0.2 * 1 s)); b's 0.1-0.9 hits 0-1
    assert (ev["per_class"]["cat"]["tp"], ev["per_class"]["cat"]["fp"], ev["per_class"]["cat"]["fn"]) == (1, 1, 1)
    assert ev["per_class"]["dog"]["f1"] == pytest.approx(0.4) and ev["per_class"]["cat"]["f1"] == pytest.approx(0.5)
    assert ev["overall"]["f1"] == pytest.approx(4 / 9) and ev["macro_f1"] == pytest.approx(0.45)
    seg = sed.segment_based_metrics(ref, est)
    # 1 s segments: dog TP 2 (a:1, a:5), FP 2 (a:2, c:2); cat TP 2 (a:3, b:0), FP 1 (a:4)
    assert (seg["per_class"]["dog"]["tp"], seg["per_class"]["dog"]["fp"], seg["per_class"]["dog"]["fn"]) == (2, 2, 0)
    assert (seg["per_class"]["cat"]["tp"], seg["per_class"]["cat"]["fp"], seg["per_class"]["cat"]["fn"]) == (2, 1, 0)
    assert seg["overall"]["f1"] == pytest.approx(8 / 11) and seg["macro_f1"] == pytest.approx((4 / 6 + 4 / 5) / 2)
    # one-to-one matching: two estimates near one reference give one hit and one false alarm
    two = sed.event_based_metrics({"x": [(0.0, 1.0, "dog")]}, {"x": [(0.0, 1.0, "dog"), (0.1, 1.1, "dog")]})
    assert (two["overall"]["tp"], two["overall"]["fp"], two["overall"]["fn"]) == (1, 1, 0)
    # the CLI scores a predicted TSV
    out = tmp_path / "sed"
    assert (
        main(["evaluate", "--events", str(tmp_path / "ref.tsv"), "--predicted", str(tmp_path / "est.tsv"), "-o", str(out)]) == 0
    )
    assert "event-based F1 macro 0.4500 micro 0.4444" in capsys.readouterr().out
    m = json.load(open(out / "sed_metrics.json"))
    assert m["event_based"]["macro_f1"] == pytest.approx(0.45)
    assert (out / "sed_per_class.csv").read_text().splitlines()[0] == "label,event_f1,event_precision,event_recall,segment_f1"
    (tmp_path / "bad.tsv").write_text("filename\tonset\toffset\tevent_label\na.wav\tx\t1\tdog\n")
    assert main(["evaluate", "--events", str(tmp_path / "bad.tsv"), "--predicted", str(tmp_path / "est.tsv")]) == 1
    assert "bad.tsv:2" in capsys.readouterr().err


class _ToneDetector(torch.nn.Module):
    """A stand-in model with HTS-AT's SED interface: framewise_output (B, frames, 2) = whether the
    250 Hz / 1400 Hz tone dominates each 10 ms frame (a 1024-frame map over the 10 s clip)."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"sample_rate": 16000, "clip_seconds": 10.24})()

    def frame_seconds(self, num_samples):
        return num_samples / 16000 / 1024

    def forward(self, wave):
        frames = wave.reshape(wave.shape[0], 1024, -1)  # 160 samples = 10 ms per frame
        t = torch.arange(frames.shape[-1]) / 16000
        power = []
        for f in (250.0, 1400.0):
            c, s = torch.cos(2 * math.pi * f * t), torch.sin(2 * math.pi * f * t)
            power.append((frames * c).sum(-1) ** 2 + (frames * s).sum(-1) ** 2)
        p = torch.stack(power, -1)
        return {"framewise_output": (p / (p.sum(-1, keepdim=True) + 1e-3) * (p.sum(-1, keepdim=True) > 1.0)).float()}


@pytest.mark.skipif(not HAVE_AUDIO, reason="needs soundfile and soxr")
def test_planted_tones_evaluated_end_to_end(tmp_path):
    import soundfile as sf

    sr = 16000
    planted = {"one.wav": [(1.0, 2.5, 250.0), (3.0, 4.0, 1400.0)], "two.wav": [(0.5, 1.5, 1400.0)]}
    for name, tones_ in planted.items():
        x = np.zeros(5 * sr, np.float32)
        for on, off, f in tones_:
            n = np.arange(int(on * sr), int(off * sr))
            x[n] = 0.3 * np.sin(2 * np.pi * f * n / sr)
        if name == "one.wav":
            x[int(1.70 * sr) : int(1.73 * sr)] = 0  # a 30 ms dropout inside the low tone
        sf.write(str(tmp_path / name), x, sr)
    label = {250.0: "Beep", 1400.0: "Whistle"}
    ref = {name: [(on, off, label[f]) for on, off, f in t] for name, t in planted.items()}
    (tmp_path / "map.csv").write_text("source,target\nlow tone,Beep\nhigh tone,Whistle\n")
    class_map = sed.read_class_map(str(tmp_path / "map.csv"))
    classes = ["low tone", "high tone"]

    def score(**kw):
        est = sed.detect_events_with_model(_ToneDetector(), classes, sorted(ref), str(tmp_path), class_map=class_map, **kw)
        return est, sed.event_based_metrics(ref, est)

    est, m = score(median_filter=7)  # the filter bridges the dropout: every planted tone found
    assert m["overall"]["f1"] == 1.0 and m["macro_f1"] == 1.0, est
    assert all(abs(a[0] - b[0]) < 0.02 and abs(a[1] - b[1]) < 0.02 for n in ref for a, b in zip(sorted(ref[n]), sorted(est[n])))
    _, unfiltered = score(median_filter=1)  # the dropout splits the Beep in two: one miss, two false alarms
    assert unfiltered["per_class"]["Beep"]["tp"] == 0 and unfiltered["per_class"]["Beep"]["fp"] == 2
    assert unfiltered["per_class"]["Whistle"]["f1"] == 1.0
    _, silent = score(threshold=1.5)  # nothing reaches the threshold
    assert silent["overall"]["tp"] == 0 and silent["overall"]["fn"] == 3
    with pytest.raises(Exception, match="not classes of the model"):
        sed.map_classes(np.zeros((3, 2)), classes, {"X": ["nope"]})
