// CUDA kernels of the gathered LayerNorm (gathered_layer_norm.h), forward and backward, for its two row
// maps: patch merging (PatchMergeRows) and the fused norm1 + shifted window partition (WindowRows).
//
// Forward: one warp per output row (4 rows per 128-thread block): the warp reads the gathered segments
// (coalesced along C) once, in 16-byte vectors kept in registers where C and the pointers allow
// (otherwise element by element, re-reading the row from L1/L2), reduces the mean, then the centred
// variance, and writes the normalised row; mean and rstd are saved in the accumulation type (fp32, fp64
// for fp64).
// Backward: one warp per row for dx (scattered back through the same map; each input element belongs
// to exactly one row), then the weight/bias gradient reduced deterministically: per-chunk partials in
// row order, then a fixed-order sum over the chunks (no float atomics). The caller
// (gathered_layer_norm.cpp) has checked the sizes, allocated the partials and made the device current.
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "floating_types.h"
#include "gathered_layer_norm.h"

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

// One warp per output row (kWarpsPerBlock rows per block): this thread's row and lane, and the element
// offsets in x of the row's segments, in index_t (int32 when gathered_layer_norm_int32_index allows: the
// map's divisions are then 32-bit and inline, no call to the 64-bit division helpers).
template <typename Rows, typename index_t>
struct WarpRow {
  index_t row;
  int lane;
  index_t seg[Rows::kSegments];
  __device__ __forceinline__ WarpRow()
      : row(static_cast<index_t>(blockIdx.x) * kWarpsPerBlock + static_cast<index_t>(threadIdx.x / kWarpSize)),
        lane(threadIdx.x % kWarpSize) {}
  // Only for row < rows: the map is evaluated for real rows only (no index past the end is formed).
  __device__ __forceinline__ void locate(const Rows& src, index_t C) {
    const index_t base = src.base(row);
#pragma unroll
    for (int k = 0; k < Rows::kSegments; ++k) seg[k] = (base + src.template offset<index_t>(k)) * C;
  }
};

template <typename Rows, typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kRowThreads)
    gathered_layer_norm_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                       const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                       acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out, Rows src,
                                       index_t rows, index_t C, acc_t eps) {
  WarpRow<Rows, index_t> w;
  if (w.row >= rows) return;  // uniform per warp
  w.locate(src, C);
  const index_t n = Rows::kSegments * C;

  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < Rows::kSegments; ++k)
    for (index_t c = w.lane; c < C; c += kWarpSize) sum += static_cast<acc_t>(x[w.seg[k] + c]);
  const acc_t mean = warp_sum(sum) / static_cast<acc_t>(n);

  acc_t sq = 0;
#pragma unroll
  for (int k = 0; k < Rows::kSegments; ++k)
    for (index_t c = w.lane; c < C; c += kWarpSize) {
      const acc_t d = static_cast<acc_t>(x[w.seg[k] + c]) - mean;
      sq += d * d;
    }
  const acc_t rstd = inv_sqrt(warp_sum(sq) / static_cast<acc_t>(n) + eps);

  scalar_t* y = out + w.row * n;
#pragma unroll
  for (int k = 0; k < Rows::kSegments; ++k)
    for (index_t c = w.lane; c < C; c += kWarpSize) {
      const index_t i = k * C + c;
      const acc_t v = (static_cast<acc_t>(x[w.seg[k] + c]) - mean) * rstd;
      y[i] = static_cast<scalar_t>(v * static_cast<acc_t>(weight[i]) + static_cast<acc_t>(bias[i]));
    }
  if (w.lane == 0) {
    mean_out[w.row] = mean;
    rstd_out[w.row] = rstd;
  }
}

// 16 bytes of consecutive elements.
template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(scalar_t));
  scalar_t v[kSize];
};

