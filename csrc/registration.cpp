// Operator schemas of the fastconv_cuda library and the Python module init.
//
// The ops are reached through torch.ops.fastconv_cuda.*, not through pybind bindings:
// importing fastconv._C just loads this shared object, whose static initializers register
// the schemas below and the CUDA kernels (TORCH_LIBRARY_IMPL in bn_act.cu).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastconv_cuda, m) {
  m.def("bn_act_forward(Tensor x, Tensor scale, Tensor shift, int activation) -> Tensor");
  m.def(
      "bn_act_backward(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, int activation)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "depthwise_forward(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding,"
      " int[2] dilation, Tensor? scale, Tensor? shift, int activation) -> Tensor");
  m.def(
      "depthwise_backward_input(Tensor grad_c, Tensor x, Tensor weight, int[2] stride,"
      " int[4] padding, int[2] dilation) -> Tensor");
  m.def(
      "depthwise_backward_weight(Tensor grad_c, Tensor x, Tensor weight, int[2] stride,"
      " int[4] padding, int[2] dilation) -> (Tensor, Tensor)");
}

// An empty module: enough for `import fastconv._C` to load the library.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
