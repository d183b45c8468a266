// C++ CPU twins of the gathered-LayerNorm kernels (gathered_layer_norm.h): the same row maps as the CUDA
// kernels (index_maps.h), the same LayerNorm algebra, the same deterministic reduction of the weight/bias
// gradient (one pass over x and dy per chunk of rows, then a fixed-order sum of the chunks' partials).
// "auto" uses them on CPU, so they are real kernels: lane-parallel reductions in a fixed order
// (bit-identical between the baseline and AVX2 builds of each loop, cpu_isa.h).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "floating_types.h"
#include "gathered_layer_norm.h"

namespace htsat {
namespace {

// Gathers row `row` into buf (acc_t): Rows::kSegments contiguous runs of C elements.
template <typename Rows, typename scalar_t, typename acc_t>
HTSAT_INLINE void gather_row(const scalar_t* __restrict__ x, int64_t row, const Rows& src, int64_t C,
                             bool int32_index, acc_t* __restrict__ buf) {
  const int64_t base = map_row_base(src, row, int32_index);
  for (int k = 0; k < Rows::kSegments; ++k) {
    const scalar_t* __restrict__ seg = x + (base + src.offset(k)) * C;
    acc_t* __restrict__ dst = buf + k * C;
    for (int64_t c = 0; c < C; ++c) dst[c] = Convert<scalar_t, acc_t>::load(seg[c]);
  }
}

// Sum of term(i) for i in [0, n) over 32 independent accumulators (4 groups of 8 lanes) in a fixed order:
// deterministic and the same for every ISA variant, and not bound by the latency of a few long
// dependency chains (each group of 8 lanes becomes one or two vector registers).
#define HTSAT_LANE_TERM(body) [&](int64_t i) HTSAT_LAMBDA_INLINE { return body; }
template <typename acc_t, typename Term>
HTSAT_INLINE acc_t reduce_lanes(int64_t n, const Term& term) {
  acc_t s0[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s1[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  acc_t s2[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s3[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int j = 0; j < 8; ++j) s0[j] += term(i + j);
    for (int j = 0; j < 8; ++j) s1[j] += term(i + 8 + j);
    for (int j = 0; j < 8; ++j) s2[j] += term(i + 16 + j);
    for (int j = 0; j < 8; ++j) s3[j] += term(i + 24 + j);
  }
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) s0[j] += term(i + j);
  }
  for (int j = 0; i < n; ++i, ++j) s0[j] += term(i);
  for (int j = 0; j < 8; ++j) s0[j] = (s0[j] + s1[j]) + (s2[j] + s3[j]);
  return ((s0[0] + s0[1]) + (s0[2] + s0[3])) + ((s0[4] + s0[5]) + (s0[6] + s0[7]));
}

template <typename acc_t>
HTSAT_INLINE acc_t sum_lanes(const acc_t* __restrict__ v, int64_t n) {
  return reduce_lanes<acc_t>(n, HTSAT_LANE_TERM(v[i]));
}

template <typename acc_t>
HTSAT_INLINE acc_t centred_square_sum_lanes(const acc_t* __restrict__ v, acc_t mu, int64_t n) {
  return reduce_lanes<acc_t>(n, HTSAT_LANE_TERM((v[i] - mu) * (v[i] - mu)));
}

template <typename acc_t>
HTSAT_INLINE acc_t dot_lanes(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  return reduce_lanes<acc_t>(n, HTSAT_LANE_TERM(a[i] * b[i]));
}
#undef HTSAT_LANE_TERM

// The launch arguments with typed pointers; weight / bias in the accumulation type.
template <typename Rows, typename scalar_t, typename acc_t>
struct ForwardRows {
  const scalar_t* x;
  const acc_t* weight;  // (n,)
  const acc_t* bias;    // (n,)
  scalar_t* out;        // (rows, n)
  acc_t* mean;
  acc_t* rstd;
  acc_t eps;
  Rows src;
  int64_t C;
  bool int32_index;
};

// Rows [begin, end) of the forward; v is an n-element scratch row.
template <typename Rows, typename scalar_t, typename acc_t>
HTSAT_INLINE void layer_norm_forward_rows(const ForwardRows<Rows, scalar_t, acc_t>& a, int64_t begin, int64_t end,
                                          acc_t* __restrict__ v) {
  const int64_t C = a.C, n = Rows::kSegments * C;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t* __restrict__ w = a.weight;
  const acc_t* __restrict__ b = a.bias;
  for (int64_t r = begin; r < end; ++r) {
    gather_row(a.x, r, a.src, C, a.int32_index, v);
    const acc_t mu = sum_lanes(v, n) * inv_n;
    const acc_t rs = acc_t(1) / std::sqrt(centred_square_sum_lanes(v, mu, n) * inv_n + a.eps);
    scalar_t* __restrict__ y = a.out + r * n;
    for (int64_t i = 0; i < n; ++i) y[i] = Convert<scalar_t, acc_t>::store((v[i] - mu) * rs * w[i] + b[i]);
    a.mean[r] = mu;
    a.rstd[r] = rs;
  }
}

template <typename Rows, typename scalar_t, typename acc_t>
void layer_norm_forward_rows_baseline(const ForwardRows<Rows, scalar_t, acc_t>& a, int64_t begin, int64_t end,
                                      acc_t* v) {
  layer_norm_forward_rows(a, begin, end, v);
}

template <typename Rows, typename scalar_t, typename acc_t>
struct BackwardChunks {
  const scalar_t* grad_out;  // (rows, n)
  const scalar_t* x;
  const acc_t* weight;  // (n,) in acc_t
  const acc_t* mean;
  const acc_t* rstd;
  scalar_t* grad_x;
  acc_t* part_w;  // (n_chunks, n)
  acc_t* part_b;
  Rows src;
  int64_t C, rows, per_chunk;
  bool int32_index;
};

// Chunks [cbegin, cend) of the backward, one pass over x and dy: dx of each row, and the chunk's partial
// weight/bias sums in the CUDA kernel's order (gathered_layer_norm.h): row r_begin + s + 4i into
// sub-chunk s (sub: kGatheredLayerNormSubChunks * 2 * n scratch), the sub-chunks combined pairwise.
template <typename Rows, typename scalar_t, typename acc_t>
HTSAT_INLINE void layer_norm_backward_chunks(const BackwardChunks<Rows, scalar_t, acc_t>& a, int64_t cbegin,
                                             int64_t cend, acc_t* __restrict__ xh, acc_t* __restrict__ gv,
                                             acc_t* __restrict__ sub) {
  constexpr int kSub = kGatheredLayerNormSubChunks;
  static_assert(kSub == 4, "the combine below is written for 4 sub-chunks");
  const int64_t C = a.C, n = Rows::kSegments * C;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t* __restrict__ w = a.weight;
  for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
    std::fill(sub, sub + kSub * 2 * n, acc_t(0));
    const int64_t r_begin = chunk * a.per_chunk;
    const int64_t r_end = std::min(a.rows, r_begin + a.per_chunk);
    for (int64_t r = r_begin; r < r_end; ++r) {
      acc_t* __restrict__ sw = sub + ((r - r_begin) % kSub) * 2 * n;
      acc_t* __restrict__ sb = sw + n;
      gather_row(a.x, r, a.src, C, a.int32_index, xh);
      const acc_t mu = a.mean[r], rs = a.rstd[r];
      const scalar_t* __restrict__ dy = a.grad_out + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t dyi = Convert<scalar_t, acc_t>::load(dy[i]);
        const acc_t xhi = (xh[i] - mu) * rs;
        xh[i] = xhi;
        gv[i] = dyi * w[i];
        sw[i] += dyi * xhi;
        sb[i] += dyi;
      }
      const acc_t mean_g = sum_lanes(gv, n) * inv_n, mean_gx = dot_lanes(gv, xh, n) * inv_n;
      const int64_t base = map_row_base(a.src, r, a.int32_index);
      for (int k = 0; k < Rows::kSegments; ++k) {
        scalar_t* __restrict__ dst = a.grad_x + (base + a.src.offset(k)) * C;
        const acc_t* __restrict__ gk = gv + k * C;
        const acc_t* __restrict__ xk = xh + k * C;
        for (int64_t c = 0; c < C; ++c) {
          dst[c] = Convert<scalar_t, acc_t>::store(layer_norm_grad_input<acc_t>(gk[c], xk[c], rs, mean_g, mean_gx));
        }
      }
    }
    acc_t* __restrict__ pw = a.part_w + chunk * n;
    acc_t* __restrict__ pb = a.part_b + chunk * n;
    const acc_t* __restrict__ s0 = sub;
    const acc_t* __restrict__ s1 = sub + 2 * n;
    const acc_t* __restrict__ s2 = sub + 4 * n;
    const acc_t* __restrict__ s3 = sub + 6 * n;
    for (int64_t i = 0; i < n; ++i) {
      pw[i] = (s0[i] + s1[i]) + (s2[i] + s3[i]);
      pb[i] = (s0[n + i] + s1[n + i]) + (s2[n + i] + s3[n + i]);
    }
  }
}

