// CUDA kernels of the gathered LayerNorm (gathered_layer_norm.h), forward and backward, for its two row
// maps: patch merging (PatchMergeRows) and the fused norm1 + shifted window partition (WindowRows).
//
// Forward: one warp per output row (4 rows per 128-thread block): the warp reads the gathered segments
// (coalesced along C) once, in 16-byte vectors kept in registers where C and the pointers allow
// (otherwise element by element, re-reading the row from L1/L2), reduces the mean, then the centred
// variance, and writes the normalised row; mean and rstd are saved in the accumulation type (fp32, fp64
// for fp64).
// Backward, one read of x and dy: grid (n_chunks <= 1024) of 128-thread blocks, block b owning chunk b of
// the rows (gathered_layer_norm_rows_per_chunk) and each of its 4 warps one row at a time (rows
// b * per_chunk + w + 4i): dx scattered back through the same map (each input element belongs to exactly
// one row), and dy * xhat, dy summed per channel in the warp's slice of shared memory; the block then
// writes its chunk's partial row (the 4 slices added pairwise). In 16-byte vectors held in registers under
// the vector forward's conditions, element by element otherwise. A second small kernel sums the partial
// rows per column in a fixed order (gathered_layer_norm_reduce_lanes): deterministic, no float atomics.
// Two launches in all. The caller (gathered_layer_norm.cpp) has checked the sizes, allocated the partials
// and made the device current.
#include <algorithm>
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

