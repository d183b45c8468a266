// C++ CPU twins of the window copies (window_copy.h): partition, merge, and merge fused with the
// residual add, through the same index map as the CUDA kernels (index_maps.h).
#include <algorithm>
#include <cstring>

#include "cpu_isa.h"
#include "floating_types.h"
#include "window_copy.h"

namespace htsat {
namespace {

// Runs fn(token, pixel, count) over every window row: work item = one window row (ws consecutive tokens).
// They map to ws consecutive pixels of one image row, except where the cyclic shift wraps the column back
// to 0, so the map is evaluated once per window row and the row is handled as one run, or two around the
// wrap. `grain_elems` sets the work per task in elements of C.
template <typename Fn>
void for_each_window_row_run(const WindowGeometry& g, int64_t grain_elems, const Fn& fn) {
  const int64_t ws = g.ws, W = g.W;
  const int64_t segments = g.batch * g.H * g.W / ws;  // W is a multiple of ws
  // the CUDA kernels' 32-bit map (fast divisors) whenever it would serve them: every token index fits
  const WindowRows map(g);
  const bool int32_index = fits_int32_index(g.batch * g.H * g.W, 0);
  at::parallel_for(0, segments, std::max<int64_t>(1, grain_elems / (g.channels * ws)), [&](int64_t begin, int64_t end) {
    for (int64_t seg = begin; seg < end; ++seg) {
      const int64_t t = seg * ws;
      const int64_t p = map_row_base(map, t, int32_index);
      const int64_t w0 = p % W;
      const int64_t first = std::min(ws, W - w0);  // tokens before the column wraps to 0
      fn(t, p, first);
      if (first < ws) fn(t + first, p - w0, ws - first);
    }
  });
}

// out[p] = shortcut[p] + windows[t] for `count` consecutive elements, as torch's add: in opmath, rounded once
// (out_t: windows' dtype, or float32 for a float32 shortcut next to float16 / bfloat16 windows).
template <typename scalar_t, typename out_t>
HTSAT_INLINE void add_rows(const scalar_t* __restrict__ w, const out_t* __restrict__ s, out_t* __restrict__ o,
                           int64_t count) {
  using acc_t = acc_type<out_t>;
  using CvtW = Convert<scalar_t, acc_t>;
  using CvtO = Convert<out_t, acc_t>;
  for (int64_t c = 0; c < count; ++c) o[c] = CvtO::store(CvtO::load(s[c]) + CvtW::load(w[c]));
}

template <typename scalar_t, typename out_t>
void add_rows_baseline(const scalar_t* w, const out_t* s, out_t* o, int64_t count) {
  add_rows(w, s, o, count);
}

#if HTSAT_CPU_DISPATCH
template <typename scalar_t, typename out_t>
HTSAT_TARGET_AVX2 void add_rows_avx2(const scalar_t* w, const out_t* s, out_t* o, int64_t count) {
  add_rows(w, s, o, count);
}
#endif

}  // namespace

// Copies every token row through the shared map: partition gathers, merge scatters. Bit-exact (memcpy).
void window_copy_cpu(const WindowCopy& a) {
  const int64_t row_bytes = a.g.channels * a.element_size;
  const char* s = static_cast<const char*>(a.src);
  char* d = static_cast<char*>(a.dst);
  for_each_window_row_run(a.g, (int64_t{1} << 16) / a.element_size, [&](int64_t token, int64_t pixel, int64_t count) {
    if (a.merge) {
      std::memcpy(d + pixel * row_bytes, s + token * row_bytes, count * row_bytes);
    } else {
      std::memcpy(d + token * row_bytes, s + pixel * row_bytes, count * row_bytes);
    }
  });
}

void window_merge_add_cpu(const WindowMergeAdd& a) {
  dispatch_floating_pair(a.dtype, a.out_dtype, "window_merge_add", [&](auto tag, auto otag) {
    using scalar_t = decltype(tag);
    using out_t = decltype(otag);
    const scalar_t* wp = static_cast<const scalar_t*>(a.windows);
    const out_t* sp = static_cast<const out_t*>(a.shortcut);
    out_t* op = static_cast<out_t*>(a.out);
    const int64_t C = a.g.channels;
    for_each_window_row_run(a.g, 16384, [&](int64_t token, int64_t pixel, int64_t count) {
      HTSAT_CPU_CALL(add_rows, wp + token * C, sp + pixel * C, op + pixel * C, count * C);
    });
  });
}

}  // namespace htsat
