"""fastconv::inverted_residual_train, the MobileNet blocks' fused training op: outputs, every
gradient and the running statistics against float64 torchvision / eager blocks, the Triton
forward (its statistics pass and the fused kernel) in float32 and float16, gradcheck and
opcheck, the activation memory kept for backward (about 1/t of the unfused chain's), batch
edge cases and bad input named. The module tests (test_inverted_residual_module.py) run the
same modules' training in float64 on the torch backend, fused and unfused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual as TorchvisionBlock

import fastconv
from fastconv.nn.inverted_residual import DepthwiseSeparableConv2d, InvertedResidual
from harness import DEVICE, assert_matches_reference, on_backend, random_tensor
from test_inverted_residual_module import eager_separable, randomise_batch_norms

BACKENDS = ["torch", "triton", "triton:tiled"]  # triton:tiled: the fused forward's tiled kernel (harness.on_backend)
# (inp, oup, stride, expand_ratio, size): residual, stride 2 on an odd size, no expansion.
BLOCKS = {"t6-residual": (8, 8, 1, 6, 7), "t6-s2-odd": (8, 12, 2, 6, 9), "t1": (8, 4, 1, 1, 5)}


def _grads(module: nn.Module, x: torch.Tensor, grad_y=None, backend: str = "torch"):
    """(y, grad_y, the gradients of x and of every parameter) of one forward and backward;
    grad_y fresh random when not given."""
    with on_backend(backend):
        y = module(x)
        grad_y = torch.randn_like(y) if grad_y is None else grad_y.to(y.dtype)
        grads = torch.autograd.grad(y, [x, *module.parameters()], grad_y)
    return y, grad_y, grads


def _compare_training(backend, fused, reference, x, dtype):
    """One training step of fused (in dtype, on backend) against reference in float64:
    output, every gradient, every running statistic."""
    want, grad_y, want_grads = _grads(reference, x.detach().double().requires_grad_())
    y, _, grads = _grads(fused, x.detach().to(dtype).requires_grad_(), grad_y, backend)
    names = ["x"] + [name for name, _ in fused.named_parameters()]
    assert_matches_reference("y", y, want, terms=64)
    for name, got, expected in zip(names, grads, want_grads):
        assert_matches_reference(f"grad {name}", got, expected, terms=2 * x.numel())
    for (name, got), expected in zip(fused.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "channel_slice"])
@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inverted_residual_training_matches_torchvision_in_float64(backend, block, layout):
    inp, oup, stride, t, size = BLOCKS[block]
    reference = randomise_batch_norms(TorchvisionBlock(inp, oup, stride, t)).to(DEVICE, torch.float64).train()
    fused = InvertedResidual.from_torchvision(copy.deepcopy(reference)).float().train()
    assert fused.fused_training
    x = random_tensor((2, inp, size, size), torch.float32, layout)
    _compare_training(backend, fused, reference, x, torch.float32)


@pytest.mark.parametrize("skip", [False, True], ids=["relu-relu", "skip"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_separable_training_matches_eager_in_float64(backend, skip):
    block = DepthwiseSeparableConv2d(8, 8 if skip else 12, 3, 1 if skip else 2, dw_activation="relu",
                                     pw_activation="relu6", skip=skip)  # fmt: skip
    block = randomise_batch_norms(block).to(DEVICE).train()
    reference = eager_separable(copy.deepcopy(block).double())
    _compare_training(backend, block, reference, random_tensor((2, 8, 7, 7), torch.float32, "channels_last"),
                      torch.float32)  # fmt: skip


def test_half_precision_training_within_twice_pytorch_s_error():
    """float16 on the Triton forward (SiLU: no kink for a rounding to land on): the output and
    the input's gradient within twice torchvision's own float16 block's error against float64."""
    reference = TorchvisionBlock(16, 16, 1, 4, norm_layer=nn.BatchNorm2d)
    for unit in reference.conv[:2]:
        unit[2] = nn.SiLU()
    reference = randomise_batch_norms(reference).to(DEVICE).train()
    fused = InvertedResidual(16, 16, 1, 4, activation="silu").to(DEVICE).train()
    fused.load_state_dict(reference.state_dict())
    fused.half()
    x = random_tensor((2, 16, 7, 7), torch.float16, "channels_last").requires_grad_()
    grad_y = random_tensor((2, 16, 7, 7), torch.float16, "channels_last")
    y, _, (grad_x, *_) = _grads(fused, x, grad_y, "triton")
    want, _, (want_x, *_) = _grads(copy.deepcopy(reference).double(), x.detach().double().requires_grad_(), grad_y)
    yard, _, (yard_x, *_) = _grads(copy.deepcopy(reference).half(), x.detach().clone().requires_grad_(), grad_y)
    assert y.dtype == grad_x.dtype == torch.float16
    assert_matches_reference("y", y, want, yard, terms=64)
    assert_matches_reference("grad x", grad_x, want_x, yard_x, terms=2 * x.numel())


