"""fastconv.nn.BatchNormAct2d against the BatchNorm2d and activation it replaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastconv.nn import BatchNormAct2d
from harness import DEVICE, assert_matches_reference, backends_under_test, random_tensor, run_backend

ACTIVATION_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish, None: nn.Identity}


def trained_batchnorm(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm2d whose running statistics and affine parameters are not the defaults."""
    bn = nn.BatchNorm2d(channels).to(DEVICE)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels) * 0.5 + 1)
        bn.bias.copy_(torch.randn(channels))
        bn.running_mean.copy_(torch.randn(channels))
        bn.running_var.copy_(torch.rand(channels) + 0.5)
    return bn


def test_state_dict_is_batchnorm2d_s():
    original = trained_batchnorm(8)
    fused = BatchNormAct2d(8, "relu6").to(DEVICE)
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.load_state_dict(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
    assert isinstance(fused, nn.BatchNorm2d)


def trained_copy(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    copy = nn.BatchNorm2d(bn.num_features).to(DEVICE)
    copy.load_state_dict(bn.state_dict())
    return copy


@pytest.mark.parametrize("activation", list(ACTIVATION_MODULES))
@pytest.mark.parametrize("backend", backends_under_test())
def test_eval_matches_batchnorm_then_activation(backend, activation):
    bn = trained_batchnorm(6).eval()
    fused = BatchNormAct2d.from_modules(bn, ACTIVATION_MODULES[activation]()).eval()
    reference64 = nn.Sequential(trained_copy(bn).double(), ACTIVATION_MODULES[activation]()).eval()
    x = random_tensor((2, 6, 5, 7), torch.float32, "channels_last", scale=2.0).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y = run_backend(backend, fused, x)
    y64 = reference64(x64)
    assert_matches_reference("y", y, y64)
    assert y.is_contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(y)
    got = run_backend(backend, torch.autograd.grad, y, (x, fused.weight, fused.bias), grad_y)
    want = torch.autograd.grad(y64, (x64, reference64[0].weight, reference64[0].bias), grad_y.double())
    for name, g, w in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
        assert_matches_reference(name, g, w)


def test_training_mode_keeps_batchnorm_semantics():
    bn = trained_batchnorm(4).train()
    twin = trained_copy(bn).train()
    fused = BatchNormAct2d.from_modules(twin, nn.ReLU6())
    for _ in range(3):
        x = random_tensor((3, 4, 5, 5), torch.float32, "nchw")
        torch.testing.assert_close(fused(x), nn.functional.relu6(bn(x)))
    torch.testing.assert_close(twin.running_mean, bn.running_mean)
    torch.testing.assert_close(twin.running_var, bn.running_var)
    assert int(twin.num_batches_tracked) == int(bn.num_batches_tracked) == 3


def test_from_modules_shares_state_and_refuses_other_activations():
    bn = trained_batchnorm(3)
    fused = BatchNormAct2d.from_modules(bn, nn.SiLU())
    assert fused.weight is bn.weight and fused.running_var is bn.running_var and fused.activation == "silu"
    with pytest.raises(ValueError, match=r"act must be one of .*; got GELU"):
        BatchNormAct2d.from_modules(bn, nn.GELU())
    with pytest.raises(ValueError, match=r"activation must be one of .*; got 'tanh'"):
        BatchNormAct2d(3, "tanh")


def test_eval_fold_is_cached_until_a_statistic_changes():
    bn = BatchNormAct2d(8, "relu").eval()
    reference = nn.BatchNorm2d(8).eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        first = bn.folded_scale_shift()
        assert bn.folded_scale_shift()[0] is first[0]  # reused
        for module in (bn, reference):
            module.running_var.mul_(4)  # in place: the version counter moves
            module.running_mean.add_(1)
        torch.testing.assert_close(bn(x), torch.relu(reference(x)))
        bn.load_state_dict(nn.BatchNorm2d(8).state_dict())
        torch.testing.assert_close(bn(x), torch.relu(nn.BatchNorm2d(8).eval()(x)))


def test_convert_sync_batchnorm_keeps_the_activation():
    """torch's converter would make a plain SyncBatchNorm of a BatchNormAct2d, dropping its ReLU6."""
    from fastconv.nn import ConvBNAct2d, SyncBatchNormAct2d, convert_sync_batchnorm

    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, "relu6"), ConvBNAct2d(8, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].bias.add_(3)  # so that ReLU6 clips
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = model(x)
    keys = list(model.state_dict())
    converted = convert_sync_batchnorm(model)
    assert type(converted[1]) is SyncBatchNormAct2d and converted[1].activation == "relu6"
    assert type(converted[2][1]) is nn.SyncBatchNorm and type(converted[3]) is nn.SyncBatchNorm
    assert list(converted.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected)


def test_eval_rejects_non_4d_input_like_batchnorm2d():
    fused = BatchNormAct2d(3).eval()
    with pytest.raises(ValueError, match="expected 4D input"):
        fused(torch.randn(2, 3, 4))
