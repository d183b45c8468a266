"""Weight averaging of checkpoints (``htsat average``), the original's last step before testing:
every tensor of the model is averaged over the checkpoints (its main.py ``weight_average``; the
authors name it, with the top-20 checkpoints by mAP, as the reason for their 0.471 mAP).

Strict: every checkpoint must hold the same keys with the same shapes and dtypes, and checkpoints
of ``htsat train`` the same model config and class list; any difference is an error naming it.
Floating tensors are summed in float64 and divided once; integer tensors (BatchNorm's
``num_batches_tracked``, constant index buffers) are floor-divided, which is what loading the
original's float average into an integer buffer gives for such non-negative counts.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import Any

import torch

from .checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, atomic_save, extract_state_dict, read_checkpoint

__all__ = ["expand_checkpoint_paths", "average_state_dicts", "average_checkpoints", "write_average"]

_SUFFIXES = (".pt", ".ckpt", ".pth")


def expand_checkpoint_paths(paths: Sequence[str]) -> list[str]:
    """Files as given; a folder stands for every .pt/.ckpt/.pth file in it (sorted), as the original
    averages a folder of checkpoints (for a run of ``htsat train --keep-top K``: ``<out>/top``)."""
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(glob.escape(p), "*")) if f.endswith(_SUFFIXES))
            if not found:
                raise CheckpointError(f"{p}: folder holds no checkpoint (*.pt, *.ckpt, *.pth)")
            out += found
        else:
            out.append(p)
    if not out:
        raise CheckpointError("no checkpoints to average")
    return out


def average_state_dicts(state_dicts: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """The element-wise mean of state dicts with identical keys, shapes and dtypes."""
    if not state_dicts:
        raise CheckpointError("no checkpoints to average")
    names = list(names) if names is not None else [f"checkpoint {i + 1}" for i in range(len(state_dicts))]
    first = state_dicts[0]
    acc: dict[str, torch.Tensor] = {}
    for key, value in first.items():
        acc[key] = value.detach().to(torch.float64 if value.is_floating_point() else torch.int64, copy=True)
    for sd, name in zip(state_dicts[1:], names[1:]):
        missing, extra = sorted(set(first) - set(sd)), sorted(set(sd) - set(first))
        if missing or extra:
            raise CheckpointError(
                f"{name}: keys differ from {names[0]} (missing {missing[:5]}, extra {extra[:5]}); cannot average"
            )
        for key, value in sd.items():
            ref = first[key]
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise CheckpointError(
                    f"{name}: {key} is {tuple(value.shape)} {value.dtype}, but {tuple(ref.shape)} {ref.dtype} in {names[0]}"
                )
            acc[key] += value.detach().to(acc[key].dtype)
    n = len(state_dicts)
    out = {}
    for key, total in acc.items():
        ref = first[key]
        mean = total / n if ref.is_floating_point() else torch.div(total, n, rounding_mode="floor")
        out[key] = mean.to(ref.dtype).contiguous()
    return out


def average_checkpoints(paths: Sequence[str]) -> dict[str, Any]:
    """The averaged checkpoint: our format (config, classes) when every input is one of ours,
    else ``{"state_dict": ...}`` (keys without 'sed_model.'/'module.' prefixes), loadable by
    ``htsat predict`` / ``load_checkpoint`` either way."""
    paths = expand_checkpoint_paths(paths)
    sds, objs = [], []
    for p in paths:
        obj = read_checkpoint(p)
        sd, _ = extract_state_dict(obj)
        sds.append(sd)
        objs.append({k: obj.get(k) for k in ("format", "config", "classes")})
    ours = all(o["format"] == FORMAT for o in objs)
    if ours:
        for p, o in zip(paths[1:], objs[1:]):
            for key in ("config", "classes"):
                if o[key] != objs[0][key]:
                    raise CheckpointError(f"{p}: its {key} differs from {paths[0]}'s; cannot average")
    avg = average_state_dicts(sds, paths)
    if not ours:
        return {"state_dict": avg, "averaged_from": list(paths)}
    out: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "config": objs[0]["config"], "state_dict": avg}
    if objs[0]["classes"] is not None:
        out["classes"] = objs[0]["classes"]
    out["averaged_from"] = list(paths)
    return out


def write_average(paths: Sequence[str], out: str) -> dict[str, Any]:
    """Average ``paths`` and write the result to ``out`` atomically; returns the checkpoint."""
    obj = average_checkpoints(paths)
    atomic_save(obj, out)
    return obj


def add_parser(sub) -> None:
    """The ``htsat average`` subcommand."""
    a = sub.add_parser(
        "average",
        help="average the weights of checkpoints (the original's weight averaging of its top checkpoints)",
        description="Average every tensor over the checkpoints (strict: same keys, shapes, dtypes, model config, "
        "classes). A folder stands for all its *.pt/*.ckpt/*.pth files, e.g. <out>/top of htsat train --keep-top K.",
    )
    a.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files or folders")
    a.add_argument("-o", "--out", required=True, help="where to write the averaged checkpoint")


def run(args) -> int:
    paths = expand_checkpoint_paths(args.checkpoints)
    write_average(paths, args.out)
    print(f"averaged {len(paths)} checkpoint(s) into {args.out}")
    return 0
