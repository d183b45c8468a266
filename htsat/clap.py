"""CLAP audio encoders in our model: laion-clap's and transformers' checkpoints, the joint embedding.

laion-clap (LAION's CLAP) uses HTS-AT as its audio branch at 48 kHz (presets ``clap-htsat-tiny``,
``-base``, ``-large``) followed by ``audio_projection`` (Linear, ReLU, Linear) to the joint space.
Its embedding of a clip (``CLAP_Module.get_audio_embedding_from_data``) is the L2-normalised
projection of the HTS-AT latent; clips shorter than 10 s are tiled and zero-padded to 10 s
(``repeatpad``), 10 s clips run as they are, longer ones are cropped at random. Ours is
deterministic there: sliding windows of 10 s every ``long_hop_seconds`` (the last one ending at the
clip's end), the projections averaged over the windows before the normalisation.

Checkpoints (converted on load by ``htsat.load_checkpoint``):

- laion-clap, as distributed: ``{"state_dict": ...}``, keys with or without ``module.``;
  ``audio_branch.*`` is our model, ``audio_projection.*`` its projection (size read from the
  checkpoint); the text branch, logit scales and the ``audio_transform`` / ``text_transform`` MLPs
  (training only) are skipped and counted. Fusion checkpoints (``enable_fusion=True``) are refused.
- transformers (``ClapModel``, ``ClapAudioModel``, ``ClapAudioModelWithProjection``; a state_dict or a
  ``model.safetensors`` file): renamed, separate q / k / v Linears concatenated into our qkv. It has
  no classification head (``tscam_conv``, ``head``): those keep their initialisation (reported).

transformers' front end is its feature extractor (numpy, outside the model), not part of the
checkpoint: compare from its log-mel features with ``clap_embedding_from_features``.
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# HTS-AT sizes of laion-clap's create_htsat_model; audio_cfg: 48 kHz, n_fft 1024, hop 480, 64 mel, 50-14000 Hz
CLAP_PRESETS = {
    f"clap-htsat-{size}": dict(
        name=f"clap-htsat-{size}",
        sample_rate=48000,
        n_fft=1024,
        hop_length=480,
        mel_bins=64,
        fmin=50.0,
        fmax=14000.0,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=(4, 8, 16, 32),
        num_classes=527,
        clip_seconds=10.0,
        clip_fill="repeatpad",
        projection_dim=512,
    )
    for size, embed_dim, depths in (("tiny", 96, (2, 2, 6, 2)), ("base", 128, (2, 2, 12, 2)), ("large", 256, (2, 2, 12, 2)))
}

_FUSION = re.compile(r"(^|\.)(fusion_model|mel_conv2d|mel_conv1d)\.")


def audio_projection(in_features: int, dim: int) -> nn.Sequential:
    """laion-clap's audio_projection: Linear(in, dim), ReLU, Linear(dim, dim) (state_dict keys 0.*, 2.*)."""
    return nn.Sequential(nn.Linear(in_features, dim), nn.ReLU(), nn.Linear(dim, dim))


