// CPU side of the kernels: intra-op parallelism, ISA dispatch and element conversions shared by the C++
// CPU twins (window_copy_cpu.cpp, gathered_layer_norm_cpu.cpp).
//
// ISA dispatch: the extension is compiled for the baseline ISA (no -march), so the hot loops are written
// once as always-inline templates and instantiated twice: for the baseline and, on x86 with GCC/Clang,
// under __attribute__((target("avx2"))), picked at run time from the CPU's features
// (HTSAT_CPU_CALL(fn, ...) calls fn_avx2 or fn_baseline). Only the vector width changes: no FMA is
// enabled, and every reduction runs over the same fixed lanes in the same order, so both variants give
// bit-identical results.
#pragma once

#include <cstdint>
#include <cstring>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

// at::parallel_for's OpenMP backend is a `#pragma omp parallel` inside a header: without -fopenmp (which
// torch.utils.cpp_extension does not add; setup.py does) every CPU kernel would silently run on the
// calling thread alone.
#ifndef _OPENMP
#error "the CPU kernels must be compiled with -fopenmp (see setup.py), or at::parallel_for runs serially"
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HTSAT_CPU_DISPATCH 1
#define HTSAT_INLINE inline __attribute__((always_inline))
#define HTSAT_TARGET_AVX2 __attribute__((target("avx2")))
#define HTSAT_LAMBDA_INLINE __attribute__((always_inline))
#define HTSAT_CPU_CALL(fn, ...) (::htsat::cpu_has_avx2() ? fn##_avx2(__VA_ARGS__) : fn##_baseline(__VA_ARGS__))
#else
#define HTSAT_CPU_DISPATCH 0
#define HTSAT_INLINE inline
#define HTSAT_LAMBDA_INLINE
#define HTSAT_CPU_CALL(fn, ...) fn##_baseline(__VA_ARGS__)
#endif

namespace htsat {

#if HTSAT_CPU_DISPATCH
inline bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}
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

}  // namespace htsat
