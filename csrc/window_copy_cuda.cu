// CUDA kernels of the window copies (window_copy.h): cyclic shift fused with the (un)partition, one pass,
// and the merge fused with the residual add.
//
// One thread moves one vector of a token row (16 bytes when C * sizeof(dtype) and both pointers allow,
// else 8/4/2): the copy is dtype-agnostic and therefore bit-exact (every dtype of the extension is at least
// 2 bytes wide, so no 1-byte variant is built). The token -> pixel map is the one in index_maps.h, shared
// with the CPU twin. 32-bit index math with precomputed divisors (FastDivisor) when the element count
// allows, 64-bit division otherwise; memory offsets are always 64-bit. The caller (window_copy.cpp) has
// checked the sizes and made the device current.
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "floating_types.h"
#include "window_copy.h"

namespace htsat {
namespace {

constexpr int kThreads = 256;

template <typename vec_t, typename index_t, bool kMerge>
__global__ void __launch_bounds__(kThreads)
    window_copy_kernel(const vec_t* __restrict__ src, vec_t* __restrict__ dst, WindowRows map, index_t row_vecs,
                       FastDivisor row_vecs_div, index_t total) {
  const index_t idx = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(kThreads) +
                      static_cast<index_t>(threadIdx.x);
  if (idx >= total) return;
  const index_t token = divide<index_t>(idx, row_vecs, row_vecs_div);
  const index_t v = idx - token * row_vecs;
  const index_t pixel = map.base(token);
  const int64_t pixel_offset = static_cast<int64_t>(pixel) * static_cast<int64_t>(row_vecs) + v;
  if constexpr (kMerge) {
    dst[pixel_offset] = src[idx];
  } else {
    dst[idx] = src[pixel_offset];
  }
}

// Blocks of kThreads covering `total` items, or an error naming the op when the grid cannot hold them.
int64_t grid_blocks(int64_t total, const char* op) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT32_MAX, op, ": tensor too large for one launch (", total, " vectors)");
  return blocks;
}

// 32-bit indices when every index (and the last block's overshoot) fits.
bool fits_int32(int64_t total) { return total < INT32_MAX - 2 * kThreads; }

