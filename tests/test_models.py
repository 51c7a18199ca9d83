"""fastconv.models: torchvision's state_dicts load with strict=True, and the models compute what
torchvision's compute with those weights, in eval and train. MobileNetV1 (no torchvision model)
against an eager PyTorch forward over its own parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fastconv
import fastconv.models
from test_optimize import randomized, run, structure


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50", "vgg16_bn"])
def test_loads_torchvision_state_dict_strictly_and_matches(name):
    torch.manual_seed(0)
    reference = randomized(getattr(torchvision.models, name)(num_classes=10))
    model = getattr(fastconv.models, name)(num_classes=10)
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(run(model.train(), x), run(reference.train(), x), rtol=1e-4, atol=1e-4)
    for key, buffer in reference.named_buffers():
        torch.testing.assert_close(model.get_buffer(key), buffer, rtol=1e-4, atol=1e-5)  # fp32 rounding


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_densenets_load_torchvision_state_dicts_strictly(name):
    """Keys and shapes; densenet121's values are test_dense_block_module.py's."""
    reference = getattr(torchvision.models, name)(num_classes=10).state_dict()
    model = getattr(fastconv.models, name)(num_classes=10)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    model.load_state_dict(reference, strict=True)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50", "densenet121"])
def test_optimize_has_nothing_left_to_do(name):
    model = getattr(fastconv.models, name)(num_classes=10)
    assert structure(fastconv.optimize(model)) == structure(model)


def _eager_v1(model: fastconv.models.MobileNetV1, x: torch.Tensor) -> torch.Tensor:
    """MobileNetV1 in eval from its parameters with F.conv2d and F.batch_norm."""

    def bn(h, b):
        return F.batch_norm(h, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)

    stem = model.features[0]
    h = F.relu(bn(F.conv2d(x, stem[0].weight, None, 2, 1), stem[1]))
    for block in model.features[1:]:
        dw = block.conv_dw
        h = F.relu(bn(F.conv2d(h, dw.weight, None, dw.stride, dw.padding, 1, dw.groups), block.bn1))
        h = F.relu(bn(F.conv2d(h, block.conv_pw.weight), block.bn2))
    return model.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.mark.parametrize("width_mult, widths", [(1.0, (32, 1024)), (0.5, (16, 512))])
def test_mobilenet_v1(width_mult, widths):
    torch.manual_seed(0)
    model = randomized(fastconv.models.mobilenet_v1(width_mult, num_classes=10)).eval()
    keys = list(model.state_dict())
    assert keys[:6] == ["features.0.0.weight"] + [f"features.0.1.{k}" for k in
                        ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]  # fmt: skip
    assert "features.13.conv_pw.weight" in keys and keys[-2:] == ["classifier.weight", "classifier.bias"]
    assert len(model.features) == 14
    assert model.features[0][0].out_channels == widths[0] and model.classifier.in_features == widths[1]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _eager_v1(model, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"width_mult must be a number > 0; got 0"):
        fastconv.models.mobilenet_v1(0)


def test_models_train():
    """A training step runs and updates the BatchNorm statistics (exactness is the modules' tests')."""
    model = fastconv.models.mobilenet_v1(0.25, num_classes=4).train()
    before = model.features[1].bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert not torch.equal(before, model.features[1].bn1.running_mean)
    assert all(p.grad is not None for p in model.parameters())
