// CUDA kernels of the gathered LayerNorm: output row r = LayerNorm over Rows::kSegments segments of C
// channels gathered through a row map, forward and backward, in one kernel each way. Two instances:
//   patch merging (PatchMergeRows, patch_merge.h): 2x2 gather + LayerNorm(4C);
//   fused norm1 + shifted window partition (WindowRows, window_process.h): LayerNorm(C) of the pixel each
//   windowed token maps to.
//
// Forward: one warp per output row (4 rows per 128-thread block): the warp reads the gathered segments
// (coalesced along C), reduces the mean, then the centred variance (two passes; the re-reads hit L1/L2),
// and writes the normalised row; mean and rstd are saved in the accumulation type (fp32, fp64 for fp64).
// Backward: one warp per row for dx (scattered back through the same map; each input element belongs
// to exactly one row), then the weight/bias gradient reduced deterministically: per-chunk partials in
// row order, then a fixed-order sum over the chunks (no float atomics).
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"
#include "patch_merge.h"
#include "window_process.h"

namespace htsat {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kRowThreads = kWarpSize * kWarpsPerBlock;
constexpr int kColThreads = 128;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float inv_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return 1.0 / sqrt(v); }

template <typename Rows, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    gathered_layer_norm_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                       const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                       acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out, Rows src,
                                       int64_t rows, int64_t C, acc_t eps) {
  constexpr int S = Rows::kSegments;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // uniform per warp
  const int64_t n = S * C;
  const int64_t base = src.base(row);
  const scalar_t* seg[S];
#pragma unroll
  for (int k = 0; k < S; ++k) seg[k] = x + (base + src.offset(k)) * C;

  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < S; ++k)
    for (int64_t c = lane; c < C; c += kWarpSize) sum += static_cast<acc_t>(seg[k][c]);
  const acc_t mean = warp_sum(sum) / static_cast<acc_t>(n);

  acc_t sq = 0;
#pragma unroll
  for (int k = 0; k < S; ++k)
    for (int64_t c = lane; c < C; c += kWarpSize) {
      const acc_t d = static_cast<acc_t>(seg[k][c]) - mean;
      sq += d * d;
    }
  const acc_t rstd = inv_sqrt(warp_sum(sq) / static_cast<acc_t>(n) + eps);

  scalar_t* y = out + row * n;
#pragma unroll
  for (int k = 0; k < S; ++k)
    for (int64_t c = lane; c < C; c += kWarpSize) {
      const int64_t i = k * C + c;
      const acc_t v = (static_cast<acc_t>(seg[k][c]) - mean) * rstd;
      y[i] = static_cast<scalar_t>(v * static_cast<acc_t>(weight[i]) + static_cast<acc_t>(bias[i]));
    }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename Rows, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    gathered_layer_norm_backward_input_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                              const scalar_t* __restrict__ weight, const acc_t* __restrict__ mean,
                                              const acc_t* __restrict__ rstd, scalar_t* __restrict__ grad_x,
                                              Rows src, int64_t rows, int64_t C) {
  constexpr int S = Rows::kSegments;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // uniform per warp
  const int64_t n = S * C;
  const int64_t base = src.base(row);
  int64_t seg[S];
#pragma unroll
  for (int k = 0; k < S; ++k) seg[k] = (base + src.offset(k)) * C;
  const acc_t mu = mean[row], rs = rstd[row];
  const scalar_t* dy = grad_out + row * n;

  acc_t sum_g = 0, sum_gx = 0;
#pragma unroll
  for (int k = 0; k < S; ++k)
    for (int64_t c = lane; c < C; c += kWarpSize) {
      const int64_t i = k * C + c;
      const acc_t g = static_cast<acc_t>(dy[i]) * static_cast<acc_t>(weight[i]);
      const acc_t xhat = (static_cast<acc_t>(x[seg[k] + c]) - mu) * rs;
      sum_g += g;
      sum_gx += g * xhat;
    }
  const acc_t mean_g = warp_sum(sum_g) / static_cast<acc_t>(n);
  const acc_t mean_gx = warp_sum(sum_gx) / static_cast<acc_t>(n);

#pragma unroll
  for (int k = 0; k < S; ++k)
    for (int64_t c = lane; c < C; c += kWarpSize) {
      const int64_t i = k * C + c;
      const acc_t g = static_cast<acc_t>(dy[i]) * static_cast<acc_t>(weight[i]);
      const acc_t xhat = (static_cast<acc_t>(x[seg[k] + c]) - mu) * rs;
      grad_x[seg[k] + c] = static_cast<scalar_t>(layer_norm_grad_input<acc_t>(g, xhat, rs, mean_g, mean_gx));
    }
}

