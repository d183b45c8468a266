"""Speech Commands V2 with its official split, as manifests for ``htsat train`` / ``htsat evaluate``.

The dataset folder holds one sub-folder per word (35 in V2) plus ``_background_noise_``, and the
lists ``validation_list.txt`` and ``testing_list.txt`` (paths relative to the folder). As in the
original HTS-AT: train = every clip not in the testing list (the validation clips are trained
on), test = the testing list, which is also the validation set of its training runs. The
validation list is written too (``valid.csv``) for those who hold it out instead.

    python -m htsat.speech_commands speech_commands_v0.02 -o manifests/scv2
    # -> manifests/scv2/{train,valid,test}.csv and classes.txt (the words, sorted)
"""

from __future__ import annotations

import argparse
import os
import sys

from .data import Item, ManifestError, write_class_list

__all__ = ["read_speech_commands", "write_speech_commands_manifests", "main"]

BACKGROUND = "_background_noise_"


def _read_list(root: str, name: str) -> list[str]:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise ManifestError(f"{root}: not a Speech Commands folder (no {name})")
    with open(path, encoding="utf-8") as f:
        return [line.strip().replace("\\", "/") for line in f if line.strip()]


def read_speech_commands(root: str) -> tuple[dict[str, list[Item]], list[str]]:
    """{"train", "valid", "test"} item lists (label = the word folder) and the sorted word list."""
    root = os.fspath(root)
    valid_list, test_list = set(_read_list(root, "validation_list.txt")), set(_read_list(root, "testing_list.txt"))
    words = sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d != BACKGROUND and not d.startswith(".")
    )
    if not words:
        raise ManifestError(f"{root}: no word folders")
    splits: dict[str, list[Item]] = {"train": [], "valid": [], "test": []}
    found = set()
    for word in words:
        for name in sorted(os.listdir(os.path.join(root, word))):
            if not name.lower().endswith(".wav"):
                continue
            rel = f"{word}/{name}"
            found.add(rel)
            item = Item(os.path.join(root, word, name), (word,))
            if rel in test_list:
                splits["test"].append(item)
            else:  # the original trains on the validation clips too
                splits["train"].append(item)
                if rel in valid_list:
                    splits["valid"].append(item)
    missing = sorted((valid_list | test_list) - found)
    if missing:
        raise ManifestError(f"{root}: {len(missing)} listed clip(s) not found, e.g. {missing[0]}")
    return splits, words


def _write_manifest(items: list[Item], path: str) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        for it in items:
            w.writerow([it.path, ";".join(it.labels)])


def write_speech_commands_manifests(root: str, out: str) -> dict[str, int]:
    """Write ``out``/{train,valid,test}.csv (absolute paths) and classes.txt; returns the sizes."""
    splits, words = read_speech_commands(root)
    os.makedirs(out, exist_ok=True)
    for name, items in splits.items():
        _write_manifest(items, os.path.join(out, f"{name}.csv"))
    write_class_list(words, os.path.join(out, "classes.txt"))
    return {name: len(items) for name, items in splits.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m htsat.speech_commands", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="the Speech Commands V2 folder (word folders, validation_list.txt, testing_list.txt)")
    p.add_argument("-o", "--out", required=True, help="folder for train.csv, valid.csv, test.csv and classes.txt")
    args = p.parse_args(argv)
    try:
        sizes = write_speech_commands_manifests(args.root, args.out)
    except (ManifestError, OSError) as exc:
        print(f"htsat: error: {exc}", file=sys.stderr)
        return 1
    print(", ".join(f"{k} {v} clips" for k, v in sizes.items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
