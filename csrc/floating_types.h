// The floating dtypes of the extension and their accumulation types, shared by the CPU twins and the
// CUDA kernels. A small switch instead of ATen/Dispatch.h keeps the .cu files free of ATen headers
// (nvcc parses every header once per architecture, so they dominate the CUDA build time).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace htsat {

// Statistics and reductions run in fp32 for fp16 / bf16 / fp32 inputs and in fp64 for fp64 (as
// at::opmath_type).
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// The dtype of the saved LayerNorm statistics (mean, rstd) for inputs of dtype t.
inline c10::ScalarType acc_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

// Calls f(scalar_t{}) for dtype t (f is a generic lambda: `using scalar_t = decltype(tag);`). The entry
// points reject the other dtypes with a message naming the argument before anything is launched.
template <typename F>
inline void dispatch_floating(c10::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case c10::ScalarType::Float:
      f(float{});
      return;
    case c10::ScalarType::Double:
      f(double{});
      return;
    case c10::ScalarType::Half:
      f(c10::Half{});
      return;
    case c10::ScalarType::BFloat16:
      f(c10::BFloat16{});
      return;
    default:
      TORCH_CHECK(false, what, ": unsupported dtype ", t);
  }
}

}  // namespace htsat