template <typename Rows, typename scalar_t, typename acc_t>
void layer_norm_backward_chunks_baseline(const BackwardChunks<Rows, scalar_t, acc_t>& a, int64_t cbegin, int64_t cend,
                                         acc_t* xh, acc_t* gv, acc_t* sub) {
  layer_norm_backward_chunks(a, cbegin, cend, xh, gv, sub);
}

// Columns [begin, end) of grad_weight / grad_bias (of the parameters' dtype out_t) in the CUDA reduction's order
// (gathered_layer_norm_reduce_lanes): `lanes` lane sums over the partial rows l, l + lanes, ... in order,
// then added pairwise. lw, lb: lanes * (end - begin) scratch each.
template <typename out_t, typename acc_t>
HTSAT_INLINE void reduce_chunk_partials(const acc_t* __restrict__ part_w, const acc_t* __restrict__ part_b,
                                        int64_t n_chunks, int64_t n, int lanes, int64_t begin, int64_t end,
                                        acc_t* __restrict__ lw, acc_t* __restrict__ lb, out_t* __restrict__ dw,
                                        out_t* __restrict__ db) {
  const int64_t m = end - begin;
  std::fill(lw, lw + lanes * m, acc_t(0));
  std::fill(lb, lb + lanes * m, acc_t(0));
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    acc_t* __restrict__ sw = lw + (chunk % lanes) * m;
    acc_t* __restrict__ sb = lb + (chunk % lanes) * m;
    const acc_t* __restrict__ pw = part_w + chunk * n + begin;
    const acc_t* __restrict__ pb = part_b + chunk * n + begin;
    for (int64_t i = 0; i < m; ++i) {
      sw[i] += pw[i];
      sb[i] += pb[i];
    }
  }
  for (int s = lanes / 2; s > 0; s /= 2) {
    for (int y = 0; y < s; ++y) {
      acc_t* __restrict__ dst_w = lw + y * m;
      acc_t* __restrict__ dst_b = lb + y * m;
      const acc_t* __restrict__ src_w = lw + (y + s) * m;
      const acc_t* __restrict__ src_b = lb + (y + s) * m;
      for (int64_t i = 0; i < m; ++i) {
        dst_w[i] += src_w[i];
        dst_b[i] += src_b[i];
      }
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    dw[begin + i] = Convert<out_t, acc_t>::store(lw[i]);
    db[begin + i] = Convert<out_t, acc_t>::store(lb[i]);
  }
}

