"""Input checks shared by every op.

Every message names the argument, the expected value and the actual one, so that a user can
fix the call without reading fastconv's source. The checks run before dispatch, on every
backend, which is why the CPU reference rejects exactly what the kernels reject.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Gradient checks run in float64; the reference and the Triton interpreter accept it too.
REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)


def fail(message: str) -> None:
    raise ValueError(f"fastconv: {message}")


def check_rank(tensor: torch.Tensor, name: str, rank: int, layout: str) -> None:
    if tensor.dim() != rank:
        fail(f"{name} must be a {rank}-D tensor {layout}; got {tensor.dim()}-D with shape {tuple(tensor.shape)}")


def check_float_dtype(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in REFERENCE_DTYPES:
        allowed = ", ".join(str(d) for d in FLOAT_DTYPES)
        fail(f"{name} must have a floating dtype ({allowed}; float64 on the torch and triton backends); got {tensor.dtype}")


def check_same_device(name: str, tensor: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if tensor.device != reference.device:
        fail(f"{name} must be on {reference_name}'s device {reference.device}; got {tensor.device}")


def check_shape(tensor: torch.Tensor, name: str, expected: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        fail(f"{name} must have shape {tuple(expected)}; got {tuple(tensor.shape)}")


def check_parameter_dtype(name: str, tensor: torch.Tensor, activation_dtype: torch.dtype) -> None:
    """Per-channel parameters may be in the activation's dtype or in float32.

    This is `torch.nn.functional.batch_norm`'s mixed-precision rule: under autocast a
    BatchNorm keeps float32 parameters beside half-precision activations. Anything else
    would be a silent cast, so it is an error.
    """
    allowed = {activation_dtype, torch.float32}
    if tensor.dtype not in allowed:
        expected = " or ".join(sorted(str(d) for d in allowed))
        fail(f"{name} must have dtype {expected} (that of the input, or float32); got {tensor.dtype}")


def check_same_dtype(name: str, tensor: torch.Tensor, reference_name: str, reference: torch.Tensor) -> None:
    if tensor.dtype != reference.dtype:
        fail(f"{name} must have {reference_name}'s dtype {reference.dtype}; got {tensor.dtype}")


def check_channel_vector(
    tensor: Optional[torch.Tensor], name: str, channels: int, x: torch.Tensor, per: str = "channel of x"
) -> None:
    """A per-channel parameter: 1-D of length `channels`, on x's device, in x's dtype or float32."""
    if tensor is None:
        return
    check_same_device(name, tensor, "x", x)
    if tensor.dim() != 1 or tensor.shape[0] != channels:
        fail(f"{name} must have shape ({channels},), one value per {per}; got {tuple(tensor.shape)}")
    check_parameter_dtype(name, tensor, x.dtype)
