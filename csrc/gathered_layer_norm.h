// Gathered LayerNorm: output row r = LayerNorm over the concatenation of Rows::kSegments segments of C
// channels read from pixel rows src.base(r) + src.offset(k) (index_maps.h). Patch merging (PatchMergeRows:
// 2x2 gather + LayerNorm(4C)) and the fused norm1 + shifted window partition (WindowRows: LayerNorm(C) of
// the pixel each windowed token maps to) are its two instances; the backward scatters grad_x through the
// same map and, in the same pass over x and dy, sums the weight/bias gradient per chunk of rows; a second
// step reduces the chunks' partial rows in a fixed order (deterministic, no float atomics).
//
// The launchers take raw pointers of contiguous, checked, non-empty tensors; the op entry points
// (gathered_layer_norm.cpp) check, allocate and call the launcher of the input's device. Statistics are
// in the accumulation type (floating_types.h). No ATen include (nvcc).
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "index_maps.h"

namespace htsat {

// LayerNorm backward for one element: g = dy * weight, xhat = (x - mean) * rstd,
// mean_g = mean(g), mean_gx = mean(g * xhat) over the row.
template <typename acc_t>
HOST_DEVICE inline acc_t layer_norm_grad_input(acc_t g, acc_t xhat, acc_t rstd, acc_t mean_g, acc_t mean_gx) {
  return rstd * (g - mean_g - xhat * mean_gx);
}

// Deterministic split of the rows for the weight/bias gradient: depends on the row count only (never on
// the thread count or the device). The rows are cut into chunks of per_chunk rows; row r_begin + s + 4i
// of a chunk goes to sub-chunk s (s < kGatheredLayerNormSubChunks: on CUDA the 4 warps of the chunk's
// block), each sub-chunk summed in row order, the 4 sums combined as (s0 + s1) + (s2 + s3) into the
// chunk's partial row; gathered_layer_norm_reduce_lanes then fixes how the partial rows are summed.
// Sizing: at most 1024 chunks of at least 32 rows (8 per warp), so a large map gives ~1024 blocks of
// 4 warps (~31 warps per SM on 132 SMs, each with a row of dy and x in flight) while the partials stay
// small next to the pass itself: 2 partial rows of n acc values per >= 32 rows of 3 n elements moved.
constexpr int kGatheredLayerNormSubChunks = 4;
inline int64_t gathered_layer_norm_rows_per_chunk(int64_t rows) {
  constexpr int64_t kMaxChunks = 1024;
  constexpr int64_t kMinRows = 32;
  int64_t n_chunks = (rows + kMinRows - 1) / kMinRows;
  if (n_chunks > kMaxChunks) n_chunks = kMaxChunks;
  if (n_chunks < 1) n_chunks = 1;
  int64_t per = (rows + n_chunks - 1) / n_chunks;
  return per < 1 ? 1 : per;
}

// Lanes L of the final weight/bias reduction (a power of two, 1..64, at least 4 chunks per lane when
// there are 8 or more chunks): lane l sums the partial rows l, l + L, l + 2L, ... in order, then the lanes
// are added pairwise (lane y += lane y + s for s = L/2, L/4, ..., 1). Depends on the chunk count only.
inline int gathered_layer_norm_reduce_lanes(int64_t n_chunks) {
  int lanes = 1;
  while (lanes < 64 && 4 * (2 * static_cast<int64_t>(lanes)) <= n_chunks) lanes *= 2;
  return lanes;
}

// Whether the index math of a map with `rows` output rows of n = kSegments * C elements runs in int32 (every
// element index of x, out and the partials is below rows * n, which the op checked fits int64; the
// overshoot covers the last block's threads past the end). CUDA kernels and CPU twins take the same path.
inline bool gathered_layer_norm_int32_index(int64_t rows, int64_t n) { return fits_int32_index(rows * n, n + 1024); }

// x (pixels, C) of `dtype`; weight, bias (n = kSegments * C,) of `param_dtype` (dtype, or float32 for
// float16 / bfloat16 x: mixed_operand_ok); out (rows, n) of `dtype`; mean, rstd (rows,) in the accumulation
// type.
template <typename Rows>
struct GatheredLayerNormForward {
  const void* x;
  const void* weight;
  const void* bias;
  void* out;
  void* mean;
  void* rstd;
  c10::ScalarType dtype;
  c10::ScalarType param_dtype;
  double eps;
  Rows src;
  int64_t rows, C;
  bool int32_index;  // gathered_layer_norm_int32_index(rows, n)
};

// grad_out (rows, n) and grad_x of x's `dtype`; weight, grad_weight, grad_bias (n,) of `param_dtype`; partials (2, n_chunks, n) accumulation-type
// scratch for the per-chunk weight/bias sums (dy * xhat, then dy), chunks of per_chunk rows.
template <typename Rows>
struct GatheredLayerNormBackward {
  const void* grad_out;
  const void* x;
  const void* weight;
  const void* mean;
  const void* rstd;
  void* grad_x;
  void* grad_weight;
  void* grad_bias;
  void* partials;
  c10::ScalarType dtype;
  c10::ScalarType param_dtype;
  Rows src;
  int64_t rows, C, per_chunk, n_chunks;
  bool int32_index;  // gathered_layer_norm_int32_index(rows, n)
};

// gathered_layer_norm_cpu.cpp, and gathered_layer_norm_cuda.cu (built with the CUDA part only); both
// instantiated for PatchMergeRows and WindowRows.
template <typename Rows>
void gathered_layer_norm_forward_cpu(const GatheredLayerNormForward<Rows>& a);
template <typename Rows>
void gathered_layer_norm_backward_cpu(const GatheredLayerNormBackward<Rows>& a);
template <typename Rows>
void gathered_layer_norm_forward_cuda(const GatheredLayerNormForward<Rows>& a);
template <typename Rows>
void gathered_layer_norm_backward_cuda(const GatheredLayerNormBackward<Rows>& a);

}  // namespace htsat
