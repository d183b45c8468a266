"""The results file's record schema and naming (no torch import: the compare tool uses it)."""

from __future__ import annotations

import re

# Every record carries these keys (null where a field does not apply). Records also carry
# extra keys: stage, stage_label, batch, bytes, bytes_formula, where, reps, pct_peak_bw, errors
# (per-tensor detail), and for the model clips_per_s, max_abs_diff_vs_reference, ...
RECORD_FIELDS = (
    "section",
    "op",
    "provider",
    "mode",
    "dtype",
    "shape",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_mem_mb",
    "gbps",
    "max_abs_err",
    "max_rel_err",
    "skipped_reason",
)

# Records of the compile report (``python -m bench --static``, ``kind: "static"``), first columns
# of its CSV; records also carry backend, preset, has_mask, shape, warps_per_sm, occupancy_limit,
# wgmma, mma_sync, dots, dots_on_tensor_cores, ideal_us, int64_div_calls, config, error, ...
STATIC_FIELDS = (
    "kind",
    "kernel",
    "op",
    "direction",
    "dtype",
    "stage",
    "arch",
    "registers",
    "spill_bytes",
    "shared_bytes",
    "num_warps",
    "blocks_per_sm",
    "tensor_core_instructions",
)

META_FIELDS = ("device", "driver", "torch", "triton", "git_commit", "date", "quick")


def device_slug(info: dict) -> str:
    """File-name-safe short name of the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    if info.get("device_type") != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", str(info.get("device", "")).lower()).strip("-")
    return slug or "cuda"
