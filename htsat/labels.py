"""The 527 AudioSet class names in the model's output order (shipped in htsat/assets/)."""

from __future__ import annotations

import csv
import functools
import os

AUDIOSET_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "audioset_class_labels_indices.csv")


@functools.lru_cache(maxsize=1)
def audioset_labels() -> list[str]:
    with open(AUDIOSET_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [row["display_name"] for row in sorted(rows, key=lambda r: int(r["index"]))]
