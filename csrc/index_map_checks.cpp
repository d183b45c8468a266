// Test-only ops over the index maps (index_maps.h), so that the CPU tests cover the map code the CUDA kernels
// run in both index types (tests/test_index_maps.py): the fast divisor against `//`, and the row maps of
// the windowed layout and of patch merging evaluated in int32 (fast divisors) and in int64 (plain division).
// Registered as catch-all kernels under leading-underscore names; not part of the op API.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "index_maps.h"

namespace htsat {
namespace {

// n / d through FastDivisor(d) for every element of the int32 tensor n (0 <= n <= INT32_MAX, 1 <= d <= INT32_MAX).
at::Tensor fast_divide(const at::Tensor& n, int64_t d) {
  TORCH_CHECK(n.scalar_type() == at::kInt && n.device().is_cpu(), "n: expected an int32 CPU tensor");
  TORCH_CHECK(d >= 1 && d <= INT32_MAX, "d: expected 1 <= d <= 2^31 - 1, got ", d);
  const at::Tensor src = n.contiguous();
  TORCH_CHECK(src.numel() == 0 || src.min().item<int32_t>() >= 0, "n: expected non-negative values");
  at::Tensor q = at::empty_like(src);
  const FastDivisor fd(d);
  const int32_t* s = src.const_data_ptr<int32_t>();
  int32_t* o = q.mutable_data_ptr<int32_t>();
  for (int64_t i = 0; i < src.numel(); ++i) o[i] = fd.quotient(s[i]);
  return q;
}

// Pixel row of every output row of the map: kind 0 the windowed layout of (B, H, W) with window_size and
// shift (WindowRows), kind 1 patch merging of (B, H, W) (PatchMergeRows, segment 0); int32_index selects
// the index type the kernels would use.
at::Tensor row_map(int64_t kind, int64_t B, int64_t H, int64_t W, int64_t window_size, int64_t shift,
                   bool int32_index) {
  TORCH_CHECK(kind == 0 || kind == 1, "kind: expected 0 (window) or 1 (patch merge), got ", kind);
  TORCH_CHECK(B > 0 && H > 0 && W > 0, "B, H, W: expected positive sizes");
  const int64_t pixels = checked_size_product("B, H, W", {B, H, W});
  TORCH_CHECK(!int32_index || fits_int32_index(pixels, 0), "int32_index: B * H * W does not fit int32");
  if (kind == 0) {
    TORCH_CHECK(window_size > 0 && H % window_size == 0 && W % window_size == 0,
                "window_size: expected a positive divisor of H and W");
    const WindowGeometry g{B, H, W, window_size, positive_mod(shift, H), positive_mod(shift, W), 1};
    const WindowRows map(g);
    at::Tensor out = at::empty({pixels}, at::kLong);
    int64_t* o = out.mutable_data_ptr<int64_t>();
    for (int64_t r = 0; r < pixels; ++r) o[r] = map_row_base(map, r, int32_index);
    return out;
  }
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0, "H, W: expected even sizes for patch merging");
  const PatchMergeRows map(H, W);
  const int64_t rows = pixels / 4;
  at::Tensor out = at::empty({rows, 4}, at::kLong);
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = map_row_base(map, r, int32_index);
    for (int k = 0; k < PatchMergeRows::kSegments; ++k) o[r * 4 + k] = base + map.offset(k);
  }
  return out;
}

}  // namespace
}  // namespace htsat

TORCH_LIBRARY_FRAGMENT(htsat_kernels, m) {
  m.def("_fast_divide(Tensor n, int d) -> Tensor", &htsat::fast_divide);
  m.def("_row_map(int kind, int B, int H, int W, int window_size, int shift, bool int32_index) -> Tensor",
        &htsat::row_map);
}