// param_t: the dtype of weight and bias (scalar_t, or float for float16 / bfloat16 x: autocast's mix);
// every kernel below computes in acc_t whatever the pair.
template <typename Rows, typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kRowThreads)
    gathered_layer_norm_forward_kernel(const scalar_t* __restrict__ x, const param_t* __restrict__ weight,
                                       const param_t* __restrict__ bias, scalar_t* __restrict__ out,
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

// The weight / bias elements of one Vec16 of the row: 16 bytes when param_t is the activations' dtype, 32
// (two 16-byte loads) for float parameters next to 2-byte activations.
template <typename param_t, int kSize>
struct alignas(16) ParamVec {
  param_t v[kSize];
};

// Forward with each row read once, in 16-byte vectors held in registers: lane l holds vectors l + 32 j
// (j < kPerLane) of every segment, reduces the mean and then the centred variance from registers, and
// writes the output in 16-byte vectors. The host launches it only when C is a multiple of the vector,
// every pointer is 16-byte aligned (so is every row: offsets are multiples of C), the segment fits in
// kPerLane vectors per lane and the indices fit int32; the element-wise formula is the scalar kernel's.
template <typename Rows, typename scalar_t, typename param_t, typename acc_t, int kPerLane>
__global__ void __launch_bounds__(kRowThreads)
    gathered_layer_norm_forward_vec_kernel(const scalar_t* __restrict__ x, const param_t* __restrict__ weight,
                                           const param_t* __restrict__ bias, scalar_t* __restrict__ out,
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

  using PV = ParamVec<param_t, V::kSize>;
  V* y = reinterpret_cast<V*>(out + w.row * n);
  const PV* wv = reinterpret_cast<const PV*>(weight);
  const PV* bv = reinterpret_cast<const PV*>(bias);
#pragma unroll
  for (int k = 0; k < kSeg; ++k)
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int32_t q = j * kWarpSize + w.lane;
      if (q < seg_vecs) {
        const int32_t i = k * seg_vecs + q;  // vector i of the output row, of weight and of bias
        const PV wi = wv[i], bi = bv[i];
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

// The backward accumulates dy * xhat and dy per channel in dynamic shared memory: kWarpsPerBlock slices
// (one per warp, the sub-chunks of gathered_layer_norm.h) of 2 * cols accumulation-type values: the
// weight sums (dy * xhat), then the bias sums (dy).
template <typename acc_t>
__device__ __forceinline__ acc_t* shared_acc() {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  return reinterpret_cast<acc_t*>(shared_bytes);
}

// Chunk `chunk`'s partial rows (dy * xhat at part, dy at part + n_chunks * n) for columns
// [col_begin, col_begin + cols): the 4 warps' slices combined as (s0 + s1) + (s2 + s3). After the block's
// rows are done (the caller synchronises the block).
template <typename acc_t, typename index_t>
__device__ __forceinline__ void write_chunk_partials(acc_t* __restrict__ part, index_t chunk, index_t n_chunks,
                                                     index_t n, index_t col_begin, index_t cols) {
  static_assert(kWarpsPerBlock == kGatheredLayerNormSubChunks && kWarpsPerBlock == 4, "one warp per sub-chunk");
  const acc_t* s = shared_acc<acc_t>();
  acc_t* pw = part + chunk * n + col_begin;
  acc_t* pb = part + (n_chunks + chunk) * n + col_begin;
  for (index_t j = threadIdx.x; j < cols; j += kRowThreads) {
    pw[j] = (s[j] + s[2 * cols + j]) + (s[4 * cols + j] + s[6 * cols + j]);
    pb[j] = (s[cols + j] + s[3 * cols + j]) + (s[5 * cols + j] + s[7 * cols + j]);
  }
}

// Backward in one pass over x and dy. grid (n_chunks): block b owns rows [b * per_chunk, ...) and its
// warp w rows b * per_chunk + w + 4i (one warp per row, as the forward): dx of the row, scattered back
// through the map (each input element belongs to exactly one row), and dy * xhat, dy added to the warp's
// shared slice for the columns [col_begin, col_begin + cols) (the whole row unless n is too wide for
// shared memory; the host then relaunches per column window, rewriting the same dx). Each column is owned
// by one lane of the warp, so the slices need no synchronisation until the block combines them.
template <typename Rows, typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kRowThreads)
    gathered_layer_norm_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                        const param_t* __restrict__ weight, const acc_t* __restrict__ mean,
                                        const acc_t* __restrict__ rstd, scalar_t* __restrict__ grad_x,
                                        acc_t* __restrict__ partials, Rows src, index_t rows, index_t C,
                                        index_t per_chunk, index_t n_chunks, index_t col_begin, index_t cols) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const index_t n = Rows::kSegments * C;
  acc_t* acc_w = shared_acc<acc_t>() + warp * 2 * cols;
  acc_t* acc_b = acc_w + cols;
  for (index_t j = lane; j < cols; j += kWarpSize) acc_w[j] = acc_b[j] = 0;
  __syncwarp();  // zeroed by other lanes than the ones that accumulate

  const index_t chunk = blockIdx.x;
  const index_t r_begin = chunk * per_chunk;
  const index_t r_end = r_begin + per_chunk < rows ? r_begin + per_chunk : rows;
  for (index_t row = r_begin + warp; row < r_end; row += kWarpsPerBlock) {
    index_t seg[Rows::kSegments];
    const index_t base = src.base(row);
#pragma unroll
    for (int k = 0; k < Rows::kSegments; ++k) seg[k] = (base + src.template offset<index_t>(k)) * C;
    const acc_t mu = mean[row], rs = rstd[row];
    const scalar_t* dy = grad_out + row * n;

    acc_t sum_g = 0, sum_gx = 0;
#pragma unroll
    for (int k = 0; k < Rows::kSegments; ++k)
      for (index_t c = lane; c < C; c += kWarpSize) {
        const acc_t g = static_cast<acc_t>(dy[k * C + c]) * static_cast<acc_t>(weight[k * C + c]);
        sum_g += g;
        sum_gx += g * ((static_cast<acc_t>(x[seg[k] + c]) - mu) * rs);
      }
    const acc_t mean_g = warp_sum(sum_g) / static_cast<acc_t>(n);
    const acc_t mean_gx = warp_sum(sum_gx) / static_cast<acc_t>(n);

    // second pass: the row's dy, weight and x again (L1/L2 hits); the segments give the loads in flight
    // (unrolling along c as well would hold more registers than it hides latency)
#pragma unroll
    for (int k = 0; k < Rows::kSegments; ++k)
#pragma unroll 1
      for (index_t c = lane; c < C; c += kWarpSize) {
        const index_t i = k * C + c;
        const acc_t d = static_cast<acc_t>(dy[i]);
        const acc_t xhat = (static_cast<acc_t>(x[seg[k] + c]) - mu) * rs;
        grad_x[seg[k] + c] = static_cast<scalar_t>(
            layer_norm_grad_input<acc_t>(d * static_cast<acc_t>(weight[i]), xhat, rs, mean_g, mean_gx));
        const index_t j = i - col_begin;
        if (j >= 0 && j < cols) {
          acc_w[j] += d * xhat;
          acc_b[j] += d;
        }
      }
  }
  __syncthreads();
  write_chunk_partials<acc_t, index_t>(partials, chunk, n_chunks, n, col_begin, cols);
}