// Forward with each row read once, in 16-byte vectors held in registers: lane l holds vectors l + 32 j
// (j < kPerLane) of every segment, reduces the mean and then the centred variance from registers, and
// writes the output in 16-byte vectors. The host launches it only when C is a multiple of the vector,
// every pointer is 16-byte aligned (so is every row: offsets are multiples of C), the segment fits in
// kPerLane vectors per lane and the indices fit int32; the element-wise formula is the scalar kernel's.
template <typename Rows, typename scalar_t, typename acc_t, int kPerLane>
__global__ void __launch_bounds__(kRowThreads)
    gathered_layer_norm_forward_vec_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                           const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                           acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out, Rows src,
                                           int32_t rows, int32_t C, acc_t eps) {
  using V = Vec16<scalar_t>;
  constexpr int kSeg = Rows::kSegments;
  WarpRow<Rows, int32_t> w;
  if (w.row >= rows) return;  // uniform per warp
  w.locate(src, C);
  const int32_t n = kSeg * C;
  const int32_t seg_vecs = C / V::kSize;

  V v[kSeg][kPerLane] = {};  // fully initialised (zeros past the row): keeps the array in registers
#pragma unroll
  for (int k = 0; k < kSeg; ++k)
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (j * kWarpSize + w.lane < seg_vecs)
        v[k][j] = reinterpret_cast<const V*>(x + w.seg[k])[j * kWarpSize + w.lane];
  acc_t sum = 0;  // the zeros past the row add nothing
#pragma unroll
  for (int k = 0; k < kSeg; ++k)
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
#pragma unroll
      for (int e = 0; e < V::kSize; ++e) sum += static_cast<acc_t>(v[k][j].v[e]);
  const acc_t mean = warp_sum(sum) / static_cast<acc_t>(n);

  acc_t sq = 0;
#pragma unroll
  for (int k = 0; k < kSeg; ++k)
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (j * kWarpSize + w.lane < seg_vecs) {
#pragma unroll
        for (int e = 0; e < V::kSize; ++e) {
          const acc_t d = static_cast<acc_t>(v[k][j].v[e]) - mean;
          sq += d * d;
        }
      }
  const acc_t rstd = inv_sqrt(warp_sum(sq) / static_cast<acc_t>(n) + eps);

  V* y = reinterpret_cast<V*>(out + w.row * n);
  const V* wv = reinterpret_cast<const V*>(weight);
  const V* bv = reinterpret_cast<const V*>(bias);
#pragma unroll
  for (int k = 0; k < kSeg; ++k)
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int32_t q = j * kWarpSize + w.lane;
      if (q < seg_vecs) {
        const int32_t i = k * seg_vecs + q;  // vector i of the output row, of weight and of bias
        const V wi = wv[i], bi = bv[i];
        V o;
#pragma unroll
        for (int e = 0; e < V::kSize; ++e) {
          const acc_t t = (static_cast<acc_t>(v[k][j].v[e]) - mean) * rstd;
          o.v[e] = static_cast<scalar_t>(t * static_cast<acc_t>(wi.v[e]) + static_cast<acc_t>(bi.v[e]));
        }
        y[i] = o;
      }
    }
  if (w.lane == 0) {
    mean_out[w.row] = mean;
    rstd_out[w.row] = rstd;
  }
}

