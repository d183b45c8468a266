"""The model check that opens the report: presets build with the original's parameter counts, and
the AudioSet model's outputs on generated audio are well formed and agree across backends."""

from __future__ import annotations

import math
import warnings

import torch

# trainable parameters of the original per preset (docs/model.md §8: total minus the frozen front end)
EXPECTED_TRAINABLE = {"htsat-audioset": 30_241_687}


def _tone_clip(sample_rate: int, seconds: float) -> torch.Tensor:
    """A 440 Hz + 2 kHz tone with a little noise: generated audio, no files needed."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(sample_rate * seconds)) / sample_rate
    x = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.1 * torch.sin(2 * math.pi * 2000 * t)
    return (x + 0.01 * torch.randn(t.shape, generator=g))[None]


def model_check(device: torch.device) -> dict:
    import htsat
    import htsat_kernels

    out: dict = {"presets": {}, "backends": {}, "checks": []}
    for name in htsat.PRESETS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # htsat-scv2 caps fmax at Nyquist and says so
            m = htsat.create_model(name)
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        out["presets"][name] = {"classes": m.config.num_classes, "trainable_params": trainable}
        if name in EXPECTED_TRAINABLE:
            out["checks"].append(
                (f"{name} trainable parameters = {EXPECTED_TRAINABLE[name]:,}", trainable == EXPECTED_TRAINABLE[name])
            )

    torch.manual_seed(0)
    model = htsat.create_model("htsat-audioset").to(device).eval()
    x = _tone_clip(model.config.sample_rate, 10.0).to(device)
    # on CPU "fused" would run the Triton interpreter at full size: check "auto" (the C++ twins) there
    backends = ["reference", "fused" if device.type == "cuda" else "auto"]
    results = {}
    for backend in backends:
        model.backend = backend
        try:
            with torch.no_grad():
                results[backend] = {k: v.float().cpu() for k, v in model(x).items()}
        except htsat_kernels.BackendUnavailable as exc:
            out["backends"][backend] = f"unavailable: {exc}"
    model.backend = "auto"
    ref = results.get("reference")
    if ref is not None:
        shapes_ok = (
            ref["clipwise_output"].shape == (1, 527)
            and ref["framewise_output"].shape == (1, 1024, 527)
            and ref["latent_output"].shape == (1, 768)
        )
        out["checks"].append(("10 s clip -> clipwise (1, 527), framewise (1, 1024, 527), latent (1, 768)", shapes_ok))
        finite = all(torch.isfinite(v).all() for v in ref.values())
        probs = bool(((ref["clipwise_output"] >= 0) & (ref["clipwise_output"] <= 1)).all())
        out["checks"].append(("outputs finite, clipwise probabilities in [0, 1]", finite and probs))
        rel = torch.allclose(torch.sigmoid(ref["clipwise_logits"]), ref["clipwise_output"], atol=1e-6)
        out["checks"].append(("clipwise_output == sigmoid(clipwise_logits)", rel))
    for backend, res in results.items():
        if backend == "reference" or ref is None:
            continue
        diff = max((res[k] - ref[k]).abs().max().item() for k in ref)
        out["backends"][backend] = f"max |output - reference| = {diff:.2e}"
        out["checks"].append((f"backend {backend!r} equals the reference to 1e-4", diff <= 1e-4))
    out["fused_status"] = htsat_kernels.fused_status()
    out["ok"] = all(ok for _, ok in out["checks"])
    out["checks"] = [{"check": c, "ok": bool(ok)} for c, ok in out["checks"]]
    return out


def render(check: dict) -> str:
    lines = ["#### Model check (HTS-AT on generated audio)", ""]
    for name, p in check["presets"].items():
        lines.append(f"  {name:15s} {p['classes']:4d} classes  {p['trainable_params']:>12,} trainable parameters")
    for c in check["checks"]:
        lines.append(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['check']}")
    for backend, status in check["backends"].items():
        lines.append(f"  backend {backend}: {status}")
    lines.append("  fused ops: " + ", ".join(f"{op}={s}" for op, s in check["fused_status"].items()))
    return "\n".join(lines)
