"""Whole-model cases: HTS-AT training step and inference, per provider.

- ``train``: one optimisation step, forward + BCE loss + backward + AdamW, under autocast (bf16 by
  default; the front end stays fp32 inside the model), in train mode (SpecAugment on).
- ``inference``: eval-mode forward under no_grad, fp32 or autocast in the low dtype.

Providers: ``reference`` (model backend "reference"), ``fused`` (backend "fused"; on a CPU-only
machine backend "auto", i.e. the C++ CPU twins for partition/merge/patch merge and the reference
attention, because the Triton kernel runs on CPU only in the interpreter), ``compile``
(``torch.compile`` of the reference model) and ``fused+compile``.

Errors (``max_abs_err``/``max_rel_err``): in eval mode (no SpecAugment/drop-path randomness) at a
small batch, the provider's outputs (inference) or outputs and every parameter gradient of the BCE
loss (train) against the reference model in fp32 without autocast, same weights and inputs.
``max_abs_diff_vs_reference``/``max_rel_diff_vs_reference``: the same against the reference model
at the same precision (the fused-versus-reference difference the low dtype alone allows).

``peak_mem_mb`` (CUDA) counts the parameters plus everything the timed calls allocate (gradients,
optimizer state, activations, outputs). ``saved_mb`` (train, any device): the bytes the training
forward keeps for backward, counted exactly (``bench.saved_memory``). The reference providers save
everything (save policy "all", as eager PyTorch); the fused ones use the model's default policy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .context import QUICK_COMPILE_REASON, Case, RunContext
from .harness import DTYPES, Prepared, Skip, combine_errors, memory_baseline, reason_of, tensor_errors

MODEL_PROVIDERS = ("reference", "fused", "compile", "fused+compile")
CPU_COMPILE_REASON = (
    "torch.compile of the whole model on CPU takes tens of minutes (several graphs: train, eval, "
    "no_grad, per dtype); run with --model-compile-on-cpu to include it"
)
MODEL_MODES = ("train", "inference")


@dataclass(frozen=True)
class ModelSpec:
    name: str = "htsat-audioset"
    tiny: bool = False
    label: str = "htsat-audioset"

    def overrides(self) -> dict:
        if not self.tiny:
            return {}
        import htsat

        return dict(htsat.TINY_OVERRIDES)


def htsat_import_error() -> str | None:
    try:
        import htsat  # noqa: F401

        htsat.create_model  # noqa: B018
    except Exception as exc:
        return f"the htsat model package is not importable: {reason_of(exc)}"
    return None


def _backend_of(provider: str, device: torch.device) -> str:
    if provider in ("reference", "compile"):
        return "reference"
    return "fused" if device.type == "cuda" else "auto"


def _save_policy_of(provider: str) -> str:
    """The reference providers are eager PyTorch (keep everything for backward); the fused ones use the
    model's default save policy (htsat_kernels.recompute)."""
    import htsat

    return "all" if provider in ("reference", "compile") else htsat.HTSATConfig().save_policy


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def _base(model):
    return getattr(model, "_orig_mod", model)


def _base_state(ctx: RunContext, spec: ModelSpec) -> dict:
    def build():
        import htsat

        torch.manual_seed(0)
        m = htsat.create_model(spec.name, backend="reference", **spec.overrides())
        m.to(ctx.device)
        cfg = m.config
        samples = int(round(cfg.clip_seconds * cfg.sample_rate))
        return {
            "state": {k: v.detach().clone() for k, v in m.state_dict().items()},
            "samples": samples,
            "sample_rate": cfg.sample_rate,
            "num_classes": cfg.num_classes,
            "params": sum(p.numel() for p in m.parameters()),
        }

    return ctx.memoize(("model_base", spec), build)


def _inputs(ctx: RunContext, base: dict, batch: int, seed: int):
    g = torch.Generator(device=ctx.device)
    g.manual_seed(seed)
    wave = 0.1 * torch.randn(batch, base["samples"], generator=g, device=ctx.device)
    target = (torch.rand(batch, base["num_classes"], generator=g, device=ctx.device) < 0.05).float()
    return wave, target


