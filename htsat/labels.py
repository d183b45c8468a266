"""The 527 AudioSet class names in the model's output order (shipped in htsat/assets/)."""

from __future__ import annotations

import csv
import functools
from importlib import resources


@functools.lru_cache(maxsize=1)
def audioset_labels() -> list[str]:
    with resources.files("htsat").joinpath("assets/audioset_class_labels_indices.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [row["display_name"] for row in sorted(rows, key=lambda r: int(r["index"]))]
