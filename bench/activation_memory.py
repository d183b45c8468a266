"""The ``memory`` section: what a training step keeps for backward, per configuration, on any device.

For each configuration (backend x save policy, fp32 and bf16 autocast) at one batch: the exact bytes
saved for backward by the training forward (``bench.saved_memory``: saved-tensor hooks, each storage
once, parameters and buffers left out), per stage and per op; the ratio to the reference (eager
PyTorch, backend "reference", save policy "all") at the same batch and dtype; the time of forward +
backward (best of ``repeats``, the configurations interleaved) against the same backend saving
everything (the cost of the recomputation); and the batch whose saved activations fit a memory
budget (``B per 80 GB``: budget less parameters, gradients and AdamW state, over the saved bytes per
clip: an upper bound, as the backward's transient buffers come on top). On CUDA also the step's peak
allocated memory above the model's (``peak_mem_mb``), and the budget batch from it.

On a CPU-only machine "fused" means backend "auto" (C++ twins; the attention runs the reference,
which under a saving policy keeps qkv only, as the fused kernel keeps qkv + log-sum-exp: the same
bytes but for the (B_, h, N) fp32 log-sum-exp). With the Triton interpreter on, one more
configuration runs backend "fused" (the Triton attention) at batch 1, counted but not timed.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from .saved_memory import MIB, count_saved, htsat_stages

BUDGET_BYTES = 80 * 10**9  # "B per 80 GB": an 80 GB GPU (H100 / A100-80GB)
# (label, model backend on CUDA, model backend on CPU, save policy); the first is the baseline
CONFIGS = (
    ("reference", "reference", "reference", "all"),
    ("fused", "fused", "auto", "all"),
    ("fused", "fused", "auto", "recompute-norms"),
    ("fused", "fused", "auto", "recompute-norms-mlp"),
)
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# the fields every bench record carries; these records hold their own (step_ms, saved_mb, ...)
_UNTIMED = dict.fromkeys(("median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "gbps", "max_abs_err", "max_rel_err", "skipped_reason"))


def _model(name: str, overrides: dict, backend: str, policy: str, device: torch.device):
    import htsat

    torch.manual_seed(0)
    model = htsat.create_model(name, backend=backend, save_policy=policy, **overrides).to(device).train()
    model.check_inputs = False
    model.use_spec_augment = False  # the same input for every configuration and repeat
    return model


def _forward(model, wave, target, device: torch.device, dtype: str):
    def run():
        ac = torch.autocast(device.type, DTYPES[dtype]) if DTYPES[dtype] else contextlib.nullcontext()
        with ac:
            out = model(wave)
        return F.binary_cross_entropy_with_logits(out["clipwise_logits"].float(), target)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fixed_bytes(model) -> int:
    """Parameters, their gradients and AdamW's two moments: what a training step holds besides activations."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


def measure(
    device: torch.device,
    name: str = "htsat-audioset",
    overrides: dict | None = None,
    label: str = "htsat-audioset",
    batch: int = 2,
    dtypes=("fp32", "bf16"),
    repeats: int = 3,
    interpreter_batch: int | None = None,
    progress=None,
) -> list[dict]:
    """The memory section's records (one per configuration and dtype)."""
    overrides = overrides or {}
    cuda = device.type == "cuda"
    records = []
    for dtype in dtypes:
        models = [_model(name, overrides, cb if cuda else pb, pol, device) for _, cb, pb, pol in CONFIGS]
        cfg = models[0].config
        gen = torch.Generator(device=device).manual_seed(0)
        wave = 0.1 * torch.randn(batch, int(round(cfg.clip_seconds * cfg.sample_rate)), generator=gen, device=device)
        target = (torch.rand(batch, cfg.num_classes, generator=gen, device=device) < 0.05).float()
        rows = []
        for model in models:
            saved, loss = count_saved(model, _forward(model, wave, target, device, dtype), htsat_stages(model))
            loss.backward()
            model.zero_grad(set_to_none=True)
            rows.append({"saved": saved, "best_s": float("inf"), "peak": None})
            if progress:
                progress()
        for _ in range(repeats):  # interleaved: the configurations share whatever else the machine does
            for model, row in zip(models, rows):
                fwd = _forward(model, wave, target, device, dtype)
                if cuda:
                    model.zero_grad(set_to_none=True)
                    _sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                _sync(device)
                t0 = time.perf_counter()
                fwd().backward()
                _sync(device)
                row["best_s"] = min(row["best_s"], time.perf_counter() - t0)
                if cuda:
                    row["peak"] = torch.cuda.max_memory_allocated(device) - before
                model.zero_grad(set_to_none=True)
        ref_saved = rows[0]["saved"].total
        all_time = {CONFIGS[i][0]: rows[i]["best_s"] for i in range(len(CONFIGS)) if CONFIGS[i][3] == "all"}
        fixed = _fixed_bytes(models[0])
        for (prov, cb, pb, pol), row in zip(CONFIGS, rows):
            records.append(
                _record(label, prov, cb if cuda else pb, pol, dtype, batch, row, ref_saved, all_time[prov], fixed, device)
            )
        del models
    if interpreter_batch and not cuda:
        records += _interpreter_records(name, overrides, label, interpreter_batch, dtypes, device)
    return records


