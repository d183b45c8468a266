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

struct WindowGeometry {
  int64_t batch;    // B
  int64_t H;        // image rows
  int64_t W;        // image columns
  int64_t ws;       // window side
  int64_t shift_h;  // shift normalised to [0, H)
  int64_t shift_w;  // shift normalised to [0, W)
  int64_t channels; // C
};

// Windowed token row -> pixel row (b * H + h) * W + w of the (B, H, W, C) image.
template <typename index_t>
HOST_DEVICE inline index_t window_token_to_pixel(index_t token, const WindowGeometry& g) {
  const index_t ws = static_cast<index_t>(g.ws);
  const index_t H = static_cast<index_t>(g.H);
  const index_t W = static_cast<index_t>(g.W);
  const index_t n_tok = ws * ws;
  const index_t n_ww = W / ws;
  const index_t n_wh = H / ws;
  const index_t win = token / n_tok;
  const index_t t = token - win * n_tok;
  const index_t i = t / ws;
  const index_t j = t - i * ws;
  const index_t rest = win / n_ww;
  const index_t ww = win - rest * n_ww;
  const index_t b = rest / n_wh;
  const index_t wh = rest - b * n_wh;
  index_t h = wh * ws + i + static_cast<index_t>(g.shift_h);  // < 2H: one wrap at most
  if (h >= H) h -= H;
  index_t w = ww * ws + j + static_cast<index_t>(g.shift_w);
  if (w >= W) w -= W;
  return (b * H + h) * W + w;
}

// Pixel row (b * H + h) * W + w of segment 0 of patch-merge output row `row`.
template <typename index_t>
HOST_DEVICE inline index_t patch_merge_base_pixel(index_t row, index_t H, index_t W) {
  const index_t Wo = W / 2;
  const index_t Ho = H / 2;
  const index_t rest = row / Wo;
  const index_t ow = row - rest * Wo;
  const index_t b = rest / Ho;
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
  template <typename index_t>
  HOST_DEVICE inline index_t base(index_t row) const {
    return patch_merge_base_pixel<index_t>(row, static_cast<index_t>(H), static_cast<index_t>(W));
  }
  template <typename index_t = int64_t>
  HOST_DEVICE inline index_t offset(int k) const {
    return patch_merge_segment_offset<index_t>(k, static_cast<index_t>(W));
  }
};

// Fused norm1 LayerNorm(C) + window partition: windowed token row `row` is the LayerNorm of the one pixel
// row it maps to.
struct WindowRows {
  static constexpr int kSegments = 1;
  WindowGeometry g;
  template <typename index_t>
  HOST_DEVICE inline index_t base(index_t row) const { return window_token_to_pixel<index_t>(row, g); }
  template <typename index_t = int64_t>
  HOST_DEVICE inline index_t offset(int) const { return 0; }
};

}  // namespace htsat
