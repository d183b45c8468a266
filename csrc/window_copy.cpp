// Entry points of window_partition, window_merge and window_merge_add (CPU and CUDA dispatch keys): check
// the arguments, allocate the output, run the launcher of the input's device (window_copy_cpu.cpp,
// window_copy_cuda.cu).
#include <c10/core/DeviceGuard.h>

#include "checks.h"
#include "ops.h"
#include "window_copy.h"

namespace htsat {
namespace {

// Copies between the image and the windowed layout; nothing to launch when either is empty.
void run_window_copy(const at::Tensor& src, at::Tensor& dst, const WindowGeometry& g, bool merge) {
  if (dst.numel() == 0) return;
  const c10::OptionalDeviceGuard guard(launch_device(src));
  const WindowCopy copy{src.const_data_ptr(), dst.mutable_data_ptr(), static_cast<int64_t>(src.element_size()), g,
                        merge};
  HTSAT_LAUNCH(src, window_copy, copy);
}

}  // namespace

at::Tensor window_partition(const at::Tensor& x, int64_t window_size, int64_t shift) {
  const WindowGeometry g = window_partition_geometry(x, window_size, shift);
  at::Tensor out = new_output("x", windowed_shape(g), x.options());
  run_window_copy(x, out, g, /*merge=*/false);
  return out;
}

at::Tensor window_merge(const at::Tensor& windows, int64_t H, int64_t W, int64_t shift) {
  const WindowGeometry g = window_merge_geometry(windows, H, W, shift);
  at::Tensor out = new_output("H and W (the output shape B, H, W, C)", image_shape(g), windows.options());
  run_window_copy(windows, out, g, /*merge=*/true);
  return out;
}

at::Tensor window_merge_add(const at::Tensor& windows, const at::Tensor& shortcut, int64_t shift) {
  const WindowGeometry g = window_merge_add_geometry(windows, shortcut, shift);
  at::Tensor out = new_output("shortcut", shortcut.sizes(), shortcut.options());
  if (out.numel() == 0) return out;
  const c10::OptionalDeviceGuard guard(launch_device(windows));
  const WindowMergeAdd add{windows.const_data_ptr(), shortcut.const_data_ptr(), out.mutable_data_ptr(),
                           windows.scalar_type(), shortcut.scalar_type(), g};
  HTSAT_LAUNCH(windows, window_merge_add, add);
  return out;
}

}  // namespace htsat
