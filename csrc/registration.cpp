// htsat_kernels._C: the operator schemas (TORCH_LIBRARY), their kernels for the CPU and CUDA dispatch
// keys (the entry points in ops.h serve both), and the Python module whose import registers them.
#include <Python.h>

#include <torch/library.h>

#include "checks.h"  // HTSAT_WITH_CUDA
#include "ops.h"

// Schemas. The backward of window_partition is window_merge with the same (H, W, shift) and vice versa
// (the same index map read the other way), so they need no separate backward ops.
TORCH_LIBRARY(htsat_kernels, m) {
  m.def("window_partition(Tensor x, int window_size, int shift) -> Tensor");
  m.def("window_merge(Tensor windows, int H, int W, int shift) -> Tensor");
  m.def("patch_merge_forward(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "patch_merge_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // Further fusions of the Swin block (optional building blocks; the unfused ops stay the public API):
  // norm1's LayerNorm(C) + cyclic shift + partition, and window merge + unshift + residual add.
  m.def(
      "layer_norm_window_partition(Tensor x, Tensor weight, Tensor bias, float eps, int window_size, int shift) "
      "-> (Tensor windows, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_window_partition_backward(Tensor grad_windows, Tensor x, Tensor weight, Tensor mean, "
      "Tensor rstd, int window_size, int shift) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("window_merge_add(Tensor windows, Tensor shortcut, int shift) -> Tensor");
}

namespace {

// The same entry points for every device key: they pick the device's launcher themselves.
void register_kernels(torch::Library& m) {
  m.impl("window_partition", &htsat::window_partition);
  m.impl("window_merge", &htsat::window_merge);
  m.impl("patch_merge_forward", &htsat::patch_merge_forward);
  m.impl("patch_merge_backward", &htsat::patch_merge_backward);
  m.impl("layer_norm_window_partition", &htsat::layer_norm_window_partition);
  m.impl("layer_norm_window_partition_backward", &htsat::layer_norm_window_partition_backward);
  m.impl("window_merge_add", &htsat::window_merge_add);
}

// Autocast passes every op through unchanged (its inputs are not cast, its output is not touched): the
// kernels take autocast's dtype mix as it comes (float16 / bfloat16 activations with float32 LayerNorm
// parameters or a float32 shortcut, floating_types.h) and compute in float32, so a cast here would only
// add passes over the activations (docs/design.md, numerics). Spelled out per op so that a later autocast
// default for custom ops cannot change it.
void register_autocast_fallthrough(torch::Library& m) {
  for (const char* op : {"window_partition", "window_merge", "patch_merge_forward", "patch_merge_backward",
                         "layer_norm_window_partition", "layer_norm_window_partition_backward", "window_merge_add"}) {
    m.impl(op, torch::CppFunction::makeFallthrough());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(htsat_kernels, CPU, m) { register_kernels(m); }
TORCH_LIBRARY_IMPL(htsat_kernels, AutocastCPU, m) { register_autocast_fallthrough(m); }
TORCH_LIBRARY_IMPL(htsat_kernels, AutocastCUDA, m) { register_autocast_fallthrough(m); }

#if HTSAT_WITH_CUDA
TORCH_LIBRARY_IMPL(htsat_kernels, CUDA, m) { register_kernels(m); }
#endif

// A Python module with no functions: importing htsat_kernels._C loads the library, whose static
// initialisers above register the ops with the dispatcher. with_cuda says whether the CUDA kernels
// were compiled in.
static struct PyModuleDef htsat_kernels_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "htsat_kernels compiled ops (registered under torch.ops.htsat_kernels)",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&htsat_kernels_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "with_cuda", HTSAT_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
