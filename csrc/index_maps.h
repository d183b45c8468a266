// Index maps of the extension: which pixel row of the (B, H, W, C) image each output row reads. Plain
// inline functions shared by the CUDA kernels (nvcc sees __host__ __device__) and the C++ CPU twins
// (the macro is empty there): the layouts are written down here and nowhere else. No ATen include, so
// nvcc parses little beyond what the kernels need.
//
// Shifted-window partition / merge (window_partition(x, ws, shift): x (B, H, W, C) -> (B*nW, ws*ws, C)
// after torch.roll(x, (-shift, -shift), dims (H, W)); window_merge is its inverse including the +shift
// roll). Token row t of the windowed layout,
//   t = ((b * nWh + wh) * nWw + ww) * ws*ws + i * ws + j,
// holds pixel row (b, (wh*ws + i + shift) mod H, (ww*ws + j + shift) mod W) of x. Partition gathers
// through this map, merge scatters through it (every pixel is hit exactly once), and the backward of
// one is the other.
//
// Patch merging (x (B, H, W, C), H and W even -> out (B, H/2 * W/2, 4C)): output row
// r = (b * H/2 + oh) * W/2 + ow is the concatenation of 4 segments of C channels, in the original order
//   k = 0: x[b, 2oh,   2ow  ]   (even row, even col)
//   k = 1: x[b, 2oh+1, 2ow  ]   (odd row,  even col)
//   k = 2: x[b, 2oh,   2ow+1]   (even row, odd col)
//   k = 3: x[b, 2oh+1, 2ow+1]   (odd row,  odd col)
// ("rows" are the H axis).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

namespace htsat {

// n / d for 0 <= n <= INT32_MAX by a multiply-high, an add and a shift instead of a division (the round-up
// method of Granlund & Montgomery, "Division by invariant integers using multiplication", 1994): with
// s = ceil(log2 d) and m = floor(2^32 * (2^s - d) / d) + 1 < 2^32, n / d = (umulhi(n, m) + n) >> s, and
// umulhi(n, m) < n keeps the sum below 2^32. Built on the host once per launch, used by the 32-bit index
// path of the kernels and of the CPU twins alike (tests/test_index_maps.py checks it against `//`).
struct FastDivisor {
  uint32_t divisor = 0;  // 0: not set up (the divisor did not fit; the int64 path never reads it)
  uint32_t multiplier = 0;
  uint32_t shift = 0;
  FastDivisor() = default;
  explicit FastDivisor(int64_t d) {
    if (d < 1 || d > INT32_MAX) return;
    while ((uint64_t{1} << shift) < static_cast<uint64_t>(d)) ++shift;
    const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << shift) - static_cast<uint64_t>(d))) /
                       static_cast<uint64_t>(d);
    divisor = static_cast<uint32_t>(d);
    multiplier = static_cast<uint32_t>(m + 1);
  }
  HOST_DEVICE inline int32_t quotient(int32_t n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(u, multiplier);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(u) * multiplier) >> 32);
#endif
    return static_cast<int32_t>((hi + u) >> shift);
  }
};

// n / d: the precomputed divisor fd (== d) in the 32-bit index path, a plain division in the 64-bit one.
template <typename index_t>
HOST_DEVICE inline index_t divide(index_t n, index_t d, const FastDivisor& fd) {
  if constexpr (sizeof(index_t) == 4) {
    return fd.quotient(n);
  } else {
    (void)fd;
    return n / d;
  }
}

struct WindowGeometry {
  int64_t batch;    // B
  int64_t H;        // image rows
  int64_t W;        // image columns
  int64_t ws;       // window side
  int64_t shift_h;  // shift normalised to [0, H)
  int64_t shift_w;  // shift normalised to [0, W)
  int64_t channels; // C
};

// Divisors of window_token_to_pixel, precomputed for the 32-bit path.
struct WindowDivisors {
  FastDivisor tokens, ws, windows_w, windows_h;  // ws*ws, ws, W/ws, H/ws
  WindowDivisors() = default;
  explicit WindowDivisors(const WindowGeometry& g)
      : tokens(g.ws * g.ws), ws(g.ws), windows_w(g.W / g.ws), windows_h(g.H / g.ws) {}
};

