"""fastconv.nn.ConvBNAct2d against nn.Sequential(Conv2d, BatchNorm2d, activation).

Training: outputs, every gradient and the running statistics after several steps, including
num_batches_tracked and momentum=None. Eval: the folded weights, and the fold cache's
invalidation after an optimizer step, load_state_dict and .to(dtype). Compatibility:
torchvision's Conv2dNormActivation state_dicts load and give identical outputs.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from fastconv.nn import ConvBNAct2d, convert_conv_bn_act
from fastconv.ops import conv_bn_act as conv_ops
from harness import DEVICE, assert_matches_reference, backends_under_test, on_backend, random_tensor

BACKENDS = backends_under_test(conv_ops.FORWARD)
ACTIVATIONS = {"relu6": nn.ReLU6, "relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, None: None}

# (in, out, kernel, stride, groups, dilation): the implicit GEMM, depthwise and pointwise routes.
GEOMETRIES = {
    "gemm-3x3-s2": (3, 8, 3, 2, 1, 1),
    "gemm-groups2-dilated": (4, 6, 3, 1, 2, 2),
    "depthwise": (6, 6, 3, 1, 6, 1),
    "pointwise": (5, 7, 1, 1, 1, 1),
}


def torchvision_unit(geometry, activation="relu6", dtype=torch.float64, momentum=0.1):
    in_channels, out_channels, kernel, stride, groups, dilation = geometry
    unit = Conv2dNormActivation(
        in_channels, out_channels, kernel, stride, groups=groups, dilation=dilation,
        activation_layer=ACTIVATIONS[activation],
    )  # fmt: skip
    unit[1].momentum = momentum
    with torch.no_grad():  # non-trivial BatchNorm parameters and statistics
        unit[1].weight.uniform_(0.5, 1.5)
        unit[1].bias.normal_()
        unit[1].running_mean.normal_()
        unit[1].running_var.uniform_(0.5, 2)
    return unit.to(DEVICE, dtype)


def fused_copy(unit, activation="relu6"):
    in_channels, out_channels = unit[0].in_channels, unit[0].out_channels
    fused = ConvBNAct2d(
        in_channels, out_channels, unit[0].kernel_size, unit[0].stride, groups=unit[0].groups,
        dilation=unit[0].dilation, activation=activation, momentum=unit[1].momentum,
    ).to(DEVICE, unit[0].weight.dtype)  # fmt: skip
    fused.load_state_dict(unit.state_dict())
    return fused


def assert_same_state(fused, unit, tolerance=1e-10):
    for (name, got), want in zip(fused.state_dict().items(), unit.state_dict().values()):
        if got.dtype == torch.int64:
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=name)


def test_state_dict_keys_are_torchvision_s():
    unit = Conv2dNormActivation(4, 8, 3, groups=2, activation_layer=nn.ReLU6)
    fused = ConvBNAct2d(4, 8, 3, groups=2)
    assert list(fused.state_dict()) == list(unit.state_dict()) == [
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
    ]  # fmt: skip
    assert repr(fused[0]) == repr(unit[0]) and repr(fused[1]) == repr(unit[1])


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loads_torchvision_weights_and_matches(backend, geometry):
    unit = torchvision_unit(GEOMETRIES[geometry], dtype=torch.float32).eval()
    fused = fused_copy(unit).eval()
    x = random_tensor((2, unit[0].in_channels, 9, 8), torch.float32, "channels_last")
    with torch.no_grad(), on_backend(backend):
        y = fused(x)
    expected = unit.double()(x.double())
    assert_matches_reference("y", y, expected, terms=unit[0].weight[0].numel())


@pytest.mark.parametrize("activation", ["relu6", "silu", None])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_steps_match_batchnorm_exactly(backend, geometry, activation):
    """Three training steps in float64: outputs, every gradient, the running statistics."""
    unit = torchvision_unit(GEOMETRIES[geometry], activation).train()
    fused = fused_copy(unit, activation).train()
    for step, layout in enumerate(["channels_last", "nchw", "channel_slice"]):
        x = random_tensor((2, unit[0].in_channels, 7, 6), torch.float64, layout).requires_grad_(True)
        with on_backend(backend):
            y = fused(x)
            grad_y = torch.randn_like(y)
            grads = torch.autograd.grad(y, [x, *fused.parameters()], grad_y)
        expected = unit(x)
        expected_grads = torch.autograd.grad(expected, [x, *unit.parameters()], grad_y)
        torch.testing.assert_close(y, expected, msg=f"step {step}: y")
        for got, want, name in zip(grads, expected_grads, ["x", "conv.weight", "bn.weight", "bn.bias"]):
            torch.testing.assert_close(got, want, msg=f"step {step}: grad of {name}")
        assert_same_state(fused, unit)
    assert int(fused[1].num_batches_tracked) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bias_and_affine_free_batchnorm(backend):
    """A conv with a bias (its statistics include it) and a BatchNorm without affine parameters."""
    conv, bn = nn.Conv2d(4, 6, 3, 2, 1, bias=True), nn.BatchNorm2d(6, affine=False)
    unit = nn.Sequential(conv, bn, nn.ReLU()).to(DEVICE, torch.float64)
    fused = ConvBNAct2d.from_modules(*copy.deepcopy(unit))
    for mode in ("train", "eval", "train"):
        getattr(unit, mode)()
        getattr(fused, mode)()
        x = torch.randn(2, 4, 9, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
        with on_backend(backend):
            y = fused(x)
            grads = torch.autograd.grad(y.square().sum(), [x, *fused.parameters()])
        expected = unit(x)
        torch.testing.assert_close(y, expected, msg=mode)
        for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), [x, *unit.parameters()])):
            torch.testing.assert_close(got, want, msg=mode)
    assert_same_state(fused, unit)


def test_a_swapped_child_runs_as_the_plain_modules():
    """nn.SyncBatchNorm.convert_sync_batchnorm (DDP) swaps the BatchNorm: its cross-GPU
    statistics must not be silently replaced by fastconv's local ones."""
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(ConvBNAct2d(3, 8, 3))
    assert type(fused[1]) is nn.SyncBatchNorm and list(fused.state_dict()) == list(ConvBNAct2d(3, 8, 3).state_dict())
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), torch.clamp(fused[1](fused[0](x)), 0, 6))
    calls = []
    sync_forward = fused[1].forward
    fused[1].forward = lambda x: calls.append(x.shape) or sync_forward(x)
    fused.train()(x)
    assert calls == [(2, 8, 9, 9)]  # SyncBatchNorm's own forward ran, not fastconv's


