"""fastconv.nn.InvertedResidual against torchvision's mobilenetv2.InvertedResidual, and
fastconv.nn.DepthwiseSeparableConv2d against the same modules run by eager PyTorch.

Eval: every distinct block of torchvision's mobilenet_v2 (features[1:18]) with random
BatchNorm statistics and affine parameters, on 7x7 images (the interpreter's cost grows with
the hidden width: the two 960-wide blocks take most of this file's time). Training: outputs,
every parameter's gradient and the input's, running statistics, num_batches_tracked, in float64,
on the fused training op and on the unfused fallback.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual as TorchvisionBlock

from fastconv.nn.inverted_residual import DepthwiseSeparableConv2d, InvertedResidual
from harness import DEVICE, assert_matches_reference, backends_under_test, on_backend, random_tensor

# The module, not the function of the same name that fastconv.ops exports.
ops = importlib.import_module("fastconv.ops.inverted_residual")
BACKENDS = backends_under_test(ops.FORWARD)


def mobilenet_v2_blocks() -> list[tuple[int, int, int, int]]:
    """(inp, oup, stride, expand_ratio) of every distinct block of torchvision's mobilenet_v2."""
    configs = []
    for block in torchvision.models.mobilenet_v2().features[1:18]:
        inp = block.conv[0][0].in_channels
        expand = 1 if len(block.conv) == 3 else block.conv[0][0].out_channels // inp
        config = (inp, block.out_channels, block.stride, expand)
        if config not in configs:
            configs.append(config)
    return configs


MOBILENET_V2 = mobilenet_v2_blocks()


def randomise_batch_norms(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.3, 0.5)  # positive shifts: relu6 of a padding tap would show
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2)
    return module


def torchvision_block(config, dtype=torch.float32):
    inp, oup, stride, expand = config
    return randomise_batch_norms(TorchvisionBlock(inp, oup, stride, expand)).to(DEVICE, dtype)


def test_mobilenet_v2_table_is_the_paper_s():
    assert len(MOBILENET_V2) == 12
    assert MOBILENET_V2[0] == (32, 16, 1, 1) and MOBILENET_V2[-1] == (160, 320, 1, 6)
    assert {stride for _, _, stride, _ in MOBILENET_V2} == {1, 2}


@pytest.mark.parametrize("expand", [1, 6])
def test_state_dict_is_torchvision_s(expand):
    reference = TorchvisionBlock(16, 16, 1, expand)
    fused = InvertedResidual(16, 16, 1, expand)
    assert list(fused.state_dict()) == list(reference.state_dict())
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    fused.load_state_dict(reference.state_dict())
    assert (fused.stride, fused.use_res_connect, fused.out_channels, fused._is_cn) == (
        reference.stride, reference.use_res_connect, reference.out_channels, reference._is_cn,
    )  # fmt: skip


@pytest.mark.parametrize("config", MOBILENET_V2, ids=lambda c: "in{}-out{}-s{}-t{}".format(*c))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_mobilenet_v2_block_in_eval_matches_torchvision(backend, config):
    block = torchvision_block(config).eval()
    fused = InvertedResidual(*config).to(DEVICE).eval()
    fused.load_state_dict(block.state_dict())
    x = random_tensor((1, config[0], 7, 7), torch.float32, "channels_last")
    with torch.no_grad(), on_backend(backend):
        y = fused(x)
    with torch.no_grad():
        expected = copy.deepcopy(block).double()(x.double())
    hidden = config[0] * config[3]
    assert_matches_reference("y", y, expected, terms=hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_eval_within_twice_torchvision_s_error(backend):
    """fp16 weights and input, fp32 folded shifts: within twice the error of torchvision's own
    fp16 block against float64 (SiLU: no kink for a rounding to land on)."""
    block = TorchvisionBlock(24, 24, 1, 4, norm_layer=nn.BatchNorm2d)
    for unit in block.conv[:2]:
        unit[2] = nn.SiLU()
    block = randomise_batch_norms(block).to(DEVICE).eval()
    fused = InvertedResidual(24, 24, 1, 4, activation="silu").to(DEVICE).eval()
    fused.load_state_dict(block.state_dict())
    fused.half()
    x = random_tensor((1, 24, 7, 7), torch.float16, "channels_last")
    with torch.no_grad(), on_backend(backend):
        y = fused(x)
    with torch.no_grad():
        expected = copy.deepcopy(block).double()(x.double())
        yardstick = copy.deepcopy(block).half()(x)
    assert y.dtype == torch.float16
    assert_matches_reference("y", y, expected, yardstick, terms=96)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_torchvision_shares_parameters_and_matches(backend):
    block = torchvision_block((24, 24, 1, 6)).eval()
    fused = InvertedResidual.from_torchvision(block)
    assert not fused.training
    assert list(fused.state_dict()) == list(block.state_dict())
    for (name, got), want in zip(fused.state_dict().items(), block.state_dict().values()):
        assert got.data_ptr() == want.data_ptr(), name
    x = random_tensor((1, 24, 9, 9), torch.float32, "nchw")
    with torch.no_grad(), on_backend(backend):
        y = fused(x)
        expected = block.double()(x.double())
    assert_matches_reference("y", y, expected, terms=144)
    assert y.is_contiguous()  # NCHW in, NCHW out


def assert_same_state(fused, reference, tolerance=1e-10):
    for (name, got), want in zip(fused.state_dict().items(), reference.state_dict().values()):
        if got.dtype == torch.int64:
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=name)


