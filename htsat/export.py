"""ONNX export of HTS-AT and the ONNX Runtime path of ``htsat predict`` / ``embed``.

- :func:`export_onnx`: a model -> an ONNX file (``torch.onnx.export(dynamo=True)``, opset 18) with a
  dynamic batch axis, input ``waveform`` (B, samples) at the model's sample rate or ``mel`` (B, 1,
  frames, mel_bins: the log-mel before bn0, what ``HTSAT.mel_features`` gives), named outputs
  (:data:`OUTPUTS`, plus ``clap_projection`` / ``clap_embedding`` for CLAP presets) and metadata
  (preset, config, sample rate, clip length, labels, package version). Every htsat_kernels op is
  traced through its PyTorch reference, so a model built for any backend exports. The file is
  checked against PyTorch on several inputs right after it is written.
- The graph holds one image: a waveform of ``n_fft`` samples up to the longest clip that fits one
  image (CLAP presets: exactly ``clip_seconds``; shorter clips are repeat-padded before it), or up
  to ``max_frames`` mel frames. Longer audio is cut into windows outside the graph, by the same code
  as the torch runtime: :class:`OnnxModel` borrows ``HTSAT.forward`` and its windowing methods and
  replaces only the one-image step, and ``htsat predict`` cuts files in ``htsat.inference``.
- :class:`OnnxModel`: an ONNX Runtime session that stands in for the model in
  ``htsat.predict.Predictor`` (``runtime="onnxruntime"``); :func:`runtime_model` exports the model on
  the fly into the cache (``$HTSAT_HOME/onnx``) or opens a given file.
- ``quantize="int8"``: ONNX Runtime's dynamic quantization (int8 weights of the MatMul/Gemm layers,
  activations quantized per batch at run time).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .config import HTSATConfig
from .model import HTSAT

__all__ = [
    "INPUTS",
    "OUTPUTS",
    "QUANTIZE",
    "RUNTIMES",
    "MissingExtraError",
    "OnnxModel",
    "check_export",
    "export_onnx",
    "read_metadata",
    "require_onnxruntime",
    "runtime_model",
]

INPUTS = ("waveform", "mel")
OUTPUTS = ("clipwise_output", "framewise_output", "latent_output", "clipwise_logits")
CLAP_OUTPUTS = ("clap_projection", "clap_embedding")
QUANTIZE = ("int8",)
RUNTIMES = ("torch", "onnxruntime")
OPSET = 18
EXTRA_HINT = 'pip install -e ".[onnx]"'
# the export check: fp32 probabilities within 1e-5 (absolute), unbounded outputs (logits, latent,
# projections) within 1e-4 relative to their scale
PROB_TOL = 1e-5
VALUE_TOL = 1e-4


class MissingExtraError(ImportError):
    """An optional dependency of the ONNX path is not installed (one line naming the extra)."""


def _require(module: str, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs the {module} package: {EXTRA_HINT} (or pip install {module})") from None


def require_onnxruntime():
    return _require("onnxruntime", "the onnxruntime runtime")


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("htsat-kernels")
    except Exception:  # not installed (run from a checkout)
        return "unknown"


def output_names(config: HTSATConfig) -> tuple[str, ...]:
    return OUTPUTS + (CLAP_OUTPUTS if config.projection_dim else ())


def clip_samples(config: HTSATConfig) -> int:
    return int(round(config.clip_seconds * config.sample_rate))


def sample_range(config: HTSATConfig) -> tuple[int, int]:
    """Waveform lengths the graph takes: one image. CLAP presets: exactly clip_seconds (shorter clips are
    repeat-padded before the graph, a shape-dependent tiling the graph cannot hold)."""
    if config.clip_fill == "repeatpad":
        n = clip_samples(config)
        return n, n
    return config.n_fft, config.max_frames * config.hop_length - 1  # 1 + S // hop <= max_frames


class _OneImage(nn.Module):
    """What the graph computes: the model on clips of one image, outputs as a tuple in output_names order."""

    def __init__(self, model: HTSAT, input: str):
        super().__init__()
        self.model, self.input = model, input
        self.names = output_names(model.config)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        out = m._forward_clip(x, None, True) if self.input == "waveform" else m.forward_mel(x)
        return tuple(out[k] for k in self.names)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter's progress lines and its torchvision warnings are noise for a user."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export_copy(model: HTSAT) -> HTSAT:
    m = copy.deepcopy(model).cpu().float().eval()
    m.backend = "reference"  # the fused ops trace as their reference computation: any backend exports
    return m


def _atomic_target(path: str) -> tuple[str, str]:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
    os.close(fd)
    return folder, tmp


def export_onnx(
    model: HTSAT,
    path: str,
    *,
    input: str = "waveform",
    labels: Sequence[str] | None = None,
    quantize: str | None = None,
    check: bool = True,
    opset: int = OPSET,
) -> dict:
    """Export ``model`` (any backend, any device: a float32 CPU copy is traced) to ``path``.

    Returns ``{"path", "input", "outputs", "quantize", "check"}``; ``check`` (unless ``check=False``)
    is :func:`check_export`'s report. The file is written to a temporary and renamed, so a failed
    export leaves any previous file as it was. A check beyond the tolerances raises ValueError (an
    int8 file is compared and reported, never refused: its deviation is the point of the report).
    """
    onnx = _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")
    if input not in INPUTS:
        raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {input!r}")
    if quantize not in (None, *QUANTIZE):
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    m = _export_copy(model)
    cfg = m.config
    lo, hi = sample_range(cfg)
    batch = torch.export.Dim("batch", min=1, max=4096)
    if input == "waveform":
        example = torch.zeros(2, clip_samples(cfg)) if lo == hi else torch.zeros(2, min(clip_samples(cfg), hi))
        dims = {0: batch} if lo == hi else {0: batch, 1: torch.export.Dim("samples", min=lo, max=hi)}
    else:
        frames = 1 + min(clip_samples(cfg), hi) // cfg.hop_length
        example = torch.zeros(2, 1, frames, cfg.mel_bins)
        dims = {0: batch} if lo == hi else {0: batch, 2: torch.export.Dim("frames", min=2, max=cfg.max_frames)}
    names = output_names(cfg)
    folder, tmp = _atomic_target(path)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                _OneImage(m, input),
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[input],
                output_names=list(names),
                dynamic_shapes=(dims,),
                verbose=False,
            )
            program.save(tmp)
        if quantize == "int8":
            _quantize_int8(tmp)
        proto = onnx.load(tmp)
        meta = {
            "htsat.preset": cfg.name,
            "htsat.config": json.dumps(cfg.to_dict()),
            "htsat.input": input,
            "htsat.outputs": json.dumps(list(names)),
            "htsat.sample_rate": str(cfg.sample_rate),
            "htsat.clip_samples": str(clip_samples(cfg)),
            "htsat.samples_range": json.dumps([lo, hi]),
            "htsat.labels": json.dumps(list(labels) if labels is not None else []),
            "htsat.quantize": quantize or "",
            "htsat.version": _package_version(),
            "htsat.torch_version": torch.__version__,
        }
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        proto.producer_name = "htsat-kernels"
        onnx.save(proto, tmp)
        report = {"path": os.fspath(path), "input": input, "outputs": list(names), "quantize": quantize}
        if check:
            report["check"] = check_export(model, tmp, strict=quantize is None)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return report


def _quantize_int8(path: str) -> None:
    require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = os.path.dirname(path)
    pre = path + ".pre.onnx"
    out = path + ".int8.onnx"
    try:
        with _quiet_exporter():
            quant_pre_process(path, pre, skip_symbolic_shape=True)
            # MatMul/Gemm only: the attention and MLP weights, where int8 GEMMs pay; the convolutions
            # (patch embedding, head) and the front end stay fp32
            quantize_dynamic(pre, out, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        os.replace(out, path)
    finally:
        for p in (pre, out):
            if os.path.exists(p):
                os.unlink(p)
    del folder


def check_inputs(config: HTSATConfig, input: str, seed: int = 0) -> list[Tensor]:
    """Inputs the export is checked on: a batch of two full clips (noise, a tone in noise, at -20 dBFS),
    and for models whose graph takes any length, a short clip and the longest one-image clip (noise).
    (A pure full-scale tone is ill-conditioned: near-silent mel bins under the log; through a model with
    random weights even the torch backends differ by 3e-5 on it.)"""
    g = torch.Generator().manual_seed(seed)
    n = clip_samples(config)
    lo, hi = sample_range(config)
    t = torch.arange(min(n, hi)) / config.sample_rate
    tone = 0.1 * torch.sin(2 * math.pi * 440.0 * t) + 0.01 * torch.randn(t.shape[0], generator=g)
    noise = 0.1 * torch.randn(t.shape[0], generator=g)
    waves = [torch.stack([noise, tone])]
    if lo != hi:
        waves += [0.1 * torch.randn(1, max(lo, n // 4), generator=g), 0.1 * torch.randn(1, hi, generator=g)]
    return waves


def check_export(model: HTSAT, path: str, *, strict: bool = True) -> dict:
    """The file's outputs against ``model`` (in float32 on CPU) on :func:`check_inputs`: per output the
    largest absolute difference (``max_abs``) and that over the output's largest magnitude (``rel``).
    ``strict``: raise ValueError past PROB_TOL (probabilities) or VALUE_TOL (relative, other outputs)."""
    m = _export_copy(model)
    onnx_model = OnnxModel(path, threads=torch.get_num_threads())
    worst: dict[str, dict] = {}
    shapes = []
    for wave in check_inputs(m.config, onnx_model.input):
        with torch.no_grad():
            if onnx_model.input == "mel":  # the graph's own input: the front end is the runtime's business
                mel = m.mel_features(wave)
                want, got = m.forward_mel(mel), onnx_model.forward_mel(mel)
            else:
                want, got = m(wave), onnx_model(wave)
        shapes.append(list(wave.shape))
        for k in onnx_model.outputs:
            diff = float((got[k] - want[k]).abs().max())
            scale = float(want[k].abs().max()) or 1.0
            w = worst.setdefault(k, {"max_abs": 0.0, "rel": 0.0})
            w["max_abs"], w["rel"] = max(w["max_abs"], diff), max(w["rel"], diff / scale)
    report = {"inputs": shapes, "outputs": worst, "ok": True}
    bad = []
    for k, w in worst.items():
        tol_ok = w["max_abs"] <= PROB_TOL if _is_probability(k, m.config) else w["rel"] <= VALUE_TOL
        if not tol_ok:
            bad.append(f"{k} {w['max_abs']:.3g}")
    report["ok"] = not bad
    if bad and strict:
        raise ValueError(f"{path}: the exported model differs from PyTorch beyond the tolerances ({', '.join(bad)})")
    return report


def _is_probability(name: str, config: HTSATConfig) -> bool:
    return name == "framewise_output" or (name == "clipwise_output" and config.loss_type == "clip_bce")


def format_check(report: dict) -> str:
    """One line per output: the largest difference to PyTorch."""
    lines = [f"checked against PyTorch on inputs {', '.join('x'.join(map(str, s)) for s in report['inputs'])}:"]
    for k, w in report["outputs"].items():
        lines.append(f"  {k:<18} max |diff| {w['max_abs']:.2e}  (relative {w['rel']:.2e})")
    lines.append("  within the tolerances" if report["ok"] else "  beyond the fp32 tolerances (expected for int8)")
    return "\n".join(lines)


def read_metadata(path: str) -> dict:
    """The ``htsat.*`` metadata of an exported file (without loading its weights into a session)."""
    onnx = _require("onnx", "reading an ONNX file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    meta = {p.key[len("htsat.") :]: p.value for p in proto.metadata_props if p.key.startswith("htsat.")}
    if "config" not in meta:
        raise ValueError(f"{path}: no htsat metadata; export it with `htsat export`")
    return meta


# ------------------------------------------------------------------------------------------------
# the runtime
# ------------------------------------------------------------------------------------------------


class OnnxModel:
    """An exported file in an ONNX Runtime session, standing in for ``HTSAT`` at inference: the same
    ``forward`` (any length: ``HTSAT.forward``, windowing and all, with the one-image step run by the
    session), ``forward_mel`` (mel graphs), ``config``, ``front_end`` and ``frame_seconds``.

    The session is opened lazily in each process (DataLoader workers fork: a session never crosses a
    fork) with ``threads`` intra-op threads (default: torch's thread count in that process, so a
    worker gets 1 as torch gives it)."""

    training = False
    check_inputs = True

    def __init__(self, path: str, *, threads: int | None = None):
        meta = read_metadata(path)
        self.path = os.fspath(path)
        self.metadata = meta
        self.config = HTSATConfig.from_dict(json.loads(meta["config"]))
        self.input = meta.get("input", "waveform")
        self.outputs = tuple(json.loads(meta["outputs"]))
        self.labels = json.loads(meta.get("labels", "[]"))
        self.quantize = meta.get("quantize") or None
        self.threads = threads
        self.audio_projection = True if "clap_projection" in self.outputs else None  # only tested for None
        self.accepts_mel = self.input == "mel"
        self._session = None
        self._pid = None
        self._front = None

    def __repr__(self) -> str:
        return f"OnnxModel({self.path!r}, input={self.input!r}, preset={self.config.name!r})"

    # nn.Module-like no-ops, so code written for the model runs unchanged
    def eval(self) -> OnnxModel:
        return self

    def to(self, device) -> OnnxModel:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the onnxruntime runtime runs on CPU, not {device} (use --device cpu or --runtime torch)")
        return self

    def session(self):
        if self._session is None or self._pid != os.getpid():
            ort = require_onnxruntime()
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = int(self.threads or torch.get_num_threads())
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
            self._pid = os.getpid()
        return self._session

    def front_end(self, stft: str = "fft"):
        from .frontend import FrontEnd, LogMel, Spectrogram

        cfg = self.config
        return FrontEnd(
            Spectrogram(cfg.n_fft, cfg.hop_length),
            LogMel(cfg.sample_rate, cfg.n_fft, cfg.mel_bins, cfg.fmin, cfg.fmax),
            stft=stft,
        )

    def _run(self, x: Tensor) -> dict[str, Tensor]:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        out = self.session().run(list(self.outputs), {self.input: arr})
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs, out)}

    def forward_mel(self, mel: Tensor, *, framewise: bool = True) -> dict[str, Tensor]:
        if self.input != "mel":
            raise ValueError(f"{self.path} takes waveforms, not log-mels (exported with input {self.input!r})")
        out = self._run(mel)
        if not framewise:
            out.pop("framewise_output")
        return out

    def _forward_clip(self, waveform: Tensor, mixup_lambda: Tensor | None, framewise: bool = True) -> dict[str, Tensor]:
        from .clap import repeat_pad

        if self.config.clip_fill == "repeatpad":
            waveform = repeat_pad(waveform, self._clip_samples())
        if self.input == "mel":
            if self._front is None:
                self._front = self.front_end("fft").eval()  # the same DFT as the model's conv, 6-7x cheaper
            with torch.no_grad():
                return self.forward_mel(self._front(waveform.float()), framewise=framewise)
        out = self._run(waveform)
        if not framewise:
            out.pop("framewise_output")
        return out

    # the model's own code for everything around the one-image step
    forward = HTSAT.forward
    __call__ = HTSAT.forward
    _check_waveform = HTSAT._check_waveform
    _one_image = HTSAT._one_image
    _clip_samples = HTSAT._clip_samples
    _forward_long = HTSAT._forward_long
    _lay_windows = HTSAT._lay_windows
    num_frames = HTSAT.num_frames
    window_starts = HTSAT.window_starts
    frame_seconds = HTSAT.frame_seconds


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return runtime


def _model_digest(model: HTSAT, input: str, quantize: str | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([model.config.to_dict(), input, quantize, _package_version(), torch.__version__, OPSET]).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_export(model: HTSAT, *, input: str = "mel", quantize: str | None = None, labels=None) -> str:
    """The model exported into ``$HTSAT_HOME/onnx/<preset>-<digest>.onnx`` once (the digest covers
    the weights, config, input, quantization and versions), and that file's path."""
    from .pretrained import cache_dir

    name = f"{model.config.name or 'custom'}-{input}{'-' + quantize if quantize else ''}-{_model_digest(model, input, quantize)}.onnx"
    path = os.path.join(cache_dir(), "onnx", name)
    if not os.path.exists(path):
        export_onnx(model, path, input=input, quantize=quantize, labels=labels)
    return path