def test_cumulative_average_when_momentum_is_none():
    unit = torchvision_unit(GEOMETRIES["gemm-3x3-s2"], momentum=None).train()
    fused = fused_copy(unit).train()
    for _ in range(3):
        x = torch.randn(2, 3, 7, 7, dtype=torch.float64, device=DEVICE)
        fused(x)
        unit(x)
    assert_same_state(fused, unit)


def test_empty_batch_in_training_counts_but_keeps_statistics():
    unit = torchvision_unit(GEOMETRIES["gemm-3x3-s2"]).train()
    fused = fused_copy(unit).train()
    x = torch.randn(0, 3, 7, 7, dtype=torch.float64, device=DEVICE)
    assert fused(x).shape == unit(x).shape == (0, 8, 4, 4)
    assert_same_state(fused, unit)
    assert int(fused[1].num_batches_tracked) == 1


def test_one_value_per_channel_in_training_is_refused_as_batchnorm_does():
    fused = ConvBNAct2d(3, 4, 3, padding=0).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fused(torch.randn(1, 3, 3, 3))
    fused.eval()(torch.randn(1, 3, 3, 3))  # fine in eval


def test_frozen_backbone_and_no_grad():
    """requires_grad=False parameters (frozen BN in a training model) and torch.no_grad()."""
    unit = torchvision_unit(GEOMETRIES["gemm-3x3-s2"])
    fused = fused_copy(unit)
    fused.requires_grad_(False)
    fused[1].eval()  # a frozen BatchNorm inside a training conv: the folded path
    unit.requires_grad_(False)
    unit[1].eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = fused(x)
    torch.testing.assert_close(y, unit(x))
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad_x, torch.autograd.grad(unit(x).sum(), x)[0])
    with torch.no_grad():
        torch.testing.assert_close(fused.train()(x), unit.train()(x))
    assert_same_state(fused, unit)