def train_and_compare(backend, fused, reference, in_channels, steps=("channels_last", "nchw"), hw=5):
    fused.train()
    reference.train()
    for step, layout in enumerate(steps):
        x = random_tensor((2, in_channels, hw, hw), torch.float64, layout).requires_grad_(True)
        with on_backend(backend):
            y = fused(x)
            grad_y = torch.randn_like(y)
            grads = torch.autograd.grad(y, [x, *fused.parameters()], grad_y)
        expected = reference(x)
        want = torch.autograd.grad(expected, [x, *reference.parameters()], grad_y)
        torch.testing.assert_close(y, expected, msg=f"step {step}: y")
        names = ["x"] + [name for name, _ in fused.named_parameters()]
        for name, got, expected_grad in zip(names, grads, want):
            torch.testing.assert_close(got, expected_grad, msg=f"step {step}: grad of {name}")
        assert_same_state(fused, reference)


@pytest.mark.parametrize("fused_training", [True, False], ids=["fused-training", "unfused-training"])
@pytest.mark.parametrize("config", [(8, 8, 1, 1), (4, 4, 1, 6), (4, 6, 2, 6)], ids=["t1", "t6-residual", "t6-s2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_matches_torchvision(backend, config, fused_training):
    """Two steps in float64 on 5x5 images (momentum 0.1, then the cumulative average; the
    training ops cost interpreter time per program): batch statistics, running statistics,
    num_batches_tracked, and every gradient, equal to torchvision's, on the fused training op
    (fastconv::inverted_residual_train; its triton forward takes no float64, so that one is
    tests/test_inverted_residual_train.py's, in float32) and on the unfused fallback."""
    block = torchvision_block(config, torch.float64)
    fused = InvertedResidual.from_torchvision(copy.deepcopy(block))
    fused.fused_training = fused_training
    train_and_compare(backend, fused, block, config[0], steps=("channels_last",))
    for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = None
    for bn in (m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = None
    train_and_compare(backend, fused, block, config[0], steps=("channel_slice",))
    assert int(fused.conv[-1].num_batches_tracked) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_fold_cache_follows_an_optimizer_step(backend):
    block = torchvision_block((8, 8, 1, 6))
    fused = InvertedResidual.from_torchvision(copy.deepcopy(block)).eval()
    x = random_tensor((1, 8, 7, 7), torch.float32, "channels_last")
    with torch.no_grad(), on_backend(backend):
        before = fused(x)
        assert torch.equal(fused(x), before)  # the cached fold, reused
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused.train()
    fused(random_tensor((2, 8, 7, 7), torch.float32, "channels_last")).square().sum().backward()
    optimizer.step()
    fused.eval()
    with torch.no_grad(), on_backend(backend):
        after = fused(x)
    block.load_state_dict(fused.state_dict())
    with torch.no_grad():
        expected = block.eval().double()(x.double())
    assert not torch.allclose(after, before)
    assert_matches_reference("y after the step", after, expected, terms=48)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_fine_tuning_gets_torchvision_s_gradients(backend):
    """Eval with parameters that want gradients: the fold is differentiated and the block runs
    on fastconv's unfused ops (the fused kernel has no backward yet)."""
    block = torchvision_block((4, 4, 1, 6), torch.float64).eval()
    fused = InvertedResidual.from_torchvision(copy.deepcopy(block))
    x = random_tensor((1, 4, 5, 5), torch.float64, "channels_last").requires_grad_(True)
    with on_backend(backend):
        y = fused(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *fused.parameters()])
    expected = block(x)
    torch.testing.assert_close(y, expected)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), [x, *block.parameters()])):
        torch.testing.assert_close(got, want)