// grid (ceil(n / kColThreads), n_chunks): partial sums of dy * xhat and dy over one chunk of rows.
template <typename Rows, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColThreads)
    gathered_layer_norm_param_partials_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                              const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                              acc_t* __restrict__ part_w, acc_t* __restrict__ part_b, Rows src,
                                              int64_t rows, int64_t rows_per_chunk, int64_t C) {
  const int64_t n = Rows::kSegments * C;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  if (col >= n) return;
  const int64_t chunk = blockIdx.y;
  const int k = static_cast<int>(col / C);
  const int64_t c = col - k * C;
  const int64_t offset = src.offset(k);
  const int64_t r_begin = chunk * rows_per_chunk;
  const int64_t r_end = r_begin + rows_per_chunk < rows ? r_begin + rows_per_chunk : rows;
  acc_t dw = 0, db = 0;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t pixel = src.base(r) + offset;
    const acc_t xhat = (static_cast<acc_t>(x[pixel * C + c]) - mean[r]) * rstd[r];
    const acc_t g = static_cast<acc_t>(grad_out[r * n + col]);
    dw += g * xhat;
    db += g;
  }
  part_w[chunk * n + col] = dw;
  part_b[chunk * n + col] = db;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColThreads)
    param_reduce_kernel(const acc_t* __restrict__ part_w, const acc_t* __restrict__ part_b,
                        scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias, int64_t n_chunks,
                        int64_t n) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  if (col >= n) return;
  acc_t sw = 0, sb = 0;
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    sw += part_w[chunk * n + col];
    sb += part_b[chunk * n + col];
  }
  grad_weight[col] = static_cast<scalar_t>(sw);
  grad_bias[col] = static_cast<scalar_t>(sb);
}

// out (rows, n), mean/rstd (rows,): launched on the current stream of x's device (guard held by caller).
template <typename Rows>
void gathered_layer_norm_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      double eps, const Rows& src, int64_t rows, int64_t C, at::Tensor& out,
                                      at::Tensor& mean, at::Tensor& rstd) {
  if (rows == 0 || C == 0) return;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "gathered LayerNorm: too many rows (", rows, ")");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gathered_layer_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gathered_layer_norm_forward_kernel<Rows, scalar_t, acc_t><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), src, rows,
        C, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename Rows>
