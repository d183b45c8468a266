// htsat_kernels._C: operator schemas (TORCH_LIBRARY) and the C++ CPU kernels.
//
// The CPU kernels are real kernels ("auto" uses them on CPU), written as twins of the CUDA ones: same
// index maps (window_process.h, patch_merge.h), same LayerNorm algebra, same deterministic reduction
// of the weight/bias gradient.
#include <Python.h>

#include <cmath>
#include <cstring>
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
// window_partition / window_merge
// ---------------------------------------------------------------------------------------------

// Copies every token row through the shared map: partition gathers, merge scatters. Bit-exact (memcpy).
void window_copy_cpu(const at::Tensor& src, at::Tensor& dst, const WindowGeometry& g, bool merge) {
  const int64_t tokens = g.batch * g.H * g.W;
  const int64_t row_bytes = g.channels * static_cast<int64_t>(src.element_size());
  if (tokens == 0 || row_bytes == 0) return;
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / row_bytes);
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = window_token_to_pixel<int64_t>(t, g);
      if (merge) {
        std::memcpy(d + p * row_bytes, s + t * row_bytes, row_bytes);
      } else {
        std::memcpy(d + t * row_bytes, s + p * row_bytes, row_bytes);
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

// ---------------------------------------------------------------------------------------------
// Gathered LayerNorm: output row r = LayerNorm over the concatenation of Rows::kSegments segments of C
// channels read from pixel rows rows.base(r) + rows.offset(k). Patch merging (4 segments, 2x2 gather)
// and the fused norm1 + window partition (1 segment, window map) are its two instances.
// ---------------------------------------------------------------------------------------------

template <typename Rows, typename scalar_t, typename acc_t>
inline void gather_row(const scalar_t* x, int64_t row, const Rows& src, int64_t C, acc_t* buf) {
  const int64_t base = src.base(row);
  for (int k = 0; k < Rows::kSegments; ++k) {
    const scalar_t* seg = x + (base + src.offset(k)) * C;
    acc_t* dst = buf + k * C;
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<acc_t>(seg[c]);
  }
}

// Sums with 8 independent accumulators in a fixed order: deterministic, and not bound by the latency of
// one long dependency chain (the compiler can also vectorise the lanes).
template <typename acc_t>
inline acc_t sum_lanes(const acc_t* __restrict__ v, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) s[j] += v[i + j];
  }
  for (int j = 0; i < n; ++i, ++j) s[j] += v[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename acc_t>
inline acc_t centred_square_sum_lanes(const acc_t* __restrict__ v, acc_t mu, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const acc_t d = v[i + j] - mu;
      s[j] += d * d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const acc_t d = v[i] - mu;
    s[j] += d * d;
  }
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename acc_t>
inline acc_t dot_lanes(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  }
  for (int j = 0; i < n; ++i, ++j) s[j] += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
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
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / n), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(n);
      for (int64_t r = begin; r < end; ++r) {
        acc_t* __restrict__ v = buf.data();
        gather_row(xp, r, src, C, v);
        const acc_t mu = sum_lanes(v, n) * inv_n;
        const acc_t rs = acc_t(1) / std::sqrt(centred_square_sum_lanes(v, mu, n) * inv_n + static_cast<acc_t>(eps));
        scalar_t* __restrict__ y = yp + r * n;
        for (int64_t i = 0; i < n; ++i) {
          y[i] = static_cast<scalar_t>((v[i] - mu) * rs * static_cast<acc_t>(wp[i]) + static_cast<acc_t>(bp[i]));
        }
        mp[r] = mu;
        rp[r] = rs;
      }
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
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    scalar_t* dxp = grad_x.mutable_data_ptr<scalar_t>();
    std::vector<acc_t> part_w(n_chunks * n), part_b(n_chunks * n);
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
    // Pass 1, one chunk of rows per task: dx of each row, and the chunk's partial weight/bias sums.
    at::parallel_for(0, n_chunks, 1, [&](int64_t cbegin, int64_t cend) {
      std::vector<acc_t> xhat(n), gw(n);
      for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
        acc_t* __restrict__ pw = part_w.data() + chunk * n;
        acc_t* __restrict__ pb = part_b.data() + chunk * n;
        std::fill(pw, pw + n, acc_t(0));
        std::fill(pb, pb + n, acc_t(0));
        const int64_t r_end = std::min(rows, (chunk + 1) * per_chunk);
        for (int64_t r = chunk * per_chunk; r < r_end; ++r) {
          acc_t* __restrict__ xh = xhat.data();
          acc_t* __restrict__ gv = gw.data();
          gather_row(xp, r, src, C, xh);
          const acc_t mu = mp[r], rs = rp[r];
          const scalar_t* __restrict__ dy = gp + r * n;
          for (int64_t i = 0; i < n; ++i) {
            const acc_t dyi = static_cast<acc_t>(dy[i]);
            xh[i] = (xh[i] - mu) * rs;
            gv[i] = dyi * static_cast<acc_t>(wp[i]);
            pw[i] += dyi * xh[i];
            pb[i] += dyi;
          }
          const acc_t mean_g = sum_lanes(gv, n) * inv_n, mean_gx = dot_lanes(gv, xh, n) * inv_n;
          const int64_t base = src.base(r);
          for (int k = 0; k < Rows::kSegments; ++k) {
            scalar_t* dst = dxp + (base + src.offset(k)) * C;
            for (int64_t c = 0; c < C; ++c) {
              const int64_t i = k * C + c;
              dst[c] = static_cast<scalar_t>(layer_norm_grad_input<acc_t>(gw[i], xhat[i], rs, mean_g, mean_gx));
            }
          }
        }
      }
    });
    // Pass 2: sum the partials of each column in chunk order.
    scalar_t* dwp = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* dbp = grad_bias.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t sw = 0, sb = 0;
        for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
          sw += part_w[chunk * n + i];
          sb += part_b[chunk * n + i];
        }
        dwp[i] = static_cast<scalar_t>(sw);
        dbp[i] = static_cast<scalar_t>(sb);
      }
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

at::Tensor window_merge_add_cpu(const at::Tensor& windows, const at::Tensor& shortcut, int64_t shift) {
  const WindowGeometry g = window_merge_add_check(windows, shortcut, shift);
  at::Tensor out = at::empty(shortcut.sizes(), shortcut.options());
  const int64_t tokens = g.batch * g.H * g.W, C = g.channels;
  if (tokens == 0 || C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, windows.scalar_type(), "window_merge_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // as torch's add: a + b in opmath, rounded once
    const scalar_t* wp = windows.const_data_ptr<scalar_t>();
    const scalar_t* sp = shortcut.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t p = window_token_to_pixel<int64_t>(t, g);
        const scalar_t* __restrict__ w = wp + t * C;
        const scalar_t* __restrict__ s = sp + p * C;
        scalar_t* __restrict__ o = op + p * C;
        for (int64_t c = 0; c < C; ++c) {
          o[c] = static_cast<scalar_t>(static_cast<acc_t>(s[c]) + static_cast<acc_t>(w[c]));
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