// Windowed token row -> pixel row (b * H + h) * W + w of the (B, H, W, C) image; `dv` built from g (used
// by the 32-bit path only).
template <typename index_t>
HOST_DEVICE inline index_t window_token_to_pixel(index_t token, const WindowGeometry& g, const WindowDivisors& dv) {
  const index_t ws = static_cast<index_t>(g.ws);
  const index_t H = static_cast<index_t>(g.H);
  const index_t W = static_cast<index_t>(g.W);
  const index_t n_tok = ws * ws;
  const index_t n_ww = W / ws;  // once per thread, not per row: loop-invariant, hoisted by the compiler
  const index_t n_wh = H / ws;
  const index_t win = divide<index_t>(token, n_tok, dv.tokens);
  const index_t t = token - win * n_tok;
  const index_t i = divide<index_t>(t, ws, dv.ws);
  const index_t j = t - i * ws;
  const index_t rest = divide<index_t>(win, n_ww, dv.windows_w);
  const index_t ww = win - rest * n_ww;
  const index_t b = divide<index_t>(rest, n_wh, dv.windows_h);
  const index_t wh = rest - b * n_wh;
  index_t h = wh * ws + i + static_cast<index_t>(g.shift_h);  // < 2H: one wrap at most
  if (h >= H) h -= H;
  index_t w = ww * ws + j + static_cast<index_t>(g.shift_w);
  if (w >= W) w -= W;
  return (b * H + h) * W + w;
}

// The same map with plain divisions (host code and the 64-bit path).
inline int64_t window_token_to_pixel(int64_t token, const WindowGeometry& g) {
  return window_token_to_pixel<int64_t>(token, g, WindowDivisors());
}

// Pixel row (b * H + h) * W + w of segment 0 of patch-merge output row `row`; wo, ho: W/2 and H/2 as
// FastDivisors (read by the 32-bit path only).
template <typename index_t>
HOST_DEVICE inline index_t patch_merge_base_pixel(index_t row, index_t H, index_t W, const FastDivisor& wo,
                                                  const FastDivisor& ho) {
  const index_t Wo = W / 2;
  const index_t Ho = H / 2;
  const index_t rest = divide<index_t>(row, Wo, wo);
  const index_t ow = row - rest * Wo;
  const index_t b = divide<index_t>(rest, Ho, ho);
  const index_t oh = rest - b * Ho;
  return (b * H + 2 * oh) * W + 2 * ow;
}

// Pixel-row offset of patch-merge segment k (0..3) from segment 0: bit 0 of k steps one row, bit 1 one column.
template <typename index_t>
HOST_DEVICE inline index_t patch_merge_segment_offset(int k, index_t W) {
  return static_cast<index_t>(k & 1) * W + static_cast<index_t>(k >> 1);
}

// True when every index below `count` plus `overshoot` (a last block's threads past the end) fits int32:
// the kernels and the CPU twins then run these maps in 32-bit arithmetic (a 64-bit division is a ~70
// instruction call on a GPU), and in int64 otherwise. Memory offsets stay below `count` either way.
HOST_DEVICE constexpr bool fits_int32_index(int64_t count, int64_t overshoot) {
  return count >= 0 && overshoot >= 0 && count <= INT32_MAX - overshoot;
}

// Row sources of the gathered LayerNorm (gathered_layer_norm.h): output row `row` is the concatenation of
// kSegments segments of C channels, segment k read from pixel row base(row) + offset(k), in the index type
// of the caller (int32 where fits_int32_index says so, else int64).

// Patch merging: 2x2 gather, LayerNorm(4C).
struct PatchMergeRows {
  static constexpr int kSegments = 4;
  int64_t H, W;
  FastDivisor wo, ho;
  PatchMergeRows(int64_t H_, int64_t W_) : H(H_), W(W_), wo(W_ / 2), ho(H_ / 2) {}
  template <typename index_t>
  HOST_DEVICE inline index_t base(index_t row) const {
    return patch_merge_base_pixel<index_t>(row, static_cast<index_t>(H), static_cast<index_t>(W), wo, ho);
  }
  template <typename index_t = int64_t>
  HOST_DEVICE inline index_t offset(int k) const {
    return patch_merge_segment_offset<index_t>(k, static_cast<index_t>(W));
  }
};

// Fused norm1 LayerNorm(C) + window partition: windowed token row `row` is the LayerNorm of the one pixel
// row it maps to. Also the token map of the window copies (window_copy_cuda.cu).
struct WindowRows {
  static constexpr int kSegments = 1;
  WindowGeometry g;
  WindowDivisors dv;
  explicit WindowRows(const WindowGeometry& g_) : g(g_), dv(g_) {}
  template <typename index_t>
  HOST_DEVICE inline index_t base(index_t row) const { return window_token_to_pixel<index_t>(row, g, dv); }
  template <typename index_t = int64_t>
  HOST_DEVICE inline index_t offset(int) const { return 0; }
};

// Pixel row of segment 0 of output row `row` of a row map (PatchMergeRows, WindowRows), evaluated in int32
// when `int32_index` (fits_int32_index of the caller's sizes), else in int64: the CPU twins take the path
// the CUDA kernels take for the same sizes.
template <typename Rows>
HOST_DEVICE inline int64_t map_row_base(const Rows& src, int64_t row, bool int32_index) {
  return int32_index ? static_cast<int64_t>(src.base(static_cast<int32_t>(row))) : src.base(row);
}

}  // namespace htsat