// kSize accumulation-type values: the shared accumulators of one 16-byte vector of the row.
template <typename acc_t, int kSize>
struct alignas(16) AccVec {
  acc_t v[kSize];
};

// The backward with each row's dy and x read once in 16-byte vectors held in registers (lane l holds
// vectors l + 32 j, j < kPerLane, of every segment, as the vector forward) and dx written in 16-byte
// vectors; launched under the vector forward's conditions (C a multiple of the vector, 16-byte aligned
// pointers, at most kPerLane vectors per lane, int32 indices) with the whole row's accumulators in shared
// memory. The element-wise formula and the reduction order are the scalar kernel's.
// At least 4 blocks per SM (<= 128 registers) with a 4-byte accumulator and at most 4 vectors of dy and of
// x held per lane: left to itself ptxas spills a few row offsets to reach 96 registers (sm_80). With 8 held
// vectors (patch merge, 2 per segment) 128 registers are too few: ptxas chooses.
template <typename acc_t, int kHeld>
constexpr int kBackwardVecMinBlocks = sizeof(acc_t) == 4 && kHeld <= 4 ? 4 : 1;

template <typename Rows, typename scalar_t, typename param_t, typename acc_t, int kPerLane>
__global__ void __launch_bounds__(kRowThreads, kBackwardVecMinBlocks<acc_t, Rows::kSegments * kPerLane>)
    gathered_layer_norm_backward_vec_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                            const param_t* __restrict__ weight, const acc_t* __restrict__ mean,
                                            const acc_t* __restrict__ rstd, scalar_t* __restrict__ grad_x,
                                            acc_t* __restrict__ partials, Rows src, int32_t rows, int32_t C,
                                            int32_t per_chunk, int32_t n_chunks) {
  using V = Vec16<scalar_t>;
  using A = AccVec<acc_t, V::kSize>;
  constexpr int kSeg = Rows::kSegments;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int32_t n = kSeg * C;
  const int32_t seg_vecs = C / V::kSize;
  acc_t* acc = shared_acc<acc_t>() + warp * 2 * n;
  for (int32_t j = lane; j < 2 * n; j += kWarpSize) acc[j] = 0;
  __syncwarp();
  A* acc_w = reinterpret_cast<A*>(acc);  // n is a multiple of the vector: both halves stay 16-byte aligned
  A* acc_b = reinterpret_cast<A*>(acc + n);
  using PV = ParamVec<param_t, V::kSize>;
  const PV* wv = reinterpret_cast<const PV*>(weight);

  const int32_t chunk = blockIdx.x;
  const int32_t r_begin = chunk * per_chunk;
  const int32_t r_end = r_begin + per_chunk < rows ? r_begin + per_chunk : rows;
  for (int32_t row = r_begin + warp; row < r_end; row += kWarpsPerBlock) {
    int32_t seg[kSeg];
    const int32_t base = src.base(row);
#pragma unroll
    for (int k = 0; k < kSeg; ++k) seg[k] = (base + src.template offset<int32_t>(k)) * C;
    const acc_t mu = mean[row], rs = rstd[row];
    const V* dyv = reinterpret_cast<const V*>(grad_out + row * n);

    V d[kSeg][kPerLane] = {}, xv[kSeg][kPerLane] = {};  // zeros past the row: they add nothing below
#pragma unroll
    for (int k = 0; k < kSeg; ++k)
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int32_t q = j * kWarpSize + lane;
        if (q < seg_vecs) {
          d[k][j] = dyv[k * seg_vecs + q];
          xv[k][j] = reinterpret_cast<const V*>(x + seg[k])[q];
        }
      }
    // first pass: the row sums, and dy * xhat, dy into the warp's accumulators (they need no row sum)
    acc_t sum_g = 0, sum_gx = 0;
#pragma unroll
    for (int k = 0; k < kSeg; ++k)
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int32_t q = j * kWarpSize + lane;
        if (q < seg_vecs) {
          const int32_t i = k * seg_vecs + q;  // vector i of the row, of weight and of the accumulators
          const PV wi = wv[i];
          A aw = acc_w[i], ab = acc_b[i];
#pragma unroll
          for (int e = 0; e < V::kSize; ++e) {
            const acc_t de = static_cast<acc_t>(d[k][j].v[e]);
            const acc_t xhat = (static_cast<acc_t>(xv[k][j].v[e]) - mu) * rs;
            const acc_t g = de * static_cast<acc_t>(wi.v[e]);
            sum_g += g;
            sum_gx += g * xhat;
            aw.v[e] += de * xhat;
            ab.v[e] += de;
          }
          acc_w[i] = aw;
          acc_b[i] = ab;
        }
      }
    const acc_t mean_g = warp_sum(sum_g) / static_cast<acc_t>(n);
    const acc_t mean_gx = warp_sum(sum_gx) / static_cast<acc_t>(n);

