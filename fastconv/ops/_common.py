"""What every op module shares: the auto cache key, the backends' dtype refusals, the TF32
switch, autocast of inputs, and the argument checks of convolutions and their epilogues.

Written once here so that a new op family (fused blocks, dense blocks) starts from the same
rules instead of a copy of them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from fastconv._geometry import check_kernel_arguments, output_size
from fastconv._validation import (
    check_channel_vector,
    check_float_dtype,
    check_rank,
    check_same_device,
    check_same_dtype,
    check_shape,
    fail,
)
from fastconv.activations import activation_code

NCHW = "(N, C, H, W)"


def _key_part(part):
    if isinstance(part, torch.Tensor):
        return (tuple(part.shape), part.stride(), part.dtype, part.device)
    if isinstance(part, (list, tuple)):
        return tuple(part)
    return part


def call_key(*parts) -> tuple:
    """What `auto` caches its choice by: each tensor's shape, strides, dtype and device (None
    for an absent one), and every other argument as it is."""
    return tuple(_key_part(part) for part in parts)


def allow_tf32() -> bool:
    """Whether float32 GEMMs may run as TF32: PyTorch's own switches, which the tests turn off."""
    return torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32


def refuse_float64(argument: str) -> Callable[..., Optional[str]]:
    """A `supports` check for backends whose kernels have no float64 path (the CUDA kernels):
    it reads the named argument of the call."""

    def supports(**arguments) -> Optional[str]:
        if arguments[argument].dtype == torch.float64:
            return "its kernels take float32, float16 and bfloat16; got float64"
        return None

    return supports


def refuse_float64_and_fp32_without_tf32(argument: str) -> Callable[..., Optional[str]]:
    """A `supports` check for the tensor-core GEMMs, whose float32 path is TF32."""
    no_float64 = refuse_float64(argument)

    def supports(**arguments) -> Optional[str]:
        why = no_float64(**arguments)
        if why is None and arguments[argument].dtype == torch.float32 and not allow_tf32():
            return "its float32 path runs on TF32 tensor cores, and TF32 is not allowed (torch.backends.*.allow_tf32)"
        return why

    return supports


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype a conv on x's device runs in, or None when autocast is off there.

    Meta and other devices without an autocast mode answer None (torch.is_autocast_enabled
    raises for them), so the ops run on meta tensors as on real ones.
    """
    try:
        enabled = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # "unknown device type for autocast"
        return None
    if not enabled or not x.is_floating_point():
        return None
    return torch.get_autocast_dtype(x.device.type)


def autocast_inputs(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> tuple:
    """x and the given tensors in the autocast dtype when autocast is on, as F.conv2d runs
    them; per-channel epilogue parameters are not passed here (float32 is allowed beside
    half activations, as BatchNorm keeps them)."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return (x, *tensors)
    return (x.to(dtype), *(t.to(dtype) if t is not None else None for t in tensors))


def contiguous_vectors(*vectors: Optional[torch.Tensor]) -> tuple:
    """Per-channel vectors made contiguous for the kernels: C values, no copy to speak of."""
    return tuple(v.contiguous() if v is not None else None for v in vectors)


def check_activation_input(x: torch.Tensor, name: str = "x") -> None:
    check_rank(x, name, 4, NCHW)
    check_float_dtype(x, name)


def check_like(name: str, tensor: torch.Tensor, x: torch.Tensor, x_name: str = "x") -> None:
    """tensor on x's device and in x's dtype (weights, biases, residuals and gradients)."""
    check_same_device(name, tensor, x_name, x)
    check_same_dtype(name, tensor, x_name, x)


def check_bias(bias: Optional[torch.Tensor], out_channels: int, x: torch.Tensor) -> None:
    if bias is not None:
        check_like("bias", bias, x)
        check_shape(bias, "bias", (out_channels,))


def check_epilogue(scale, shift, activation, out_channels: int, x: torch.Tensor) -> None:
    """The folded BatchNorm and activation applied per output channel."""
    for name, vector in (("scale", scale), ("shift", shift)):
        check_channel_vector(vector, name, out_channels, x, per="output channel")
    activation_code(activation)


def conv_output_size(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, int]:
    """(Ho, Wo), after checking the normalised geometry and that the output is not empty."""
    if min(weight.shape[2:]) < 1:
        fail(f"weight's kernel size must be >= 1; got {tuple(weight.shape[2:])}")
    check_kernel_arguments(stride, padding, dilation)
    height, width = output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation)
    if height < 1 or width < 1:
        fail(
            f"the output size must be >= 1; got ({height}, {width}) for input {tuple(x.shape[2:])}, kernel "
            f"{tuple(weight.shape[2:])}, stride {tuple(stride)}, padding {tuple(padding)}, dilation {tuple(dilation)}"
        )
    return height, width


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte addresses the tensor can touch."""
    start = tensor.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + extent * tensor.element_size()


def check_writable(name: str, tensor: torch.Tensor) -> None:
    """An output an op writes in place must not repeat an element: an expanded view (a stride 0
    over a dimension of size > 1) would have the kernels store several results into one address,
    in a race, where PyTorch's own out= ops refuse it. (The rule PyTorch checks, and the only
    overlap a stride inspection can decide cheaply.)"""
    if any(size > 1 and stride == 0 for size, stride in zip(tensor.shape, tensor.stride())):
        fail(f"{name} must not be an expanded view (several of its elements share one memory location); got shape "
             f"{tuple(tensor.shape)} with strides {tensor.stride()}: pass a tensor of its own, e.g. {name}.clone()")


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors can share an element; exact for channel slices of one buffer.

    DenseNet's features are channel slices of one channels_last buffer: x = buffer[:, :k] and
    out = buffer[:, k:k + g] interleave in memory but never share an element. Other layouts
    get the conservative answer: overlapping address ranges overlap.
    """
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a_first, a_last), (b_first, b_last) = _span(a), _span(b)
    if a_last < b_first or b_last < a_first:
        return False
    same_pixels = [a.stride(d) for d in (0, 2, 3)] == [b.stride(d) for d in (0, 2, 3)] and a.shape[2:] == b.shape[2:]
    if same_pixels and a.stride(1) == b.stride(1) == 1:
        # Channel runs within each pixel: [offset, offset + C) relative to the lower offset.
        base = min(a.storage_offset(), b.storage_offset())
        a_run = (a.storage_offset() - base, a.storage_offset() - base + a.shape[1])
        b_run = (b.storage_offset() - base, b.storage_offset() - base + b.shape[1])
        pixel_strides = [a.stride(d) for d in (0, 2, 3) if a.shape[d] > 1]
        if not pixel_strides or max(a_run[1], b_run[1]) <= min(pixel_strides):
            return a_run[0] < b_run[1] and b_run[0] < a_run[1]
    return True


def tensors_only(x, weight) -> None:
    """The public functions' first check: a Proxy or a list where a tensor belongs is named."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        fail(f"x and weight must be tensors; got {type(x).__name__} and {type(weight).__name__}")


def input_grads_wanted(ctx, arity: int) -> tuple[bool, ...]:
    """ctx.needs_input_grad padded to the schema's `arity`: a call that leaves trailing
    arguments to the schema's defaults has fewer entries (those defaults are never tensors
    that want gradients)."""
    needs = tuple(ctx.needs_input_grad)
    return needs + (False,) * (arity - len(needs))