def repeat_pad(waveform: Tensor, length: int) -> Tensor:
    """laion-clap's ``repeatpad``: (B, S) with S < length -> whole repeats of the clip, then zeros, to length."""
    S = waveform.shape[1]
    if S >= length:
        return waveform
    return F.pad(waveform.repeat(1, length // S), (0, length - (length // S) * S))


# -------------------------------------------------------------------------------------------------
# checkpoint conversion
# -------------------------------------------------------------------------------------------------


def is_laion_layout(sd: dict) -> bool:
    return any(k.startswith("audio_branch.") for k in sd)


def is_transformers_layout(sd: dict) -> bool:
    return any(".audio_encoder.layers." in "." + k for k in sd)


_HF_RENAMES = (
    (re.compile(r"^batch_norm\."), "bn0."),
    (re.compile(r"\.layernorm_before\."), ".norm1."),
    (re.compile(r"\.layernorm_after\."), ".norm2."),
    (re.compile(r"\.attention\.self\.relative_position_bias_table$"), ".attn.relative_position_bias_table"),
    (re.compile(r"\.attention\.self\.relative_position_index$"), ".attn.relative_position_index"),
    (re.compile(r"\.attention\.output\.dense\."), ".attn.proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"\.output\.dense\."), ".mlp.fc2."),
    (re.compile(r"^audio_projection\.linear1\."), "audio_projection.0."),
    (re.compile(r"^audio_projection\.linear2\."), "audio_projection.2."),
)
_HF_QKV = re.compile(r"^(.*)\.attention\.self\.(query|key|value)\.(weight|bias)$")


def _convert_transformers(sd: dict) -> tuple[dict, list[str]]:
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if "audio_encoder." in key:
            key = key.split("audio_encoder.", 1)[1]
        elif not key.startswith("audio_projection."):
            skipped.append(key)  # ClapModel's text model, text projection, logit scales
            continue
        m = _HF_QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in _HF_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            out[f"{prefix}.attention.self.{kind}"] = next(iter(parts.values()))  # reported as unexpected
            continue
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out, skipped


def _convert_laion(sd: dict) -> tuple[dict, list[str]]:
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in sd.items():
        if key.startswith("audio_branch."):
            out[key[len("audio_branch.") :]] = value
        elif key.startswith("audio_projection."):
            out[key] = value
        else:
            skipped.append(key)  # text branch, logit scales, audio/text transforms (training only)
    return out, skipped


def convert_checkpoint(model: nn.Module, sd: dict, kind: str) -> tuple[dict, str, list[str], bool]:
    """laion-clap / transformers CLAP state_dicts -> our keys; other layouts pass through.

    Returns (state_dict, kind, skipped keys, has_head). Sizes the model's ``audio_projection`` from
    the checkpoint's. Raises CheckpointError for fusion checkpoints.
    """
    if is_laion_layout(sd):
        sd, skipped = _convert_laion(sd)
        kind = f"laion-clap {kind}"
        has_head = True
    elif is_transformers_layout(sd):
        sd, skipped = _convert_transformers(sd)
        kind = f"transformers CLAP {kind}"
        has_head = False
    else:
        return sd, kind, [], True
    fusion = sorted(k for k in sd if _FUSION.search(k))
    if fusion:
        from .checkpoint import CheckpointError

        raise CheckpointError(
            f"{kind}: a feature-fusion CLAP checkpoint (enable_fusion=True) is not supported; its fusion keys: "
            f"{fusion[:6]}{' ...' if len(fusion) > 6 else ''}. Use a non-fusion checkpoint"
        )
    _size_projection(model, sd)
    return sd, kind, skipped, has_head


def _size_projection(model: nn.Module, sd: dict) -> None:
    """Give the model an audio_projection of the checkpoint's size (read, never guessed); none if it has none."""
    w0, w2 = sd.get("audio_projection.0.weight"), sd.get("audio_projection.2.weight")
    current = getattr(model, "audio_projection", None)
    if w0 is None or w2 is None:
        return  # a checkpoint without projection: the model keeps its own, reported as missing keys
    dim, in_features = int(w0.shape[0]), int(w0.shape[1])
    if current is not None and tuple(current[0].weight.shape) == (dim, in_features):
        return
    ref = next(model.parameters())
    model.audio_projection = audio_projection(in_features, dim).to(device=ref.device, dtype=ref.dtype)
    model.config = model.config.replace(projection_dim=dim)


def read_safetensors(path: str) -> dict:
    """A .safetensors file's tensors; CheckpointError (one line naming the file) when it cannot be read."""
    from .checkpoint import CheckpointError

    path = os.fspath(path)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"cannot read checkpoint {path}: .safetensors files need the safetensors package (pip install safetensors, "
            "or pip install htsat-kernels[hub])"
        ) from None
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # SafetensorError for a bad header, OSError, ... depending on the damage
        text = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read checkpoint {path} (safetensors): {type(exc).__name__}: {text}") from exc


def preset_for(sd: dict) -> str | None:
    """The clap-htsat-* preset of a laion-clap / transformers state_dict (from its widths and depths), or None."""
    if not (is_laion_layout(sd) or is_transformers_layout(sd)):
        return None
    conv = next((v for k, v in sd.items() if k.endswith("patch_embed.proj.weight")), None)
    if conv is None:
        return None
    width = int(conv.shape[0])
    stage3_blocks = 12 if any(re.search(r"layers\.2\.blocks\.11\.", k) for k in sd) else 6
    return {(96, 6): "clap-htsat-tiny", (128, 12): "clap-htsat-base", (256, 12): "clap-htsat-large"}.get((width, stage3_blocks))


# -------------------------------------------------------------------------------------------------
# transformers' features
# -------------------------------------------------------------------------------------------------


def clap_embedding_from_features(model: nn.Module, input_features: Tensor) -> dict[str, Tensor]:
    """Our model from transformers ``ClapFeatureExtractor`` features (B, 1, frames, mel_bins), before bn0.

    transformers computes its log-mel in numpy (its own STFT and mel filterbank, dB scale) outside the
    model; ours is a torchlibrosa-equivalent front end inside it, so equal outputs need equal features:
    this runs bn0, the folding, the backbone and the projection on the given features.
    Returns latent_output (= transformers' pooler_output), clap_projection (= audio_embeds of
    ClapAudioModelWithProjection) and clap_embedding (normalised, = ClapModel.get_audio_features).
    """
    if input_features.ndim != 4 or input_features.shape[1] != 1:
        raise ValueError(f"input_features must have shape (batch, 1, frames, mel_bins), got {tuple(input_features.shape)}")
    if model.audio_projection is None:
        raise ValueError(f"{model.config.name} has no audio_projection (projection_dim=0): load a CLAP checkpoint first")
    x = model.bn0(input_features.transpose(1, 3)).transpose(1, 3)
    latent = model.forward_features(model.reshape_wav2img(x))["latent_output"]
    proj = model.audio_projection(latent)
    return {"latent_output": latent, "clap_projection": proj, "clap_embedding": F.normalize(proj, dim=-1)}
