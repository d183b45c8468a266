"""Checkpoints: the original's Lightning .ckpt files, plain state_dicts, and our own format.

Loading never drops a key silently: every key is loaded, or recognised as a derived constant and
checked against ours (front-end DFT/mel weights, ``attn_mask``, ``relative_position_index``), or
skipped because the caller asked (``drop_head=True`` for fine-tuning with another class count).
Anything else is an error that names the keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import clap
from .config import HTSATConfig, load_config
from .model import HTSAT

FORMAT = "htsat-kernels"
FORMAT_VERSION = 1
HEAD_PREFIXES = ("head.", "tscam_conv.")
_FRONTEND_KEYS = (
    "spectrogram_extractor.stft.conv_real.weight",
    "spectrogram_extractor.stft.conv_imag.weight",
    "logmel_extractor.melW",
)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the keys."""


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    derived_checked: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    source_format: str = ""
    skipped_other: list[str] = field(default_factory=list)  # a CLAP checkpoint's text branch, logit scales, ...

    def __str__(self) -> str:
        return (
            f"{self.source_format}: loaded {len(self.loaded)} tensors, checked {len(self.derived_checked)} derived "
            f"constants, skipped {len(self.skipped_head)} head tensors"
            + (f" and {len(self.skipped_other)} non-audio tensors" if self.skipped_other else "")
        )


def is_derived_key(key: str) -> bool:
    return key in _FRONTEND_KEYS or key.endswith(".attn_mask") or key.endswith(".relative_position_index")


def _source(path_or_obj) -> str:
    """How error messages name a checkpoint: its path, or "checkpoint" for an object in memory."""
    return "checkpoint" if isinstance(path_or_obj, Mapping) else os.fspath(path_or_obj)


# the first bytes of files people pass by mistake, for "this is not a checkpoint" messages
_MAGIC = (
    (b"RIFF", "a RIFF/WAV audio file"),
    (b"fLaC", "a FLAC audio file"),
    (b"OggS", "an Ogg audio file"),
    (b"ID3", "an MP3 audio file"),
    (b"\xff\xfb", "an MP3 audio file"),
    (b"{", "a JSON or text file"),
)


