"""CLAP embedding throughput (issue 11): ``clap-htsat-base`` three ways, on the same weights.

``python -m bench --clap [N]`` writes ``clap_<device>_<date>.json`` to ``--out``: clips/s of the
CLAP audio embedding (10 s clips at 48 kHz, batches of ``--clap-batch``) for

- ``ours``: ``htsat.create_model("clap-htsat-base")`` with laion-clap's weights loaded through
  ``htsat.load_checkpoint`` (output ``clap_embedding``), on the ambient backend ("auto");
- ``laion``: laion-clap's own HTSAT audio branch and ``audio_projection`` (its unchanged
  ``htsat.py``, loaded as the tests load it), then the L2 normalisation CLAP applies;
- ``patched``: the same laion-clap modules after ``htsat_kernels.integrations.patch_clap``.

The weights are laion-clap's initialisation, perturbed so that no layer is trivial; each record
also carries the largest difference of ``ours`` and ``patched`` from ``laion`` (the three compute
the same function). On CPU the fused ops that "auto" picks are the C++ twins (attention stays on
the reference there), so the figures say little about a GPU.
"""

from __future__ import annotations

import copy
import datetime
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
SR = 48000
CLIP = 10 * SR


def _laion_base():
    """laion-clap's HTSAT-base audio branch and projection, via the loader the tests use."""
    import torch
    from torch import nn

    sys.path.insert(0, str(REPO / "tests"))
    try:
        from original_htsat import load_original_module
    finally:
        sys.path.pop(0)
    try:
        module = load_original_module()
    except BaseException as exc:  # pytest.skip when laion-clap / torchlibrosa are absent
        raise SystemExit(f"--clap needs laion-clap and torchlibrosa (the test extra): {exc}") from None
    cfg = SimpleNamespace(
        model_name="base", class_num=527, sample_rate=SR, window_size=1024, hop_size=480, mel_bins=64, fmin=50, fmax=14000
    )
    torch.manual_seed(0)
    branch = module.create_htsat_model(cfg)
    projection = nn.Sequential(nn.Linear(branch.num_features, 512), nn.ReLU(), nn.Linear(512, 512))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*branch.parameters(), *projection.parameters()]:
            if p.requires_grad:  # not the frozen STFT / mel weights
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return branch.eval(), projection.eval()


def run(out: Path, *, clips: int = 16, batch: int = 4, device: str = "cpu", threads=None, repeats: int = 3) -> dict:
    import torch
    import torch.nn.functional as F

    import htsat
    import htsat_kernels.integrations as hki

    if threads:
        torch.set_num_threads(threads)
    branch, projection = _laion_base()
    sd = {f"module.audio_branch.{k}": v for k, v in branch.state_dict().items()}
    sd.update({f"module.audio_projection.{k}": v for k, v in projection.state_dict().items()})
    ours = htsat.create_model("clap-htsat-base")
    htsat.load_checkpoint(ours, {"state_dict": sd})
    ours = ours.eval().to(device)
    branch, projection = branch.to(device), projection.to(device)
    patched = copy.deepcopy(branch)
    hki.patch_clap(patched)

    def laion_fn(m):
        return lambda x: F.normalize(projection(m({"waveform": x})["embedding"]), dim=-1)

    providers = {"ours": lambda x: ours(x)["clap_embedding"], "laion": laion_fn(branch), "patched": laion_fn(patched)}
    g = torch.Generator().manual_seed(0)
    waves = [(0.1 * torch.randn(batch, CLIP, generator=g)).to(device) for _ in range(max(1, clips // batch))]
    n = len(waves) * batch
    embeddings = {}
    best = dict.fromkeys(providers, float("inf"))
    with torch.inference_mode():
        for name, fn in providers.items():
            embeddings[name] = fn(waves[0])  # warm-up, and the output compared below
        for _ in range(repeats):  # providers interleaved: a change of machine load hits all of them alike
            for name, fn in providers.items():
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for w in waves:
                    fn(w)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - t0)
    results = {name: round(n / t, 3) for name, t in best.items()}
    err = {k: float((embeddings[k] - embeddings["laion"]).abs().max()) for k in ("ours", "patched")}
    rec = {
        "case": "clap_embedding",
        "model": "clap-htsat-base (laion-clap HTSAT-base + audio_projection)",
        "device": device,
        "clip_seconds": 10,
        "sample_rate": SR,
        "clips": n,
        "batch": batch,
        "torch_threads": torch.get_num_threads(),
        "clips_per_s": results,
        "max_abs_diff_vs_laion": err,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"clap_{device.split(':')[0]}_{rec['date']}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    print(
        f"CLAP embedding, clap-htsat-base, {n} clips of 10 s, batch {batch} on {device}: "
        + ", ".join(f"{k} {v} clips/s" for k, v in results.items())
        + f" (max |ours - laion| {err['ours']:.1e}, |patched - laion| {err['patched']:.1e})"
    )
    print(f"results: {path}")
    return rec
