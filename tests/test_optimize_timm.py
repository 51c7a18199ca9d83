"""fastconv.optimize on timm's models: MobileNetV2 (mobilenetv2_100), MobileNetV1
(mobilenetv1_100), ResNet-50, DenseNet-121 and, for the partial swap (its squeeze-excitation
stays), EfficientNet-B0. timm's blocks become fastconv's fused blocks with timm's keys
(timm_blocks.py); the conv -> BatchNorm pairs of what stays timm's are fused as attributes
(attribute_fusion), without a key changing; timm's BatchNormAct2d keeps its activation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastconv
from fastconv.nn import BatchNormAct2d, DenseBlock, DepthwiseSeparableConv2d, Transition
from fastconv.nn.attribute_fusion import FoldedBatchNorm2d, FusedConv2d
from fastconv.nn.resnet import ResNetBlock
from fastconv.nn.sequential import run_batchnorms
from fastconv.nn.timm_blocks import TimmInvertedResidual
from test_optimize import bn_outside_fastconv, randomized

timm = pytest.importorskip("timm")

MODELS = ["mobilenetv2_100", "mobilenetv1_100", "resnet50", "densenet121", "efficientnet_b0"]
# What each becomes: timm's blocks as fastconv's fused blocks, EfficientNet's (with SE) pair by pair.
FUSED_BLOCKS = {
    "mobilenetv2_100": {TimmInvertedResidual: 16, DepthwiseSeparableConv2d: 1},
    "mobilenetv1_100": {DepthwiseSeparableConv2d: 13},
    "resnet50": {ResNetBlock: 16},
    "densenet121": {DenseBlock: 4, Transition: 3},
    "efficientnet_b0": {FusedConv2d: 49},
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomized(timm.create_model(name, num_classes=10))


@pytest.mark.parametrize("name", MODELS)
def test_optimize_matches_timm_in_eval_and_train_with_gradients(name):
    original = build(name)
    optimized = fastconv.optimize(original)
    assert list(optimized.state_dict()) == list(original.state_dict())
    for kind, count in FUSED_BLOCKS[name].items():
        assert sum(type(m) is kind for m in optimized.modules()) == count, kind.__name__
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = original.eval()(x)
        torch.testing.assert_close(optimized.eval()(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # The training step in float64 on the torch backend (the kernels' accuracy is their own tests').
    original, optimized = original.double().train(), optimized.double().train()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with fastconv.use_backend("torch"):
        reference, fused = copy.deepcopy(original), copy.deepcopy(optimized)
        want, got = reference(x), fused(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        weights = torch.randn_like(want)
        (want * weights).sum().backward()
        (got * weights).sum().backward()
    grads = dict(fused.named_parameters())
    scale = max(p.grad.norm().item() for p in reference.parameters() if p.grad is not None)
    for key, parameter in reference.named_parameters():
        error = (grads[key].grad - parameter.grad).norm().item()
        assert error <= 1e-5 * parameter.grad.norm().item() + 1e-9 * scale, f"{key}: {error}"
    buffers = dict(fused.named_buffers())
    for key, buffer in reference.named_buffers():  # each BatchNorm's running update, in its own slot
        torch.testing.assert_close(buffers[key], buffer, rtol=1e-6, atol=1e-9, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", ["mobilenetv2_100", "mobilenetv1_100", "resnet50", "densenet121"])
def test_no_batchnorm_is_left_outside_a_fastconv_module(name):
    optimized = fastconv.optimize(build(name))
    assert bn_outside_fastconv(optimized) == []
    # A timm BatchNormAct2d is left only where a FusedSequential runs it fused (DenseNet's stem
    # conv0 -> norm0 keeps its keys so): none runs its own forward.
    fused_runs = set().union(*(run_batchnorms(m) for m in optimized.modules()))
    assert not [m for m in optimized.modules() if type(m).__name__ == "BatchNormAct2d" and
                type(m).__module__.startswith("timm.") and id(m) not in fused_runs]  # fmt: skip


def test_efficientnet_keeps_its_squeeze_excitation_and_reports_it(capsys):
    optimized = fastconv.optimize(build("efficientnet_b0"), verbose=True)
    printed = capsys.readouterr().out
    assert "squeeze-excitation" in printed
    assert any(type(m).__name__ == "SqueezeExcite" for m in optimized.modules())
    assert bn_outside_fastconv(optimized) == []


def test_idempotent_and_channels_last():
    optimized = fastconv.optimize(build("mobilenetv2_100"))
    again = fastconv.optimize(optimized)
    assert [type(m) for m in again.modules()] == [type(m) for m in optimized.modules()]
    model = build("mobilenetv2_100").to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(fastconv.optimize(model)(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_optimizer_sees_the_same_parameters_inplace():
    model = build("mobilenetv2_100")
    parameters = [id(p) for p in model.parameters()]
    fastconv.optimize(model, inplace=True)
    assert [id(p) for p in model.parameters()] == parameters


def test_timm_batch_norm_act_keeps_its_activation():
    """The issue's silent wrong answer: BatchNormAct2d.from_modules dropped timm's ReLU6 (off by
    38). from_timm honours it; from_modules refuses; a real drop layer is refused."""
    bn = timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU6)
    randomized(bn).eval()
    x = torch.randn(2, 4, 5, 5) * 20
    fused = BatchNormAct2d.from_timm(bn)
    assert fused.activation == "relu6" and fused.weight is bn.weight
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(x))
    with pytest.raises(ValueError, match=r"not a subclass"):
        BatchNormAct2d.from_modules(bn)
    dropping = timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=timm.layers.DropBlock2d)
    with pytest.raises(ValueError, match=r"drop layer \(DropBlock2d\)"):
        BatchNormAct2d.from_timm(dropping)


def test_a_folded_batchnorm_follows_the_model_s_mode_and_device_moves():
    optimized = fastconv.optimize(build("resnet50"))
    fused = optimized.conv1
    assert isinstance(fused, FusedConv2d) and fused.folded_bn is optimized.bn1
    assert isinstance(optimized.bn1, FoldedBatchNorm2d) and type(optimized.act1) is nn.Identity
    optimized.eval()
    assert not fused.folded_bn.training
    copied = copy.deepcopy(optimized)
    assert copied.conv1.folded_bn is copied.bn1  # the reference follows the copy
    half = copy.deepcopy(optimized).double()
    assert half.conv1.folded_bn.weight.dtype == torch.float64


def test_a_timm_block_fastconv_cannot_honour_is_refused_naming_why():
    """EfficientNet's blocks have a squeeze-excitation; a ResNet with stochastic depth has a
    drop path: each keeps timm's forward, with its pairs fused one by one, and says why."""
    efficientnet = build("efficientnet_b0")
    with pytest.raises(ValueError, match=r"se \(SqueezeExcite\) has no fused kernel"):
        TimmInvertedResidual.from_timm(efficientnet.blocks[1][0])
    with pytest.raises(ValueError, match=r"se \(SqueezeExcite\) has no fused kernel"):
        DepthwiseSeparableConv2d.from_timm(efficientnet.blocks[0][0])
    torch.manual_seed(0)
    deep = timm.create_model("resnet18", num_classes=10, drop_path_rate=0.1)
    with pytest.raises(ValueError, match=r"drop path"):
        ResNetBlock.from_timm(deep.layer4[1])  # the rate grows with depth: the first block has none
    optimized = fastconv.optimize(deep)
    assert not isinstance(optimized.layer4[1], ResNetBlock)
    assert any(isinstance(m, FusedConv2d) for m in optimized.modules())