template <typename Rows, typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kRowThreads)
    gathered_layer_norm_backward_input_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                              const scalar_t* __restrict__ weight, const acc_t* __restrict__ mean,
                                              const acc_t* __restrict__ rstd, scalar_t* __restrict__ grad_x,
                                              Rows src, index_t rows, index_t C) {
  WarpRow<Rows, index_t> w;
  if (w.row >= rows) return;  // uniform per warp
  w.locate(src, C);
  const index_t n = Rows::kSegments * C;
  const acc_t mu = mean[w.row], rs = rstd[w.row];
  const scalar_t* dy = grad_out + w.row * n;

  // g = dy * weight and xhat = (x - mean) * rstd of channel c of segment k, read again in the second pass
  const auto g_at = [&](int k, index_t c) {
    return static_cast<acc_t>(dy[k * C + c]) * static_cast<acc_t>(weight[k * C + c]);
  };
  const auto xhat_at = [&](int k, index_t c) { return (static_cast<acc_t>(x[w.seg[k] + c]) - mu) * rs; };

  acc_t sum_g = 0, sum_gx = 0;
#pragma unroll
  for (int k = 0; k < Rows::kSegments; ++k)
    for (index_t c = w.lane; c < C; c += kWarpSize) {
      const acc_t g = g_at(k, c);
      sum_g += g;
      sum_gx += g * xhat_at(k, c);
    }
  const acc_t mean_g = warp_sum(sum_g) / static_cast<acc_t>(n);
  const acc_t mean_gx = warp_sum(sum_gx) / static_cast<acc_t>(n);

#pragma unroll
  for (int k = 0; k < Rows::kSegments; ++k)
    for (index_t c = w.lane; c < C; c += kWarpSize)
      grad_x[w.seg[k] + c] =
          static_cast<scalar_t>(layer_norm_grad_input<acc_t>(g_at(k, c), xhat_at(k, c), rs, mean_g, mean_gx));
}