def runtime_model(model, *, runtime: str, onnx: str | None = None, quantize: str | None = None, labels=None):
    """The model for a runtime: ``model`` itself for torch, else an :class:`OnnxModel` of ``onnx`` or of
    the model exported into the cache."""
    if runtime == "torch":
        if onnx or quantize:
            raise ValueError("--onnx and --quantize need --runtime onnxruntime")
        return model
    require_onnxruntime()
    if isinstance(model, OnnxModel):
        return model
    if onnx:
        if quantize:
            raise ValueError("--quantize applies when the model is exported here; export an int8 file with htsat export")
        given = OnnxModel(onnx)
        if given.config.to_dict() != model.config.to_dict():
            raise ValueError(f"--onnx {onnx} was exported from another model config ({given.config.name}) than the checkpoint's")
        return given
    return OnnxModel(cached_export(model, quantize=quantize, labels=labels))


# ------------------------------------------------------------------------------------------------
# htsat export
# ------------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch; checked against PyTorch)",
        description="Export a checkpoint, a name of `htsat models` or a preset (random weights) to an ONNX file with a "
        "dynamic batch axis, named outputs and metadata, then check it against PyTorch and print the differences. "
        "The graph holds one image (up to max_frames STFT frames; CLAP presets: clip_seconds); longer audio is windowed "
        "by the runtime (htsat predict --runtime onnxruntime --onnx FILE).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "source",
        help="our checkpoint, an original HTS-AT / CLAP one, a name of `htsat models` (its weights, downloaded into the "
        "cache), or a preset or JSON config that is not one (random weights)",
    )
    p.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    p.add_argument("--model", help="preset or JSON config for checkpoints without a saved config")
    p.add_argument("--labels", help="class names file stored in the metadata (default: the checkpoint's, else AudioSet's)")
    p.add_argument(
        "--input", choices=INPUTS, default="waveform", help="waveform (B, samples) or mel (B, 1, frames, mel_bins: before bn0)"
    )
    p.add_argument("--quantize", choices=QUANTIZE, help="int8: ONNX Runtime dynamic quantization of the MatMul/Gemm weights")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the comparison with PyTorch (default: check)")


