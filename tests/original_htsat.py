"""The original HTS-AT, as the test oracle for faithfulness.

The original repository is not on PyPI, but its model code ships unchanged in the ``laion-clap``
package (docs/model.md §10: Swin blocks, WindowAttention, PatchMerging, BasicLayer and the token
semantic head are byte-identical; only the input is a dict and the latent is named 'embedding').
We load that one file (laion_clap/clap_module/htsat.py) without the rest of CLAP, whose imports
(transformers, h5py, torchvision, ...) the model does not need: those are stubbed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest


def _stub(name: str, **attrs) -> None:
    if name in sys.modules:
        return
    try:
        __import__(name)
    except Exception:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod


def load_original_module():
    """The original htsat.py as a module, or pytest.skip if laion-clap / torchlibrosa are absent."""
    pytest.importorskip("torchlibrosa")
    spec = importlib.util.find_spec("laion_clap")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("laion-clap (the original HTS-AT code) is not installed")
    folder = list(spec.submodule_search_locations)[0] + "/clap_module"
    if "_orig_htsat_pkg.htsat" in sys.modules:
        return sys.modules["_orig_htsat_pkg.htsat"]
    _stub("h5py")
    _stub("torchvision")
    _stub("torchvision.ops")
    _stub("torchvision.ops.misc", FrozenBatchNorm2d=object)
    pkg = types.ModuleType("_orig_htsat_pkg")
    pkg.__path__ = [folder]
    sys.modules["_orig_htsat_pkg"] = pkg
    mod_spec = importlib.util.spec_from_file_location("_orig_htsat_pkg.htsat", folder + "/htsat.py")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules["_orig_htsat_pkg.htsat"] = module
    mod_spec.loader.exec_module(module)
    return module


def build_original(config, drop_path_rate=None):
    """The original model with the hyperparameters of one of our HTSATConfig objects."""
    module = load_original_module()
    audio_cfg = SimpleNamespace(
        sample_rate=config.sample_rate,
        window_size=config.n_fft,
        hop_size=config.hop_length,
        mel_bins=config.mel_bins,
        fmin=config.fmin,
        fmax=config.fmax,
        class_num=config.num_classes,
    )
    return module.HTSAT_Swin_Transformer(
        spec_size=config.spec_size,
        patch_size=config.patch_size,
        patch_stride=tuple(config.patch_stride),
        num_classes=config.num_classes,
        embed_dim=config.embed_dim,
        depths=list(config.depths),
        num_heads=list(config.num_heads),
        window_size=config.window_size,
        drop_path_rate=config.drop_path_rate if drop_path_rate is None else drop_path_rate,
        config=audio_cfg,
    )
