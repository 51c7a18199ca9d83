"""Convolution geometry, the output-layout rule and the accumulate dtype: the bottom layer.

Everything above uses these (the ops, the reference, the Triton kernels' host code), so that a
rule is written once; this module imports nothing from fastconv but the input checks.

The kernels take stride and dilation as pairs and padding as four numbers, (top, left,
bottom, right), because padding="same" with an even kernel pads one more at the end than at
the start, as F.conv2d does.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from fastconv._validation import fail

IntOrPair = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence[int]]


def pair(value: IntOrPair, name: str) -> tuple[int, int]:
    """An int or a pair of ints as (height, width)."""
    if isinstance(value, bool) or not isinstance(value, (int, Sequence)) or isinstance(value, str):
        fail(f"{name} must be an int or a pair of ints; got {value!r}")
    values = (value, value) if isinstance(value, int) else tuple(value)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        fail(f"{name} must be an int or a pair of ints; got {value!r}")
    return values


def positive_pair(value: IntOrPair, name: str) -> tuple[int, int]:
    values = pair(value, name)
    if min(values) < 1:
        fail(f"{name} must be >= 1 in each dimension; got {value!r}")
    return values


def padding_4(padding: Padding, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]):
    """(top, left, bottom, right) from F.conv2d's padding: an int, a pair, "same" or "valid"."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            fail(f"padding must be an int, a pair of ints, 'same' or 'valid'; got {padding!r}")
        if stride != (1, 1):
            fail(f"padding='same' needs stride 1, as in F.conv2d; got stride {stride}")
        # F.conv2d's rule: the total is dilation*(k-1); the extra one of an odd total goes last.
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        begin = [t // 2 for t in totals]
        return (begin[0], begin[1], totals[0] - begin[0], totals[1] - begin[1])
    top, left = pair(padding, "padding")
    if min(top, left) < 0:
        fail(f"padding must be >= 0 in each dimension; got {padding!r}")
    return (top, left, top, left)


def normalise_geometry(kernel: tuple[int, int], stride: IntOrPair, padding: Padding, dilation: IntOrPair) -> tuple:
    """(stride, padding as (top, left, bottom, right), dilation) from F.conv2d's forms."""
    stride_ = positive_pair(stride, "stride")
    dilation_ = positive_pair(dilation, "dilation")
    return stride_, padding_4(padding, kernel, stride_, dilation_), dilation_


def output_size(
    size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int]:
    """(Ho, Wo) of a convolution, for padding given as (top, left, bottom, right)."""
    return tuple(
        (size[i] + padding[i] + padding[i + 2] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)
    )


def check_kernel_arguments(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> None:
    """The normalised forms, as an op receives them from a direct torch.ops call."""
    if len(stride) != 2 or min(stride) < 1:
        fail(f"stride must be two ints >= 1; got {list(stride)}")
    if len(dilation) != 2 or min(dilation) < 1:
        fail(f"dilation must be two ints >= 1; got {list(dilation)}")
    if len(padding) != 4 or min(padding) < 0:
        fail(f"padding must be four ints >= 0 (top, left, bottom, right); got {list(padding)}")


def channels_innermost(t: torch.Tensor) -> bool:
    """Whether t's channels are adjacent in memory: channels_last, or a channel slice of it.

    The one output-layout rule of every op (and the CUDA side's `layout.h`): an output is
    channels_last exactly when its input's channels are innermost, so a channels_last network
    stays channels_last and a DenseNet slice of a channels_last buffer is read in place. A
    single channel is not "innermost": torch calls such a tensor contiguous in both formats.
    """
    return t.shape[1] > 1 and t.stride(1) == 1


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of an op's output (and of grad_x) for the input x."""
    return torch.channels_last if channels_innermost(x) else torch.contiguous_format


def empty_output(shape: Sequence[int], x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output of `shape` in the layout `output_memory_format(x)` gives."""
    return torch.empty(
        tuple(shape), dtype=dtype or x.dtype, device=x.device, memory_format=output_memory_format(x)
    )


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What every kernel computes and reduces in: float32, or float64 for float64 inputs.

    Half-precision inputs are never accumulated in half (no fp16 overflow in a sum); float64
    stays float64 so that gradcheck sees exact gradients.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