def _record(label, provider, backend, policy, dtype, batch, row, ref_saved, all_time, fixed, device) -> dict:
    saved = row["saved"]
    per_clip = saved.total / batch
    rec = {
        "section": "memory",
        "op": "model",
        "provider": provider,
        "mode": "train",
        "dtype": dtype,
        "autocast": dtype != "fp32",
        "batch": batch,
        "shape": f"B={batch} clips x {label}, save {policy}",
        "stage_label": label,
        "where": device.type,
        "backend": backend,
        "save_policy": policy,
        **_UNTIMED,
        "saved_mb": saved.total / MIB,
        "saved_vs_reference": saved.total / ref_saved,
        "step_ms": row["best_s"] * 1e3,
        "step_vs_save_all": row["best_s"] / all_time,
        "clips_per_80gb": int((BUDGET_BYTES - fixed) // per_clip),
        "how": "saved-tensor hooks, each storage once, parameters and buffers excluded; time: forward + loss + backward, best of the interleaved repeats",
        **saved.as_record(),
    }
    if row["peak"] is not None:
        rec["peak_mem_mb"] = row["peak"] / MIB
        rec["clips_per_80gb_by_peak"] = int((BUDGET_BYTES - fixed) // (row["peak"] / batch))
    return rec


def _interpreter_records(name, overrides, label, batch, dtypes, device) -> list[dict]:
    """Backend "fused" with the Triton attention in the interpreter: counted, not timed."""
    import htsat_kernels as hk

    if hk.fused_status().get("window_attention") != "available":
        return []
    out = []
    for dtype in [d for d in dtypes if d == "fp32"]:
        counts = []
        for backend, policy in (("reference", "all"), ("fused", "recompute-norms-mlp")):
            model = _model(name, overrides, backend, policy, device)
            cfg = model.config
            gen = torch.Generator().manual_seed(0)
            wave = 0.1 * torch.randn(batch, int(round(cfg.clip_seconds * cfg.sample_rate)), generator=gen)
            target = torch.zeros(batch, cfg.num_classes)
            saved, loss = count_saved(model, _forward(model, wave, target, device, dtype), htsat_stages(model))
            del loss
            counts.append(saved)
        saved = counts[1]
        out.append(
            {
                "section": "memory",
                "op": "model",
                "provider": "fused (Triton interpreter)",
                "mode": "train",
                "dtype": dtype,
                "autocast": False,
                "batch": batch,
                "shape": f"B={batch} clips x {label}, save recompute-norms-mlp",
                **_UNTIMED,
                "stage_label": label,
                "where": device.type,
                "backend": "fused",
                "save_policy": "recompute-norms-mlp",
                "saved_mb": saved.total / MIB,
                "saved_vs_reference": saved.total / counts[0].total,
                "how": "saved-tensor hooks as above; the Triton attention runs in the interpreter (not timed)",
                **saved.as_record(),
            }
        )
    return out
