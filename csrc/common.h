// Shared helpers of the htsat_kernels._C extension: argument checks that name the argument
// (flash-attention style, over TORCH_CHECK) and the HOST_DEVICE qualifier of the index maps.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// Index maps are plain inline functions in headers shared by the CUDA kernels (nvcc sees
// __host__ __device__) and the C++ CPU twins (the macro is empty there): one source of truth.
#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

#define CHECK_DEVICE(x, dev)                                                                   \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), " (like the other inputs), got ", \
              (x).device())

#define CHECK_DTYPE(x, dtype) \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must have dtype ", (dtype), ", got ", (x).scalar_type())

// The floating dtypes every op of the extension supports.
#define CHECK_FLOATING(x)                                                                                \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||                       \
                  (x).scalar_type() == at::kBFloat16 || (x).scalar_type() == at::kDouble,                \
              #x " must be float32, float16, bfloat16 or float64, got ", (x).scalar_type())

#define CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dimensions, got shape ", (x).sizes())

#define CHECK_SHAPE(x, ...)                                                                    \
  TORCH_CHECK((x).sizes() == c10::IntArrayRef({__VA_ARGS__}), #x " must have shape ",          \
              c10::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous (call .contiguous() first)")
