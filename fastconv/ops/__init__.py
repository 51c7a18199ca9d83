"""The fastconv ops: each module defines its `torch.ops.fastconv.*` schemas once, with fake,
autograd and per-backend implementations beside them."""

from fastconv.ops import batch_norm  # noqa: F401  (registers the training BatchNorm ops)
from fastconv.ops import batch_norm_cat  # noqa: F401  (registers batch_norm_act_cat, Inception's training concat)
from fastconv.ops.bn_act import bn_act
from fastconv.ops.bn_act_pool import bn_act_avg_pool
from fastconv.ops.conv_bn_act import conv2d_bn_act
from fastconv.ops import dense_block  # noqa: F401  (registers the dense-block ops)
from fastconv.ops.depthwise import depthwise_conv2d
from fastconv.ops.inverted_residual import depthwise_separable_conv2d, inverted_residual
from fastconv.ops.inverted_residual_train import inverted_residual_train
from fastconv.ops.pointwise import pointwise_conv2d

__all__ = [
    "bn_act", "bn_act_avg_pool", "conv2d_bn_act", "depthwise_conv2d", "depthwise_separable_conv2d", "inverted_residual", "inverted_residual_train",
    "pointwise_conv2d",
]
