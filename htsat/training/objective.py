"""What is optimised: the clip-level loss and mixup.

Mixup follows the original: one weight per clip drawn from Beta(alpha, alpha) (numpy's global
RNG, saved in every checkpoint), each clip mixed with the batch reversed. The model mixes the
log-mels (after SpecAugment, ``HTSAT.forward(mixup_lambda=...)``); here the same
:func:`~htsat.model.mix_with_reversed` mixes the targets when ``mixup_labels`` is on (the
original leaves them unmixed). The loss is BCE with logits on ``clipwise_logits`` (the original's
BCE on sigmoid outputs, AMP-safe) or cross-entropy for single-label models.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import mix_with_reversed

__all__ = ["Mixup", "Objective"]


class Mixup:
    def __init__(self, enabled: bool, alpha: float, mix_labels: bool):
        self.enabled, self.alpha, self.mix_labels = enabled, alpha, mix_labels

    def draw(self, batch_size: int, device: torch.device) -> Tensor | None:
        """Per-clip weights (B,) for the model, or None when mixup is off."""
        if not self.enabled:
            return None
        lam = np.random.beta(self.alpha, self.alpha, size=batch_size).astype(np.float32)
        return torch.from_numpy(lam).to(device)

    def targets(self, target: Tensor, lam: Tensor | None) -> Tensor:
        return mix_with_reversed(target, lam) if lam is not None and self.mix_labels else target


class Objective:
    def __init__(self, loss_kind: str, mixup: Mixup):
        self.loss_kind, self.mixup = loss_kind, mixup

    def loss(self, logits: Tensor, target: Tensor, lam: Tensor | None) -> Tensor:
        logits = logits.float()
        soft = self.mixup.targets(target, lam)
        if self.loss_kind == "bce":
            return F.binary_cross_entropy_with_logits(logits, soft)
        if soft is not target:  # mixed one-hot targets: cross-entropy with probabilities
            return F.cross_entropy(logits, soft)
        return F.cross_entropy(logits, target.argmax(dim=1))