# MobileNetV1 ---------------------------------------------------------------------------------


def eager_separable(block: DepthwiseSeparableConv2d) -> nn.Module:
    """The same modules (shared, not copied) run by eager PyTorch."""
    acts = {"relu6": nn.ReLU6, "relu": nn.ReLU, "silu": nn.SiLU, None: nn.Identity}

    class Eager(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_dw, self.bn1, self.conv_pw, self.bn2 = block.conv_dw, block.bn1, block.conv_pw, block.bn2

        def forward(self, x):
            h = acts[block.dw_activation]()(self.bn1(self.conv_dw(x)))
            h = acts[block.pw_activation]()(self.bn2(self.conv_pw(h)))
            return h + x if block.skip else h

    return Eager()


MOBILENET_V1 = {
    # (in, out, kernel, stride, dw_activation, pw_activation, skip): MobileNetV1's rows, narrowed
    # (its 512 and 1024 widths only cost interpreter time), timm's linear-pw variant and a skip.
    "32-64-s1": (32, 64, 3, 1, "relu6", "relu6", False),
    "64-128-s2": (64, 128, 3, 2, "relu6", "relu6", False),
    "48-48-s1-skip-linear": (48, 48, 3, 1, "relu", None, True),
    "24-40-k5-s2-silu": (24, 40, 5, 2, "silu", "silu", False),
}


def test_separable_state_dict_keys():
    assert list(DepthwiseSeparableConv2d(8, 16).state_dict()) == [
        "conv_dw.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
        "conv_pw.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked",
    ]  # fmt: skip


@pytest.mark.parametrize("case", list(MOBILENET_V1))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mobilenet_v1_blocks_in_eval(backend, case):
    c_in, c_out, k, stride, dw_act, pw_act, skip = MOBILENET_V1[case]
    block = DepthwiseSeparableConv2d(c_in, c_out, k, stride, dw_activation=dw_act, pw_activation=pw_act, skip=skip)
    block = randomise_batch_norms(block).to(DEVICE).eval()
    x = random_tensor((1, c_in, 9, 9), torch.float32, "channels_last")
    with torch.no_grad(), on_backend(backend):
        y = block(x)
        expected = eager_separable(copy.deepcopy(block).double())(x.double())
    assert_matches_reference("y", y, expected, terms=c_in)


@pytest.mark.parametrize("fused_training", [True, False], ids=["fused-training", "unfused-training"])
@pytest.mark.parametrize("case", ["64-128-s2", "48-48-s1-skip-linear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mobilenet_v1_training_matches_eager(backend, case, fused_training):
    c_in, c_out, k, stride, dw_act, pw_act, skip = MOBILENET_V1[case]
    c_in, c_out = c_in // 8, c_out // 8  # small widths suffice
    block = DepthwiseSeparableConv2d(c_in, c_out, k, stride, dw_activation=dw_act, pw_activation=pw_act, skip=skip)
    block = randomise_batch_norms(block).to(DEVICE, torch.float64)
    fused = copy.deepcopy(block)
    fused.fused_training = fused_training
    train_and_compare(backend, fused, eager_separable(block), c_in, steps=("channels_last", "nchw"))


def test_bad_module_arguments_named():
    with pytest.raises(ValueError, match="stride must be 1 or 2, as torchvision's InvertedResidual; got 3"):
        InvertedResidual(8, 8, 3, 6)
    with pytest.raises(ValueError, match="skip needs stride 1 and in_channels == out_channels; got stride 2"):
        DepthwiseSeparableConv2d(8, 8, stride=2, skip=True)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        DepthwiseSeparableConv2d(8, 8, kernel_size=4)


def test_symbolic_trace_records_one_node_and_torchscript_is_refused():
    """As every fastconv module (fastconv/nn/_fx.py): one opaque node under torch.fx."""
    from fastconv.nn import _fx

    block = InvertedResidual(8, 8, 1, 2).eval()
    graph = torch.fx.symbolic_trace(nn.Sequential(block))
    assert [n.target for n in graph.graph.nodes if n.op == "call_function"] == [_fx.opaque_call]
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), block(x))
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script"):
        torch.jit.script(DepthwiseSeparableConv2d(4, 4))
