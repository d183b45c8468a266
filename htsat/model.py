"""HTS-AT: front end, time-frequency folding, Swin backbone and token-semantic head (docs/model.md §3-6).

Input of any length: clips that fit one image (at most max_frames = 1024 STFT frames, i.e. fewer
than max_frames * hop_length samples: shorter than 10.24 s for the AudioSet preset) follow the
original, bicubically stretched to 1024 frames. From max_frames + 1 frames on (exactly 10.24 s
gives 1 + 327680 // 320 = 1025), where the original switches to its own two-crop long-audio path,
clips run as sliding windows of ``clip_seconds`` every ``long_hop_seconds``; clipwise outputs are
averaged over the windows and framewise outputs are laid on the real time axis of the whole clip.

Samples are expected in [-1, 1]. As in the original, finite samples of enormous amplitude (from
roughly 1e17) overflow the float32 power spectrum and every output is NaN. Audio files beyond
``htsat.audio.MAX_PEAK`` (1e15) are rejected when loaded, and ``htsat predict`` reports any
non-finite output as an error for that file.

Frame rate of ``framewise_output``: a clip that fits one image gives ``max_frames`` (1024) frames
spread evenly over its real duration (one frame = duration / 1024). A long clip gives frames of
``clip_seconds / max_frames`` seconds each (10 / 1024 s = 9.77 ms for the AudioSet preset), covering
the whole clip; ``HTSAT.frame_seconds(num_samples)`` returns the frame duration for an input length.
The underlying time resolution of the token-semantic map is 32x coarser (0.3125 s per step at 10 s).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import htsat_kernels

from .clap import audio_projection, repeat_pad
from .config import HTSATConfig
from .frontend import FrontEnd, LogMel, Spectrogram
from .layers import BasicLayer, PatchEmbed


class HTSAT(nn.Module):
    def __init__(self, config: HTSATConfig, backend: str = "auto"):
        super().__init__()
        self.config = cfg = config
        self.check_inputs = True  # reject NaN/inf samples (one device sync per forward; skipped under compile)
        self.use_spec_augment = True  # SpecAugment in training mode (htsat train --no-specaug turns it off)
        self.spectrogram_extractor = Spectrogram(cfg.n_fft, cfg.hop_length)
        self.logmel_extractor = LogMel(cfg.sample_rate, cfg.n_fft, cfg.mel_bins, cfg.fmin, cfg.fmax)
        self.bn0 = nn.BatchNorm2d(cfg.mel_bins)
        self.patch_embed = PatchEmbed(cfg.spec_size, cfg.patch_size, cfg.patch_stride, 1, cfg.embed_dim, cfg.patch_norm)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        grid = self.patch_embed.grid_size
        drop_path = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        num_stages = len(cfg.depths)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            start = sum(cfg.depths[:i])
            self.layers.append(
                BasicLayer(
                    dim=cfg.embed_dim * 2**i,
                    input_resolution=(grid[0] // 2**i, grid[1] // 2**i),
                    depth=depth,
                    num_heads=cfg.num_heads[i],
                    window_size=cfg.window_size,
                    mlp_ratio=cfg.mlp_ratio,
                    drop=cfg.drop_rate,
                    attn_drop=cfg.attn_drop_rate,
                    drop_path=drop_path[start : start + depth],
                    downsample=i < num_stages - 1,
                    use_checkpoint=cfg.use_checkpoint,
                    save_policy=cfg.save_policy,
                )
            )
        self.norm = nn.LayerNorm(cfg.num_features)
        sf = cfg.spec_size // 2 ** (num_stages - 1) // cfg.patch_stride[0] // cfg.freq_ratio
        self.tscam_conv = nn.Conv2d(cfg.num_features, cfg.num_classes, kernel_size=(sf, 3), padding=(0, 1))
        self.head = nn.Linear(cfg.num_classes, cfg.num_classes)  # unused in forward; kept for checkpoints
        self.apply(_init_weights)
        # CLAP's joint-embedding projection (htsat/clap.py): None for the classification presets
        self.audio_projection = audio_projection(cfg.num_features, cfg.projection_dim) if cfg.projection_dim else None
        self.backend = backend
        self._fft_fronts: dict[torch.dtype, FrontEnd] = {}  # mel_features on CPU, per front-end dtype

    # backend ----------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in htsat_kernels.BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {htsat_kernels.BACKENDS}")
        self._backend = name

    @property
    def save_policy(self) -> str:
        """What a training forward keeps for backward (``HTSATConfig.save_policy``); settable."""
        return self.config.save_policy

    @save_policy.setter
    def save_policy(self, policy: str) -> None:
        self.config.save_policy = htsat_kernels.recompute.check_save_policy(policy)
        for m in self.modules():
            if m is not self and hasattr(m, "save_policy"):
                m.save_policy = policy

    def _backend_scope(self):
        """The one place the model's backend takes effect: the Swin layers (where every op is called)
        run inside ``use_backend(self.backend)``. "auto" pushes nothing, so an enclosing use_backend()
        or $HTSAT_KERNELS_BACKEND still decides."""
        return contextlib.nullcontext() if self._backend == "auto" else htsat_kernels.use_backend(self._backend)

    # front end --------------------------------------------------------------------------------
    def logmel(self, waveform: Tensor) -> Tensor:
        """(B, samples) -> (B, 1, frames, mel_bins) log-mel after bn0 (``mel_features``, then bn0)."""
        return self._normalize_mel(self.mel_features(waveform))

    def front_end(self, stft: str = "conv") -> FrontEnd:
        """The parameter-free front end (STFT, mel, log) as its own module, e.g. for DataLoader workers;
        ``stft="fft"``: the same DFT by ``torch.stft`` (see FrontEnd)."""
        return FrontEnd(self.spectrogram_extractor, self.logmel_extractor, self._front_dtype(), stft)

    def mel_features(self, waveform: Tensor) -> Tensor:
        """(B, samples) -> (B, 1, frames, mel_bins) log-mel before bn0, in float32 (float64 for a double
        model), also under autocast or in a model cast to half (a full-scale tone overflows fp16 in the
        power spectrum): what ``front_end()`` computes. On CPU, except on the reference backend, the DFT
        runs by FFT (``front_end(stft="fft")``: the same values within 1e-6 of the outputs, a tenth of the
        conv's time there, where the conv is a tenth of the model's)."""
        if waveform.device.type == "cpu" and self._backend != "reference":
            dtype = self._front_dtype()
            front = self._fft_fronts.get(dtype)
            if front is None:  # a plain dict entry, not a submodule: state_dict keys stay the original's
                front = self._fft_fronts[dtype] = self.front_end(stft="fft")
            return front(waveform)
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            return self.logmel_extractor(self.spectrogram_extractor(waveform.to(self._front_dtype())))

    def _dtype(self) -> torch.dtype:
        return self.bn0.weight.dtype

    def _front_dtype(self) -> torch.dtype:
        return torch.float64 if self._dtype() == torch.float64 else torch.float32

    def _normalize_mel(self, mel: Tensor) -> Tensor:
        with torch.autocast(device_type=mel.device.type, enabled=False):
            x = mel.to(self._dtype())
            return self.bn0(x.transpose(1, 3)).transpose(1, 3)

    def forward_mel(self, mel: Tensor, *, framewise: bool = True) -> dict[str, Tensor]:
        """Clips of one image given as ``mel_features`` (the front end run elsewhere: ``htsat.inference``
        computes it in DataLoader workers on CPU, overlapping the transformer). Eval-time only: no
        SpecAugment or mixup; the same outputs as ``forward`` on the clips' waveforms."""
        return self._forward_image(self._normalize_mel(mel), framewise)

    def spec_augment(self, x: Tensor) -> Tensor:
        """2 time stripes of width [0, 64) and 2 mel stripes of width [0, 8) set to 0, per sample."""
        x = _drop_stripes(x, dim=2, max_width=64, stripes=2)
        return _drop_stripes(x, dim=3, max_width=8, stripes=2)

    def reshape_wav2img(self, x: Tensor) -> Tensor:
        """(B, 1, T, F) -> (B, 1, S, S): stretch to max_frames, then stack freq_ratio time chunks vertically."""
        cfg = self.config
        B, C, T, Fb = x.shape
        target_t, target_f = cfg.max_frames, cfg.spec_size // cfg.freq_ratio
        if T > target_t or Fb > target_f:
            raise ValueError(f"spectrogram of {T} frames x {Fb} bins exceeds the image's {target_t} x {target_f}")
        if T < target_t:
            x = F.interpolate(x, (target_t, x.shape[3]), mode="bicubic", align_corners=True)
        if Fb < target_f:
            x = F.interpolate(x, (x.shape[2], target_f), mode="bicubic", align_corners=True)
        x = x.permute(0, 1, 3, 2).reshape(B, C, target_f, cfg.freq_ratio, target_t // cfg.freq_ratio)
        return x.permute(0, 1, 3, 2, 4).reshape(B, C, target_f * cfg.freq_ratio, target_t // cfg.freq_ratio)

    # backbone and head ------------------------------------------------------------------------
    def forward_features(self, img: Tensor) -> dict[str, Tensor]:
        """(B, 1, S, S) image -> logits map (B, C, steps), clipwise logits (B, C), latent (B, D)."""
        cfg = self.config
        x = self.pos_drop(self.patch_embed(img))
        with self._backend_scope():  # every htsat_kernels op of the model runs in these layers
            for layer in self.layers:
                x = layer(x)
        x = self.norm(x)
        B, N, D = x.shape
        rows = cfg.spec_size // 2 ** (len(cfg.depths) - 1) // cfg.patch_stride[0]
        cols = cfg.spec_size // 2 ** (len(cfg.depths) - 1) // cfg.patch_stride[1]
        x = x.permute(0, 2, 1).reshape(B, D, rows, cols)
        # regroup: token rows are (chunk, freq group); put the chunks back in time order
        groups = rows // cfg.freq_ratio
        x = x.reshape(B, D, rows // groups, groups, cols).permute(0, 1, 3, 2, 4).reshape(B, D, groups, -1)
        latent = x.flatten(2).mean(dim=2)
        logits_map = self.tscam_conv(x).flatten(2)  # (B, classes, steps)
        return {"logits_map": logits_map, "clipwise_logits": logits_map.mean(dim=2), "latent_output": latent}

    def _forward_image(self, x: Tensor, framewise: bool = True) -> dict[str, Tensor]:
        cfg = self.config
        feats = self.forward_features(self.reshape_wav2img(x))
        clip_logits = feats["clipwise_logits"]
        clipwise = torch.sigmoid(clip_logits) if cfg.loss_type == "clip_bce" else clip_logits
        out = {"clipwise_output": clipwise, "latent_output": feats["latent_output"], "clipwise_logits": clip_logits}
        if framewise:
            logits_map = feats["logits_map"]
            fw = torch.sigmoid(logits_map).transpose(1, 2)  # (B, steps, classes)
            out["framewise_output"] = fw.repeat_interleave(cfg.max_frames // logits_map.shape[2], dim=1)
        if self.audio_projection is not None:
            out["clap_projection"] = proj = self.audio_projection(feats["latent_output"])
            out["clap_embedding"] = F.normalize(proj, dim=-1)
        return out

    def _forward_clip(self, waveform: Tensor, mixup_lambda: Tensor | None, framewise: bool = True) -> dict[str, Tensor]:
        if self.config.clip_fill == "repeatpad":
            waveform = repeat_pad(waveform, self._clip_samples())
        x = self.logmel(waveform)
        if self.training:
            if self.use_spec_augment:
                x = self.spec_augment(x)
            if mixup_lambda is not None:
                x = mix_with_reversed(x, mixup_lambda)
        return self._forward_image(x, framewise)

    def forward(self, waveform: Tensor, mixup_lambda: Tensor | None = None, *, framewise: bool = True) -> dict[str, Tensor]:
        """(B, samples) float waveform -> dict of clipwise_output (B, C), framewise_output (B, F, C),
        latent_output (B, D), clipwise_logits (B, C). mixup_lambda (B,) mixes with the reversed batch
        in training (the original's recipe, docs/model.md §3.6). ``framewise=False`` leaves
        framewise_output out (for an hour of audio it is the largest thing the model would keep)."""
        self._check_waveform(waveform, mixup_lambda)
        if self._one_image(waveform.shape[1]):
            out = self._forward_clip(waveform, mixup_lambda, framewise)
            if framewise and self.config.clip_fill == "repeatpad":  # frames of the real clip, not of its repeats
                keep = math.ceil(waveform.shape[1] / self.config.sample_rate / self.frame_seconds(waveform.shape[1]) - 1e-9)
                out["framewise_output"] = out["framewise_output"][:, :keep]
            return out
        if mixup_lambda is not None:
            raise ValueError("mixup_lambda applies to clips of one image; crop long audio to clip_seconds for training")
        return self._forward_long(waveform, framewise=framewise)

    # any length -------------------------------------------------------------------------------
    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.config.hop_length

    def _clip_samples(self) -> int:
        return int(round(self.config.clip_seconds * self.config.sample_rate))

    def _one_image(self, num_samples: int) -> bool:
        """Whether a clip runs as one image; "repeatpad" (CLAP): up to clip_seconds, else up to max_frames."""
        if self.config.clip_fill == "repeatpad":
            return num_samples <= self._clip_samples()
        return self.num_frames(num_samples) <= self.config.max_frames

    def window_starts(self, num_samples: int) -> list[int]:
        """Start samples of the sliding windows that cover a long clip (the last one ends at its end)."""
        cfg = self.config
        win = int(round(cfg.clip_seconds * cfg.sample_rate))
        hop = int(round(cfg.long_hop_seconds * cfg.sample_rate))
        starts = list(range(0, num_samples - win + 1, hop))
        if starts[-1] + win < num_samples:
            starts.append(num_samples - win)
        return starts

    def frame_seconds(self, num_samples: int) -> float:
        """Duration of one framewise_output frame for an input of num_samples samples."""
        cfg = self.config
        if self._one_image(num_samples) and cfg.clip_fill != "repeatpad":
            return num_samples / cfg.sample_rate / cfg.max_frames
        return cfg.clip_seconds / cfg.max_frames

    def _forward_long(self, waveform: Tensor, windows_per_batch: int = 64, framewise: bool = True) -> dict[str, Tensor]:
        cfg = self.config
        B, S = waveform.shape
        win = int(round(cfg.clip_seconds * cfg.sample_rate))
        starts = self.window_starts(S)
        # windows are cut a group at a time: never a copy of the whole input per window
        per = max(1, windows_per_batch // B)
        outs = []
        for g in range(0, len(starts), per):
            group = starts[g : g + per]
            chunk = torch.stack([waveform[:, s : s + win] for s in group], dim=1).reshape(B * len(group), win)
            outs.append({k: v.unflatten(0, (B, len(group))) for k, v in self._forward_clip(chunk, None, framewise).items()})
        out = {k: torch.cat([o[k] for o in outs], dim=1) for k in outs[0]}
        result = {k: out[k].mean(dim=1) for k in ("clipwise_output", "latent_output", "clipwise_logits")}
        if "clap_projection" in out:  # CLAP: window projections averaged, then normalised
            result["clap_projection"] = proj = out["clap_projection"].mean(dim=1)
            result["clap_embedding"] = F.normalize(proj, dim=-1)
        if framewise:
            result["framewise_output"] = self._lay_windows(out["framewise_output"], starts, S)
        return result

    def _lay_windows(self, per_window: Tensor, starts: list[int], num_samples: int) -> Tensor:
        """(B, windows, max_frames, C) framewise maps -> (B, frames, C) on the clip's time axis,
        overlaps averaged."""
        cfg = self.config
        frame_sec = self.frame_seconds(num_samples)
        total = math.ceil(num_samples / cfg.sample_rate / frame_sec - 1e-9)
        per_win = cfg.max_frames
        framewise = per_window.new_zeros(per_window.shape[0], total, per_window.shape[-1])
        count = per_window.new_zeros(1, total, 1)
        for w, s in enumerate(starts):
            # the last window ends where the clip ends: align it with the end of the frame grid
            off = total - per_win if w == len(starts) - 1 else min(round(s / cfg.sample_rate / frame_sec), total - per_win)
            framewise[:, off : off + per_win] += per_window[:, w]
            count[:, off : off + per_win] += 1
        return framewise / count.clamp(min=1)

    def _check_waveform(self, waveform: Tensor, mixup_lambda: Tensor | None) -> None:
        if not isinstance(waveform, Tensor):
            raise TypeError(f"waveform must be a torch.Tensor of shape (batch, samples), got {type(waveform).__name__}")
        if waveform.ndim != 2:
            hint = " (add a batch axis: waveform.unsqueeze(0))" if waveform.ndim == 1 else ""
            raise ValueError(f"waveform must have shape (batch, samples), got {tuple(waveform.shape)}{hint}")
        if not waveform.is_floating_point():
            raise TypeError(f"waveform must be floating point (samples in [-1, 1]), got {waveform.dtype}")
        B, S = waveform.shape
        if B == 0:
            raise ValueError("empty batch: waveform has 0 clips")
        if S < self.config.n_fft:
            raise ValueError(
                f"clip of {S} samples is shorter than one STFT window ({self.config.n_fft} samples = "
                f"{self.config.n_fft / self.config.sample_rate * 1000:.1f} ms at {self.config.sample_rate} Hz)"
            )
        if mixup_lambda is not None and tuple(mixup_lambda.shape) != (B,):
            raise ValueError(f"mixup_lambda must have shape ({B},), got {tuple(mixup_lambda.shape)}")
        if self.check_inputs and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(waveform).all()):
                bad = (~torch.isfinite(waveform)).any(dim=1).nonzero().flatten().tolist()
                raise ValueError(f"waveform holds NaN or inf samples (clips {bad})")


def mix_with_reversed(x: Tensor, lam: Tensor) -> Tensor:
    """Mixup of a batch with itself reversed: lam[i] * x[i] + (1 - lam[i]) * x[B - 1 - i] (the
    original's recipe; the model mixes log-mels, the trainer mixes targets)."""
    lam = lam.to(x).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x.flip(0)


def _drop_stripes(x: Tensor, dim: int, max_width: int, stripes: int) -> Tensor:
    """Zero `stripes` random bands along `dim` of (B, 1, T, F), width in [0, max_width), per sample."""
    B, total = x.shape[0], x.shape[dim]
    width = torch.randint(0, max_width, (B, stripes), device=x.device)
    start = (torch.rand(B, stripes, device=x.device) * (total - width).clamp(min=1)).long()
    pos = torch.arange(total, device=x.device).view(1, 1, total)
    drop = ((pos >= start[..., None]) & (pos < (start + width)[..., None])).any(dim=1)  # (B, total)
    shape = [B, 1, 1, 1]
    shape[dim] = total
    return x.masked_fill(drop.view(shape), 0.0)


def _init_weights(m: nn.Module) -> None:
    """The original's init: Linear trunc_normal(0.02) and zero bias; LayerNorm 1/0; convs keep defaults."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def create_model(
    name: str | None = None,
    *,
    num_classes: int | None = None,
    backend: str = "auto",
    pretrained: bool | str = False,
    **overrides,
) -> HTSAT:
    """Build HTS-AT from a preset name ("htsat-audioset", "htsat-esc50", "htsat-scv2", "clap-htsat-tiny", ...), a
    named pretrained checkpoint (``htsat models`` lists them) or a JSON config file; ``overrides`` are HTSATConfig
    fields. ``backend``: "auto", "reference" or "fused". ``pretrained=True`` loads the checkpoint registered under
    ``name``, ``pretrained="NAME"`` that one (downloaded into the cache first, see htsat.pretrained); with
    ``num_classes`` the checkpoint's head is skipped (fine-tuning with another class count)."""
    from .config import PRESETS, load_config
    from .pretrained import REGISTRY, get, load_pretrained

    entry = None
    if pretrained:
        entry = get(pretrained if isinstance(pretrained, str) else name or "htsat-audioset")
        if name in PRESETS and name != entry.preset:
            raise ValueError(f"pretrained {entry.name!r} is a {entry.preset} checkpoint; name={name!r} builds another model")
        overrides = {**entry.overrides, **overrides}
    elif name in REGISTRY and name not in PRESETS:
        entry = REGISTRY[name]  # a checkpoint's name without its weights: its preset
    preset = entry.preset if entry is not None and (name is None or name in REGISTRY) else name or "htsat-audioset"
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    config = load_config(preset, **overrides)
    model = HTSAT(config, backend=backend)
    if pretrained:
        load_pretrained(model, entry.name, drop_head=num_classes is not None)
    return model