void gathered_layer_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& mean, const at::Tensor& rstd, const Rows& src, int64_t rows,
                                       int64_t C, at::Tensor& grad_x, at::Tensor& grad_weight,
                                       at::Tensor& grad_bias) {
  const int64_t n = Rows::kSegments * C;
  if (rows == 0 || n == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return;
  }
  const int64_t per_chunk = patch_merge_rows_per_chunk(rows);
  const int64_t n_chunks = (rows + per_chunk - 1) / per_chunk;  // <= 512
  const int64_t row_blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t col_blocks = (n + kColThreads - 1) / kColThreads;
  TORCH_CHECK(row_blocks <= INT32_MAX && col_blocks <= INT32_MAX, "gathered LayerNorm: tensor too large");
  at::Tensor partials = at::empty({2, n_chunks, n}, mean.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gathered_layer_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* part_w = partials.mutable_data_ptr<acc_t>();
    acc_t* part_b = part_w + n_chunks * n;
    gathered_layer_norm_backward_input_kernel<Rows, scalar_t, acc_t>
        <<<static_cast<unsigned>(row_blocks), kRowThreads, 0, stream>>>(
            grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
            mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(), src,
            rows, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(n_chunks));
    gathered_layer_norm_param_partials_kernel<Rows, scalar_t, acc_t><<<grid, kColThreads, 0, stream>>>(
        grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
        rstd.const_data_ptr<acc_t>(), part_w, part_b, src, rows, per_chunk, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    param_reduce_kernel<scalar_t, acc_t><<<static_cast<unsigned>(col_blocks), kColThreads, 0, stream>>>(
        part_w, part_b, grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(), n_chunks,
        n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::TensorOptions stat_options(const at::Tensor& x) {
  return x.options().dtype(layer_norm_stat_dtype(x.scalar_type()));
}

// ---- patch_merge: 2x2 gather + LayerNorm(4C) ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merge_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                        const at::Tensor& bias, double eps) {
  const PatchMergeGeometry g = patch_merge_check(x, weight, bias);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t L = (g.H / 2) * (g.W / 2);
  at::Tensor out = at::empty({g.batch, L, 4 * g.C}, x.options());
  at::Tensor mean = at::empty({g.batch, L}, stat_options(x));
  at::Tensor rstd = at::empty({g.batch, L}, stat_options(x));
  gathered_layer_norm_forward_cuda(x, weight, bias, eps, PatchMergeRows{g.H, g.W}, g.rows(), g.C, out, mean, rstd);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merge_backward_cuda(const at::Tensor& grad_out,
                                                                         const at::Tensor& x, const at::Tensor& weight,
                                                                         const at::Tensor& mean,
                                                                         const at::Tensor& rstd) {
  const PatchMergeGeometry g = patch_merge_backward_check(grad_out, x, weight, mean, rstd);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::empty(weight.sizes(), weight.options());
  gathered_layer_norm_backward_cuda(grad_out, x, weight, mean, rstd, PatchMergeRows{g.H, g.W}, g.rows(), g.C, grad_x,
                                    grad_weight, grad_bias);
  return {grad_x, grad_weight, grad_bias};
}

// ---- fused norm1 LayerNorm(C) + window partition ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_window_partition_cuda(const at::Tensor& x,
                                                                                const at::Tensor& weight,
                                                                                const at::Tensor& bias, double eps,
                                                                                int64_t window_size, int64_t shift) {
  const WindowGeometry g = layer_norm_window_partition_check(x, weight, bias, window_size, shift);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const std::vector<int64_t> shape = windowed_shape(g);
  at::Tensor out = at::empty(shape, x.options());
  at::Tensor mean = at::empty({shape[0], shape[1]}, stat_options(x));
  at::Tensor rstd = at::empty({shape[0], shape[1]}, stat_options(x));
  gathered_layer_norm_forward_cuda(x, weight, bias, eps, WindowRows{g}, shape[0] * shape[1], g.channels, out, mean,
                                   rstd);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_window_partition_backward_cuda(
    const at::Tensor& grad_windows, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t window_size, int64_t shift) {
  const WindowGeometry g =
      layer_norm_window_partition_backward_check(grad_windows, x, weight, mean, rstd, window_size, shift);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::empty(weight.sizes(), weight.options());
  gathered_layer_norm_backward_cuda(grad_windows, x, weight, mean, rstd, WindowRows{g}, g.batch * g.H * g.W,
                                    g.channels, grad_x, grad_weight, grad_bias);
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace htsat

TORCH_LIBRARY_IMPL(htsat_kernels, CUDA, m) {
  m.impl("patch_merge_forward", &htsat::patch_merge_forward_cuda);
  m.impl("patch_merge_backward", &htsat::patch_merge_backward_cuda);
  m.impl("layer_norm_window_partition", &htsat::layer_norm_window_partition_cuda);
  m.impl("layer_norm_window_partition_backward", &htsat::layer_norm_window_partition_backward_cuda);
}
