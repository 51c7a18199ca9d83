"""fastconv: fused Triton and CUDA kernels for the convolutions of efficient CNNs.

Every op is a PyTorch op in the `fastconv` namespace (`torch.ops.fastconv.*`) with three
backends (cuda, triton, torch); see `fastconv.backends`.
"""

from fastconv import backends, nn, reference
from fastconv.backends import get_backend, set_backend, use_backend
from fastconv.ops import (
    bn_act,
    bn_act_avg_pool,
    conv2d_bn_act,
    depthwise_conv2d,
    depthwise_separable_conv2d,
    inverted_residual,
    inverted_residual_train,
    pointwise_conv2d,
)
from fastconv.optimize import optimize  # the function: fastconv.optimize(model)
from fastconv import models  # after nn: the models are built from its modules

__version__ = "0.1.0"

__all__ = [
    "backends", "bn_act", "bn_act_avg_pool", "conv2d_bn_act", "depthwise_conv2d", "depthwise_separable_conv2d", "get_backend",
    "inverted_residual", "inverted_residual_train", "models", "nn", "optimize", "pointwise_conv2d", "reference", "set_backend",
    "use_backend",
]
