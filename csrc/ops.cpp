// htsat_kernels._C: operator schemas (TORCH_LIBRARY) and the C++ CPU kernels.
//
// The CPU kernels are real kernels ("auto" uses them on CPU), written as twins of the CUDA ones: same
// index maps (window_process.h, patch_merge.h), same LayerNorm algebra, same deterministic reduction
// of the weight/bias gradient.
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"
#include "patch_merge.h"
#include "window_process.h"

#ifndef HTSAT_WITH_CUDA
#define HTSAT_WITH_CUDA 0
#endif

namespace htsat {
namespace {

// ---------------------------------------------------------------------------------------------
// Intra-op parallelism
// ---------------------------------------------------------------------------------------------
// at::parallel_for's OpenMP backend is a `#pragma omp parallel` inside a header: without -fopenmp
// (which torch.utils.cpp_extension does not add; setup.py does) every kernel here would silently
// run on the calling thread alone.
#ifndef _OPENMP
#error "csrc/ops.cpp must be compiled with -fopenmp (see setup.py), or at::parallel_for runs serially"
#endif
using at::parallel_for;

// ---------------------------------------------------------------------------------------------
// window_partition / window_merge
// ---------------------------------------------------------------------------------------------

// Copies every token row through the shared map: partition gathers, merge scatters. Bit-exact (memcpy).
// Work item = one window row (ws consecutive tokens): they map to ws consecutive pixels of one image row,
// except where the cyclic shift wraps the column back to 0, so the map is evaluated once per window row
// and the row is moved with one memcpy, or two around the wrap.
void window_copy_cpu(const at::Tensor& src, at::Tensor& dst, const WindowGeometry& g, bool merge) {
  const int64_t tokens = g.batch * g.H * g.W;
  const int64_t row_bytes = g.channels * static_cast<int64_t>(src.element_size());
  if (tokens == 0 || row_bytes == 0) return;
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  const int64_t ws = g.ws, W = g.W;
  const int64_t segments = tokens / ws;  // W is a multiple of ws
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (row_bytes * ws));
  parallel_for(0, segments, grain, [&](int64_t begin, int64_t end) {
    for (int64_t seg = begin; seg < end; ++seg) {
      const int64_t t = seg * ws;
      const int64_t p = window_token_to_pixel<int64_t>(t, g);
      const int64_t w0 = p % W;
      const int64_t first = std::min(ws, W - w0);  // tokens before the column wraps to 0
      const int64_t runs[2][3] = {{t, p, first}, {t + first, p - w0, ws - first}};
      for (const auto& run : runs) {
        if (run[2] == 0) continue;
        const int64_t bytes = run[2] * row_bytes;
        if (merge) {
          std::memcpy(d + run[1] * row_bytes, s + run[0] * row_bytes, bytes);
        } else {
          std::memcpy(d + run[0] * row_bytes, s + run[1] * row_bytes, bytes);
        }
      }
    }
  });
}

at::Tensor window_partition_cpu(const at::Tensor& x, int64_t window_size, int64_t shift) {
  const WindowGeometry g = window_partition_geometry(x, window_size, shift);
  at::Tensor out = at::empty(windowed_shape(g), x.options());
  window_copy_cpu(x, out, g, /*merge=*/false);
  return out;
}

at::Tensor window_merge_cpu(const at::Tensor& windows, int64_t H, int64_t W, int64_t shift) {
  const WindowGeometry g = window_merge_geometry(windows, H, W, shift);
  at::Tensor out = at::empty(image_shape(g), windows.options());
  window_copy_cpu(windows, out, g, /*merge=*/true);
  return out;
}

// ---- CPU ISA dispatch ----
// The extension is compiled for the baseline ISA (no -march), so the hot loops below are written once as
// always-inline templates and instantiated twice: for the baseline and, on x86 with GCC/Clang, under
// __attribute__((target("avx2"))), picked at run time from the CPU's features. Only the vector width
// changes: no FMA is enabled, and every reduction runs over the same fixed lanes in the same order, so
// both variants give bit-identical results.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HTSAT_CPU_DISPATCH 1
#define HTSAT_INLINE inline __attribute__((always_inline))
#define HTSAT_TARGET_AVX2 __attribute__((target("avx2")))
#define HTSAT_LAMBDA_INLINE __attribute__((always_inline))
inline bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}
#else
#define HTSAT_CPU_DISPATCH 0
#define HTSAT_INLINE inline
#define HTSAT_LAMBDA_INLINE
inline bool cpu_has_avx2() { return false; }
#endif