// grid (ceil(n / kColThreads), n_chunks): partial sums of dy * xhat and dy over one chunk of rows.
template <typename Rows, typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kColThreads)
    gathered_layer_norm_param_partials_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                              const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                              acc_t* __restrict__ part_w, acc_t* __restrict__ part_b, Rows src,
                                              index_t rows, index_t rows_per_chunk, index_t C) {
  const index_t n = Rows::kSegments * C;
  const index_t col = static_cast<index_t>(blockIdx.x) * kColThreads + static_cast<index_t>(threadIdx.x);
  if (col >= n) return;
  const index_t chunk = blockIdx.y;
  int k = 0;  // segment of this column: at most 3 compares instead of a division
  while (k + 1 < Rows::kSegments && col >= (k + 1) * C) ++k;
  const index_t c = col - k * C;
  const index_t offset = src.template offset<index_t>(k);
  const index_t r_begin = chunk * rows_per_chunk;
  const index_t r_end = r_begin + rows_per_chunk < rows ? r_begin + rows_per_chunk : rows;
  acc_t dw = 0, db = 0;
  for (index_t r = r_begin; r < r_end; ++r) {
    const index_t pixel = src.base(r) + offset;
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

// fn(int32_t{}) when the launch's indices fit int32 (gathered_layer_norm_int32_index), else fn(int64_t{}).
template <typename Fn>
void dispatch_index(bool int32_index, const Fn& fn) {
  if (int32_index) {
    fn(int32_t{});
  } else {
    fn(int64_t{});
  }
}

// ceil(count / per_block) blocks, or an error when one grid dimension cannot hold them.
unsigned blocks_for(int64_t count, int64_t per_block) {
  const int64_t blocks = (count + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= INT32_MAX, "gathered LayerNorm: tensor too large for one launch (", count, " rows or columns)");
  return static_cast<unsigned>(blocks);
}

}  // namespace

template <typename Rows>
void gathered_layer_norm_forward_cuda(const GatheredLayerNormForward<Rows>& a) {
  const unsigned blocks = blocks_for(a.rows, kWarpsPerBlock);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floating(a.dtype, "gathered_layer_norm_forward_cuda", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x = static_cast<const scalar_t*>(a.x);
    const scalar_t* weight = static_cast<const scalar_t*>(a.weight);
    const scalar_t* bias = static_cast<const scalar_t*>(a.bias);
    scalar_t* out = static_cast<scalar_t*>(a.out);
    // the vector kernel: 1, 2 or 4 vectors of each segment per lane
    constexpr int64_t kVec = Vec16<scalar_t>::kSize;
    const uintptr_t addr = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(weight) |
                           reinterpret_cast<uintptr_t>(bias) | reinterpret_cast<uintptr_t>(out);
    const int64_t per_lane = (a.C / kVec + kWarpSize - 1) / kWarpSize;
    if (a.int32_index && a.C % kVec == 0 && addr % 16 == 0 && per_lane <= 4) {
      const auto launch = [&](auto kernel) {
        kernel<<<blocks, kRowThreads, 0, stream>>>(x, weight, bias, out, static_cast<acc_t*>(a.mean),
                                                   static_cast<acc_t*>(a.rstd), a.src, static_cast<int32_t>(a.rows),
                                                   static_cast<int32_t>(a.C), static_cast<acc_t>(a.eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (per_lane <= 1) {
        launch(gathered_layer_norm_forward_vec_kernel<Rows, scalar_t, acc_t, 1>);
      } else if (per_lane <= 2) {
        launch(gathered_layer_norm_forward_vec_kernel<Rows, scalar_t, acc_t, 2>);
      } else {
        launch(gathered_layer_norm_forward_vec_kernel<Rows, scalar_t, acc_t, 4>);
      }
      return;
    }
    dispatch_index(a.int32_index, [&](auto itag) {
      using index_t = decltype(itag);
      gathered_layer_norm_forward_kernel<Rows, scalar_t, acc_t, index_t><<<blocks, kRowThreads, 0, stream>>>(
          static_cast<const scalar_t*>(a.x), static_cast<const scalar_t*>(a.weight),
          static_cast<const scalar_t*>(a.bias), static_cast<scalar_t*>(a.out), static_cast<acc_t*>(a.mean),
          static_cast<acc_t*>(a.rstd), a.src, static_cast<index_t>(a.rows), static_cast<index_t>(a.C),
          static_cast<acc_t>(a.eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename Rows>
void gathered_layer_norm_backward_cuda(const GatheredLayerNormBackward<Rows>& a) {
  const int64_t n = Rows::kSegments * a.C;
  const unsigned row_blocks = blocks_for(a.rows, kWarpsPerBlock);
  const unsigned col_blocks = blocks_for(n, kColThreads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floating(a.dtype, "gathered_layer_norm_backward_cuda", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    const scalar_t* grad_out = static_cast<const scalar_t*>(a.grad_out);
    const scalar_t* x = static_cast<const scalar_t*>(a.x);
    const acc_t* mean = static_cast<const acc_t*>(a.mean);
    const acc_t* rstd = static_cast<const acc_t*>(a.rstd);
    acc_t* part_w = static_cast<acc_t*>(a.partials);
    acc_t* part_b = part_w + a.n_chunks * n;
    dispatch_index(a.int32_index, [&](auto itag) {
      using index_t = decltype(itag);
      const auto rows = static_cast<index_t>(a.rows), C = static_cast<index_t>(a.C);
      gathered_layer_norm_backward_input_kernel<Rows, scalar_t, acc_t, index_t><<<row_blocks, kRowThreads, 0, stream>>>(
          grad_out, x, static_cast<const scalar_t*>(a.weight), mean, rstd, static_cast<scalar_t*>(a.grad_x), a.src,
          rows, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 grid(col_blocks, static_cast<unsigned>(a.n_chunks));  // n_chunks <= 512
      gathered_layer_norm_param_partials_kernel<Rows, scalar_t, acc_t, index_t><<<grid, kColThreads, 0, stream>>>(
          grad_out, x, mean, rstd, part_w, part_b, a.src, rows, static_cast<index_t>(a.per_chunk), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    param_reduce_kernel<scalar_t, acc_t><<<col_blocks, kColThreads, 0, stream>>>(
        part_w, part_b, static_cast<scalar_t*>(a.grad_weight), static_cast<scalar_t*>(a.grad_bias), a.n_chunks, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template void gathered_layer_norm_forward_cuda(const GatheredLayerNormForward<PatchMergeRows>&);
template void gathered_layer_norm_forward_cuda(const GatheredLayerNormForward<WindowRows>&);
template void gathered_layer_norm_backward_cuda(const GatheredLayerNormBackward<PatchMergeRows>&);
template void gathered_layer_norm_backward_cuda(const GatheredLayerNormBackward<WindowRows>&);

}  // namespace htsat
