// Patch merging: 2x2 gather + LayerNorm(4C). Index maps and LayerNorm algebra shared by the CUDA
// kernels and the CPU twins.
//
// x (B, H, W, C), H and W even -> out (B, H/2 * W/2, 4C). Output row r = (b * H/2 + oh) * W/2 + ow is
// the concatenation of 4 segments of C channels, in the original order
//   k = 0: x[b, 2oh,   2ow  ]   (even row, even col)
//   k = 1: x[b, 2oh+1, 2ow  ]   (odd row,  even col)
//   k = 2: x[b, 2oh,   2ow+1]   (even row, odd col)
//   k = 3: x[b, 2oh+1, 2ow+1]   (odd row,  odd col)
// ("rows" are the H axis), then LayerNorm over the 4C values with statistics in the accumulation type
// (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64).
#pragma once

#include "common.h"

namespace htsat {

// Pixel row (b * H + h) * W + w of segment 0 of output row `row`.
template <typename index_t>
HOST_DEVICE inline index_t patch_merge_base_pixel(index_t row, index_t H, index_t W) {
  const index_t Wo = W / 2;
  const index_t Ho = H / 2;
  const index_t rest = row / Wo;
  const index_t ow = row - rest * Wo;
  const index_t b = rest / Ho;
  const index_t oh = rest - b * Ho;
  return (b * H + 2 * oh) * W + 2 * ow;
}

// Pixel-row offset of segment k (0..3) from segment 0: bit 0 of k steps one row, bit 1 one column.
template <typename index_t>
HOST_DEVICE inline index_t patch_merge_segment_offset(int k, index_t W) {
  return static_cast<index_t>(k & 1) * W + static_cast<index_t>(k >> 1);
}

// Row source of patch merging for the gathered-LayerNorm kernels: output row `row` is the concatenation
// of kSegments segments of C channels, segment k read from pixel row base(row) + offset(k).
struct PatchMergeRows {
  static constexpr int kSegments = 4;
  int64_t H, W;
  HOST_DEVICE inline int64_t base(int64_t row) const { return patch_merge_base_pixel<int64_t>(row, H, W); }
  HOST_DEVICE inline int64_t offset(int k) const { return patch_merge_segment_offset<int64_t>(k, W); }
};

// LayerNorm backward for one element: g = dy * weight, xhat = (x - mean) * rstd,
// mean_g = mean(g), mean_gx = mean(g * xhat) over the row.
template <typename acc_t>
HOST_DEVICE inline acc_t layer_norm_grad_input(acc_t g, acc_t xhat, acc_t rstd, acc_t mean_g, acc_t mean_gx) {
  return rstd * (g - mean_g - xhat * mean_gx);
}

// ---- host-side argument checks, shared by the CPU and CUDA entry points ----

struct PatchMergeGeometry {
  int64_t batch, H, W, C;
  int64_t rows() const { return batch * (H / 2) * (W / 2); }
};

// LayerNorm weight and bias: (n,), same dtype and device as x, contiguous.
inline void check_layer_norm_affine(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t n) {
  CHECK_DEVICE(weight, x.device());
  CHECK_DEVICE(bias, x.device());
  CHECK_DTYPE(weight, x.scalar_type());
  CHECK_DTYPE(bias, x.scalar_type());
  CHECK_SHAPE(weight, n);
  CHECK_SHAPE(bias, n);
  CHECK_CONTIGUOUS(weight);
  CHECK_CONTIGUOUS(bias);
}

// Saved statistics (mean, rstd) of the gathered-LayerNorm ops: fp32, or fp64 for fp64 inputs.
inline at::ScalarType layer_norm_stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Inputs of a gathered-LayerNorm backward: grad_out of `out_shape`, weight (n,), mean and rstd of
// `stat_shape` in the statistics dtype, all on x's device, contiguous.
inline void check_layer_norm_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& mean, const at::Tensor& rstd, c10::IntArrayRef out_shape,
                                      c10::IntArrayRef stat_shape, int64_t n) {
  CHECK_DEVICE(grad_out, x.device());
  CHECK_DEVICE(weight, x.device());
  CHECK_DEVICE(mean, x.device());
  CHECK_DEVICE(rstd, x.device());
  CHECK_DTYPE(grad_out, x.scalar_type());
  CHECK_DTYPE(weight, x.scalar_type());
  CHECK_DTYPE(mean, layer_norm_stat_dtype(x.scalar_type()));
  CHECK_DTYPE(rstd, layer_norm_stat_dtype(x.scalar_type()));
  TORCH_CHECK(grad_out.sizes() == out_shape, "grad_out must have shape ", out_shape, ", got ", grad_out.sizes());
  CHECK_SHAPE(weight, n);
  TORCH_CHECK(mean.sizes() == stat_shape, "mean must have shape ", stat_shape, ", got ", mean.sizes());
  TORCH_CHECK(rstd.sizes() == stat_shape, "rstd must have shape ", stat_shape, ", got ", rstd.sizes());
  CHECK_CONTIGUOUS(grad_out);
  CHECK_CONTIGUOUS(weight);
  CHECK_CONTIGUOUS(mean);
  CHECK_CONTIGUOUS(rstd);
}

inline PatchMergeGeometry patch_merge_check(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  CHECK_DIM(x, 4);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  const int64_t H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0, "x: patch_merge needs even H and W (dims 1 and 2), got H=", H, ", W=", W);
  check_layer_norm_affine(x, weight, bias, 4 * C);
  return PatchMergeGeometry{x.size(0), H, W, C};
}

inline PatchMergeGeometry patch_merge_backward_check(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& mean,
                                                     const at::Tensor& rstd) {
  CHECK_DIM(x, 4);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0, "x: patch_merge needs even H and W (dims 1 and 2), got H=", H, ", W=", W);
  const int64_t L = (H / 2) * (W / 2);
  check_layer_norm_backward(grad_out, x, weight, mean, rstd, {B, L, 4 * C}, {B, L}, 4 * C);
  return PatchMergeGeometry{B, H, W, C};
}

// Deterministic split of the rows for the weight/bias gradient (every gathered-LayerNorm backward): depends on the row count only (never
// on the thread count), each chunk reduced in row order, the chunks then summed in chunk order.
inline int64_t patch_merge_rows_per_chunk(int64_t rows) {
  constexpr int64_t kMaxChunks = 512;
  constexpr int64_t kMinRows = 64;
  int64_t n_chunks = (rows + kMinRows - 1) / kMinRows;
  if (n_chunks > kMaxChunks) n_chunks = kMaxChunks;
  if (n_chunks < 1) n_chunks = 1;
  int64_t per = (rows + n_chunks - 1) / n_chunks;
  return per < 1 ? 1 : per;
}

}  // namespace htsat