// Element conversions to / from the accumulation type. bfloat16 is spelled out with integer ops (the
// same round-to-nearest-even and NaN rule as c10::BFloat16) so the loops vectorise.
template <typename scalar_t, typename acc_t>
struct Convert {
  static HTSAT_INLINE acc_t load(scalar_t v) { return static_cast<acc_t>(v); }
  static HTSAT_INLINE scalar_t store(acc_t v) { return static_cast<scalar_t>(v); }
};

template <>
struct Convert<c10::BFloat16, float> {
  static HTSAT_INLINE float load(c10::BFloat16 v) {
    const uint32_t u = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static HTSAT_INLINE c10::BFloat16 store(float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    uint32_t r = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
    r = (v != v) ? UINT32_C(0x7FC0) : r;
    return c10::BFloat16(static_cast<uint16_t>(r), c10::BFloat16::from_bits());
  }
};

// ---------------------------------------------------------------------------------------------
// Gathered LayerNorm: output row r = LayerNorm over the concatenation of Rows::kSegments segments of C
// channels read from pixel rows rows.base(r) + rows.offset(k). Patch merging (4 segments, 2x2 gather)
// and the fused norm1 + window partition (1 segment, window map) are its two instances.
// ---------------------------------------------------------------------------------------------

// Gathers row `row` into buf (acc_t): Rows::kSegments contiguous runs of C elements.
template <typename Rows, typename scalar_t, typename acc_t>
HTSAT_INLINE void gather_row(const scalar_t* __restrict__ x, int64_t row, const Rows& src, int64_t C,
                             acc_t* __restrict__ buf) {
  const int64_t base = src.base(row);
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

template <typename Rows, typename scalar_t, typename acc_t>
struct LayerNormForwardArgs {
  const scalar_t* x;
  const acc_t* weight;  // (n,) in acc_t
  const acc_t* bias;    // (n,) in acc_t
  scalar_t* out;        // (rows, n)
  acc_t* mean;
  acc_t* rstd;
  acc_t eps;
  Rows src;
  int64_t C;
};

// Rows [begin, end) of the forward; v is an n-element scratch row.
template <typename Rows, typename scalar_t, typename acc_t>
HTSAT_INLINE void layer_norm_forward_rows(const LayerNormForwardArgs<Rows, scalar_t, acc_t>& a, int64_t begin,
                                          int64_t end, acc_t* __restrict__ v) {
  const int64_t C = a.C, n = Rows::kSegments * C;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t* __restrict__ w = a.weight;
  const acc_t* __restrict__ b = a.bias;
  for (int64_t r = begin; r < end; ++r) {
    gather_row(a.x, r, a.src, C, v);
    const acc_t mu = sum_lanes(v, n) * inv_n;
    const acc_t rs = acc_t(1) / std::sqrt(centred_square_sum_lanes(v, mu, n) * inv_n + a.eps);
    scalar_t* __restrict__ y = a.out + r * n;
    for (int64_t i = 0; i < n; ++i) y[i] = Convert<scalar_t, acc_t>::store((v[i] - mu) * rs * w[i] + b[i]);
    a.mean[r] = mu;
    a.rstd[r] = rs;
  }
}

template <typename Rows, typename scalar_t, typename acc_t>
void layer_norm_forward_rows_baseline(const LayerNormForwardArgs<Rows, scalar_t, acc_t>& a, int64_t begin,
                                      int64_t end, acc_t* v) {
  layer_norm_forward_rows(a, begin, end, v);
}

template <typename Rows, typename scalar_t, typename acc_t>
struct LayerNormBackwardArgs {
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
};

// Chunks [cbegin, cend) of the backward: dx of each row, and the chunk's partial weight/bias sums.
template <typename Rows, typename scalar_t, typename acc_t>
HTSAT_INLINE void layer_norm_backward_chunks(const LayerNormBackwardArgs<Rows, scalar_t, acc_t>& a, int64_t cbegin,
                                             int64_t cend, acc_t* __restrict__ xh, acc_t* __restrict__ gv) {
  const int64_t C = a.C, n = Rows::kSegments * C;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t* __restrict__ w = a.weight;
  for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
    acc_t* __restrict__ pw = a.part_w + chunk * n;
    acc_t* __restrict__ pb = a.part_b + chunk * n;
    std::fill(pw, pw + n, acc_t(0));
    std::fill(pb, pb + n, acc_t(0));
    const int64_t r_end = std::min(a.rows, (chunk + 1) * a.per_chunk);
    for (int64_t r = chunk * a.per_chunk; r < r_end; ++r) {
      gather_row(a.x, r, a.src, C, xh);
      const acc_t mu = a.mean[r], rs = a.rstd[r];
      const scalar_t* __restrict__ dy = a.grad_out + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t dyi = Convert<scalar_t, acc_t>::load(dy[i]);
        const acc_t xhi = (xh[i] - mu) * rs;
        xh[i] = xhi;
        gv[i] = dyi * w[i];
        pw[i] += dyi * xhi;
        pb[i] += dyi;
      }
      const acc_t mean_g = sum_lanes(gv, n) * inv_n, mean_gx = dot_lanes(gv, xh, n) * inv_n;
      const int64_t base = a.src.base(r);
      for (int k = 0; k < Rows::kSegments; ++k) {
        scalar_t* __restrict__ dst = a.grad_x + (base + a.src.offset(k)) * C;
        const acc_t* __restrict__ gk = gv + k * C;
        const acc_t* __restrict__ xk = xh + k * C;
        for (int64_t c = 0; c < C; ++c) {
          dst[c] = Convert<scalar_t, acc_t>::store(layer_norm_grad_input<acc_t>(gk[c], xk[c], rs, mean_g, mean_gx));
        }
      }
    }
  }
}