@pytest.mark.parametrize("expand", [True, False])
def test_gradcheck_in_float64(expand):
    torch.manual_seed(0)
    c, hidden = 3, (6 if expand else 3)
    x = torch.randn(2, c, 5, 5, dtype=torch.float64).requires_grad_()
    weights = [torch.randn(hidden, c, 1, 1, dtype=torch.float64).requires_grad_() if expand else None,
               torch.randn(hidden, 1, 3, 3, dtype=torch.float64).requires_grad_(),
               torch.randn(c, hidden, 1, 1, dtype=torch.float64).requires_grad_()]  # fmt: skip
    norms = [torch.rand(n, dtype=torch.float64).add_(0.5).requires_grad_() if i % 2 == 0 else
             torch.randn(n, dtype=torch.float64).requires_grad_() for i, n in enumerate([hidden] * 4 + [c] * 2)]  # fmt: skip
    if not expand:
        norms[:2] = [None, None]
    activations = ("silu" if expand else None, "silu", "hardswish")

    def block(x, *tensors):
        w, n = list(tensors[:3]), list(tensors[3:])
        return fastconv.inverted_residual_train(x, *w, n, stride=2, activations=activations, use_residual=False)[0]

    with fastconv.use_backend("torch"):
        assert torch.autograd.gradcheck(block, (x, *weights, *norms), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("expand", [True, False])
def test_opcheck(expand):
    torch.manual_seed(0)
    hidden = 12 if expand else 4
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    args = [x, torch.randn(hidden, 4, 1, 1, requires_grad=True) if expand else None,
            torch.randn(hidden, 1, 3, 3, requires_grad=True), torch.randn(4, hidden, 1, 1, requires_grad=True),
            (1, 1), (1, 1, 1, 1), (1, 1)]  # fmt: skip
    norms = [torch.rand(n).add_(0.5).requires_grad_() for n in [hidden] * 4 + [4] * 2]
    if not expand:
        norms[:2] = [None, None]
    args += [*norms, 1e-5, "relu6" if expand else None, "relu6", None, True]
    with fastconv.use_backend("torch"):
        torch.library.opcheck(torch.ops.fastconv.inverted_residual_train.default, args)


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward of one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


@pytest.mark.parametrize("kernel", ["gather", "tiled"])
@pytest.mark.parametrize("n, size, stride, k", [(2, 11, 1, 3), (1, 13, 2, 5)], ids=["s1-k3", "s2-k5"])
def test_hidden_statistics_of_both_kernels_match_float64(kernel, n, size, stride, k, monkeypatch):
    """The training forward's statistics pass (the depthwise output's batch mean and variance,
    never stored) against float64, on both Triton kernels, with the tiled kernel's GPU default
    tile (8x8: ragged tiles in both directions, more tiles than the interpreter's 4 programs, so
    each program merges several into its row) and a ragged hidden chunk."""
    from fastconv.triton_kernels import inverted_residual as kernels
    from fastconv.triton_kernels import inverted_residual_tiled as tiled

    if kernel == "tiled":
        tuner = tiled.hidden_stats_tiled
        default = tuner.all_configs[1] if len(tuner.all_configs) > 1 and fastconv.backends.interpreting() else tuner.all_configs[0]
        monkeypatch.setattr(tuner, "configs", [default])
    monkeypatch.setenv("FASTCONV_FUSED_BLOCK_KERNEL", kernel)
    c_in, c_hid, pad = 12, 40, k // 2
    x = random_tensor((n, c_in, size, size), torch.float32, "channels_last")
    we, be = torch.randn(c_hid, c_in, device=DEVICE) / c_in**0.5, torch.randn(c_hid, device=DEVICE) * 0.5 + 0.5
    wd = torch.randn(c_hid, k * k, device=DEVICE) / k
    ho = (size + 2 * pad - k) // stride + 1
    mean, var = kernels.hidden_statistics(x, we, be, wd, (k, k), stride, (pad, pad), (ho, ho), 1, 2)  # relu6
    e = F.relu6(F.conv2d(x.double(), we.double()[:, :, None, None]) + be.double()[None, :, None, None])
    d = F.conv2d(e, wd.double().view(c_hid, 1, k, k), stride=stride, padding=pad, groups=c_hid)
    want_var, want_mean = torch.var_mean(d, dim=(0, 2, 3), correction=0)
    assert_matches_reference("mean", mean, want_mean, terms=k * k * c_in)
    assert_matches_reference("var", var, want_var, terms=k * k * c_in)


def test_kept_activation_memory_is_under_one_over_t():
    """24 -> 144 -> 24 (t = 6): the fused op keeps x, the pre-BatchNorm projection, the weights
    and the statistics; the unfused chain keeps four 144-wide tensors besides."""
    block = randomise_batch_norms(InvertedResidual(24, 24, 1, 6)).to(DEVICE).train()
    x = random_tensor((2, 24, 16, 16), torch.float32, "channels_last").requires_grad_()
    fused = _saved_bytes(block, x)
    block.fused_training = False
    unfused = _saved_bytes(block, x)
    assert fused < unfused / 6, (fused, unfused)
    activations = 2 * x.numel() * 4  # x and p
    assert fused < activations * 1.5, fused


def test_batch_edge_cases():
    block = InvertedResidual(4, 4, 1, 6).to(DEVICE).train()
    assert block(torch.randn(0, 4, 5, 5, device=DEVICE)).shape == (0, 4, 5, 5)  # as torchvision's
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        block(torch.randn(1, 4, 1, 1, device=DEVICE))
    # Mixed BatchNorm modes take the unfused path, exactly.
    reference = randomise_batch_norms(TorchvisionBlock(4, 4, 1, 6)).to(DEVICE).train()
    fused = InvertedResidual.from_torchvision(copy.deepcopy(reference))
    reference.conv[0][1].eval()
    fused.conv[0][1].eval()
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    torch.testing.assert_close(fused(x), reference(x))


def test_autocast_casts_the_convs_not_the_norms():
    x = torch.randn(2, 4, 5, 5)
    weights = [torch.randn(12, 4, 1, 1), torch.randn(12, 1, 3, 3), torch.randn(4, 12, 1, 1)]
    norms = [torch.ones(12), torch.zeros(12), torch.ones(12), torch.zeros(12), torch.ones(4), torch.zeros(4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, p, *stats = torch.ops.fastconv.inverted_residual_train(
            x, *weights, (1, 1), (1, 1, 1, 1), (1, 1), *norms, 1e-5, "relu6", "relu6", None, True)  # fmt: skip
    assert y.dtype == p.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in stats)


def test_bad_input_is_named():
    x = torch.randn(2, 4, 5, 5)
    we, wd, wp = torch.randn(12, 4, 1, 1), torch.randn(12, 1, 3, 3), torch.randn(4, 12, 1, 1)
    norms = [torch.ones(12), torch.zeros(12), torch.ones(12), torch.zeros(12), torch.ones(4), torch.zeros(4)]
    with pytest.raises(ValueError, match=r"dw_norm_weight must have shape \(12,\), one value per hidden channel; got \(4,\)"):
        fastconv.inverted_residual_train(x, we, wd, wp, norms[:2] + [torch.ones(4)] + norms[3:])
    with pytest.raises(ValueError, match=r"project_norm_bias must have shape \(4,\), one value per output channel"):
        fastconv.inverted_residual_train(x, we, wd, wp, norms[:5] + [torch.zeros(12)])
    with pytest.raises(ValueError, match=r"dw_weight.shape\[0\] must equal expand_weight's output channels 12; got 8"):
        fastconv.inverted_residual_train(x, we, torch.randn(8, 1, 3, 3), wp, norms)
    with pytest.raises(ValueError, match=r"use_residual needs the output's shape \(2, 4, 3, 3\) to equal x's"):
        fastconv.inverted_residual_train(x, we, wd, wp, norms, stride=2, use_residual=True)
    with pytest.raises(ValueError, match=r"expand_norm_weight must be None when expand_weight is None"):
        fastconv.inverted_residual_train(x, None, torch.randn(4, 1, 3, 3), wp[:, :4], [torch.ones(4)] + [None] * 5,
                                         activations=(None, "relu6", None))  # fmt: skip
    with pytest.raises(ValueError, match=r"eps must be a float > 0; got 0.0"):
        fastconv.inverted_residual_train(x, we, wd, wp, norms, eps=0)
    with pytest.raises(ValueError, match=r"norms must hold 6 entries"):
        fastconv.inverted_residual_train(x, we, wd, wp, norms[:4])
    with pytest.raises(ValueError, match=r"at least one output pixel per channel"):
        fastconv.inverted_residual_train(torch.randn(0, 4, 5, 5), we, wd, wp, norms)


def test_torch_compile_fullgraph_trains():
    block = randomise_batch_norms(InvertedResidual(4, 4, 1, 6)).train()
    reference = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 5, 5).requires_grad_()
    y = compiled(x)
    y.square().sum().backward()
    want = reference(x.detach())
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(block.conv[0][0].weight.grad, torch.autograd.grad(
        F.mse_loss(reference(x.detach()), torch.zeros_like(want), reduction="sum"), reference.conv[0][0].weight)[0])  # fmt: skip