def _load_failure(path: str, exc: Exception) -> str:
    """Why torch.load(weights_only=True) failed, in words; never advice to unpickle the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot open it ({e.strerror or e})"
    if not head:
        return "empty file (0 bytes)"
    if not head.startswith(b"PK\x03\x04") and not head.startswith(b"\x80"):
        # neither torch.save's zip container nor a legacy pickle
        kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
        return "not a PyTorch checkpoint file" + (f" (it is {kind})" if kind else f" (unknown format, starts with {head!r})")
    text = str(exc)
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f"a pickled Python object ({found.group(1)})" if found else "Python objects other than tensors and plain data"
        return (
            f"refused: it holds {what}, which only a full unpickle could create, and unpickling a file can run "
            "arbitrary code; only weights (tensors, numbers, strings, lists, dicts) are loaded. Re-export the "
            "weights as a plain state_dict (torch.save(model.state_dict(), path)) where the file was made"
        )
    if head.startswith(b"PK\x03\x04"):
        return f"damaged or truncated checkpoint ({type(exc).__name__}: {text.splitlines()[0] if text else ''})"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


_HASHED: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256: a file loaded twice in a process is read once


def sha256_of(path: str) -> str:
    path = os.path.abspath(path)
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHED[key] = h.hexdigest()
    return _HASHED[key]


def recorded_sha256(path: str) -> str | None:
    """The sha256 written beside a file (``<file>.sha256``, ``sha256sum`` format) when it was downloaded; None without."""
    try:
        with open(path + ".sha256", encoding="ascii") as f:
            first = f.read(200).split()
    except (OSError, UnicodeDecodeError):
        return None
    return first[0].lower() if first and re.fullmatch(r"[0-9a-fA-F]{64}", first[0]) else None


def read_checkpoint(path_or_obj: str | os.PathLike | Mapping) -> Mapping:
    """A checkpoint file read with torch.load(weights_only=True) (a mapping passes through).

    Raises FileNotFoundError for a missing file and CheckpointError naming the file for a file that
    differs from the sha256 recorded beside it at download (``<file>.sha256``) and for anything
    that is not a dict of weights: another kind of file, a damaged one, a pickle of arbitrary
    objects (refused, never unpickled), or a file holding a bare tensor or a list.
    """
    if isinstance(path_or_obj, Mapping):
        return path_or_obj
    path = os.fspath(path_or_obj)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    recorded = recorded_sha256(path)
    if recorded is not None and sha256_of(path) != recorded:  # a downloaded file damaged since (htsat download)
        raise CheckpointError(
            f"{path}: damaged: its sha256 differs from the one recorded at download in {path}.sha256; delete it, or "
            "download it again (htsat download --force NAME for a named checkpoint)"
        )
    if path.endswith(".safetensors"):  # transformers' model.safetensors
        return clap.read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        why = _load_failure(path, exc)
        raise CheckpointError(f"cannot read checkpoint {path} (loaded with weights_only=True): {why}") from exc
    if not isinstance(obj, Mapping):
        shape = f" of shape {tuple(obj.shape)}" if isinstance(obj, Tensor) else ""
        raise CheckpointError(
            f"{path}: not a model checkpoint: it holds a {type(obj).__name__}{shape}, expected a dict "
            "(a state_dict, an original Lightning .ckpt or a checkpoint of htsat train)"
        )
    return obj


def extract_state_dict(obj: Mapping) -> tuple[dict[str, Tensor], str]:
    """The model tensors of any supported checkpoint, keys without 'sed_model.' / 'module.' prefixes."""
    if obj.get("format") == FORMAT:
        sd, kind = obj.get("state_dict"), "htsat-kernels checkpoint"
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{kind} without a 'state_dict' dict (found {type(sd).__name__})")
    elif isinstance(obj.get("state_dict"), Mapping):
        sd, kind = obj["state_dict"], "Lightning checkpoint"
    elif isinstance(obj.get("model"), Mapping):
        sd, kind = obj["model"], "checkpoint with a 'model' entry"
    else:
        sd, kind = obj, "plain state_dict"
    non_tensors = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if non_tensors:
        raise CheckpointError(f"{kind}: entries {non_tensors[:5]} are not tensors; is this a model state_dict?")
    unnamed = [k for k in sd if not isinstance(k, str)]
    if unnamed:
        raise CheckpointError(f"{kind}: keys {unnamed[:5]} are not strings; is this a model state_dict?")
    out = {}
    for key, value in sd.items():
        for prefix in ("sed_model.", "module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out, kind


def _derived_matches(key: str, theirs: Tensor, ours: Tensor) -> bool:
    if theirs.shape != ours.shape:
        return False
    if key.endswith("relative_position_index"):
        return torch.equal(theirs.long(), ours.cpu().long())
    return torch.allclose(theirs.float(), ours.detach().cpu().float(), rtol=1e-4, atol=1e-5)


def load_checkpoint(model: HTSAT, path_or_state_dict: str | os.PathLike | Mapping, *, drop_head: bool = False) -> LoadReport:
    """Load the original's .ckpt (keys under 'state_dict' with the 'sed_model.' prefix), a plain
    state_dict or our own format into ``model``. ``drop_head=True`` skips head.* and tscam_conv.*
    (fine-tuning with a new class count). Raises CheckpointError on any mismatch, naming the file."""
    obj = read_checkpoint(path_or_state_dict)
    try:
        return _load_into(model, obj, drop_head)
    except CheckpointError as exc:
        raise _named(exc, path_or_state_dict) from None


def _named(exc: CheckpointError, path_or_obj) -> CheckpointError:
    """The error with the checkpoint's path in front (objects in memory have no name to add)."""
    src = _source(path_or_obj)
    return exc if isinstance(path_or_obj, Mapping) or str(exc).startswith(src) else CheckpointError(f"{src}: {exc}")


