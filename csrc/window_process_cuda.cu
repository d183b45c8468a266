// CUDA kernels of window_partition / window_merge: cyclic shift fused with the (un)partition, one pass.
//
// One thread moves one vector of a token row (16 bytes when C * sizeof(dtype) and both pointers allow,
// else 8/4/2/1): the copy is dtype-agnostic and therefore bit-exact. The token -> pixel map is the one
// in window_process.h, shared with the CPU twin. 32-bit index math when the element count allows,
// 64-bit otherwise; memory offsets are always 64-bit.
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"
#include "window_process.h"

namespace htsat {
namespace {

constexpr int kThreads = 256;

template <typename vec_t, typename index_t, bool kMerge>
__global__ void __launch_bounds__(kThreads)
    window_copy_kernel(const vec_t* __restrict__ src, vec_t* __restrict__ dst, WindowGeometry g, index_t row_vecs,
                       index_t total) {
  const index_t idx = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(kThreads) +
                      static_cast<index_t>(threadIdx.x);
  if (idx >= total) return;
  const index_t token = idx / row_vecs;
  const index_t v = idx - token * row_vecs;
  const index_t pixel = window_token_to_pixel<index_t>(token, g);
  const int64_t pixel_offset = static_cast<int64_t>(pixel) * static_cast<int64_t>(row_vecs) + v;
  if constexpr (kMerge) {
    dst[pixel_offset] = src[idx];
  } else {
    dst[idx] = src[pixel_offset];
  }
}

template <typename vec_t, bool kMerge>
void launch_window_copy(const at::Tensor& src, at::Tensor& dst, const WindowGeometry& g, int64_t row_bytes) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t total = g.batch * g.H * g.W * row_vecs;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT32_MAX, "window_process: tensor too large (", total, " vectors)");
  const vec_t* s = static_cast<const vec_t*>(src.const_data_ptr());
  vec_t* d = static_cast<vec_t*>(dst.mutable_data_ptr());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (total < INT32_MAX - 2 * kThreads) {
    window_copy_kernel<vec_t, int32_t, kMerge><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        s, d, g, static_cast<int32_t>(row_vecs), static_cast<int32_t>(total));
  } else {
    window_copy_kernel<vec_t, int64_t, kMerge><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        s, d, g, row_vecs, total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kMerge>
void window_copy_cuda(const at::Tensor& src, at::Tensor& dst, const WindowGeometry& g) {
  const int64_t row_bytes = g.channels * static_cast<int64_t>(src.element_size());
  if (g.batch * g.H * g.W == 0 || row_bytes == 0) return;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(src.const_data_ptr()) |
                         reinterpret_cast<uintptr_t>(dst.const_data_ptr());
  auto fits = [&](int64_t bytes) { return row_bytes % bytes == 0 && addr % static_cast<uintptr_t>(bytes) == 0; };
  if (fits(16)) {
    launch_window_copy<uint4, kMerge>(src, dst, g, row_bytes);
  } else if (fits(8)) {
    launch_window_copy<uint2, kMerge>(src, dst, g, row_bytes);
  } else if (fits(4)) {
    launch_window_copy<uint32_t, kMerge>(src, dst, g, row_bytes);
  } else if (fits(2)) {
    launch_window_copy<uint16_t, kMerge>(src, dst, g, row_bytes);
  } else {
    launch_window_copy<uint8_t, kMerge>(src, dst, g, row_bytes);
  }
}

at::Tensor window_partition_cuda(const at::Tensor& x, int64_t window_size, int64_t shift) {
  const WindowGeometry g = window_partition_geometry(x, window_size, shift);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(windowed_shape(g), x.options());
  window_copy_cuda</*kMerge=*/false>(x, out, g);
  return out;
}

at::Tensor window_merge_cuda(const at::Tensor& windows, int64_t H, int64_t W, int64_t shift) {
  const WindowGeometry g = window_merge_geometry(windows, H, W, shift);
  const c10::cuda::CUDAGuard device_guard(windows.device());
  at::Tensor out = at::empty(image_shape(g), windows.options());
  window_copy_cuda</*kMerge=*/true>(windows, out, g);
  return out;
}

// ---- window merge fused with the residual add: out[pixel] = shortcut[pixel] + windows[token] ----

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <typename scalar_t, int kVec, typename index_t>
__global__ void __launch_bounds__(kThreads)
    window_merge_add_kernel(const scalar_t* __restrict__ windows, const scalar_t* __restrict__ shortcut,
                            scalar_t* __restrict__ out, WindowGeometry g, index_t row_packs, index_t total) {
  using P = Pack<scalar_t, kVec>;
  using acc_t = at::opmath_type<scalar_t>;  // as torch's add: a + b in opmath, rounded once
  const index_t idx = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(kThreads) +
                      static_cast<index_t>(threadIdx.x);
  if (idx >= total) return;
  const index_t token = idx / row_packs;
  const index_t v = idx - token * row_packs;
  const int64_t pixel_offset =
      static_cast<int64_t>(window_token_to_pixel<index_t>(token, g)) * static_cast<int64_t>(row_packs) + v;
  const P w = reinterpret_cast<const P*>(windows)[idx];
  const P s = reinterpret_cast<const P*>(shortcut)[pixel_offset];
  P o;
#pragma unroll
  for (int i = 0; i < kVec; ++i) o.v[i] = static_cast<scalar_t>(static_cast<acc_t>(s.v[i]) + static_cast<acc_t>(w.v[i]));
  reinterpret_cast<P*>(out)[pixel_offset] = o;
}

template <typename scalar_t, int kVec>
void launch_window_merge_add(const at::Tensor& windows, const at::Tensor& shortcut, at::Tensor& out,
                             const WindowGeometry& g) {
  const int64_t row_packs = g.channels / kVec;
  const int64_t total = g.batch * g.H * g.W * row_packs;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT32_MAX, "window_merge_add: tensor too large (", total, " vectors)");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* w = windows.const_data_ptr<scalar_t>();
  const scalar_t* s = shortcut.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  if (total < INT32_MAX - 2 * kThreads) {
    window_merge_add_kernel<scalar_t, kVec, int32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        w, s, o, g, static_cast<int32_t>(row_packs), static_cast<int32_t>(total));
  } else {
    window_merge_add_kernel<scalar_t, kVec, int64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        w, s, o, g, row_packs, total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor window_merge_add_cuda(const at::Tensor& windows, const at::Tensor& shortcut, int64_t shift) {
  const WindowGeometry g = window_merge_add_check(windows, shortcut, shift);
  const c10::cuda::CUDAGuard device_guard(windows.device());
  at::Tensor out = at::empty(shortcut.sizes(), shortcut.options());
  if (g.batch * g.H * g.W == 0 || g.channels == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, windows.scalar_type(), "window_merge_add_cuda", [&] {
    constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
    const uintptr_t addr = reinterpret_cast<uintptr_t>(windows.const_data_ptr()) |
                           reinterpret_cast<uintptr_t>(shortcut.const_data_ptr()) |
                           reinterpret_cast<uintptr_t>(out.const_data_ptr());
    if (g.channels % kVec == 0 && addr % 16 == 0) {
      launch_window_merge_add<scalar_t, kVec>(windows, shortcut, out, g);
    } else {
      launch_window_merge_add<scalar_t, 1>(windows, shortcut, out, g);
    }
  });
  return out;
}

}  // namespace
}  // namespace htsat

TORCH_LIBRARY_IMPL(htsat_kernels, CUDA, m) {
  m.impl("window_partition", &htsat::window_partition_cuda);
  m.impl("window_merge", &htsat::window_merge_cuda);
  m.impl("window_merge_add", &htsat::window_merge_add_cuda);
}