template <typename vec_t, bool kMerge>
void launch_window_copy(const WindowCopy& a, int64_t row_bytes) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t total = a.g.batch * a.g.H * a.g.W * row_vecs;
  const auto blocks = static_cast<unsigned>(grid_blocks(total, "window_partition/window_merge"));
  const vec_t* s = static_cast<const vec_t*>(a.src);
  vec_t* d = static_cast<vec_t*>(a.dst);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const WindowRows map(a.g);
  const FastDivisor row_vecs_div(row_vecs);
  if (fits_int32(total)) {
    window_copy_kernel<vec_t, int32_t, kMerge><<<blocks, kThreads, 0, stream>>>(
        s, d, map, static_cast<int32_t>(row_vecs), row_vecs_div, static_cast<int32_t>(total));
  } else {
    window_copy_kernel<vec_t, int64_t, kMerge>
        <<<blocks, kThreads, 0, stream>>>(s, d, map, row_vecs, row_vecs_div, total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kMerge>
void window_copy_vectorised(const WindowCopy& a) {
  const int64_t row_bytes = a.g.channels * a.element_size;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(a.src) | reinterpret_cast<uintptr_t>(a.dst);
  auto fits = [&](int64_t bytes) { return row_bytes % bytes == 0 && addr % static_cast<uintptr_t>(bytes) == 0; };
  if (fits(16)) {
    launch_window_copy<uint4, kMerge>(a, row_bytes);
  } else if (fits(8)) {
    launch_window_copy<uint2, kMerge>(a, row_bytes);
  } else if (fits(4)) {
    launch_window_copy<uint32_t, kMerge>(a, row_bytes);
  } else {
    launch_window_copy<uint16_t, kMerge>(a, row_bytes);
  }
}

// ---- window merge fused with the residual add: out[pixel] = shortcut[pixel] + windows[token] ----

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// out_t: the shortcut's and the output's dtype (scalar_t, or float for autocast's fp32 residual stream).
template <typename scalar_t, typename out_t, int kVec, typename index_t>
__global__ void __launch_bounds__(kThreads)
    window_merge_add_kernel(const scalar_t* __restrict__ windows, const out_t* __restrict__ shortcut,
                            out_t* __restrict__ out, WindowRows map, index_t row_packs,
                            FastDivisor row_packs_div, index_t total) {
  using P = Pack<scalar_t, kVec>;
  using PO = Pack<out_t, kVec>;
  using acc_t = acc_type<out_t>;  // as torch's add: a + b in opmath, rounded once
  const index_t idx = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(kThreads) +
                      static_cast<index_t>(threadIdx.x);
  if (idx >= total) return;
  const index_t token = divide<index_t>(idx, row_packs, row_packs_div);
  const index_t v = idx - token * row_packs;
  const int64_t pixel_offset = static_cast<int64_t>(map.base(token)) * static_cast<int64_t>(row_packs) + v;
  const P w = reinterpret_cast<const P*>(windows)[idx];
  const PO s = reinterpret_cast<const PO*>(shortcut)[pixel_offset];
  PO o;
#pragma unroll
  for (int i = 0; i < kVec; ++i) o.v[i] = static_cast<out_t>(static_cast<acc_t>(s.v[i]) + static_cast<acc_t>(w.v[i]));
  reinterpret_cast<PO*>(out)[pixel_offset] = o;
}

template <typename scalar_t, typename out_t, int kVec>
void launch_window_merge_add(const WindowMergeAdd& a) {
  const int64_t row_packs = a.g.channels / kVec;
  const int64_t total = a.g.batch * a.g.H * a.g.W * row_packs;
  const auto blocks = static_cast<unsigned>(grid_blocks(total, "window_merge_add"));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* w = static_cast<const scalar_t*>(a.windows);
  const out_t* s = static_cast<const out_t*>(a.shortcut);
  out_t* o = static_cast<out_t*>(a.out);
  const WindowRows map(a.g);
  const FastDivisor row_packs_div(row_packs);
  if (fits_int32(total)) {
    window_merge_add_kernel<scalar_t, out_t, kVec, int32_t><<<blocks, kThreads, 0, stream>>>(
        w, s, o, map, static_cast<int32_t>(row_packs), row_packs_div, static_cast<int32_t>(total));
  } else {
    window_merge_add_kernel<scalar_t, out_t, kVec, int64_t>
        <<<blocks, kThreads, 0, stream>>>(w, s, o, map, row_packs, row_packs_div, total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void window_copy_cuda(const WindowCopy& a) {
  if (a.merge) {
    window_copy_vectorised</*kMerge=*/true>(a);
  } else {
    window_copy_vectorised</*kMerge=*/false>(a);
  }
}

void window_merge_add_cuda(const WindowMergeAdd& a) {
  dispatch_floating_pair(a.dtype, a.out_dtype, "window_merge_add_cuda", [&](auto tag, auto otag) {
    using scalar_t = decltype(tag);
    using out_t = decltype(otag);
    constexpr int kVec = 16 / static_cast<int>(sizeof(out_t));  // 16-byte shortcut / out packs
    const uintptr_t addr = reinterpret_cast<uintptr_t>(a.windows) | reinterpret_cast<uintptr_t>(a.shortcut) |
                           reinterpret_cast<uintptr_t>(a.out);
    if (a.g.channels % kVec == 0 && addr % 16 == 0) {
      launch_window_merge_add<scalar_t, out_t, kVec>(a);
    } else {
      launch_window_merge_add<scalar_t, out_t, 1>(a);
    }
  });
}

}  // namespace htsat
