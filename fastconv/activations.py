"""The activations fastconv fuses, one name each, with a code shared by every backend.

The codes are part of the contract with the CUDA and Triton kernels (`csrc/activations.cuh`,
`triton_kernels/activations.py`): change one, change all three.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

# None first so that code 0 means "no activation" everywhere.
ACTIVATION_CODES: dict[Optional[str], int] = {
    None: 0,
    "relu": 1,
    "relu6": 2,
    "silu": 3,
    "hardswish": 4,
}

# The eager PyTorch function for each activation: the reference the kernels are checked against.
_REFERENCE: dict[Optional[str], Callable[[torch.Tensor], torch.Tensor]] = {
    None: lambda z: z,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "hardswish": F.hardswish,
}


def activation_code(activation: Optional[str], argument: str = "activation") -> int:
    """The kernel code of `activation`, or a ValueError naming the argument and the choices."""
    if activation not in ACTIVATION_CODES:
        choices = ", ".join(repr(name) for name in ACTIVATION_CODES)
        raise ValueError(f"fastconv: {argument} must be one of {choices}; got {activation!r}")
    return ACTIVATION_CODES[activation]


def apply_activation(z: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """`activation(z)` in eager PyTorch."""
    activation_code(activation)
    return _REFERENCE[activation](z)


def activation_derivative(z: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """d activation / dz at `z`, with PyTorch's own conventions at the kinks.

    relu and relu6 are differentiated as `threshold_backward` and `hardtanh_backward` do: the
    gradient is zero *at* 0 and at 6. hardswish follows `hardswish_backward`: 0 up to and at
    -3, z/3 + 1/2 on the open (-3, 3), 1 from 3 on (checked against torch 2.14).
    """
    activation_code(activation)
    if activation is None:
        return torch.ones_like(z)
    if activation == "relu":
        return (~(z <= 0)).to(z.dtype)
    if activation == "relu6":
        return (~((z <= 0) | (z >= 6))).to(z.dtype)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    # hardswish
    middle = z / 3 + 0.5
    return torch.where(z <= -3, torch.zeros_like(z), torch.where(z < 3, middle, torch.ones_like(z)))
