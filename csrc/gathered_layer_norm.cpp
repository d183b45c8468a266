// Entry points of the gathered-LayerNorm ops (CPU and CUDA dispatch keys): patch_merge_forward /
// _backward (2x2 gather + LayerNorm(4C)) and layer_norm_window_partition / _backward (norm1's LayerNorm(C)
// + shifted window partition). Each checks its arguments, allocates its outputs and runs the launcher of
// x's device (gathered_layer_norm_cpu.cpp, gathered_layer_norm_cuda.cu).
#include <c10/core/DeviceGuard.h>

#include "checks.h"
#include "gathered_layer_norm.h"
#include "ops.h"

namespace htsat {
namespace {

// out of `out_shape` (..., n) and the statistics mean, rstd of out_shape[:-1].
template <typename Rows>
TensorTriple gathered_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                              const Rows& src, c10::IntArrayRef out_shape) {
  const c10::IntArrayRef stat_shape = out_shape.slice(0, out_shape.size() - 1);
  at::Tensor out = new_output("x", out_shape, x.options());
  at::Tensor mean = new_output("x", stat_shape, stat_options(x));
  at::Tensor rstd = at::empty(stat_shape, stat_options(x));
  const int64_t rows = mean.numel(), C = x.size(3);
  if (rows > 0 && C > 0) {
    const c10::OptionalDeviceGuard guard(launch_device(x));
    const GatheredLayerNormForward<Rows> args{x.const_data_ptr(),    weight.const_data_ptr(), bias.const_data_ptr(),
                                              out.mutable_data_ptr(), mean.mutable_data_ptr(), rstd.mutable_data_ptr(),
                                              x.scalar_type(),        weight.scalar_type(),    eps, src,
                                              rows,                   C,
                                              gathered_layer_norm_int32_index(rows, out.size(-1))};
    HTSAT_LAUNCH(x, gathered_layer_norm_forward, args);
  }
  return {out, mean, rstd};
}

// grad_x scattered back through the row map; grad_weight / grad_bias summed per fixed chunk of rows in the
// same pass, then the chunks' partial rows reduced in a fixed order (gathered_layer_norm.h).
template <typename Rows>
TensorTriple gathered_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& mean, const at::Tensor& rstd, const Rows& src) {
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::empty(weight.sizes(), weight.options());
  const int64_t rows = mean.numel(), C = x.size(3), n = weight.numel();
  if (rows == 0 || C == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_x, grad_weight, grad_bias};
  }
  const int64_t per_chunk = gathered_layer_norm_rows_per_chunk(rows);
  const int64_t n_chunks = (rows + per_chunk - 1) / per_chunk;  // <= 1024
  at::Tensor partials = at::empty({2, n_chunks, n}, stat_options(x));
  const c10::OptionalDeviceGuard guard(launch_device(x));
  const GatheredLayerNormBackward<Rows> args{grad_out.const_data_ptr(),    x.const_data_ptr(),
                                             weight.const_data_ptr(),      mean.const_data_ptr(),
                                             rstd.const_data_ptr(),        grad_x.mutable_data_ptr(),
                                             grad_weight.mutable_data_ptr(), grad_bias.mutable_data_ptr(),
                                             partials.mutable_data_ptr(),  x.scalar_type(),
                                             weight.scalar_type(),         src,                          rows,
                                             C,                            per_chunk,
                                             n_chunks,                     gathered_layer_norm_int32_index(rows, n)};
  HTSAT_LAUNCH(x, gathered_layer_norm_backward, args);
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TensorTriple patch_merge_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const PatchMergeGeometry g = patch_merge_geometry(x);
  check_layer_norm_affine(x, weight, bias, 4 * g.C);
  return gathered_forward(x, weight, bias, eps, PatchMergeRows{g.H, g.W}, {g.batch, g.tokens(), 4 * g.C});
}

TensorTriple patch_merge_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& mean, const at::Tensor& rstd) {
  const PatchMergeGeometry g = patch_merge_geometry(x);
  check_layer_norm_backward(grad_out, x, weight, mean, rstd, {g.batch, g.tokens(), 4 * g.C}, {g.batch, g.tokens()},
                            4 * g.C);
  return gathered_backward(grad_out, x, weight, mean, rstd, PatchMergeRows{g.H, g.W});
}

TensorTriple layer_norm_window_partition(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                         double eps, int64_t window_size, int64_t shift) {
  const WindowGeometry g = window_partition_geometry(x, window_size, shift);
  check_layer_norm_affine(x, weight, bias, g.channels);
  return gathered_forward(x, weight, bias, eps, WindowRows{g}, windowed_shape(g));
}

TensorTriple layer_norm_window_partition_backward(const at::Tensor& grad_windows, const at::Tensor& x,
                                                  const at::Tensor& weight, const at::Tensor& mean,
                                                  const at::Tensor& rstd, int64_t window_size, int64_t shift) {
  const WindowGeometry g = window_partition_geometry(x, window_size, shift);
  const std::vector<int64_t> out_shape = windowed_shape(g);
  check_layer_norm_backward(grad_windows, x, weight, mean, rstd, out_shape, {out_shape[0], out_shape[1]}, g.channels);
  return gathered_backward(grad_windows, x, weight, mean, rstd, WindowRows{g});
}

}  // namespace htsat
