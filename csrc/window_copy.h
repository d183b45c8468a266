// Window copies: partition (gather token rows from the image), merge (scatter them back) and merge fused
// with the residual add, all through window_token_to_pixel (index_maps.h). The launchers below take raw
// pointers of contiguous, checked, non-empty tensors; the op entry points (window_copy.cpp) check the
// arguments, allocate the output and call the launcher of the input's device. No ATen include (nvcc).
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "index_maps.h"

namespace htsat {

// merge=false: dst token rows gather from src pixel rows (window_partition); merge=true: src token rows
// scatter to dst pixel rows (window_merge). A row is `channels` elements of `element_size` bytes; the
// copy is dtype-agnostic and bit-exact.
struct WindowCopy {
  const void* src;
  void* dst;
  int64_t element_size;
  WindowGeometry g;
  bool merge;
};

// out[pixel] = shortcut[pixel] + windows[token] as torch's add (in the accumulation type, rounded once).
// windows of `dtype`; shortcut and out of `out_dtype`: dtype, or float32 for float16 / bfloat16 windows
// (autocast's fp32 residual stream; mixed_operand_ok), as torch's type promotion gives.
struct WindowMergeAdd {
  const void* windows;
  const void* shortcut;
  void* out;
  c10::ScalarType dtype;
  c10::ScalarType out_dtype;
  WindowGeometry g;
};

void window_copy_cpu(const WindowCopy& a);        // window_copy_cpu.cpp
void window_merge_add_cpu(const WindowMergeAdd& a);
void window_copy_cuda(const WindowCopy& a);       // window_copy_cuda.cu (built with the CUDA part only)
void window_merge_add_cuda(const WindowMergeAdd& a);

}  // namespace htsat
