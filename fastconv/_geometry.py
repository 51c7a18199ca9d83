"""Convolution arguments as F.conv2d takes them, normalised for the kernels, and checked.

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


def output_size(
    size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: Sequence[int], dilation: tuple[int, int]
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


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x's channels are innermost (channels_last, or a channel slice of it)."""
    return torch.channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format
