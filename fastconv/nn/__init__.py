"""Drop-in nn.Modules built on the fastconv ops; state_dicts match their torch.nn originals."""

from fastconv.nn._pipeline import convert_blocks
from fastconv.nn.batch_norm import BatchNormAct2d, SyncBatchNormAct2d, convert_sync_batchnorm
from fastconv.nn.conv_bn_act import ConvBNAct2d, convert_conv_bn_act
from fastconv.nn.dense import DenseBlock, DenseLayer, Transition
from fastconv.nn.depthwise import DepthwiseConv2d, convert_depthwise
from fastconv.nn.inception import BasicConv2d, InceptionBlock
from fastconv.nn.inverted_residual import DepthwiseSeparableConv2d, InvertedResidual
from fastconv.nn.pointwise import PointwiseConv2d, convert_pointwise
from fastconv.nn.resnet import ResNetBlock
from fastconv.nn.timm_blocks import TimmInvertedResidual

__all__ = [
    "BasicConv2d", "BatchNormAct2d", "ConvBNAct2d", "DenseBlock", "DenseLayer", "DepthwiseConv2d", "DepthwiseSeparableConv2d", "InceptionBlock", "InvertedResidual",
    "PointwiseConv2d",
    "ResNetBlock", "SyncBatchNormAct2d", "TimmInvertedResidual", "Transition", "convert_blocks", "convert_conv_bn_act", "convert_depthwise", "convert_pointwise", "convert_sync_batchnorm",
]