def test_eval_fine_tuning_gets_gradients_through_the_fold():
    unit = torchvision_unit(GEOMETRIES["gemm-groups2-dilated"]).eval()
    fused = fused_copy(unit).eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, device=DEVICE)
    grads = torch.autograd.grad(fused(x).sum(), list(fused.parameters()))
    for got, want in zip(grads, torch.autograd.grad(unit(x).sum(), list(unit.parameters()))):
        torch.testing.assert_close(got, want)


class TestFoldCache:
    """The eval fold is computed once and recomputed exactly when a source tensor changes."""

    def setup_method(self):
        self.unit = torchvision_unit(GEOMETRIES["gemm-3x3-s2"], dtype=torch.float32)
        self.fused = fused_copy(self.unit)
        self.x = torch.randn(2, 3, 9, 9, device=DEVICE)

    def check(self):
        self.fused.eval()
        self.unit.eval()
        with torch.no_grad():
            y = self.fused(self.x)
            expected = self.unit.double()(self.x.double()).to(y.dtype)
            self.unit.to(y.dtype)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)

    def test_reused_while_nothing_changes(self):
        with torch.no_grad():
            first = self.fused.eval().folded_weight_and_shift()
            assert self.fused.folded_weight_and_shift()[0] is first[0]

    def test_invalidated_by_an_optimizer_step(self):
        self.check()
        optimizer = torch.optim.SGD(self.fused.parameters(), lr=0.5)
        self.fused.train()
        self.fused(self.x).square().sum().backward()
        optimizer.step()
        self.unit.load_state_dict(self.fused.state_dict())  # the train step moved the running stats too
        self.check()

    def test_invalidated_by_load_state_dict(self):
        self.check()
        other = torchvision_unit(GEOMETRIES["gemm-3x3-s2"], dtype=torch.float32)
        self.fused.load_state_dict(other.state_dict())
        self.unit = other
        self.check()

    def test_invalidated_by_running_stat_updates_in_place(self):
        self.check()
        with torch.no_grad():
            self.fused[1].running_var.mul_(3)
            self.unit[1].running_var.mul_(3)
        self.check()

    def test_invalidated_by_a_dtype_change(self):
        self.check()
        self.fused.double()
        with torch.no_grad():
            y = self.fused.eval()(self.x.double())
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, self.unit.double().eval()(self.x.double()))
        self.fused.float()
        self.unit.float()
        self.check()

    def test_copies_and_pickles_rebuild_their_cache(self):
        self.check()
        for duplicate in (copy.deepcopy, lambda module: pickle.loads(pickle.dumps(module))):
            clone = duplicate(self.fused)
            with torch.no_grad():
                clone[1].running_mean.add_(1)
                self.unit[1].running_mean.add_(1)
            self.fused = clone
            self.check()


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cuda"])
@pytest.mark.parametrize("geometry", ["gemm-groups2-dilated", "depthwise"])
def test_gradcheck_training_float64(backend, geometry):
    unit = torchvision_unit(GEOMETRIES[geometry], "silu")
    fused = fused_copy(unit, "silu").train()
    x = torch.randn(2, unit[0].in_channels, 4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    conv_weight, bn_weight, bn_bias = fused.parameters()

    def function(x, conv_weight, bn_weight, bn_bias):
        # Functional parameters, so that gradcheck perturbs them; the running stats drift
        # meanwhile, which a training forward never reads.
        return torch.func.functional_call(fused, {"0.weight": conv_weight, "1.weight": bn_weight, "1.bias": bn_bias}, (x,))

    with on_backend(backend):
        assert torch.autograd.gradcheck(function, (x, conv_weight, bn_weight, bn_bias), fast_mode=True)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_fullgraph(mode):
    unit = torchvision_unit(GEOMETRIES["gemm-3x3-s2"], dtype=torch.float32)
    fused = fused_copy(unit)
    getattr(fused, mode)()
    getattr(unit, mode)()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(2, 3, 9, 9, device=DEVICE, requires_grad=True)
        y = compiled(x)
        expected = unit(x)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0],
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    assert_same_state(fused, unit, tolerance=1e-5)


