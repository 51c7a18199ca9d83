// Host entry points of the bn_act kernels (implemented in bn_act_forward.cu and
// bn_act_backward.cu; the ops themselves are in bn_act.cu).
//
// Callers have validated the arguments, set the device guard, allocated the outputs and
// handled zero-size tensors; scale/shift are contiguous.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastconv {

// y = act(x * scale[c] + shift[c])
void launch_bn_act_forward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& y, int act);

// d = grad_y * act'(z); grad_x = d * scale[c]; grad_shift[c] = sum d; grad_scale[c] = sum d * x
void launch_bn_act_backward(const at::Tensor& grad_y, const at::Tensor& x,
                            const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& grad_x, const at::Tensor& grad_scale,
                            const at::Tensor& grad_shift, int act);

}  // namespace fastconv