template <typename Rows, typename scalar_t, typename acc_t>
void layer_norm_backward_chunks_baseline(const LayerNormBackwardArgs<Rows, scalar_t, acc_t>& a, int64_t cbegin,
                                         int64_t cend, acc_t* xh, acc_t* gv) {
  layer_norm_backward_chunks(a, cbegin, cend, xh, gv);
}

// Columns [begin, end) of grad_weight / grad_bias: the chunks' partials summed in chunk order (s* are
// (end - begin)-element scratch rows).
template <typename scalar_t, typename acc_t>
HTSAT_INLINE void reduce_chunk_partials(const acc_t* __restrict__ part_w, const acc_t* __restrict__ part_b,
                                        int64_t n_chunks, int64_t n, int64_t begin, int64_t end,
                                        acc_t* __restrict__ sw, acc_t* __restrict__ sb, scalar_t* __restrict__ dw,
                                        scalar_t* __restrict__ db) {
  const int64_t m = end - begin;
  std::fill(sw, sw + m, acc_t(0));
  std::fill(sb, sb + m, acc_t(0));
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    const acc_t* __restrict__ pw = part_w + chunk * n + begin;
    const acc_t* __restrict__ pb = part_b + chunk * n + begin;
    for (int64_t i = 0; i < m; ++i) {
      sw[i] += pw[i];
      sb[i] += pb[i];
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    dw[begin + i] = Convert<scalar_t, acc_t>::store(sw[i]);
    db[begin + i] = Convert<scalar_t, acc_t>::store(sb[i]);
  }
}

template <typename scalar_t, typename acc_t>
void reduce_chunk_partials_baseline(const acc_t* part_w, const acc_t* part_b, int64_t n_chunks, int64_t n,
                                    int64_t begin, int64_t end, acc_t* sw, acc_t* sb, scalar_t* dw, scalar_t* db) {
  reduce_chunk_partials(part_w, part_b, n_chunks, n, begin, end, sw, sb, dw, db);
}

#if HTSAT_CPU_DISPATCH
template <typename Rows, typename scalar_t, typename acc_t>
HTSAT_TARGET_AVX2 void layer_norm_forward_rows_avx2(const LayerNormForwardArgs<Rows, scalar_t, acc_t>& a,
                                                    int64_t begin, int64_t end, acc_t* v) {
  layer_norm_forward_rows(a, begin, end, v);
}

