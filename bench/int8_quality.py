"""How far ``--quantize int8`` moves the outputs: ``python -m bench --int8-quality``.

Audio made on this machine (no data set is reachable here): speech synthesised by espeak-ng (when
installed; several voices and sentences), tones and chords, white and pink noise, and their mixes, 10 s
each at the model's rate. Each clip goes through the fp32 model (``auto``, the torch runtime) and through
the int8 ONNX file ``htsat predict --runtime onnxruntime --quantize int8`` runs (the fp32 ONNX file too,
as a control). Reported per model: the cosine similarity of the embeddings to fp32 (``latent_output``;
``clap_embedding`` for CLAP presets), top-1 agreement and the mean top-5 overlap of the tags, and the
largest probability difference.

What the numbers mean: the weights are whatever ``create_model`` gives (random unless pretrained weights
are in the cache: none could be downloaded here), so the tags themselves mean nothing; the agreement
measures how often int8 keeps fp32's ranking, which is what matters once real weights are loaded, but
trained weights may quantize better or worse than random ones.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things from the store.",
    "Audio tagging runs on the CPU far more often than on a GPU.",
    "A dog barks in the distance while the rain falls on the roof.",
)
VOICES = ("en", "en-us", "de", "fr")


def _speech(rate: int, seconds: float) -> list[tuple[str, np.ndarray]]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return []
    import soundfile as sf
    import soxr

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (text, voice) in enumerate(zip(SENTENCES, VOICES)):
            wav = os.path.join(tmp, f"{i}.wav")
            subprocess.run([exe, "-v", voice, "-w", wav, text], check=True, capture_output=True)
            x, sr = sf.read(wav, dtype="float32")
            x = soxr.resample(x, sr, rate).astype(np.float32)
            x = np.tile(x, int(np.ceil(seconds * rate / len(x))))[: int(seconds * rate)]
            out.append((f"speech-{voice}", 0.5 * x / max(1e-6, float(np.abs(x).max()))))
    return out


def clips(rate: int, seconds: float = 10.0, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    white = rng.standard_normal(n)
    pink = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) / np.sqrt(np.maximum(np.arange(n // 2 + 1), 1)), n)
    out = [
        ("tone-440", 0.3 * np.sin(2 * np.pi * 440 * t)),
        ("chord-c-major", 0.1 * sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0))),
        ("sweep", 0.3 * np.sin(2 * np.pi * (100 * t + 400 * t**2))),
        ("beeps", 0.3 * np.sin(2 * np.pi * 1000 * t) * ((t % 1.0) < 0.2)),
        ("white-noise", 0.1 * white),
        ("pink-noise", 0.3 * pink / np.abs(pink).max()),
    ]
    speech = _speech(rate, seconds)
    out += speech
    if speech:
        out.append(("speech+noise", speech[0][1] + 0.05 * white))
    return [(name, x.astype(np.float32)) for name, x in out]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def compare(want: dict, got: dict, emb_key: str, k: int = 5) -> dict:
    pw, pg = want["clipwise_output"], got["clipwise_output"]
    top_w, top_g = np.argsort(-pw, axis=1)[:, :k], np.argsort(-pg, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_w, top_g)]
    cos = _cos(want[emb_key], got[emb_key])
    return {
        "embedding": emb_key,
        "cosine_mean": round(float(cos.mean()), 6),
        "cosine_min": round(float(cos.min()), 6),
        "top1_agreement": round(float((top_w[:, 0] == top_g[:, 0]).mean()), 4),
        "top5_overlap": round(float(np.mean(overlap)), 4),
        "max_prob_diff": float(np.abs(pw - pg).max()),
    }


def run(out: Path, *, models=("htsat-audioset", "clap-htsat-base")) -> dict:
    import torch

    import htsat
    from htsat.export import OnnxModel, cached_export

    results = {}
    for name in models:
        torch.manual_seed(0)  # the weights bench --cpu-runtimes exports: the cached files are reused
        model = htsat.create_model(name).eval()
        cfg = model.config
        data = clips(cfg.sample_rate, cfg.clip_seconds)
        x = torch.from_numpy(np.stack([w for _, w in data]))
        emb_key = "clap_embedding" if cfg.projection_dim else "latent_output"
        keys = ("clipwise_output", emb_key)
        with torch.inference_mode():
            want = {k: v.numpy() for k, v in model(x).items() if k in keys}
            rows = {}
            for label, quantize in (("onnx-fp32", None), ("onnx-int8", "int8")):
                om = OnnxModel(cached_export(model, input="mel", quantize=quantize))
                got = {k: v.numpy() for k, v in om(x).items() if k in keys}
                rows[label] = compare(want, got, emb_key)
                rows[label]["per_clip_cosine"] = dict(
                    zip([n for n, _ in data], np.round(_cos(want[emb_key], got[emb_key]), 5).tolist())
                )
        results[name] = {"clips": [n for n, _ in data], **rows}
        for label, r in rows.items():
            print(
                f"int8-quality: {name} {label}: cosine of {emb_key} mean {r['cosine_mean']:.5f} min {r['cosine_min']:.5f}, "
                f"top-1 agreement {r['top1_agreement']:.2f}, top-5 overlap {r['top5_overlap']:.2f}, "
                f"max prob diff {r['max_prob_diff']:.2e} ({len(data)} clips)"
            )
    rec = {
        "case": "int8_quality",
        "weights": "random (create_model, seed 0): tags are meaningless; agreement = int8 keeping fp32's ranking",
        "espeak_ng": shutil.which("espeak-ng") is not None,
        "results": results,
        "date": datetime.date.today().isoformat(),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"int8_quality_{rec['date']}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"results: {path}")
    return rec
