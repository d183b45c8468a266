// Host side of the op entry points (window_copy.cpp, gathered_layer_norm.cpp), shared by the CPU and CUDA
// dispatch keys: argument checks whose messages name the argument (flash-attention style, over
// TORCH_CHECK), overflow-checked size products, output allocation, and the choice of the device launcher.
// Every op runs these once, before anything is allocated or launched; the launchers then only see
// contiguous, non-empty tensors whose sizes multiply without overflow.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include "floating_types.h"
#include "index_maps.h"

#ifndef HTSAT_WITH_CUDA
#define HTSAT_WITH_CUDA 0
#endif

// fn_cuda(args) for a CUDA tensor `on`, fn_cpu(args) otherwise (the dispatcher routes only CPU tensors
// here in a build without the CUDA part).
#if HTSAT_WITH_CUDA
#define HTSAT_LAUNCH(on, fn, args) ((on).is_cuda() ? fn##_cuda(args) : fn##_cpu(args))
#else
#define HTSAT_LAUNCH(on, fn, args) fn##_cpu(args)
#endif

#define CHECK_DEVICE(x, dev)                                                                   \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), " (like the other inputs), got ", \
              (x).device())

#define CHECK_DTYPE(x, dtype) \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must have dtype ", (dtype), ", got ", (x).scalar_type())

// The floating dtypes every op of the extension supports (floating_types.h).
#define CHECK_FLOATING(x)                                                                                \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||                       \
                  (x).scalar_type() == at::kBFloat16 || (x).scalar_type() == at::kDouble,                \
              #x " must be float32, float16, bfloat16 or float64, got ", (x).scalar_type())