template <typename Rows, typename scalar_t, typename acc_t>
HTSAT_TARGET_AVX2 void layer_norm_backward_chunks_avx2(const LayerNormBackwardArgs<Rows, scalar_t, acc_t>& a,
                                                       int64_t cbegin, int64_t cend, acc_t* xh, acc_t* gv) {
  layer_norm_backward_chunks(a, cbegin, cend, xh, gv);
}

template <typename scalar_t, typename acc_t>
HTSAT_TARGET_AVX2 void reduce_chunk_partials_avx2(const acc_t* part_w, const acc_t* part_b, int64_t n_chunks,
                                                  int64_t n, int64_t begin, int64_t end, acc_t* sw, acc_t* sb,
                                                  scalar_t* dw, scalar_t* db) {
  reduce_chunk_partials(part_w, part_b, n_chunks, n, begin, end, sw, sb, dw, db);
}
#define HTSAT_CPU_CALL(fn, ...) (cpu_has_avx2() ? fn##_avx2(__VA_ARGS__) : fn##_baseline(__VA_ARGS__))
#else
#define HTSAT_CPU_CALL(fn, ...) fn##_baseline(__VA_ARGS__)
#endif

// weight / bias in the accumulation type: the tensor itself when the types agree, else a converted copy.
template <typename scalar_t, typename acc_t>
const acc_t* affine_in_acc(const at::Tensor& t, int64_t n, std::vector<acc_t>& storage) {
  const scalar_t* p = t.const_data_ptr<scalar_t>();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    storage.resize(n);
    for (int64_t i = 0; i < n; ++i) storage[i] = static_cast<acc_t>(p[i]);
    return storage.data();
  }
}

// out (rows, n) contiguous, mean/rstd (rows,) in the statistics dtype.
template <typename Rows>
void gathered_layer_norm_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     double eps, const Rows& src, int64_t rows, int64_t C, at::Tensor& out,
                                     at::Tensor& mean, at::Tensor& rstd) {
  const int64_t n = Rows::kSegments * C;
  if (rows == 0 || n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gathered_layer_norm_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> w_store, b_store;
    const LayerNormForwardArgs<Rows, scalar_t, acc_t> args{x.const_data_ptr<scalar_t>(),
                                                          affine_in_acc<scalar_t, acc_t>(weight, n, w_store),
                                                          affine_in_acc<scalar_t, acc_t>(bias, n, b_store),
                                                          out.mutable_data_ptr<scalar_t>(),
                                                          mean.mutable_data_ptr<acc_t>(),
                                                          rstd.mutable_data_ptr<acc_t>(),
                                                          static_cast<acc_t>(eps),
                                                          src,
                                                          C};
    // ~32K elements per task at least: small maps stay on few threads.
    parallel_for(0, rows, std::max<int64_t>(1, 32768 / n), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(n);
      HTSAT_CPU_CALL(layer_norm_forward_rows, args, begin, end, buf.data());
    });
  });
}

// grad_x scattered back through the row map (every input element belongs to exactly one output row);
// grad_weight / grad_bias: per-chunk partials in row order, then summed in chunk order (deterministic).
template <typename Rows>
void gathered_layer_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& mean, const at::Tensor& rstd, const Rows& src, int64_t rows,
                                      int64_t C, at::Tensor& grad_x, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t n = Rows::kSegments * C;
  if (rows == 0 || n == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return;
  }
  const int64_t per_chunk = patch_merge_rows_per_chunk(rows);
  const int64_t n_chunks = (rows + per_chunk - 1) / per_chunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gathered_layer_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> part_w(n_chunks * n), part_b(n_chunks * n), w_store;
    const LayerNormBackwardArgs<Rows, scalar_t, acc_t> args{grad_out.const_data_ptr<scalar_t>(),
                                                           x.const_data_ptr<scalar_t>(),
                                                           affine_in_acc<scalar_t, acc_t>(weight, n, w_store),
                                                           mean.const_data_ptr<acc_t>(),
                                                           rstd.const_data_ptr<acc_t>(),
                                                           grad_x.mutable_data_ptr<scalar_t>(),
                                                           part_w.data(),
                                                           part_b.data(),
                                                           src,
                                                           C,
                                                           rows,
                                                           per_chunk};
    // Pass 1, chunks of rows per task: dx of each row, and each chunk's partial weight/bias sums.
    const int64_t chunk_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_chunk * n));
    parallel_for(0, n_chunks, chunk_grain, [&](int64_t cbegin, int64_t cend) {
      std::vector<acc_t> scratch(2 * n);
      HTSAT_CPU_CALL(layer_norm_backward_chunks, args, cbegin, cend, scratch.data(), scratch.data() + n);
    });
    // Pass 2: sum the partials of each column in chunk order.
    scalar_t* dwp = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* dbp = grad_bias.mutable_data_ptr<scalar_t>();
    const acc_t* pwp = part_w.data();
    const acc_t* pbp = part_b.data();
    const int64_t col_grain = std::max<int64_t>(64, 32768 / n_chunks);
    parallel_for(0, n, col_grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sums(2 * (end - begin));
      HTSAT_CPU_CALL(reduce_chunk_partials, pwp, pbp, n_chunks, n, begin, end, sums.data(),
                     sums.data() + (end - begin), dwp, dbp);
    });
  });
}

