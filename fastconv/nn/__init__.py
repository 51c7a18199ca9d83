"""Drop-in nn.Modules built on the fastconv ops; state_dicts match their torch.nn originals."""

from fastconv.nn.batchnorm_act import BatchNormAct2d
from fastconv.nn.depthwise import DepthwiseConv2d, convert_depthwise

__all__ = ["BatchNormAct2d", "DepthwiseConv2d", "convert_depthwise"]
