"""Pure-PyTorch references for every fastconv op.

These are the `torch` backend, the oracle of the tests (run in float64) and the eager
baseline of the benchmarks: one definition, shared by all three.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastconv._affine import batch_norm_scale_shift
from fastconv._geometry import accumulate_dtype
from fastconv.activations import activation_derivative, apply_activation


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision inputs are computed in float32, as the kernels do; float64 stays float64.
    return accumulate_dtype(x.dtype)


def _per_channel(vector: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return vector.to(dtype).view(1, -1, 1, 1)


def bn_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: Optional[str] = None) -> torch.Tensor:
    """act(x * scale[c] + shift[c]) for x of shape (N, C, H, W); result in x's dtype."""
    dtype = _compute_dtype(x)
    z = x.to(dtype) * _per_channel(scale, dtype) + _per_channel(shift, dtype)
    return apply_activation(z, activation).to(x.dtype)


def bn_act_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    activation: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_scale, grad_shift) of `bn_act`, computed by the chain rule in one pass."""
    dtype = _compute_dtype(x)
    x_wide = x.to(dtype)
    z = x_wide * _per_channel(scale, dtype) + _per_channel(shift, dtype)
    grad_z = grad_y.to(dtype) * activation_derivative(z, activation)
    grad_x = (grad_z * _per_channel(scale, dtype)).to(x.dtype)
    grad_scale = (grad_z * x_wide).sum(dim=(0, 2, 3)).to(scale.dtype)
    grad_shift = grad_z.sum(dim=(0, 2, 3)).to(shift.dtype)
    return grad_x, grad_scale, grad_shift


def conv_epilogue(
    y: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    activation: Optional[str],
) -> torch.Tensor:
    """act(y * scale[c] + shift[c]) with either of scale, shift absent; computed as bn_act is."""
    if scale is None and shift is None and activation is None:
        return y
    channels = y.shape[1]
    dtype = _compute_dtype(y)
    scale = scale if scale is not None else torch.ones(channels, dtype=dtype, device=y.device)
    shift = shift if shift is not None else torch.zeros(channels, dtype=dtype, device=y.device)
    return bn_act(y, scale, shift, activation)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    activation_after_residual: bool = False,
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, groups=groups) with padding (top, left, bottom, right),
    then the epilogue act(y * scale + shift) (+ residual, see residual_epilogue). Asymmetric
    padding goes through F.pad (a copy)."""
    top, left, bottom, right = padding
    if (top, left) != (bottom, right):
        x = F.pad(x, (left, right, top, bottom))
        top = left = 0
    y = F.conv2d(x, weight, bias, stride, (top, left), dilation, groups=groups)
    return residual_epilogue(y, scale, shift, activation, residual, activation_after_residual)


def residual_epilogue(
    y: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    activation: Optional[str],
    residual: Optional[torch.Tensor],
    activation_after_residual: bool,
) -> torch.Tensor:
    """z = y * scale + shift; then act(z) + residual, or act(z + residual) when
    activation_after_residual (ResNet's order); in float32 for half inputs, as the kernels do."""
    if residual is None:
        return conv_epilogue(y, scale, shift, activation)
    dtype = _compute_dtype(y)
    z = conv_epilogue(y.to(dtype), scale, shift, None if activation_after_residual else activation)
    z = z + residual.to(dtype)
    if activation_after_residual:
        z = apply_activation(z, activation)
    return z.to(y.dtype)


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """`conv2d` with groups = C: one filter (or m, the depth multiplier) per input channel."""
    return conv2d(x, weight, bias, stride, padding, dilation, x.shape[1], scale, shift, activation)


def pointwise_prologue(
    x: torch.Tensor, in_scale: Optional[torch.Tensor], in_shift: Optional[torch.Tensor], in_activation: Optional[str]
) -> torch.Tensor:
    """in_act(x * in_scale[c] + in_shift[c]) in x's dtype (the BN -> ReLU before a 1x1 conv)."""
    if in_scale is None and in_shift is None and in_activation is None:
        return x
    return conv_epilogue(x, in_scale, in_shift, in_activation)


def pointwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    activation_after_residual: bool = False,
    in_scale: Optional[torch.Tensor] = None,
    in_shift: Optional[torch.Tensor] = None,
    in_activation: Optional[str] = None,
) -> torch.Tensor:
    """A 1x1 convolution with its prologue and epilogue, as eager PyTorch ops.

    a = in_act(x * in_scale + in_shift); y = conv1x1(a) + bias; z = y * scale + shift; then
    act(z) + residual, or act(z + residual) when activation_after_residual (ResNet's order).
    The epilogue is computed in float32 for half inputs, as the kernels do.
    """
    a = pointwise_prologue(x, in_scale, in_shift, in_activation)
    y = F.conv2d(a, weight, bias)
    return residual_epilogue(y, scale, shift, activation, residual, activation_after_residual)


def batch_norm_stats(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel of c (N, C, H, W) over N, H and W, in float32 (float64
    for float64 c); NaN for both when N*H*W == 0, as torch.var_mean gives (without its warning)."""
    dtype = _compute_dtype(c)
    if c.shape[0] * c.shape[2] * c.shape[3] == 0:
        nan = torch.full((c.shape[1],), float("nan"), dtype=dtype, device=c.device)
        return nan, nan.clone()
    var, mean = torch.var_mean(c.to(dtype), dim=(0, 2, 3), correction=0)
    return mean, var


def batch_norm_act_backward(
    grad_y: torch.Tensor,
    c: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    activation: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_c, grad_weight, grad_bias) of y = act((c - mean) * invstd * w + b) in training mode,
    where mean and invstd are c's own batch statistics (w = 1, b = 0 when None).

    With scale = w * invstd, shift = b - mean * scale, z = c * scale + shift, g = grad_y * act'(z)
    and R = N*H*W, per channel Sg = sum(g) and Sgx = sum(g * (c - mean)):
    grad_weight = invstd * Sgx, grad_bias = Sg (in the compute dtype), and
    grad_c = scale * (g - Sg / R - (c - mean) * invstd**2 * Sgx / R) in c's dtype.
    """
    dtype = _compute_dtype(c)
    channels = c.shape[1]
    pixels = c.shape[0] * c.shape[2] * c.shape[3]
    if pixels == 0:
        zeros = torch.zeros(channels, dtype=dtype, device=c.device)
        return torch.empty_like(c), zeros, zeros.clone()
    mean, invstd = mean.to(dtype), invstd.to(dtype)
    scale, shift = batch_norm_scale_shift(mean, invstd, weight, bias)
    c_wide = c.to(dtype)
    z = c_wide * _per_channel(scale, dtype) + _per_channel(shift, dtype)
    g = grad_y.to(dtype) * activation_derivative(z, activation)
    centered = c_wide - _per_channel(mean, dtype)
    sum_g = g.sum(dim=(0, 2, 3))
    sum_gx = (g * centered).sum(dim=(0, 2, 3))
    mean_g = _per_channel(sum_g / pixels, dtype)
    coef = _per_channel(invstd * invstd * sum_gx / pixels, dtype)
    grad_c = (_per_channel(scale, dtype) * (g - mean_g - centered * coef)).to(c.dtype)
    return grad_c, invstd * sum_gx, sum_g