template <typename out_t, typename acc_t>
void reduce_chunk_partials_baseline(const acc_t* part_w, const acc_t* part_b, int64_t n_chunks, int64_t n, int lanes,
                                    int64_t begin, int64_t end, acc_t* lw, acc_t* lb, out_t* dw, out_t* db) {
  reduce_chunk_partials(part_w, part_b, n_chunks, n, lanes, begin, end, lw, lb, dw, db);
}

#if HTSAT_CPU_DISPATCH
template <typename Rows, typename scalar_t, typename acc_t>
HTSAT_TARGET_AVX2 void layer_norm_forward_rows_avx2(const ForwardRows<Rows, scalar_t, acc_t>& a, int64_t begin,
                                                    int64_t end, acc_t* v) {
  layer_norm_forward_rows(a, begin, end, v);
}

template <typename Rows, typename scalar_t, typename acc_t>
HTSAT_TARGET_AVX2 void layer_norm_backward_chunks_avx2(const BackwardChunks<Rows, scalar_t, acc_t>& a, int64_t cbegin,
                                                       int64_t cend, acc_t* xh, acc_t* gv, acc_t* sub) {
  layer_norm_backward_chunks(a, cbegin, cend, xh, gv, sub);
}

template <typename out_t, typename acc_t>
HTSAT_TARGET_AVX2 void reduce_chunk_partials_avx2(const acc_t* part_w, const acc_t* part_b, int64_t n_chunks,
                                                  int64_t n, int lanes, int64_t begin, int64_t end, acc_t* lw,
                                                  acc_t* lb, out_t* dw, out_t* db) {
  reduce_chunk_partials(part_w, part_b, n_chunks, n, lanes, begin, end, lw, lb, dw, db);
}
#endif

// weight / bias (param_t: x's dtype or float32) in the accumulation type: the tensor's own data when the
// types agree, else a converted copy.
template <typename param_t, typename acc_t>
const acc_t* affine_in_acc(const void* data, int64_t n, std::vector<acc_t>& storage) {
  const param_t* p = static_cast<const param_t*>(data);
  if constexpr (std::is_same_v<param_t, acc_t>) {
    return p;
  } else {
    storage.resize(n);
    for (int64_t i = 0; i < n; ++i) storage[i] = static_cast<acc_t>(p[i]);
    return storage.data();
  }
}

}  // namespace

