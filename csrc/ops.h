// The op entry points, one per schema in registration.cpp, registered for both the CPU and the CUDA
// dispatch keys: each checks its arguments (checks.h), allocates its outputs and runs the launcher of its
// input's device. window_copy.cpp and gathered_layer_norm.cpp define them.
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace htsat {

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// window_copy.cpp
at::Tensor window_partition(const at::Tensor& x, int64_t window_size, int64_t shift);
at::Tensor window_merge(const at::Tensor& windows, int64_t H, int64_t W, int64_t shift);
at::Tensor window_merge_add(const at::Tensor& windows, const at::Tensor& shortcut, int64_t shift);

// gathered_layer_norm.cpp
TensorTriple patch_merge_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);
TensorTriple patch_merge_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& mean, const at::Tensor& rstd);
TensorTriple layer_norm_window_partition(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                         double eps, int64_t window_size, int64_t shift);
TensorTriple layer_norm_window_partition_backward(const at::Tensor& grad_windows, const at::Tensor& x,
                                                  const at::Tensor& weight, const at::Tensor& mean,
                                                  const at::Tensor& rstd, int64_t window_size, int64_t shift);

}  // namespace htsat