def _eval_outputs_and_grads(model, wave, target, device, dtype: str):
    """Eval-mode outputs and parameter gradients of the BCE loss (the error probe)."""
    base = _base(model)
    base.eval()
    base.zero_grad(set_to_none=True)
    with _autocast(device, dtype):
        out = model(wave)
    loss = F.binary_cross_entropy_with_logits(out["clipwise_logits"].float(), target)
    loss.backward()
    outs = {k: v.detach().float() for k, v in out.items()}
    grads = {n: p.grad.detach().float().clone() for n, p in base.named_parameters() if p.grad is not None}
    base.zero_grad(set_to_none=True)
    return outs, grads


def _norm_rel(outs, grads, ref_outs, ref_grads, with_grads: bool) -> float:
    """The largest norm-relative error ||a - r|| / ||r|| over the outputs (and every parameter gradient)."""
    pairs = [(v, ref_outs[k]) for k, v in outs.items() if k in ref_outs]
    if with_grads:
        pairs += [(g, ref_grads[n]) for n, g in grads.items() if n in ref_grads]
    errs = [((a.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item() for a, r in pairs]
    return max(errs) if errs else float("nan")


def _coverage(decisions) -> dict:
    """Calls of the measured forward that ran fused, all calls, and why the others ran the reference."""
    reasons: dict[str, int] = {}
    for d in decisions:
        if not d.fused:
            key = f"{d.op}: {d.reason}"
            reasons[key] = reasons.get(key, 0) + 1
    return {"fused_calls": sum(1 for d in decisions if d.fused), "calls": len(decisions), "declines": reasons}


def _compare(outs, grads, ref_outs, ref_grads, with_grads: bool):
    pairs = {k: (v, ref_outs[k]) for k, v in outs.items() if k in ref_outs}
    max_abs, max_rel, detail = combine_errors(pairs)
    if with_grads:
        g_abs, g_rel, worst = 0.0, 0.0, None
        missing = sorted(set(ref_grads) - set(grads))
        for name, g in grads.items():
            if name not in ref_grads:
                continue
            a, r = tensor_errors(g, ref_grads[name])
            if r > g_rel or worst is None:
                worst = name
            g_abs, g_rel = max(g_abs, a), max(g_rel, r)
        detail["grads"] = {"max_abs_err": g_abs, "max_rel_err": g_rel, "worst_param": worst, "n_params": len(grads)}
        if missing:
            detail["grads"]["missing"] = missing[:5]
        max_abs, max_rel = max(max_abs, g_abs), max(max_rel, g_rel)
    return max_abs, max_rel, detail


def _saved_mb(model, wave, target, device, dtype: str) -> float:
    """Bytes the training forward keeps for backward (bench/saved_memory.py), in MiB."""
    from .saved_memory import MIB, count_saved, htsat_stages

    def forward():
        with _autocast(device, dtype):
            out = model(wave)
        return F.binary_cross_entropy_with_logits(out["clipwise_logits"].float(), target)

    # a compiled model gets no stage hooks: module hooks are guarded on and would recompile it
    stages = None if hasattr(model, "_orig_mod") else htsat_stages(model)
    saved, loss = count_saved(model, forward, stages)
    loss.backward()
    _base(model).zero_grad(set_to_none=True)
    return saved.total / MIB


@dataclass(frozen=True)
class ModelCase(Case):
    provider: str
    mode: str
    batch: int
    dtype: str
    spec: ModelSpec = field(default_factory=ModelSpec)
    error_batch: int = 1
    section: str = "model"
    where: str = ""

    def fields(self) -> dict:
        return {
            "section": self.section,
            "op": "model",
            "provider": self.provider,
            "mode": self.mode,
            "dtype": self.dtype,
            "shape": f"B={self.batch} clips x {self.spec.label}",
            "stage": None,
            "stage_label": self.spec.label,
            "batch": self.batch,
            "bytes": None,
            "bytes_formula": None,
            "where": self.where,
            "autocast": self.dtype != "fp32",
            "backend": _backend_of(self.provider, torch.device(self.where or "cpu"))
            + (
                " (CPU: C++ twins where they load, reference attention)"
                if self.where == "cpu" and self.provider.startswith("fused")
                else ""
            ),
            "clips_per_s": None,
            "save_policy": _save_policy_of(self.provider),
        }

    def plan_skip(self, ctx: RunContext) -> str | None:
        reason = htsat_import_error()
        if reason:
            return reason
        if ctx.quick and "compile" in self.provider:
            return QUICK_COMPILE_REASON
        if "compile" in self.provider and ctx.device.type != "cuda" and not ctx.model_compile_on_cpu:
            return CPU_COMPILE_REASON
        key = ("model", self.provider)
        if key in ctx.sticky:
            return ctx.sticky[key]
        if self.provider.startswith("fused"):
            import htsat_kernels as hk

            status = hk.fused_status()
            avail = [op for op, s in status.items() if s == "available"]
            if not avail:
                return "no fused op can load: " + "; ".join(f"{op}: {s}" for op, s in status.items())
        return None

    def _model(self, ctx: RunContext):
        def build():
            import htsat

            base = _base_state(ctx, self.spec)
            m = htsat.create_model(
                self.spec.name,
                backend=_backend_of(self.provider, ctx.device),
                save_policy=_save_policy_of(self.provider),
                **self.spec.overrides(),
            )
            m.to(ctx.device)
            m.load_state_dict(base["state"])
            if hasattr(m, "check_inputs"):
                m.check_inputs = False  # a host sync per call: not part of what is measured
            return torch.compile(m) if "compile" in self.provider else m

        return ctx.group(("model", self.provider, self.spec), build)

    def _errors(self, ctx: RunContext, model) -> dict:
        base = _base_state(ctx, self.spec)
        wave, target = _inputs(ctx, base, self.error_batch, seed=123)

        def golden(dtype: str):
            def build():
                import htsat

                ref = htsat.create_model(self.spec.name, backend="reference", **self.spec.overrides()).to(ctx.device)
                ref.load_state_dict(base["state"])
                res = _eval_outputs_and_grads(ref, wave, target, ctx.device, dtype)
                del ref
                return res

            return ctx.memoize(("model_gold", self.spec, self.error_batch, dtype), build)

        def measure():
            import htsat_kernels as hk

            _base(model).load_state_dict(base["state"])
            with hk.record_dispatch() as decisions:
                outs, grads = _eval_outputs_and_grads(model, wave, target, ctx.device, self.dtype)
            g32_o, g32_g = golden("fp32")
            res: dict = {"fp32": {}, "same": {}, "norm_rel": {}, "coverage": _coverage(decisions)}
            for with_grads, mode in ((False, "inference"), (True, "train")):
                res["fp32"][mode] = _compare(outs, grads, g32_o, g32_g, with_grads)
                lo_o, lo_g = golden(self.dtype) if self.dtype != "fp32" else (g32_o, g32_g)
                res["same"][mode] = _compare(outs, grads, lo_o, lo_g, with_grads)
                # the model 2x rule (docs/design.md, numerics): against fp32, at most twice the reference's
                # own norm-relative error in this dtype plus 1e-3
                mine = _norm_rel(outs, grads, g32_o, g32_g, with_grads)
                theirs = _norm_rel(lo_o, lo_g, g32_o, g32_g, with_grads)
                res["norm_rel"][mode] = {"fused": mine, "reference": theirs, "ok": bool(mine <= 2 * theirs + 1e-3)}
            return res

        return ctx.memoize(("model_err", self.provider, self.spec, self.dtype), measure)

    def prepare(self, ctx: RunContext) -> Prepared:
        try:
            model = self._model(ctx)
            errs = self._errors(ctx, model)
        except Skip:
            raise
        except Exception as exc:
            reason = reason_of(exc)
            if "out of memory" not in reason.lower():
                ctx.sticky[("model", self.provider)] = (
                    f"{reason} (first failure at {self.mode} B={self.batch} {self.dtype}; not retried)"
                )
            raise Skip(reason) from exc
        max_abs, max_rel, detail = errs["fp32"][self.mode]
        same_abs, same_rel, _ = errs["same"][self.mode]
        base = _base_state(ctx, self.spec)
        bm = _base(model)
        bm.load_state_dict(base["state"])
        param_bytes = sum(p.numel() * p.element_size() for p in bm.parameters())
        wave, target = _inputs(ctx, base, self.batch, seed=7)
        device = ctx.device
        baseline = memory_baseline(device) - param_bytes
        fields = {
            "max_abs_err": max_abs,
            "max_rel_err": max_rel,
            "errors": detail,
            "max_abs_diff_vs_reference": same_abs,
            "max_rel_diff_vs_reference": same_rel,
            "norm_rel_err": errs["norm_rel"][self.mode]["fused"],
            "reference_norm_rel_err": errs["norm_rel"][self.mode]["reference"],
            "numerics_ok": errs["norm_rel"][self.mode]["ok"],
            "fused_calls": errs["coverage"]["fused_calls"],
            "calls": errs["coverage"]["calls"],
            "declines": errs["coverage"]["declines"],
            "error_batch": self.error_batch,
            "params": base["params"],
            "samples_per_clip": base["samples"],
            "sample_rate": base["sample_rate"],
        }
        if self.mode == "inference":
            bm.eval()

            def fn():
                with torch.no_grad(), _autocast(device, self.dtype):
                    model(wave)

        else:
            bm.train()
            opt = torch.optim.AdamW(bm.parameters(), lr=1e-4)

            def fn():
                opt.zero_grad(set_to_none=True)
                with _autocast(device, self.dtype):
                    out = model(wave)
                loss = F.binary_cross_entropy_with_logits(out["clipwise_logits"].float(), target)
                loss.backward()
                opt.step()

        try:
            fn()  # warm-up (compiles where needed)
        except Exception as exc:
            raise Skip(reason_of(exc)) from exc
        if self.mode == "train":
            try:
                fields["saved_mb"] = _saved_mb(model, wave, target, device, self.dtype)
            except Exception as exc:  # the count is extra: the timing still runs
                fields["saved_mb_error"] = reason_of(exc)
        return Prepared(fn, None, fields, timed=True, items_per_call=self.batch, baseline_alloc=baseline)


def build_model_cases(
    *, device: torch.device, providers, dtypes, modes, quick: bool, spec: ModelSpec | None = None
) -> list[ModelCase]:
    if spec is None:
        # The full model on a CPU is minutes per compiled graph: CPU runs use the tiny config
        # (--model-config htsat-audioset asks for the full one).
        tiny = quick or device.type != "cuda"
        spec = ModelSpec("htsat-audioset", tiny=tiny, label="htsat-tiny" if tiny else "htsat-audioset")
    if device.type == "cuda" and not quick:
        batches = {"train": (32, 128), "inference": (1, 32, 128)}
        err_b = 4
    else:
        batches = {"train": (2,), "inference": (1, 2)}
        err_b = 1
    where = "cuda" if device.type == "cuda" else "cpu"
    cases = []
    for p in providers:
        if p not in MODEL_PROVIDERS:
            continue
        for mode in modes:
            if mode == "train":
                mdtypes = ["bf16"] if "bf16" in dtypes else list(dtypes[:1])
            else:
                mdtypes = list(dtypes)
                if quick:
                    mdtypes = [d for d in mdtypes if d in ("fp32", "bf16")] or mdtypes[:1]
                elif device.type != "cuda":
                    # CPU: compiling the model takes minutes per graph; one inference dtype.
                    mdtypes = [d for d in mdtypes if d == "fp32"] or mdtypes[:1]
            for B in batches[mode]:
                for dt in mdtypes:
                    cases.append(ModelCase(p, mode, B, dt, spec, err_b, "model", where))
    return cases
