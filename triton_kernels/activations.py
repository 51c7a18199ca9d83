"""The fused activations and their derivatives, selected at compile time by code.

Codes match `fastconv.activations.ACTIVATION_CODES`: 0 none, 1 relu, 2 relu6, 3 silu,
4 hardswish. NaN propagates as in PyTorch (hence PropagateNan.ALL on min/max), and the
derivatives follow PyTorch's backward kernels at the kinks: zero at relu's 0 and at relu6's
0 and 6, and z/3 + 1/2 on hardswish's open (-3, 3).
"""

import triton
import triton.language as tl


@triton.jit
def apply_activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == 2:
        z = tl.minimum(tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == 3:
        z = z * tl.sigmoid(z)
    elif ACTIVATION == 4:
        z = z * tl.minimum(tl.maximum(z + 3.0, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0) / 6.0
    return z


@triton.jit
def activation_derivative(z, ACTIVATION: tl.constexpr):
    one = tl.full(z.shape, 1.0, z.dtype)
    zero = tl.zeros(z.shape, z.dtype)
    if ACTIVATION == 0:
        d = one
    elif ACTIVATION == 1:
        d = tl.where(z <= 0.0, zero, one)
    elif ACTIVATION == 2:
        d = tl.where((z <= 0.0) | (z >= 6.0), zero, one)
    elif ACTIVATION == 3:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    else:
        d = tl.where(z <= -3.0, zero, tl.where(z < 3.0, z / 3.0 + 0.5, one))
    return d