// A parameter of dtype x's, or float32 next to float16 / bfloat16 x (autocast's mix: mixed_operand_ok).
#define CHECK_PARAM_DTYPE(p, x)                                                                             \
  TORCH_CHECK(::htsat::mixed_operand_ok((x).scalar_type(), (p).scalar_type()), #p " must have dtype ",     \
              (x).scalar_type(), " (that of " #x ") or Float with Half / BFloat16 " #x ", got ", (p).scalar_type())

#define CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dimensions, got shape ", (x).sizes())

#define CHECK_SHAPE(x, ...)                                                                    \
  TORCH_CHECK((x).sizes() == c10::IntArrayRef({__VA_ARGS__}), #x " must have shape ",          \
              c10::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous (call .contiguous() first)")

namespace htsat {

// ---- sizes ----

// The product of `sizes`, or an error naming `what` when the product of the non-zero ones overflows int64:
// then every partial product of them fits as well, so index arithmetic over any subset of these sizes is
// safe. A zero does not excuse an overflowing shape (torch cannot allocate one either).
inline int64_t checked_size_product(const char* what, c10::IntArrayRef sizes) {
  int64_t product = 1;
  bool has_zero = false;
  for (const int64_t s : sizes) {
    TORCH_CHECK(s >= 0, what, ": negative size in ", sizes);
    if (s == 0) {
      has_zero = true;
      continue;
    }
    TORCH_CHECK(!c10::mul_overflows(product, s, &product), what, ": the size product of ", sizes, " overflows int64");
  }
  return has_zero ? 0 : product;
}

// A new contiguous tensor of `shape` with `options`, after checking that its element count and byte size
// fit int64 (`what` names the argument that set the shape).
inline at::Tensor new_output(const char* what, c10::IntArrayRef shape, const at::TensorOptions& options) {
  std::vector<int64_t> sizes_and_bytes(shape.begin(), shape.end());
  sizes_and_bytes.push_back(static_cast<int64_t>(options.dtype().itemsize()));
  checked_size_product(what, sizes_and_bytes);
  return at::empty(shape, options);
}

// Options of the saved LayerNorm statistics of x: the accumulation dtype on x's device.
inline at::TensorOptions stat_options(const at::Tensor& x) { return x.options().dtype(acc_dtype(x.scalar_type())); }

// The device a launch must make current: a CUDA tensor's (for the kernels' current stream); none on CPU.
inline std::optional<c10::Device> launch_device(const at::Tensor& t) {
  return t.is_cuda() ? std::optional<c10::Device>(t.device()) : std::nullopt;
}

// a mod m in [0, m) for m > 0, without overflow for any int64 a (torch.roll's shift semantics).
inline int64_t positive_mod(int64_t a, int64_t m) {
  const int64_t r = a % m;
  return r < 0 ? r + m : r;
}

// floor(sqrt(n)) for n >= 0, exact for every int64 (no square that could overflow is formed).
inline int64_t integer_sqrt(int64_t n) {
  if (n <= 0) return 0;
  int64_t r = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (r > n / r) --r;
  while (r + 1 <= n / (r + 1)) ++r;
  return r;
}

// ---- window partition / merge ----

inline WindowGeometry window_partition_geometry(const at::Tensor& x, int64_t window_size, int64_t shift) {
  CHECK_DIM(x, 4);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  TORCH_CHECK(window_size > 0, "window_size must be positive, got ", window_size);
  const int64_t H = x.size(1), W = x.size(2);
  TORCH_CHECK(H > 0 && W > 0 && H % window_size == 0 && W % window_size == 0,
              "x: H and W (dims 1 and 2) must be positive multiples of window_size=", window_size, ", got H=", H,
              ", W=", W);
  return WindowGeometry{x.size(0), H, W, window_size, positive_mod(shift, H), positive_mod(shift, W), x.size(3)};
}

inline WindowGeometry window_merge_geometry(const at::Tensor& windows, int64_t H, int64_t W, int64_t shift) {
  CHECK_DIM(windows, 3);
  CHECK_FLOATING(windows);
  CHECK_CONTIGUOUS(windows);
  const int64_t n_tok = windows.size(1);
  const int64_t ws = integer_sqrt(n_tok);
  TORCH_CHECK(n_tok > 0 && ws * ws == n_tok,
              "windows: tokens per window (dim 1) must be a positive square number, got ", n_tok);
  TORCH_CHECK(H > 0 && W > 0 && H % ws == 0 && W % ws == 0, "H and W must be positive multiples of the window size ",
              ws, ", got H=", H, ", W=", W);
  const int64_t n_win = checked_size_product("H and W (windows per image: H/ws * W/ws)", {H / ws, W / ws});
  TORCH_CHECK(windows.size(0) % n_win == 0, "windows: dim 0 (", windows.size(0),
              ") must be a multiple of the number of windows per image (", n_win, " for H=", H, ", W=", W, ")");
  return WindowGeometry{windows.size(0) / n_win, H, W, ws, positive_mod(shift, H), positive_mod(shift, W),
                        windows.size(2)};
}

inline std::vector<int64_t> windowed_shape(const WindowGeometry& g) {
  return {g.batch * (g.H / g.ws) * (g.W / g.ws), g.ws * g.ws, g.channels};
}

inline std::vector<int64_t> image_shape(const WindowGeometry& g) { return {g.batch, g.H, g.W, g.channels}; }

// Window merge fused with the residual add: out = shortcut + window_merge(windows), shortcut (B, H, W, C) of
// windows' dtype or float32 (the output's dtype is the shortcut's, as torch's type promotion gives).
inline WindowGeometry window_merge_add_geometry(const at::Tensor& windows, const at::Tensor& shortcut, int64_t shift) {
  CHECK_DIM(shortcut, 4);
  CHECK_CONTIGUOUS(shortcut);
  CHECK_DEVICE(shortcut, windows.device());
  CHECK_PARAM_DTYPE(shortcut, windows);  // float32 shortcut with float16 / bfloat16 windows: autocast's residual
  const WindowGeometry g = window_merge_geometry(windows, shortcut.size(1), shortcut.size(2), shift);
  CHECK_SHAPE(shortcut, g.batch, g.H, g.W, g.channels);
  return g;
}

// ---- gathered LayerNorm ----

// LayerNorm weight and bias: (n,), on x's device, of one dtype (x's, or float32 with float16 / bfloat16 x),
// contiguous.
inline void check_layer_norm_affine(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t n) {
  CHECK_DEVICE(weight, x.device());
  CHECK_DEVICE(bias, x.device());
  CHECK_PARAM_DTYPE(weight, x);
  CHECK_DTYPE(bias, weight.scalar_type());
  CHECK_SHAPE(weight, n);
  CHECK_SHAPE(bias, n);
  CHECK_CONTIGUOUS(weight);
  CHECK_CONTIGUOUS(bias);
}

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
  CHECK_PARAM_DTYPE(weight, x);
  CHECK_DTYPE(mean, acc_dtype(x.scalar_type()));
  CHECK_DTYPE(rstd, acc_dtype(x.scalar_type()));
  TORCH_CHECK(grad_out.sizes() == out_shape, "grad_out must have shape ", out_shape, ", got ", grad_out.sizes());
  CHECK_SHAPE(weight, n);
  TORCH_CHECK(mean.sizes() == stat_shape, "mean must have shape ", stat_shape, ", got ", mean.sizes());
  TORCH_CHECK(rstd.sizes() == stat_shape, "rstd must have shape ", stat_shape, ", got ", rstd.sizes());
  CHECK_CONTIGUOUS(grad_out);
  CHECK_CONTIGUOUS(weight);
  CHECK_CONTIGUOUS(mean);
  CHECK_CONTIGUOUS(rstd);
}

struct PatchMergeGeometry {
  int64_t batch, H, W, C;
  int64_t tokens() const { return (H / 2) * (W / 2); }  // output rows per image
  int64_t rows() const { return batch * tokens(); }
};

// x (B, H, W, C) with H, W even; the LayerNorm width 4C fits int64.
inline PatchMergeGeometry patch_merge_geometry(const at::Tensor& x) {
  CHECK_DIM(x, 4);
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  const int64_t H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0, "x: patch_merge needs even H and W (dims 1 and 2), got H=", H, ", W=", W);
  checked_size_product("x: the LayerNorm width 4 * C", {4, C});
  return PatchMergeGeometry{x.size(0), H, W, C};
}

}  // namespace htsat
