"""torch.fx.symbolic_trace and torchvision's create_feature_extractor of converted models: each
fastconv module is one node of the graph (fastconv/nn/_fx.py), which runs the module itself."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import fastconv
from fastconv.nn import _fx

CONVERTERS = {
    "conv_bn_act": fastconv.nn.convert_conv_bn_act,
    "depthwise": fastconv.nn.convert_depthwise,
    "pointwise": fastconv.nn.convert_pointwise,
}


def converted_mobilenet_v2(converter, training: bool) -> torch.nn.Module:
    model = converter(torchvision.models.mobilenet_v2(num_classes=10))
    with torch.no_grad():  # random BatchNorm statistics, so that eval's fold matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 1.5)
    return model.train(training)


@pytest.mark.parametrize("training", (False, True), ids=("eval", "train"))
@pytest.mark.parametrize("kind", list(CONVERTERS))
def test_symbolic_trace_matches_the_model(kind, training):
    model = converted_mobilenet_v2(CONVERTERS[kind], training)
    graph = torch.fx.symbolic_trace(model)
    opaque = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is _fx.opaque_call]
    assert opaque, "the fastconv modules should appear as opaque_call nodes"
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)  # the classifier's dropout in training
    got = graph(x)
    torch.manual_seed(0)
    want = model(x)
    torch.testing.assert_close(got, want)


def test_create_feature_extractor():
    model = converted_mobilenet_v2(fastconv.nn.convert_conv_bn_act, training=False)
    extractor = create_feature_extractor(model, {"features.3": "stride4", "features.18": "last"})
    x = torch.randn(1, 3, 64, 64)
    features = extractor(x)
    assert features["stride4"].shape == (1, 24, 16, 16) and features["last"].shape == (1, 1280, 2, 2)
    torch.testing.assert_close(features["last"], model.features(x))


def test_opaque_call_only_under_symbolic_tracing():
    assert not _fx.symbolically_traced()


@pytest.mark.parametrize(
    "module",
    [
        fastconv.nn.ConvBNAct2d(3, 8, 3),
        fastconv.nn.DepthwiseConv2d(4, 4, 3, groups=4),
        fastconv.nn.PointwiseConv2d(4, 6),
        fastconv.nn.BatchNormAct2d(4),
    ],
    ids=lambda m: type(m).__name__,
)
def test_torchscript_gets_a_clear_error(module):
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*use torch\.compile"):
        torch.jit.script(module)