def test_autocast_training_keeps_float32_statistics():
    fused = ConvBNAct2d(3, 8, 3, stride=2).train()
    x = torch.randn(2, 3, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
    assert y.dtype == torch.bfloat16 and fused[1].running_mean.dtype == torch.float32
    assert int(fused[1].num_batches_tracked) == 1


def test_from_modules_shares_and_convert_swaps_torchvision_blocks():
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    keys = list(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        converted = convert_conv_bn_act(copy.deepcopy(model))
        y = converted(x)
    assert list(converted.state_dict()) == keys
    assert sum(isinstance(m, ConvBNAct2d) for m in converted.modules()) == 35  # every Conv2dNormActivation
    torch.testing.assert_close(y, expected, rtol=1e-3, atol=1e-3)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    fused = ConvBNAct2d.from_modules(conv, bn, nn.ReLU())
    assert fused[0] is conv and fused[1] is bn and fused.activation == "relu"


@pytest.mark.parametrize(
    "build, pattern",
    [
        (lambda: ConvBNAct2d(6, 8, 3, groups=4), r"in_channels and out_channels must be divisible by groups; got in_channels=6"),
        (lambda: ConvBNAct2d(4, 6, 3, groups=4), r"divisible by groups; got in_channels=4, out_channels=6, groups=4"),
        (lambda: ConvBNAct2d(0, 6, 3), r"in_channels must be an int >= 1; got 0"),
        (lambda: ConvBNAct2d(4, 6, 0), r"kernel_size must be >= 1 in each dimension; got 0"),
        (lambda: ConvBNAct2d(4, 6, 3, eps=0), r"eps must be a finite number > 0; got 0"),
        (lambda: ConvBNAct2d(4, 6, 3, eps=float("nan")), r"eps must be a finite number > 0; got nan"),
        (lambda: ConvBNAct2d(4, 6, 3, momentum=1.5), r"momentum must be a number in \[0, 1\], or None .*; got 1.5"),
        (lambda: ConvBNAct2d(4, 6, 3, activation="gelu"), r"activation must be one of .*; got 'gelu'"),
        (lambda: ConvBNAct2d.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)), r"bn.num_features must equal conv.out_channels=4; got 5"),
        (lambda: ConvBNAct2d.from_modules(nn.Conv2d(3, 4, 3, padding_mode="reflect"), nn.BatchNorm2d(4)), r"conv.padding_mode must be 'zeros'; got 'reflect'"),
        (lambda: ConvBNAct2d.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU()), r"act must be one of .*; got GELU"),
        (lambda: ConvBNAct2d(4, 6, 3)(torch.randn(2, 5, 8, 8)), r"x's channels must be divisible by groups|weight.shape\[1\] must"),
    ],
    ids=["groups-in", "groups-out", "channels", "kernel", "eps", "eps-nan", "momentum", "activation", "bn-features",
         "padding-mode", "act-module", "x-channels"],  # fmt: skip
)
def test_bad_arguments_are_named(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()