at::TensorOptions stat_options(const at::Tensor& x) {
  return x.options().dtype(layer_norm_stat_dtype(x.scalar_type()));
}

// ---- patch_merge: 2x2 gather + LayerNorm(4C) ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merge_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                       const at::Tensor& bias, double eps) {
  const PatchMergeGeometry g = patch_merge_check(x, weight, bias);
  const int64_t L = (g.H / 2) * (g.W / 2);
  at::Tensor out = at::empty({g.batch, L, 4 * g.C}, x.options());
  at::Tensor mean = at::empty({g.batch, L}, stat_options(x));
  at::Tensor rstd = at::empty({g.batch, L}, stat_options(x));
  gathered_layer_norm_forward_cpu(x, weight, bias, eps, PatchMergeRows{g.H, g.W}, g.rows(), g.C, out, mean, rstd);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_merge_backward_cpu(const at::Tensor& grad_out,
                                                                        const at::Tensor& x, const at::Tensor& weight,
                                                                        const at::Tensor& mean,
                                                                        const at::Tensor& rstd) {
  const PatchMergeGeometry g = patch_merge_backward_check(grad_out, x, weight, mean, rstd);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::empty(weight.sizes(), weight.options());
  gathered_layer_norm_backward_cpu(grad_out, x, weight, mean, rstd, PatchMergeRows{g.H, g.W}, g.rows(), g.C, grad_x,
                                   grad_weight, grad_bias);
  return {grad_x, grad_weight, grad_bias};
}

