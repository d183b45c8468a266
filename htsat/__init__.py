"""HTS-AT: the hierarchical token-semantic audio transformer (Chen et al., ICASSP 2022).

Faithful to the original (its checkpoints load unchanged and give the same outputs), with every
hot op running through ``htsat_kernels`` (reference or fused kernels).
"""

import os

# torch's OpenMP threads spin-wait between parallel regions (libgomp's default): where the cores are shared
# with other work that waiting starves the threads doing it, and a 2-thread forward on a loaded 2-core box
# ran 2-4x slower than with passive waiting (python -m bench --cpu-runtimes). Read when torch loads, so it
# applies when htsat is imported first (the htsat command); a value already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import PRESETS, TINY_OVERRIDES, HTSATConfig, load_config
from .labels import audioset_labels
from .model import HTSAT, create_model
from .pretrained import DownloadError

__all__ = [
    "HTSAT",
    "HTSATConfig",
    "PRESETS",
    "TINY_OVERRIDES",
    "CheckpointError",
    "DownloadError",
    "audioset_labels",
    "create_model",
    "load_checkpoint",
    "load_config",
    "model_from_checkpoint",
    "save_checkpoint",
]