def _architecture(sd: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """embed_dim, depths and num_heads of a state_dict's backbone (None when it has no patch embedding)."""
    conv = sd.get("patch_embed.proj.weight")
    if conv is None or conv.ndim != 4:
        return None
    blocks: dict[int, set[int]] = {}
    heads: dict[int, int] = {}
    for key, value in sd.items():
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            if key.endswith("attn.relative_position_bias_table") and value.ndim == 2:
                heads[int(m.group(1))] = int(value.shape[1])
    stages = range(max(blocks) + 1) if blocks else range(0)
    return {
        "embed_dim": int(conv.shape[0]),
        "depths": tuple(len(blocks.get(i, ())) for i in stages),
        "num_heads": tuple(heads.get(i, 0) for i in stages),
    }


def _size_mismatch(model: HTSAT, sd: Mapping[str, Tensor]) -> str | None:
    """The checkpoint's backbone is of another size than the model's: say so first (every shape then differs,
    the head's included), with the presets of the checkpoint's size."""
    theirs = _architecture(sd)
    if theirs is None:
        return None
    cfg = model.config
    ours = {"embed_dim": cfg.embed_dim, "depths": tuple(cfg.depths), "num_heads": tuple(cfg.num_heads)}
    if theirs == ours:
        return None
    from .config import PRESETS

    default = HTSATConfig()
    fits = [n for n, p in PRESETS.items()
            if {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k in theirs for v in [p.get(k, getattr(default, k))]}
            == theirs]  # fmt: skip
    desc = ", ".join(f"{k} {v}" for k, v in theirs.items())
    ours_desc = ", ".join(f"{k} {v}" for k, v in ours.items())
    how = (
        f"build the model with the preset of its size ({' or '.join(fits)}: --model NAME on the command line, "
        "create_model(NAME) in Python)"
        if fits
        else "build the model with the checkpoint's size (--model CONFIG.json on the command line, create_model(..., "
        "embed_dim=..., depths=..., num_heads=...) in Python)"
    )
    return f"the checkpoint is a model of another size ({desc}) than {cfg.name} ({ours_desc}); {how}"


def _load_into(model: HTSAT, obj: Mapping, drop_head: bool) -> LoadReport:
    # a CLAP checkpoint resizes the model's audio_projection before the checks: a failed load puts it back
    projection, config = model.audio_projection, model.config
    try:
        return _checked_load(model, obj, drop_head)
    except BaseException:
        model.audio_projection, model.config = projection, config
        raise


def _checked_load(model: HTSAT, obj: Mapping, drop_head: bool) -> LoadReport:
    sd, kind = extract_state_dict(obj)
    sd, kind, skipped_other, has_head = clap.convert_checkpoint(model, sd, kind)  # CLAP layouts -> ours
    drop_head = drop_head or not has_head  # transformers' CLAP has no classification head
    ours = model.state_dict()
    report = LoadReport(source_format=kind, skipped_other=skipped_other)
    to_load: dict[str, Tensor] = {}
    unexpected, bad_shape, bad_derived = [], [], []
    class_mismatch: str | None = None
    for key, value in sd.items():
        if drop_head and key.startswith(HEAD_PREFIXES):
            report.skipped_head.append(key)
        elif key not in ours:
            unexpected.append(key)
        elif is_derived_key(key):
            if not _derived_matches(key, value, ours[key]):
                bad_derived.append(f"{key} (checkpoint {tuple(value.shape)}, ours {tuple(ours[key].shape)})")
            report.derived_checked.append(key)
        elif value.shape != ours[key].shape:
            if key.startswith(HEAD_PREFIXES) and value.shape[1:] == ours[key].shape[1:] and class_mismatch is None:
                class_mismatch = (
                    f"the checkpoint has {value.shape[0]} classes ({key} {tuple(value.shape)}) but the model has "
                    f"{model.config.num_classes}; to fine-tune with a new class count pass drop_head=True "
                    "(skips head.* and tscam_conv.*, which keep their fresh initialisation)"
                )
            else:
                bad_shape.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(ours[key].shape)}")
        else:
            to_load[key] = value
    missing = [k for k in ours if k not in sd and not is_derived_key(k) and not (drop_head and k.startswith(HEAD_PREFIXES))]
    problems = []
    size = _size_mismatch(model, sd)
    if size:
        problems.append(size)
    if class_mismatch:
        problems.append(class_mismatch)
    if bad_derived:
        hint = ""
        if any(k.startswith("logmel_extractor.melW") for k in bad_derived) and model.config.sample_rate == 16000:
            hint = " (an original SCV2 checkpoint keeps fmax 14000 at 16 kHz: create the model with cap_fmax=False)"
        problems.append(
            "derived constants differ from this model's (e.g. another sample rate, n_fft, mel or window "
            f"setting): {bad_derived}{hint}"
        )
    if bad_shape:
        more = f" ... ({len(bad_shape) - 10} more)" if len(bad_shape) > 10 else ""
        problems.append(f"shape mismatches: {bad_shape[:10]}{more}")
    if unexpected:
        problems.append(f"keys the model does not have: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if missing:
        problems.append(f"keys missing from the checkpoint: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if problems:
        raise CheckpointError(f"cannot load {kind} into {model.config.name}: " + "; ".join(problems))
    with torch.no_grad():
        for key, value in to_load.items():
            ours[key].copy_(value)
    report.loaded = sorted(to_load)
    return report


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: a kill never leaves half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(model: HTSAT, path: str | os.PathLike, **extra: Any) -> None:
    """Our format: {"format", "version", "config", "state_dict", **extra}, written atomically."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    obj = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(), "state_dict": model.state_dict()}
    obj.update(extra)
    atomic_save(obj, path)


def _config_value_problem(key: str, value: Any) -> str | None:
    """Why a saved config value has the wrong type for its field (checked before the dataclass
    sees it, whose own checks would fail with an unrelated TypeError); None when it fits."""
    fields = {f.name: f for f in dataclasses.fields(HTSATConfig)}
    if key not in fields:
        return None  # from_dict names unknown fields
    default = fields[key].default
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ok = ok or (key == "patch_stride" and isinstance(value, int) and not isinstance(value, bool))
    else:
        return None
    if ok:
        return None
    want = {bool: "true/false", int: "an integer", float: "a number", str: "a string", tuple: "a list of integers"}[type(default)]
    return f"{key} = {value!r} ({type(value).__name__}), expected {want}"


def saved_config(obj: Mapping) -> HTSATConfig:
    """The model config stored in one of our checkpoints; CheckpointError when absent or invalid."""
    if "config" not in obj:
        raise CheckpointError("htsat-kernels checkpoint without a 'config' entry (the model's settings)")
    if not isinstance(obj["config"], Mapping):
        raise CheckpointError(f"htsat-kernels checkpoint whose 'config' is a {type(obj['config']).__name__}, not a dict")
    for key, value in obj["config"].items():
        problem = _config_value_problem(key, value)
        if problem:
            raise CheckpointError(f"invalid model config in the checkpoint: {problem}")
    try:
        return HTSATConfig.from_dict(dict(obj["config"]))
    except Exception as exc:  # a bad value fails in whatever way the dataclass's checks trip over it
        raise CheckpointError(f"invalid model config in the checkpoint ({type(exc).__name__}: {exc})") from exc


def model_from_checkpoint(
    path_or_obj: str | os.PathLike | Mapping,
    *,
    name: str | None = None,
    backend: str = "auto",
    source: str | None = None,
    overrides: Mapping | None = None,
) -> HTSAT:
    """Build and load a model: from the saved config of our format, or from a preset (``name``,
    default htsat-audioset) for original checkpoints, with the class count read from tscam_conv
    (``overrides``: config fields the checkpoint needs, e.g. a registry entry's). ``source`` names an
    already read checkpoint in error messages (a path is named anyway)."""
    obj = read_checkpoint(path_or_obj)
    try:
        if obj.get("format") == FORMAT and name is None:
            config = saved_config(obj)
        else:
            sd, _ = extract_state_dict(obj)
            w = sd.get("tscam_conv.weight", sd.get("audio_branch.tscam_conv.weight"))
            name = name or clap.preset_for(sd)  # a laion-clap / transformers CLAP checkpoint: its clap-htsat-* size
            config = load_config(
                name or "htsat-audioset",
                **{**dict(overrides or {}), "num_classes": None if w is None or w.ndim == 0 else int(w.shape[0])},
            )
        model = HTSAT(config, backend=backend)
        _load_into(model, obj, drop_head=False)
    except CheckpointError as exc:
        raise _named(exc, source if source is not None else path_or_obj) from None
    return model.eval()
