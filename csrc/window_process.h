// Shifted-window partition / merge: the index map shared by the CUDA kernels and the CPU twins.
//
// window_partition(x, ws, shift): x (B, H, W, C) -> (B*nW, ws*ws, C) after torch.roll(x, (-shift, -shift),
// dims (H, W)); window_merge is its inverse (including the +shift roll). Both are row copies: a "row"
// is the C contiguous channels of one token. Token row t of the windowed layout,
//   t = ((b * nWh + wh) * nWw + ww) * ws*ws + i * ws + j,
// holds pixel row (b, (wh*ws + i + shift) mod H, (ww*ws + j + shift) mod W) of x. Partition gathers
// through this map, merge scatters through it (every pixel is hit exactly once), and the backward of
// one is the other, so the map below is the only place the layout is written down.
#pragma once

#include "common.h"
#include "patch_merge.h"  // LayerNorm argument checks shared with the fused norm1 + partition

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

// Row source of the fused norm1 LayerNorm + window partition for the gathered-LayerNorm kernels
// (patch_merge.h): windowed token row `row` is the LayerNorm of the one pixel row it maps to.
struct WindowRows {
  static constexpr int kSegments = 1;
  WindowGeometry g;
  HOST_DEVICE inline int64_t base(int64_t row) const { return window_token_to_pixel<int64_t>(row, g); }
  HOST_DEVICE inline int64_t offset(int) const { return 0; }
};

// ---- host-side argument checks, shared by the CPU and CUDA entry points ----

inline int64_t positive_mod(int64_t a, int64_t m) { return ((a % m) + m) % m; }

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
  int64_t ws = 0;
  while ((ws + 1) * (ws + 1) <= n_tok) ++ws;
  TORCH_CHECK(n_tok > 0 && ws * ws == n_tok,
              "windows: tokens per window (dim 1) must be a positive square number, got ", n_tok);
  TORCH_CHECK(H > 0 && W > 0 && H % ws == 0 && W % ws == 0, "H and W must be positive multiples of the window size ",
              ws, ", got H=", H, ", W=", W);
  const int64_t n_win = (H / ws) * (W / ws);
  TORCH_CHECK(windows.size(0) % n_win == 0, "windows: dim 0 (", windows.size(0),
              ") must be a multiple of the number of windows per image (", n_win, " for H=", H, ", W=", W, ")");
  return WindowGeometry{windows.size(0) / n_win, H, W, ws, positive_mod(shift, H), positive_mod(shift, W),
                        windows.size(2)};
}

inline std::vector<int64_t> windowed_shape(const WindowGeometry& g) {
  return {g.batch * (g.H / g.ws) * (g.W / g.ws), g.ws * g.ws, g.channels};
}

inline std::vector<int64_t> image_shape(const WindowGeometry& g) { return {g.batch, g.H, g.W, g.channels}; }

// Fused norm1 LayerNorm(C) + window partition: x (B, H, W, C) -> windows (B*nW, ws*ws, C).
inline WindowGeometry layer_norm_window_partition_check(const at::Tensor& x, const at::Tensor& weight,
                                                        const at::Tensor& bias, int64_t window_size, int64_t shift) {
  const WindowGeometry g = window_partition_geometry(x, window_size, shift);
  check_layer_norm_affine(x, weight, bias, g.channels);
  return g;
}

inline WindowGeometry layer_norm_window_partition_backward_check(const at::Tensor& grad_windows, const at::Tensor& x,
                                                                 const at::Tensor& weight, const at::Tensor& mean,
                                                                 const at::Tensor& rstd, int64_t window_size,
                                                                 int64_t shift) {
  const WindowGeometry g = window_partition_geometry(x, window_size, shift);
  const std::vector<int64_t> out_shape = windowed_shape(g);
  check_layer_norm_backward(grad_windows, x, weight, mean, rstd, out_shape, {out_shape[0], out_shape[1]},
                            g.channels);
  return g;
}

// Window merge fused with the residual add: out = shortcut + window_merge(windows), shortcut (B, H, W, C).
inline WindowGeometry window_merge_add_check(const at::Tensor& windows, const at::Tensor& shortcut, int64_t shift) {
  CHECK_DIM(shortcut, 4);
  CHECK_CONTIGUOUS(shortcut);
  CHECK_DEVICE(shortcut, windows.device());
  CHECK_DTYPE(shortcut, windows.scalar_type());
  const WindowGeometry g = window_merge_geometry(windows, shortcut.size(1), shortcut.size(2), shift);
  CHECK_SHAPE(shortcut, g.batch, g.H, g.W, g.channels);
  return g;
}

}  // namespace htsat
