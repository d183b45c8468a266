"""The index maps of the compiled extension (csrc/index_maps.h), which the CUDA kernels and their C++
CPU twins share: the fast divisor of the 32-bit index path against Python's ``//``, and the row maps of
the windowed layout and of patch merging in both index types (int32 with fast divisors, int64 with plain
division) against maps built from ``torch.roll`` and slicing. At test sizes the ops take the int32 path
only, so these test-only ops are how the CPU tests reach the int64 one as well (issue #10)."""

from __future__ import annotations

import pytest
import torch

try:
    from htsat_kernels.fused import extension  # noqa: F401  (registers torch.ops.htsat_kernels)
except ImportError as exc:  # the compiled extension is optional: say why and skip
    pytest.skip(str(exc), allow_module_level=True)

ops = torch.ops.htsat_kernels
INT32_MAX = 2**31 - 1


def _divisors() -> list[int]:
    ds = set(range(1, 1100))
    for s in range(1, 31):
        ds.update({2**s - 1, 2**s, 2**s + 1})
    ds.update({INT32_MAX, INT32_MAX - 1, 2**31 // 3, 46341, 65521, 1000003, 2147483629})
    gen = torch.Generator().manual_seed(0)
    ds.update(torch.randint(1, INT32_MAX, (200,), generator=gen).tolist())
    return sorted(d for d in ds if 1 <= d <= INT32_MAX)


def test_fast_divisor_matches_floor_division():
    gen = torch.Generator().manual_seed(1)
    rand = torch.randint(0, INT32_MAX, (2000,), generator=gen, dtype=torch.int64)
    for d in _divisors():
        top = INT32_MAX - INT32_MAX % d  # the largest multiple of d that fits
        edges = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, top - 1, top, INT32_MAX - 1, INT32_MAX]
        n = torch.cat([torch.tensor([e for e in edges if 0 <= e <= INT32_MAX]), rand]).to(torch.int32)
        want = (n.to(torch.int64) // d).to(torch.int32)
        got = ops._fast_divide(n, d)
        assert torch.equal(got, want), f"d={d}: {n[got != want][:5].tolist()}"


@pytest.mark.parametrize("d", [3, 7, 24, 49, 64, 96, 144, 1000, 65537])
def test_fast_divisor_exhaustive_low_range(d):
    n = torch.arange(0, 2**22, dtype=torch.int32)
    assert torch.equal(ops._fast_divide(n, d), n // d)


def _window_map(B, H, W, ws, shift):
    pix = torch.arange(B * H * W).reshape(B, H, W)
    pix = torch.roll(pix, (-shift, -shift), dims=(1, 2))
    return pix.reshape(B, H // ws, ws, W // ws, ws).permute(0, 1, 3, 2, 4).reshape(-1)


def _patch_merge_map(B, H, W):
    pix = torch.arange(B * H * W).reshape(B, H, W)
    segs = [pix[:, 0::2, 0::2], pix[:, 1::2, 0::2], pix[:, 0::2, 1::2], pix[:, 1::2, 1::2]]
    return torch.stack(segs, dim=-1).reshape(-1, 4)


WINDOW_CASES = [
    (2, 64, 64, 8, 4),  # HTS-AT stage 1 at batch 2, shifted
    (2, 64, 64, 8, 0),
    (3, 16, 16, 8, 4),
    (1, 8, 8, 8, 4),  # one window: the shift wraps inside it
    (2, 6, 9, 3, 1),  # H != W, odd window
    (2, 6, 9, 3, -7),  # negative shift, past the size
    (1, 12, 20, 4, 1000003),
]


@pytest.mark.parametrize("B,H,W,ws,shift", WINDOW_CASES)
@pytest.mark.parametrize("int32_index", [True, False])
def test_window_row_map(B, H, W, ws, shift, int32_index):
    got = ops._row_map(0, B, H, W, ws, shift, int32_index)
    assert torch.equal(got, _window_map(B, H, W, ws, shift))


@pytest.mark.parametrize("B,H,W", [(2, 64, 64), (3, 8, 4), (1, 2, 2), (2, 6, 10)])
@pytest.mark.parametrize("int32_index", [True, False])
def test_patch_merge_row_map(B, H, W, int32_index):
    got = ops._row_map(1, B, H, W, 1, 0, int32_index)
    assert torch.equal(got, _patch_merge_map(B, H, W))


def test_row_map_refuses_int32_past_its_range():
    with pytest.raises(RuntimeError, match="int32_index"):
        ops._row_map(0, 2, 2**15, 2**15, 8, 0, True)