template <typename Rows>
void gathered_layer_norm_forward_cpu(const GatheredLayerNormForward<Rows>& a) {
  const int64_t n = Rows::kSegments * a.C;
  dispatch_floating_pair(a.dtype, a.param_dtype, "gathered_layer_norm_forward_cpu", [&](auto tag, auto ptag) {
    using scalar_t = decltype(tag);
    using param_t = decltype(ptag);
    using acc_t = acc_type<scalar_t>;
    std::vector<acc_t> w_store, b_store;
    const ForwardRows<Rows, scalar_t, acc_t> args{static_cast<const scalar_t*>(a.x),
                                                  affine_in_acc<param_t, acc_t>(a.weight, n, w_store),
                                                  affine_in_acc<param_t, acc_t>(a.bias, n, b_store),
                                                  static_cast<scalar_t*>(a.out),
                                                  static_cast<acc_t*>(a.mean),
                                                  static_cast<acc_t*>(a.rstd),
                                                  static_cast<acc_t>(a.eps),
                                                  a.src,
                                                  a.C,
                                                  a.int32_index};
    // ~32K elements per task at least: small maps stay on few threads.
    at::parallel_for(0, a.rows, std::max<int64_t>(1, 32768 / n), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(n);
      HTSAT_CPU_CALL(layer_norm_forward_rows, args, begin, end, buf.data());
    });
  });
}

// grad_x scattered back through the row map (every input element belongs to exactly one output row);
// grad_weight / grad_bias: per-chunk partials in row order, then summed in chunk order (deterministic).
template <typename Rows>
void gathered_layer_norm_backward_cpu(const GatheredLayerNormBackward<Rows>& a) {
  const int64_t n = Rows::kSegments * a.C, n_chunks = a.n_chunks;
  dispatch_floating_pair(a.dtype, a.param_dtype, "gathered_layer_norm_backward_cpu", [&](auto tag, auto ptag) {
    using scalar_t = decltype(tag);
    using param_t = decltype(ptag);
    using acc_t = acc_type<scalar_t>;
    std::vector<acc_t> w_store;
    acc_t* part_w = static_cast<acc_t*>(a.partials);
    acc_t* part_b = part_w + n_chunks * n;
    const BackwardChunks<Rows, scalar_t, acc_t> args{static_cast<const scalar_t*>(a.grad_out),
                                                     static_cast<const scalar_t*>(a.x),
                                                     affine_in_acc<param_t, acc_t>(a.weight, n, w_store),
                                                     static_cast<const acc_t*>(a.mean),
                                                     static_cast<const acc_t*>(a.rstd),
                                                     static_cast<scalar_t*>(a.grad_x),
                                                     part_w,
                                                     part_b,
                                                     a.src,
                                                     a.C,
                                                     a.rows,
                                                     a.per_chunk,
                                                     a.int32_index};
    // Pass 1, chunks of rows per task: dx of each row, and each chunk's partial weight/bias sums.
    const int64_t chunk_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, a.per_chunk * n));
    at::parallel_for(0, n_chunks, chunk_grain, [&](int64_t cbegin, int64_t cend) {
      std::vector<acc_t> scratch((2 + 2 * kGatheredLayerNormSubChunks) * n);
      HTSAT_CPU_CALL(layer_norm_backward_chunks, args, cbegin, cend, scratch.data(), scratch.data() + n,
                     scratch.data() + 2 * n);
    });
    // Pass 2: sum the partials of each column in the fixed order of gathered_layer_norm_reduce_lanes.
    param_t* dwp = static_cast<param_t*>(a.grad_weight);  // the parameters' own dtype
    param_t* dbp = static_cast<param_t*>(a.grad_bias);
    const int lanes = gathered_layer_norm_reduce_lanes(n_chunks);
    const int64_t col_grain = std::max<int64_t>(64, 32768 / n_chunks);
    at::parallel_for(0, n, col_grain, [&](int64_t begin, int64_t end) {
      const int64_t m = end - begin;
      std::vector<acc_t> sums(2 * lanes * m);
      HTSAT_CPU_CALL(reduce_chunk_partials, part_w, part_b, n_chunks, n, lanes, begin, end, sums.data(),
                     sums.data() + lanes * m, dwp, dbp);
    });
  });
}

template void gathered_layer_norm_forward_cpu(const GatheredLayerNormForward<PatchMergeRows>&);
template void gathered_layer_norm_forward_cpu(const GatheredLayerNormForward<WindowRows>&);
template void gathered_layer_norm_backward_cpu(const GatheredLayerNormBackward<PatchMergeRows>&);
template void gathered_layer_norm_backward_cpu(const GatheredLayerNormBackward<WindowRows>&);

}  // namespace htsat
