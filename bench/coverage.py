"""``python -m bench --coverage``: which calls of each op ran fused and which ran the reference, and why.

A per-op benchmark in one dtype cannot show that the fused kernels run where training really runs: under
autocast the activations, LayerNorm parameters and residual stream have different dtypes, and each op's
capability check decides per call. This runs HTS-AT (backend "auto", batch 1) in every configuration on
the device at hand: fp32, bf16 autocast and fp16 autocast (where the device has it); eager and
``torch.compile``; a training step (train mode, forward + backward) and inference (eval, no_grad). Each
op's dispatch decisions are recorded (``htsat_kernels.record_dispatch``): records ``kind: "coverage"``
with ``config``, ``op``, ``fused_calls``, ``reference_calls`` and ``reasons`` (decline reason -> calls).

A call is counted once, in the forward (the backward of a fused call is the fused backward). Under
``torch.compile`` the decisions are made while Dynamo traces, whatever the compiler backend: on a CPU the
compile configurations use the "aot_eager" backend (Inductor's C++ build of the whole model takes
minutes and decides nothing), on a GPU the default Inductor.

On a machine without a GPU the "cuda (derived)" configurations give the CUDA picture: the model's
parameters become fake CUDA tensors (``FakeTensorMode``: shapes and dtypes, no data, no device), CUDA
autocast is switched on (``torch.set_autocast_enabled("cuda", True)``), so each op sees the dtypes CUDA
autocast produces (linear -> bf16, layer_norm -> fp32, fp32 + bf16 -> fp32) and its capability check
decides as on a GPU with an extension built with its CUDA part. The C++ ops run their fake kernels;
window attention runs its reference there (its launcher asks the device for its architecture), which
gives the same output dtype. Forward only, eager only: the decisions of a training step's backward and
of a compiled step are those of its forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("train", "inference")
DERIVED = "cuda (derived)"


@dataclasses.dataclass(frozen=True)
class Config:
    device: str  # "cpu", "cuda" or DERIVED
    dtype: str  # a key of DTYPES
    compiled: bool
    mode: str  # "train" or "inference"

    @property
    def label(self) -> str:
        precision = "fp32" if self.dtype == "fp32" else f"{self.dtype} autocast"
        return f"{self.device} {precision}, {'compile' if self.compiled else 'eager'}, {self.mode}"


def autocast_dtypes(device_type: str) -> list[str]:
    """fp32 and the autocast dtypes the device has (fp16 autocast on CPU needs a recent torch)."""
    out = ["fp32"]
    for name in ("bf16", "fp16"):
        try:
            with torch.autocast(device_type, dtype=DTYPES[name]):
                pass
        except (RuntimeError, ValueError):
            continue
        if device_type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
            continue
        out.append(name)
    return out


def configs(device_type: str, *, compiled: bool = True, derived: bool = True, dtypes=None) -> list[Config]:
    """Every configuration of one run: the device's, and the derived CUDA ones on a machine without a GPU
    (``dtypes``: a subset of DTYPES' keys; ``compiled=False``: eager only)."""
    keep = set(dtypes or DTYPES)
    out = [
        Config(device_type, dt, c, mode)
        for dt in autocast_dtypes(device_type)
        if dt in keep
        for c in ((False, True) if compiled else (False,))
        for mode in MODES
    ]
    if derived and device_type != "cuda":
        out += [Config(DERIVED, dt, False, mode) for dt in DTYPES if dt in keep for mode in MODES]
    return out


def build_model(name: str, *, tiny: bool):
    """HTS-AT on backend "auto" with fixed weights, its input check off (a host sync, no op of interest)."""
    import htsat

    torch.manual_seed(0)
    model = htsat.create_model(name, backend="auto", **(dict(htsat.TINY_OVERRIDES) if tiny else {}))
    model.check_inputs = False
    return model


def _samples(model) -> int:
    return int(round(model.config.clip_seconds * model.config.sample_rate))


@contextlib.contextmanager
def _autocast(device_type: str, dtype: str) -> Iterator[None]:
    if DTYPES[dtype] is None:
        yield
    else:
        with torch.autocast(device_type, dtype=DTYPES[dtype]):
            yield


def _step(model, wave: torch.Tensor, device_type: str, cfg: Config) -> None:
    if cfg.mode == "train":
        model.train()
        with _autocast(device_type, cfg.dtype):
            out = model(wave)
        F.binary_cross_entropy_with_logits(out["clipwise_logits"].float(), torch.zeros_like(out["clipwise_logits"])).backward()
        model.zero_grad(set_to_none=True)
    else:
        model.eval()
        with torch.no_grad(), _autocast(device_type, cfg.dtype):
            model(wave)


def run_real(model, cfg: Config) -> list:
    """The decisions of one training step or inference call of ``model`` (on cfg.device) in ``cfg``."""
    import htsat_kernels as hk

    torch._dynamo.reset()
    device = torch.device(cfg.device)
    wave = 0.1 * torch.randn(1, _samples(model), generator=torch.Generator().manual_seed(1)).to(device)
    fn = model
    if cfg.compiled:
        fn = torch.compile(model, backend="inductor" if device.type == "cuda" else "aot_eager")
    with hk.record_dispatch() as decisions:
        _step(fn, wave, device.type, cfg)
    return list(decisions)


DERIVED_ARCH = 90  # the compute capability the derived CUDA flow's capability checks assume (H100/H200)


@contextlib.contextmanager
def _fake_cuda_model(model) -> Iterator:
    """``model`` with fake CUDA parameters and buffers inside a FakeTensorMode; restored afterwards."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from htsat_kernels import backends, reference
    from htsat_kernels.fused import extension

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    items = []
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if t is not None:
                    items.append((store, key, t))
    attention = backends._fused.get("window_attention")
    patches = contextlib.ExitStack()
    try:
        with mode:
            patches.enter_context(mock.patch.object(extension, "with_cuda", True))
            with contextlib.suppress(ImportError):  # the attention's per-arch limits ask the device: an H100's
                from htsat_kernels.fused import window_attention

                patches.enter_context(mock.patch.object(window_attention, "_device_arch", lambda device: DERIVED_ARCH))
            if isinstance(attention, backends.FusedImpl):
                fake_attention = dataclasses.replace(attention, run=reference.window_attention)
                patches.enter_context(mock.patch.dict(backends._fused, {"window_attention": fake_attention}))
            for store, key, t in items:
                fake = mode.from_tensor(t.detach()).to("cuda")
                is_param = isinstance(t, torch.nn.Parameter)
                store[key] = torch.nn.Parameter(fake, requires_grad=t.requires_grad) if is_param else fake
            yield mode
    finally:
        patches.close()
        for store, key, t in items:
            store[key] = t
        _clear_device_caches()


def _clear_device_caches() -> None:
    """Forget the per-device caches (index maps, masks) that the fake run may have filled with fake tensors."""
    import htsat_kernels.reference as reference

    modules = [reference]
    with contextlib.suppress(ImportError):
        from htsat_kernels.fused import window_attention

        modules.append(window_attention)
    for mod in modules:
        for value in vars(mod).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()


def run_derived(model, cfg: Config) -> list:
    """The decisions CUDA autocast's dtype flow gives (fake CUDA tensors; see the module docstring)."""
    import htsat_kernels as hk

    with _fake_cuda_model(model):
        wave = torch.empty(1, _samples(model), device="cuda")
        enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        if DTYPES[cfg.dtype] is not None:
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", DTYPES[cfg.dtype])
        try:
            model.train(cfg.mode == "train")
            with hk.record_dispatch() as decisions, torch.set_grad_enabled(cfg.mode == "train"):
                model(wave)
        finally:
            torch.set_autocast_enabled("cuda", enabled)
            torch.set_autocast_dtype("cuda", dtype)
    return list(decisions)


def records_of(cfg: Config, decisions: list) -> list[dict]:
    """One ``kind: "coverage"`` record per op of the op table (0 calls where the model made none)."""
    from htsat_kernels.ops import OPS

    out = []
    for op in OPS:
        mine = [d for d in decisions if d.op == op]
        reasons = Counter(d.reason for d in mine if not d.fused)
        out.append(
            {
                "kind": "coverage",
                "config": cfg.label,
                "device": cfg.device,
                "dtype": cfg.dtype,
                "compiled": cfg.compiled,
                "mode": cfg.mode,
                "op": op,
                "fused_calls": sum(1 for d in mine if d.fused),
                "reference_calls": sum(1 for d in mine if not d.fused),
                "reasons": dict(reasons),
            }
        )
    return out


def collect(
    device_type: str,
    *,
    model_name: str = "htsat-audioset",
    tiny: bool | None = None,
    compiled: bool = True,
    derived: bool = True,
    dtypes=None,
) -> list[dict]:
    """The coverage records of every configuration (tiny model config on a CPU unless ``tiny`` says otherwise)."""
    from tqdm import tqdm

    if tiny is None:
        tiny = device_type != "cuda"
    model = build_model(model_name, tiny=tiny)
    records = []
    cfgs = configs(device_type, compiled=compiled, derived=derived, dtypes=dtypes)
    for cfg in tqdm(cfgs, desc="coverage", file=sys.stderr):
        if cfg.device == DERIVED:
            decisions = run_derived(model, cfg)
        else:
            decisions = run_real(model.to(cfg.device), cfg)
        records += records_of(cfg, decisions)
    return records


def render(records: list[dict]) -> str:
    """A table: one row per configuration, "fused/calls" per op; then every decline reason with its calls."""
    from htsat_kernels.ops import OPS

    ops = list(OPS)
    short = {op: (OPS[op].aliases[0] if OPS[op].aliases else op) for op in ops}
    by_cfg: dict[str, dict[str, dict]] = {}
    for r in records:
        by_cfg.setdefault(r["config"], {})[r["op"]] = r
    width = max(len(c) for c in by_cfg) if by_cfg else 10
    lines = ["coverage: fused calls / calls per op (backend 'auto', batch 1; a call = one forward call)"]
    lines.append(f"{'configuration':{width}s}  " + "  ".join(f"{short[op]:>12s}" for op in ops))
    reasons: dict[tuple[str, str], set[str]] = {}
    for cfg, per_op in by_cfg.items():
        cells = []
        for op in ops:
            r = per_op.get(op)
            n = (r["fused_calls"] + r["reference_calls"]) if r else 0
            cells.append(f"{(str(r['fused_calls']) + '/' + str(n)) if n else '-':>12s}")
            for reason in (r or {}).get("reasons", {}):
                reasons.setdefault((op, reason), set()).add(cfg)
        lines.append(f"{cfg:{width}s}  " + "  ".join(cells))
    if reasons:
        lines.append("reasons the reference ran:")
        for (op, reason), cfgs in sorted(reasons.items()):
            lines.append(f"  {op}: {reason} [{len(cfgs)} configuration(s), e.g. {sorted(cfgs)[0]}]")
    return "\n".join(lines)


def main(out_dir: Path, *, device: str | None = None, model_name: str | None = None, compiled: bool = True, dtypes=None) -> int:
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    tiny = None if model_name is None else False
    records = collect(device_type, model_name=model_name or "htsat-audioset", tiny=tiny, compiled=compiled, dtypes=dtypes)
    text = render(records)
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = out_dir / f"coverage_{device_type}_{date}.json"
    meta = {
        "kind": "coverage",
        "date": date,
        "device": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": model_name or ("htsat-audioset" if device_type == "cuda" else "htsat-audioset (tiny config)"),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(f"results: {path}")
    return 0
