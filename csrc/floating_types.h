// The floating dtypes of the extension and their accumulation types, shared by the CPU twins and the
// CUDA kernels. A small switch instead of ATen/Dispatch.h keeps the .cu files free of ATen headers
// (nvcc parses every header once per architecture, so they dominate the CUDA build time).
#pragma once

#include <type_traits>

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

// Autocast's dtype mix: float16 / bfloat16 activations next to float32 parameters (LayerNorm weight and
// bias) or a float32 residual stream (window_merge_add's shortcut). A second operand of dtype `other` is
// accepted next to activations of dtype `t` when it is t itself or, for float16 / bfloat16 t, float32; the
// kernels compute in the accumulation type either way (docs/design.md, numerics).
inline bool mixed_operand_ok(c10::ScalarType t, c10::ScalarType other) {
  return other == t ||
         (other == c10::ScalarType::Float && (t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16));
}

template <typename scalar_t>
constexpr bool is_half_type = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

// Calls f(scalar_t{}, other_t{}) for activations of dtype t and a second operand of dtype `other`
// (mixed_operand_ok): other_t is scalar_t, or float for float16 / bfloat16 activations. Shared by the CPU
// twins and the CUDA launchers, so the CPU tests run the dtype pairing the GPU kernels get. Only the
// pairs that can occur are instantiated.
template <typename F>
inline void dispatch_floating_pair(c10::ScalarType t, c10::ScalarType other, const char* what, F&& f) {
  dispatch_floating(t, what, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (other == t) {
      f(tag, tag);
      return;
    }
    if constexpr (is_half_type<scalar_t>) {
      if (other == c10::ScalarType::Float) {
        f(tag, float{});
        return;
      }
    }
    TORCH_CHECK(false, what, ": unsupported dtype pair ", t, " with ", other);
  });
}

}  // namespace htsat