// ---- fused norm1 LayerNorm(C) + window partition ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_window_partition_cpu(const at::Tensor& x,
                                                                               const at::Tensor& weight,
                                                                               const at::Tensor& bias, double eps,
                                                                               int64_t window_size, int64_t shift) {
  const WindowGeometry g = layer_norm_window_partition_check(x, weight, bias, window_size, shift);
  const std::vector<int64_t> shape = windowed_shape(g);
  at::Tensor out = at::empty(shape, x.options());
  at::Tensor mean = at::empty({shape[0], shape[1]}, stat_options(x));
  at::Tensor rstd = at::empty({shape[0], shape[1]}, stat_options(x));
  gathered_layer_norm_forward_cpu(x, weight, bias, eps, WindowRows{g}, shape[0] * shape[1], g.channels, out, mean,
                                  rstd);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_window_partition_backward_cpu(
    const at::Tensor& grad_windows, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t window_size, int64_t shift) {
  const WindowGeometry g =
      layer_norm_window_partition_backward_check(grad_windows, x, weight, mean, rstd, window_size, shift);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::empty(weight.sizes(), weight.options());
  gathered_layer_norm_backward_cpu(grad_windows, x, weight, mean, rstd, WindowRows{g}, g.batch * g.H * g.W,
                                   g.channels, grad_x, grad_weight, grad_bias);
  return {grad_x, grad_weight, grad_bias};
}

// ---- window merge fused with the residual add ----

// out[p] = shortcut[p] + windows[t] for `count` consecutive tokens t -> pixels p, as torch's add: in
// opmath, rounded once.
template <typename scalar_t>
HTSAT_INLINE void add_rows(const scalar_t* __restrict__ w, const scalar_t* __restrict__ s, scalar_t* __restrict__ o,
                           int64_t count) {
  using acc_t = at::opmath_type<scalar_t>;
  using Cvt = Convert<scalar_t, acc_t>;
  for (int64_t c = 0; c < count; ++c) o[c] = Cvt::store(Cvt::load(s[c]) + Cvt::load(w[c]));
}

template <typename scalar_t>
void add_rows_baseline(const scalar_t* w, const scalar_t* s, scalar_t* o, int64_t count) {
  add_rows(w, s, o, count);
}

#if HTSAT_CPU_DISPATCH
template <typename scalar_t>
HTSAT_TARGET_AVX2 void add_rows_avx2(const scalar_t* w, const scalar_t* s, scalar_t* o, int64_t count) {
  add_rows(w, s, o, count);
}
#endif

at::Tensor window_merge_add_cpu(const at::Tensor& windows, const at::Tensor& shortcut, int64_t shift) {
  const WindowGeometry g = window_merge_add_check(windows, shortcut, shift);
  at::Tensor out = at::empty(shortcut.sizes(), shortcut.options());
  const int64_t tokens = g.batch * g.H * g.W, C = g.channels;
  if (tokens == 0 || C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, windows.scalar_type(), "window_merge_add_cpu", [&] {
    const scalar_t* wp = windows.const_data_ptr<scalar_t>();
    const scalar_t* sp = shortcut.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // One window row per work item, as window_copy_cpu: one or two contiguous runs of tokens.
    const int64_t ws = g.ws, W = g.W;
    parallel_for(0, tokens / ws, std::max<int64_t>(1, 16384 / (C * ws)), [&](int64_t begin, int64_t end) {
      for (int64_t seg = begin; seg < end; ++seg) {
        const int64_t t = seg * ws;
        const int64_t p = window_token_to_pixel<int64_t>(t, g);
        const int64_t w0 = p % W;
        const int64_t first = std::min(ws, W - w0);
        const int64_t runs[2][3] = {{t, p, first}, {t + first, p - w0, ws - first}};
        for (const auto& run : runs) {
          if (run[2] == 0) continue;
          HTSAT_CPU_CALL(add_rows, wp + run[0] * C, sp + run[1] * C, op + run[1] * C, run[2] * C);
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace htsat

// Schemas. The backward of window_partition is window_merge with the same (H, W, shift) and vice versa
// (the same index map read the other way), so they need no separate backward ops.
TORCH_LIBRARY(htsat_kernels, m) {
  m.def("window_partition(Tensor x, int window_size, int shift) -> Tensor");
  m.def("window_merge(Tensor windows, int H, int W, int shift) -> Tensor");
  m.def("patch_merge_forward(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "patch_merge_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // Further fusions of the Swin block (optional building blocks; the unfused ops stay the public API):
  // norm1's LayerNorm(C) + cyclic shift + partition, and window merge + unshift + residual add.
  m.def(
      "layer_norm_window_partition(Tensor x, Tensor weight, Tensor bias, float eps, int window_size, int shift) "
      "-> (Tensor windows, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_window_partition_backward(Tensor grad_windows, Tensor x, Tensor weight, Tensor mean, "
      "Tensor rstd, int window_size, int shift) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("window_merge_add(Tensor windows, Tensor shortcut, int shift) -> Tensor");
}

TORCH_LIBRARY_IMPL(htsat_kernels, CPU, m) {
  m.impl("window_partition", &htsat::window_partition_cpu);
  m.impl("window_merge", &htsat::window_merge_cpu);
  m.impl("patch_merge_forward", &htsat::patch_merge_forward_cpu);
  m.impl("patch_merge_backward", &htsat::patch_merge_backward_cpu);
  m.impl("layer_norm_window_partition", &htsat::layer_norm_window_partition_cpu);
  m.impl("layer_norm_window_partition_backward", &htsat::layer_norm_window_partition_backward_cpu);
  m.impl("window_merge_add", &htsat::window_merge_add_cpu);
}

// A Python module with no functions: importing htsat_kernels._C loads the library, whose static
// initialisers above register the ops with the dispatcher. with_cuda says whether the CUDA kernels
// were compiled in.
static struct PyModuleDef htsat_kernels_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "htsat_kernels compiled ops (registered under torch.ops.htsat_kernels)",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&htsat_kernels_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "with_cuda", HTSAT_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