def _load_for_export(args):
    from .config import PRESETS
    from .model import create_model
    from .predict import Predictor, labels_for
    from .pretrained import REGISTRY

    src = args.source
    if os.path.exists(src) and not src.endswith(".json") or src in REGISTRY:  # a name of both: its weights
        pred = Predictor.from_checkpoint(src, name=args.model, backend="reference", device="cpu", labels_file=args.labels)
        return pred.model, pred.labels, False
    if src in PRESETS or src.endswith(".json"):
        model = create_model(src, backend="reference").eval()
        return model, labels_for(model.config.num_classes, None, args.labels), True
    raise ValueError(f"{src}: no such checkpoint file, name of `htsat models` or preset")


def run(args) -> int:
    import sys

    _require("onnx", "htsat export")
    model, labels, random = _load_for_export(args)
    if random:
        print(f"htsat: warning: {args.source} is a preset: exporting randomly initialised weights", file=sys.stderr)
    report = export_onnx(model, args.output, input=args.input, labels=labels, quantize=args.quantize, check=args.check)
    cfg = model.config
    lo, hi = sample_range(cfg)
    if args.input == "waveform":
        shape = f"waveform (batch, {lo if lo == hi else f'{lo}..{hi}'} samples at {cfg.sample_rate} Hz)"
    else:
        shape = f"mel (batch, 1, {'2..' + str(cfg.max_frames) if lo != hi else 1 + lo // cfg.hop_length} frames, {cfg.mel_bins})"
    print(f"wrote {args.output}: {shape} -> {', '.join(report['outputs'])}{' (int8)' if args.quantize else ''}")
    if "check" in report:
        print(format_check(report["check"]))
    return 0
