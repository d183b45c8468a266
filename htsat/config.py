"""Every hyperparameter of HTS-AT in one dataclass, with the presets users start from.

Field names follow the spec (docs/model.md §2). A model is created from a preset name or from a JSON
file holding any subset of these fields (the rest take the AudioSet defaults).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from htsat_kernels.recompute import DEFAULT_SAVE_POLICY, SAVE_POLICIES


@dataclass
class HTSATConfig:
    # front end (docs/model.md §2)
    sample_rate: int = 32000
    n_fft: int = 1024
    hop_length: int = 320
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 14000.0
    # image and Swin backbone
    spec_size: int = 256
    patch_size: int = 4
    patch_stride: tuple = (4, 4)
    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    # head
    num_classes: int = 527
    # "clip_bce": multi-label, clipwise_output = sigmoid(mean logits);
    # "clip_ce": single-label, clipwise_output = mean logits (the original's switch).
    loss_type: str = "clip_bce"
    # the original crashes with patch_norm=False or use_checkpoint=True; both work here
    patch_norm: bool = True
    use_checkpoint: bool = False
    # what a training forward keeps for backward (docs/design.md §7.5): "all" (as eager PyTorch),
    # "recompute-norms" (LayerNorm outputs feeding a Linear, the reference attention's probabilities),
    # "recompute-norms-mlp" (also GELU's output). Values and gradients are the same; no state-dict keys.
    save_policy: str = DEFAULT_SAVE_POLICY
    # long audio: clips longer than one image are cut into windows of clip_seconds every long_hop_seconds
    # fmax above Nyquist is capped (with a warning). The original SCV2 model kept fmax 14000 at
    # 16 kHz (9 empty mel filters): cap_fmax=False reproduces that filterbank, to load its checkpoints.
    cap_fmax: bool = True
    clip_seconds: float = 10.0
    long_hop_seconds: float = 5.0
    # CLAP (htsat/clap.py): "repeatpad" tiles clips shorter than clip_seconds and zero-pads them to it and
    # runs longer ones as sliding windows (laion-clap's rule; "stretch": one image up to max_frames);
    # projection_dim > 0 adds audio_projection and the clap_embedding output.
    clip_fill: str = "stretch"
    projection_dim: int = 0
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.patch_stride = tuple(int(s) for s in _pair(self.patch_stride))
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        nyquist = self.sample_rate / 2
        if self.fmax > nyquist and not self.cap_fmax:
            warnings.warn(
                f"{self.name}: fmax {self.fmax:g} Hz exceeds the Nyquist frequency {nyquist:g} Hz; kept as asked "
                "(cap_fmax=False, the original's filterbank): the mel filters above Nyquist are empty",
                stacklevel=3,
            )
        elif self.fmax > nyquist:
            warnings.warn(
                f"{self.name}: fmax {self.fmax:g} Hz exceeds the Nyquist frequency {nyquist:g} Hz of "
                f"{self.sample_rate} Hz audio (the original leaves empty mel filters); capping fmax to {nyquist:g} Hz",
                stacklevel=3,
            )
            self.fmax = float(nyquist)
        self.validate()

    # derived sizes ---------------------------------------------------------------------------
    @property
    def freq_ratio(self) -> int:
        """How many time chunks are stacked vertically into the square image (4 for HTS-AT)."""
        return self.spec_size // self.mel_bins

    @property
    def max_frames(self) -> int:
        """STFT frames that fit one image (1024); longer input runs as sliding windows."""
        return self.spec_size * self.freq_ratio

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid HTS-AT config {self.name!r}: {msg}")

        need(self.loss_type in ("clip_bce", "clip_ce"), f"loss_type must be 'clip_bce' or 'clip_ce', got {self.loss_type!r}")
        need(len(self.depths) == len(self.num_heads), "depths and num_heads need one entry per stage")
        need(self.num_classes >= 1, "num_classes must be at least 1")
        need(self.spec_size % self.mel_bins == 0 and self.freq_ratio >= 1, "spec_size must be a multiple of mel_bins")
        for i, h in enumerate(self.num_heads):
            need((self.embed_dim * 2**i) % h == 0, f"stage {i} width {self.embed_dim * 2**i} is not divisible by {h} heads")
        grid = self.spec_size // self.patch_stride[0] // 2 ** (len(self.depths) - 1)
        need(grid >= 1, "spec_size too small for the number of stages")
        need(grid // self.freq_ratio >= 1, "final token grid has fewer rows than freq_ratio; raise mel_bins or spec_size")
        need(self.n_fft >= 2 and self.hop_length >= 1, "n_fft and hop_length must be positive")
        need(0 <= self.fmin < self.fmax, "need 0 <= fmin < fmax")
        clip_frames = 1 + int(round(self.clip_seconds * self.sample_rate)) // self.hop_length
        need(
            clip_frames <= self.max_frames,
            f"clip_seconds {self.clip_seconds} gives {clip_frames} frames, more than the {self.max_frames} one image holds",
        )
        need(0 < self.long_hop_seconds <= self.clip_seconds, "long_hop_seconds must be in (0, clip_seconds]")
        need(self.clip_fill in ("stretch", "repeatpad"), f"clip_fill must be 'stretch' or 'repeatpad', got {self.clip_fill!r}")
        need(self.save_policy in SAVE_POLICIES, f"save_policy must be one of {SAVE_POLICIES}, got {self.save_policy!r}")
        need(self.projection_dim >= 0, "projection_dim must be >= 0 (0: no CLAP projection)")

    # (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HTSATConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown HTS-AT config fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides: Any) -> HTSATConfig:
        return self.from_dict({**self.to_dict(), **overrides})


def _clap_presets() -> dict[str, dict[str, Any]]:
    from .clap import CLAP_PRESETS  # clap-htsat-tiny / -base / -large

    return CLAP_PRESETS


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


PRESETS: dict[str, dict[str, Any]] = {
    "htsat-audioset": dict(name="htsat-audioset"),
    "htsat-esc50": dict(name="htsat-esc50", num_classes=50, loss_type="clip_ce"),
    "htsat-scv2": dict(name="htsat-scv2", num_classes=35, sample_rate=16000, hop_length=160),
}
PRESETS.update(_clap_presets())

# A small model with every structural feature (4 stages, shifted windows, patch merges, the
# token-semantic head) for fast CPU tests and examples: 16 kHz, 32 mel bins, 128x128 image.
TINY_OVERRIDES: dict[str, Any] = dict(
    sample_rate=16000,
    n_fft=512,
    hop_length=160,
    mel_bins=32,
    fmax=8000.0,
    spec_size=128,
    embed_dim=24,
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 4, 8),
    clip_seconds=5.0,
    long_hop_seconds=2.5,
)


def load_config(name_or_path: str = "htsat-audioset", **overrides: Any) -> HTSATConfig:
    """A preset name, or a JSON file of config fields (optionally with a "preset" key to start from)."""
    if name_or_path in PRESETS:
        base = dict(PRESETS[name_or_path])
    elif str(name_or_path).endswith(".json") or os.path.isfile(str(name_or_path)):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"model config file not found: {name_or_path}")
        with open(name_or_path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name_or_path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{name_or_path} must hold a JSON object of config fields")
        preset = data.pop("preset", None)
        if preset and preset not in PRESETS:
            raise ValueError(f"{name_or_path}: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        base = dict(PRESETS[preset]) if preset else {}
        base.update(data)
        base.setdefault("name", os.path.splitext(os.path.basename(name_or_path))[0])
    else:
        raise ValueError(f"unknown model {name_or_path!r}: choose a preset {sorted(PRESETS)} or a .json config file")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return HTSATConfig.from_dict(base)
