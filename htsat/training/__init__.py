"""Training: the original recipe (docs/model.md §9) on any CSV manifest or ESC-50 folder, on one CPU,
one GPU or many GPUs through ``torchrun`` (DDP), with an output folder that survives a kill.

Defaults follow the original: AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.05 on
every parameter), the original per-epoch LR multipliers (warm-up 0.02/0.05/0.1, peak 1e-4, ...),
gradient clipping at norm 1.0, SpecAugment, mixup with Beta(0.5, 0.5) per clip and unmixed labels
for multi-label data. Departures, all on purpose: the clip-level BCE is computed with logits
(``binary_cross_entropy_with_logits`` on ``clipwise_logits``, the same loss, AMP-safe), bf16
autocast on GPUs (the front end stays in fp32 inside the model), and the original's unused
``head`` Linear is frozen (it never receives a gradient; freezing keeps DDP from waiting on it).

Nothing is lost when a run dies: ``<out>/last.pt`` is written atomically every
``checkpoint_every`` steps and at every epoch end, and holds the model, optimiser, scheduler,
epoch and position inside the epoch, the RNG states of every rank and the metric history.
``resume=True`` continues from it and reaches the same state as an uninterrupted run (bit-exact on
CPU with ``num_workers=0``; the data order and random crops are functions of (seed, epoch, index),
independent of worker processes), and first rewrites whatever a kill left behind last.pt
(best.pt, the metrics files, half-written temporaries).

Modules: ``config`` (TrainConfig, the CLI generated from it), ``setup`` (data, model, optimiser,
schedule), ``objective`` (loss, mixup), ``loop`` (train_step / run_epoch / evaluate / end_epoch),
``state`` (what last.pt holds, resume, RNG), ``outputs`` (lock, atomic writes, fault points),
``distributed``, ``schedule`` (LR), ``metrics`` (mAP, mAUC, d-prime, accuracy with scikit-learn), ``runner`` (train).
"""

from .config import TrainConfig, TrainingError
from .metrics import average_precision, d_prime, mean_average_precision, multilabel_metrics, singlelabel_metrics
from .runner import train
from .schedule import make_lr_lambda, original_lr_multiplier

__all__ = [
    "TrainConfig",
    "TrainingError",
    "train",
    "original_lr_multiplier",
    "make_lr_lambda",
    "average_precision",
    "mean_average_precision",
    "multilabel_metrics",
    "singlelabel_metrics",
    "d_prime",
]
