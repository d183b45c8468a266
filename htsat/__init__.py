"""HTS-AT: the hierarchical token-semantic audio transformer (Chen et al., ICASSP 2022).

Faithful to the original (its checkpoints load unchanged and give the same outputs), with every
hot op running through ``htsat_kernels`` (reference or fused kernels).
"""

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