def test_timm_blocks_share_parameters_and_keep_their_semantics():
    model = build("mobilenetv2_100")
    block = model.blocks[2][1]  # 24 -> 144 -> 24, stride 1: has_skip
    fused = TimmInvertedResidual.from_timm(block)
    assert fused.has_skip and fused.activation == "relu6"
    assert fused.conv_pw.weight is block.conv_pw.weight and fused.bn1.running_mean is block.bn1.running_mean
    assert list(fused.state_dict()) == list(block.state_dict())
    first = DepthwiseSeparableConv2d.from_timm(model.blocks[0][0])  # timm's pw_act=False: linear projection
    assert (first.dw_activation, first.pw_activation, first.skip) == ("relu6", None, False)


def test_timm_inverted_residual_on_the_triton_kernel():
    """The fused kernel (Triton, interpreted on the CPU) on a timm block in eval: 16 -> 96 -> 24,
    stride 2, odd input size."""
    block = build("mobilenetv2_100").blocks[1][0].eval()
    fused = TimmInvertedResidual.from_timm(block)
    x = torch.randn(2, 16, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastconv.use_backend("triton"):
        want = block(x)
        torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("name", ["mobilenetv2_100", "resnet50", "densenet121", "mobilenetv1_100"])
def test_frozen_batch_norms_stay_frozen(name):
    """timm's BatchNormAct2d become plain BatchNorms sharing their state: each keeps the frozen
    (eval) mode of the one it stands for inside a training model, and the model computes what
    timm's does, its running statistics untouched."""
    original = build(name).train()
    for bn in (m for m in original.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.eval()
    optimized = fastconv.optimize(original)
    modes = {key: m.training for key, m in optimized.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert optimized.training and modes and not any(modes.values()), [key for key, mode in modes.items() if mode]
    before = {key: b.clone() for key, b in optimized.named_buffers()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(1)
        got = optimized(x)
        torch.manual_seed(1)
        torch.testing.assert_close(got, original(x), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(b, before[key]) for key, b in optimized.named_buffers())
