"""Shared by the audio, data, training and prediction tests: optional-dependency markers, the
one-thread fixture and the fast model config."""

import importlib.util
import json

import pytest
import torch

import htsat

HAVE_AUDIO = importlib.util.find_spec("soundfile") is not None and importlib.util.find_spec("soxr") is not None
needs_audio = pytest.mark.skipif(not HAVE_AUDIO, reason="needs soundfile and soxr")

SR = 16000
FREQS = {"low": 250.0, "mid": 600.0, "high": 1400.0, "top": 3200.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CI box they lose a lot.
    Autouse in every module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model_json(path, **extra):
    """A fast model: TINY_OVERRIDES with a 64x64 image, one block per stage and 1 s clips."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in htsat.TINY_OVERRIDES.items()}
    cfg.update(preset="htsat-esc50", spec_size=64, depths=[1, 1, 1, 1], clip_seconds=1.0, long_hop_seconds=0.5)
    cfg.update(extra)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(path)
