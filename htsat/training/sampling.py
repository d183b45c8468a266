"""The training order: a seeded shuffle (:class:`htsat.data.ResumableSampler`) or the original's
class-balanced queue for AudioSet (:class:`BalancedSampler`), chosen by ``--sampler``.

The original's queue (its ``generate_queue``): an epoch is ``total_size`` draws (the number of
training clips); they come from repeating "shuffle the class ids, then draw one random clip of
each class" until the queue is full, cut to ``total_size``; the queue is regenerated at every
epoch end. Rare classes are therefore seen as often as common ones. A multi-label clip belongs to
every class it is labelled with. Classes without a training clip are left out of the shuffle (the
original would fail on them).

Here the queue is a function of (seed, epoch) only, so every rank builds the same queue and a
resumed run skips to the very next draw exactly as with the shuffle; the queue is padded and
strided over ranks like ``DistributedSampler``.

Warm-up: the LR schedule counts epochs, so its warm-up (3 epochs in the original) lasts
3 * total_size draws whatever the sampler; the original's 3 epochs are 3 * ~2M AudioSet clips.
The authors advise scaling the warm-up to the data set (their issue #18): ``--warmup-epochs``
takes fractions (e.g. 0.5 on a small set, or more epochs when an epoch is short).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data import Item, ResumableSampler

__all__ = ["BalancedSampler", "class_members", "resolve_sampler", "is_audioset_classes"]


def class_members(items: Sequence[Item], classes: Sequence[str]) -> list[list[int]]:
    """For each class, the indices of the items labelled with it."""
    index = {c: i for i, c in enumerate(classes)}
    members: list[list[int]] = [[] for _ in classes]
    for i, it in enumerate(items):
        for lab in it.labels:
            members[index[lab]].append(i)
    return members


def is_audioset_classes(classes: Sequence[str]) -> bool:
    """True when ``classes`` is AudioSet's 527-class list in the model's order."""
    if len(classes) != 527:
        return False
    from ..data import read_class_list

    return list(classes) == read_class_list("audioset")


def resolve_sampler(choice: str, multi_label: bool, classes: Sequence[str]) -> str:
    """``auto``: balanced for multi-label data with the AudioSet classes (the original's AudioSet
    recipe), shuffle otherwise."""
    if choice != "auto":
        return choice
    return "balanced" if multi_label and is_audioset_classes(classes) else "shuffle"


class BalancedSampler(ResumableSampler):
    """The original's class-balanced queue with ResumableSampler's epoch/start/shard behaviour."""

    def __init__(
        self,
        members: Sequence[Sequence[int]],
        total_size: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        super().__init__(total_size, shuffle=True, seed=seed, num_replicas=num_replicas, rank=rank, drop_last=drop_last)
        self.members = [np.asarray(m, dtype=np.int64) for m in members]
        self.drawable = np.array([i for i, m in enumerate(self.members) if len(m)], dtype=np.int64)
        if len(self.drawable) == 0:
            raise ValueError("balanced sampler: no class has a training clip")

    def order(self) -> list[int]:
        """This epoch's queue of ``n`` clip indices (the same on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch, 0xBA1A])
        out: list[int] = []
        while len(out) < self.n:
            for c in rng.permutation(self.drawable):
                m = self.members[c]
                out.append(int(m[rng.integers(len(m))]))
        return out[: self.n]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kind": "balanced"}
