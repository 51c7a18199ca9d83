"""torch.export of a converted MobileNetV2: the fastconv ops appear as themselves in the
exported graph (their fake implementations give the shapes), and the program matches."""

from __future__ import annotations

import torch
import torchvision

import fastconv


def test_export_of_a_converted_mobilenet_v2_runs_and_matches():
    model = fastconv.nn.convert_conv_bn_act(torchvision.models.mobilenet_v2(num_classes=10)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    # convert_conv_bn_act takes MobileNetV2's Conv2dNormActivation blocks: 17 depthwise, 16
    # expansions and the last 1x1 (pointwise), and the stem (the implicit GEMM). The 17 bare
    # Conv2d -> BatchNorm2d projections stay eager (the models issue's optimize() takes them).
    counts = {op: targets.count(f"{op}.default") for op in (
        "fastconv.depthwise_conv2d", "fastconv.pointwise_conv2d", "fastconv.conv2d_bn_act", "aten.conv2d")}
    assert counts == {
        "fastconv.depthwise_conv2d": 17, "fastconv.pointwise_conv2d": 17, "fastconv.conv2d_bn_act": 1, "aten.conv2d": 17,
    }  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))