#pragma unroll
    for (int k = 0; k < kSeg; ++k)
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int32_t q = j * kWarpSize + lane;
        if (q < seg_vecs) {
          const PV wi = wv[k * seg_vecs + q];
          V o;
#pragma unroll
          for (int e = 0; e < V::kSize; ++e) {
            const acc_t de = static_cast<acc_t>(d[k][j].v[e]);
            const acc_t xhat = (static_cast<acc_t>(xv[k][j].v[e]) - mu) * rs;
            o.v[e] = static_cast<scalar_t>(
                layer_norm_grad_input<acc_t>(de * static_cast<acc_t>(wi.v[e]), xhat, rs, mean_g, mean_gx));
          }
          reinterpret_cast<V*>(grad_x + seg[k])[q] = o;
        }
      }
  }
  __syncthreads();
  write_chunk_partials<acc_t, int32_t>(partials, chunk, n_chunks, n, 0, n);
}

constexpr int kReduceCols = 8;       // columns per block: 32-byte sectors of fp32 partial rows
constexpr int kMaxReduceLanes = 64;  // gathered_layer_norm_reduce_lanes

// grid (ceil(n / kReduceCols)), block (kReduceCols, lanes): grad_weight / grad_bias from the chunks' partial
// rows in the fixed order of gathered_layer_norm_reduce_lanes (lane y sums rows y, y + lanes, ... in
// order; then pairwise). Sizing: all lanes busy (>= 4 partial rows each), up to 512 threads per block with
// 4 rows unrolled (8 loads in flight per thread: 16 KB per block in fp32), and blocks of 8 columns (one
// 32-byte sector per partial row) so that even n = 96 spreads over 12 SMs; before, one thread per column
// looped over every chunk.
template <typename param_t, typename acc_t>
__global__ void __launch_bounds__(kReduceCols* kMaxReduceLanes)
    param_reduce_kernel(const acc_t* __restrict__ part_w, const acc_t* __restrict__ part_b,
                        param_t* __restrict__ grad_weight, param_t* __restrict__ grad_bias, int64_t n_chunks,
                        int64_t n) {
  __shared__ acc_t sw[kMaxReduceLanes][kReduceCols], sb[kMaxReduceLanes][kReduceCols];
  const int cx = threadIdx.x, y = threadIdx.y, lanes = blockDim.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceCols + cx;
  acc_t w = 0, b = 0;
  if (col < n) {
#pragma unroll 4
    for (int64_t chunk = y; chunk < n_chunks; chunk += lanes) {
      w += part_w[chunk * n + col];
      b += part_b[chunk * n + col];
    }
  }
  sw[y][cx] = w;
  sb[y][cx] = b;
  __syncthreads();
  for (int s = lanes / 2; s > 0; s >>= 1) {
    if (y < s) {
      sw[y][cx] += sw[y + s][cx];
      sb[y][cx] += sb[y + s][cx];
    }
    __syncthreads();
  }
  if (y == 0 && col < n) {
    grad_weight[col] = static_cast<param_t>(sw[0][cx]);
    grad_bias[col] = static_cast<param_t>(sb[0][cx]);
  }
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
  dispatch_floating_pair(a.dtype, a.param_dtype, "gathered_layer_norm_forward_cuda", [&](auto tag, auto ptag) {
    using scalar_t = decltype(tag);
    using param_t = decltype(ptag);
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x = static_cast<const scalar_t*>(a.x);
    const param_t* weight = static_cast<const param_t*>(a.weight);
    const param_t* bias = static_cast<const param_t*>(a.bias);
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
        launch(gathered_layer_norm_forward_vec_kernel<Rows, scalar_t, param_t, acc_t, 1>);
      } else if (per_lane <= 2) {
        launch(gathered_layer_norm_forward_vec_kernel<Rows, scalar_t, param_t, acc_t, 2>);
      } else {
        launch(gathered_layer_norm_forward_vec_kernel<Rows, scalar_t, param_t, acc_t, 4>);
      }
      return;
    }
    dispatch_index(a.int32_index, [&](auto itag) {
      using index_t = decltype(itag);
      gathered_layer_norm_forward_kernel<Rows, scalar_t, param_t, acc_t, index_t><<<blocks, kRowThreads, 0, stream>>>(
          x, weight, bias, out, static_cast<acc_t*>(a.mean),
          static_cast<acc_t*>(a.rstd), a.src, static_cast<index_t>(a.rows), static_cast<index_t>(a.C),
          static_cast<acc_t>(a.eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// Launches `kernel` with `bytes` of dynamic shared memory (opting in past the default 48 KB).
template <typename Kernel, typename... Args>
void launch_with_shared(Kernel kernel, unsigned blocks, size_t bytes, cudaStream_t stream, Args... args) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  kernel<<<blocks, kRowThreads, bytes, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Rows>
void gathered_layer_norm_backward_cuda(const GatheredLayerNormBackward<Rows>& a) {
  const int64_t n = Rows::kSegments * a.C;
  const unsigned chunks = static_cast<unsigned>(a.n_chunks);  // <= 1024 (gathered_layer_norm_rows_per_chunk)
  int device = 0, shared_optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floating_pair(a.dtype, a.param_dtype, "gathered_layer_norm_backward_cuda", [&](auto tag, auto ptag) {
    using scalar_t = decltype(tag);
    using param_t = decltype(ptag);
    using acc_t = acc_type<scalar_t>;
    const scalar_t* grad_out = static_cast<const scalar_t*>(a.grad_out);
    const scalar_t* x = static_cast<const scalar_t*>(a.x);
    const param_t* weight = static_cast<const param_t*>(a.weight);
    const acc_t* mean = static_cast<const acc_t*>(a.mean);
    const acc_t* rstd = static_cast<const acc_t*>(a.rstd);
    scalar_t* grad_x = static_cast<scalar_t*>(a.grad_x);
    acc_t* part = static_cast<acc_t*>(a.partials);
    // Pass 1 (one read of x and dy): dx and the per-chunk weight/bias partial rows.
    constexpr int64_t kVec = Vec16<scalar_t>::kSize;
    constexpr size_t kSliceBytes = kWarpsPerBlock * 2 * sizeof(acc_t);  // shared bytes per accumulated column
    const uintptr_t addr = reinterpret_cast<uintptr_t>(grad_out) | reinterpret_cast<uintptr_t>(x) |
                           reinterpret_cast<uintptr_t>(weight) | reinterpret_cast<uintptr_t>(grad_x);
    const int64_t per_lane = (a.C / kVec + kWarpSize - 1) / kWarpSize;
    // dy and x of every segment stay in registers: 4 vectors per lane of each for one segment, 3 for four
    // (patch merge at n = 1536 in fp32)
    constexpr int64_t kMaxPerLane = Rows::kSegments == 1 ? 4 : 3;
    const size_t row_bytes = static_cast<size_t>(n) * kSliceBytes;
    if (a.int32_index && a.C % kVec == 0 && addr % 16 == 0 && per_lane <= kMaxPerLane &&
        row_bytes <= static_cast<size_t>(shared_optin)) {
      const auto launch = [&](auto kernel) {
        launch_with_shared(kernel, chunks, row_bytes, stream, grad_out, x, weight, mean, rstd, grad_x, part, a.src,
                           static_cast<int32_t>(a.rows), static_cast<int32_t>(a.C), static_cast<int32_t>(a.per_chunk),
                           static_cast<int32_t>(a.n_chunks));
      };
      if (per_lane <= 1) {
        launch(gathered_layer_norm_backward_vec_kernel<Rows, scalar_t, param_t, acc_t, 1>);
      } else if (per_lane <= 2) {
        launch(gathered_layer_norm_backward_vec_kernel<Rows, scalar_t, param_t, acc_t, 2>);
      } else if constexpr (kMaxPerLane == 4) {
        launch(gathered_layer_norm_backward_vec_kernel<Rows, scalar_t, param_t, acc_t, 4>);
      } else {
        launch(gathered_layer_norm_backward_vec_kernel<Rows, scalar_t, param_t, acc_t, 3>);
      }
    } else {
      // Column windows of at most shared_optin / kSliceBytes accumulators: one launch unless n is very wide.
      const int64_t fit = shared_optin / static_cast<int64_t>(kSliceBytes);
      const int64_t window = std::max<int64_t>(1, std::min<int64_t>(n, fit));
      dispatch_index(a.int32_index, [&](auto itag) {
        using index_t = decltype(itag);
        for (int64_t col_begin = 0; col_begin < n; col_begin += window) {
          const int64_t cols = std::min(window, n - col_begin);
          launch_with_shared(gathered_layer_norm_backward_kernel<Rows, scalar_t, param_t, acc_t, index_t>, chunks,
                             static_cast<size_t>(cols) * kSliceBytes, stream, grad_out, x, weight, mean, rstd, grad_x,
                             part, a.src, static_cast<index_t>(a.rows), static_cast<index_t>(a.C),
                             static_cast<index_t>(a.per_chunk), static_cast<index_t>(a.n_chunks),
                             static_cast<index_t>(col_begin), static_cast<index_t>(cols));
        }
      });
    }
    // Pass 2: the partial rows summed per column in a fixed order.
    const int lanes = gathered_layer_norm_reduce_lanes(a.n_chunks);
    param_reduce_kernel<param_t, acc_t><<<blocks_for(n, kReduceCols), dim3(kReduceCols, lanes), 0, stream>>>(
        part, part + a.n_chunks * n, static_cast<param_t*>(a.grad_weight), static_cast<param_t*>(a.grad_bias),
        a.n_chunks, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template void gathered_layer_norm_forward_cuda(const GatheredLayerNormForward<PatchMergeRows>&);
template void gathered_layer_norm_forward_cuda(const GatheredLayerNormForward<WindowRows>&);
template void gathered_layer_norm_backward_cuda(const GatheredLayerNormBackward<PatchMergeRows>&);
template void gathered_layer_norm_backward_cuda(const GatheredLayerNormBackward<WindowRows>&);

}  // namespace htsat
