"""Model definitions built from fastconv's modules, with torchvision's state_dict keys.

`alexnet`, `mobilenet_v2`, `densenet121/161/169/201`, `googlenet`, `inception_v3`, `resnet50`, `vgg16` and `vgg16_bn` load ``torchvision.models.X().state_dict()`` with strict=True
(tested). `mobilenet_v1` has no torchvision model; its keys are documented on the function, and
`mobilenet_v1_eager` is the same network in plain PyTorch layers with those keys (the eager baseline).
No weights are downloaded: every model starts from torchvision's random initialisation.
"""

from fastconv.models.alexnet import AlexNet, alexnet
from fastconv.models.densenet import DenseNet, densenet121, densenet161, densenet169, densenet201
from fastconv.models.inception import GoogLeNet, Inception3, googlenet, inception_v3
from fastconv.models.mobilenet import MobileNetV1, mobilenet_v1, mobilenet_v1_eager, mobilenet_v2
from fastconv.models.resnet import ResNet, resnet50
from fastconv.models.vgg import VGG, vgg16, vgg16_bn

__all__ = [
    "VGG", "AlexNet", "DenseNet", "GoogLeNet", "Inception3", "MobileNetV1", "ResNet", "alexnet", "densenet121", "densenet161",
    "densenet169", "densenet201", "googlenet", "inception_v3", "mobilenet_v1", "mobilenet_v1_eager", "mobilenet_v2", "resnet50",
    "vgg16", "vgg16_bn",
]
