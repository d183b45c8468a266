"""The block shapes of HTS-AT's four Swin stages: where every op is measured and sampled.

AudioSet preset, 10 s clip: a 256x256 image, patch stride 4 -> a 64x64 token map; window 8 (N = 64
tokens), head dim 24, channels doubling and the map halving at each patch merge. Stages 1-3 are
given in their shifted form (shift 4, additive (nW, N, N) mask), the more expensive of their two
block kinds; stage 4 is one window per clip and never shifted, and has no patch merge after it.
(The values are written out rather than read from ``htsat.config``: htsat_kernels does not depend on
the model package.)
"""

from __future__ import annotations

from dataclasses import dataclass

WINDOW = 8


@dataclass(frozen=True)
class Stage:
    index: int
    H: int
    W: int
    C: int
    heads: int
    shift: int
    label: str = ""
    window: int = WINDOW
    downsample: bool = True  # a patch merge follows the stage

    @property
    def nW(self) -> int:
        """Windows per clip."""
        return (self.H // self.window) * (self.W // self.window)

    @property
    def N(self) -> int:
        """Tokens per window."""
        return self.window * self.window

    @property
    def head_dim(self) -> int:
        return self.C // self.heads

    @property
    def table_rows(self) -> int:
        """Rows of the relative-position bias table, (2ws - 1)^2."""
        return (2 * self.window - 1) ** 2

    @property
    def name(self) -> str:
        return self.label or f"s{self.index}"


STAGES = (
    Stage(1, 64, 64, 96, 4, 4),
    Stage(2, 32, 32, 192, 8, 4),
    Stage(3, 16, 16, 384, 16, 4),
    Stage(4, 8, 8, 768, 32, 0, downsample=False),
)
