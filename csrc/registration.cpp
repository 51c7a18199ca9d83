// The fastconv_cuda library: every operator schema of the extension, and the Python module
// init that loads it.
//
// All schemas sit here, in one TORCH_LIBRARY, so that this one file lists the extension's
// whole ABI: what the Python side (fastconv/ops/*.py) may call and with which arguments. The
// public, stable schema is the Python custom ops' (torch.ops.fastconv.*); these raw ops are
// its implementation detail, and one list makes a change to them visible in one diff. The
// kernels register beside their code, per dispatch key: TORCH_LIBRARY_IMPL(fastconv_cuda,
// CUDA / Meta, m) in bn_act.cu, depthwise.cu, pointwise.cu, conv_bn_act.cu, batch_norm.cu
// (autotune_choices, which has no tensor to dispatch on, in autotune.cpp).
//
// The ops are reached through torch.ops.fastconv_cuda.*, not through pybind bindings:
// importing fastconv._C just loads this shared object, whose static initializers register
// the schemas and the kernels.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastconv_cuda, m) {
  // bn_act: y = act(x * scale[c] + shift[c]) and its gradient (bn_act.cu).
  m.def("bn_act_forward(Tensor x, Tensor scale, Tensor shift, int activation) -> Tensor");
  // The same, written into `out` (x's shape, any strides: a channel slice of an Inception
  // block's output, fastconv::batch_norm_act_cat).
  m.def(
      "bn_act_forward_out(Tensor x, Tensor scale, Tensor shift, int activation, Tensor(a!) out)"
      " -> ()");
  m.def(
      "bn_act_backward(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, int activation)"
      " -> (Tensor, Tensor, Tensor)");

  // depthwise: the depthwise conv with its fused epilogue, and its gradients (depthwise.cu).
  m.def(
      "depthwise_forward(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding,"
      " int[2] dilation, Tensor? scale, Tensor? shift, int activation) -> Tensor");
  m.def(
      "depthwise_backward_input(Tensor grad_c, Tensor x, Tensor weight, int[2] stride,"
      " int[4] padding, int[2] dilation) -> Tensor");
  m.def(
      "depthwise_backward_weight(Tensor grad_c, Tensor x, Tensor weight, int[2] stride,"
      " int[4] padding, int[2] dilation) -> (Tensor, Tensor)");

  // pointwise: the 1x1 conv as a tensor-core GEMM, written into `out` (pointwise.cu).
  m.def(
      "pointwise_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift,"
      " int activation, Tensor? residual, bool activation_after_residual, Tensor? in_scale,"
      " Tensor? in_shift, int in_activation, bool allow_tf32, Tensor(a!) out) -> ()");

  // conv_bn_act: the implicit-GEMM conv with its epilogue and optional batch statistics
  // (conv_bn_act.cu).
  m.def(
      "conv_bn_act_forward(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding,"
      " int[2] dilation, int groups, Tensor? scale, Tensor? shift, int activation,"
      " bool compute_stats, bool allow_tf32) -> (Tensor, Tensor, Tensor)");
  // The same conv stored into `out` (any strides: a channel slice of a concatenation buffer),
  // optionally with a residual (out's shape) added after the activation or before it (ResNet's
  // BasicBlock); returns the statistics.
  m.def(
      "conv_bn_act_out(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding,"
      " int[2] dilation, int groups, Tensor? scale, Tensor? shift, int activation,"
      " bool compute_stats, bool allow_tf32, Tensor? residual, bool activation_after_residual,"
      " Tensor(a!) out) -> (Tensor, Tensor)");

  // bn_act_avg_pool: DenseNet's transition, BatchNorm -> activation -> 2x2 average pool in one
  // pass, written into `out` (bn_act_pool.cu).
  m.def(
      "bn_act_avg_pool(Tensor x, Tensor scale, Tensor shift, int activation, Tensor(a!) out) -> ()");

  // inverted_residual: the fused MobileNet block, expansion, depthwise and projection with
  // their folded BatchNorms, written into `out` (inverted_residual.cu); kernel 0 on the CUDA
  // cores (every dtype), 1 on the tensor cores (fp16 / bf16: inverted_residual_mma.cu).
  m.def(
      "inverted_residual_forward(Tensor x, Tensor? expand_weight, Tensor? expand_bias,"
      " Tensor dw_weight, Tensor? dw_bias, Tensor project_weight, Tensor? project_bias,"
      " int[2] kernel_size, int stride, int[2] padding, int dilation, int expand_activation,"
      " int dw_activation, int project_activation, Tensor? residual, Tensor(a!) out,"
      " int kernel=0) -> ()");

  // batch_norm: the training BatchNorm's statistics and backward (batch_norm.cu).
  m.def("batch_norm_stats(Tensor c) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_act_backward(Tensor grad_y, Tensor c, Tensor mean, Tensor invstd, Tensor? weight,"
      " Tensor? bias, int activation) -> (Tensor, Tensor, Tensor)");
  // The same backward adding grad_c into a given tensor (a dense block's gradient buffer slice);
  // returns the parameter gradients.
  m.def(
      "batch_norm_act_backward_accumulate(Tensor grad_y, Tensor c, Tensor mean, Tensor invstd,"
      " Tensor? weight, Tensor? bias, int activation, Tensor(a!) grad_c) -> (Tensor, Tensor)");

  // The autotuner's decisions, one line per key (autotune.cpp).
  m.def("autotune_choices() -> str[]");
}

// An empty module: enough for `import fastconv._C` to load the library.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
