"""fastconv.nn.DenseBlock and Transition against torchvision's _DenseBlock and _Transition, and
fastconv.models.densenet121 against torchvision's: outputs, gradients and running statistics in
train and eval, in float64 (random weights and BatchNorm statistics, odd sizes, batch 1 and 3);
dropout with torchvision's draw; the memory each keeps for backward, against depth.

The module tests run on the torch backend: the kernels' accuracy is test_dense_block.py's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.densenet import _DenseBlock, _Transition

import fastconv
from fastconv.nn import DenseBlock, Transition


@pytest.fixture(autouse=True)
def _torch_backend():
    with fastconv.use_backend("torch"):
        yield


def randomized(module: nn.Module) -> nn.Module:
    """Random BatchNorm affines and running statistics (fresh ones are 1/0 and would hide a swap)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(3)
    return module


def assert_same_step(fused: nn.Module, original: nn.Module, x: torch.Tensor, rtol=1e-9, atol=1e-10) -> None:
    """One forward and backward of each from x: outputs, input and parameter gradients, buffers."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = fused(x1), original(x2)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    weights = torch.randn_like(want)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=rtol, atol=atol)
    for (name, p), q in zip(fused.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(fused.named_buffers(), original.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def block_pair(layers=3, c0=5, bn_size=2, growth=3, drop_rate=0.0, momentum=0.1):
    original = randomized(_DenseBlock(layers, c0, bn_size, growth, drop_rate)).double()
    for m in original.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    fused = DenseBlock.from_torchvision(copy.deepcopy(original))
    return fused, original


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n, h, w", [(1, 7, 9), (3, 5, 5)])
def test_block_matches_torchvision(train, n, h, w):
    fused, original = block_pair()
    fused.train(train), original.train(train)
    assert list(fused.state_dict()) == list(original.state_dict())
    assert_same_step(fused, original, torch.randn(n, 5, h, w, dtype=torch.float64))


def test_block_matches_torchvision_channels_last_and_sliced_input():
    fused, original = block_pair()
    x = torch.randn(3, 9, 7, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)[:, 2:7]
    assert_same_step(fused, original, x)


def test_running_statistics_cumulative_average_and_several_steps():
    """momentum=None (the cumulative average, counted by num_batches_tracked) over three steps."""
    fused, original = block_pair(momentum=None)
    for _ in range(3):
        x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
        fused(x), original(x)
    for (name, b), c in zip(fused.named_buffers(), original.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_constructor_keys_match_torchvision_and_load_strictly():
    original = _DenseBlock(4, 16, 4, 8, 0.0)
    fused = DenseBlock(4, 16, 4, 8)
    assert list(fused.state_dict()) == list(original.state_dict())
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    fused.load_state_dict(original.state_dict(), strict=True)


def test_from_torchvision_shares_parameters():
    original = _DenseBlock(2, 4, 2, 2, 0.0)
    fused = DenseBlock.from_torchvision(original)
    assert fused.denselayer2.conv1.weight is original.denselayer2.conv1.weight
    assert fused.denselayer1.norm2.running_var is original.denselayer1.norm2.running_var


def test_dropout_draws_as_torchvision():
    """drop_rate > 0 in training: the same masks as torchvision's F.dropout from the same seed
    (F.dropout's bernoulli over the new features, layer by layer), so the same step."""
    fused, original = block_pair(drop_rate=0.4)
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    torch.manual_seed(7)
    x1 = x.clone().requires_grad_()
    got = fused(x1)
    torch.manual_seed(7)
    x2 = x.clone().requires_grad_()
    want = original(x2)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    new = got[:, 5:]
    assert 0.2 < (new == 0).double().mean().item() < 0.6  # about drop_rate of the new features dropped
    got.sum().backward(), want.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-10)
    fused.eval(), original.eval()
    torch.testing.assert_close(fused(x), original(x), rtol=1e-9, atol=1e-10)  # no dropout in eval


def test_mixed_batchnorm_modes_run_torchvision_s_computation():
    """A block whose BatchNorms are not all in one mode (one frozen BatchNorm while fine-tuning)
    is not fused, and is still exact."""
    fused, original = block_pair()
    fused.denselayer2.norm1.eval(), original.denselayer2.norm1.eval()
    assert fused._fused_mode() == "layers"
    assert_same_step(fused, original, torch.randn(2, 5, 6, 7, dtype=torch.float64))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_transition_matches_torchvision(train):
    original = randomized(_Transition(6, 3)).double().train(train)
    fused = Transition.from_torchvision(copy.deepcopy(original))
    assert list(fused.state_dict()) == list(original.state_dict())
    assert_same_step(fused, original, torch.randn(3, 6, 9, 7, dtype=torch.float64))


def test_bad_input_names_the_argument():
    block = DenseBlock(2, 5, 2, 3)
    with pytest.raises(ValueError, match=r"DenseBlock: x must have num_input_features=5 channels; got 4"):
        block(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"DenseBlock: x must be a 4-D tensor"):
        block(torch.randn(5, 5, 5))
    with pytest.raises(ValueError, match=r"DenseBlock: growth_rate must be an int >= 1; got 0"):
        DenseBlock(2, 5, 2, 0)
    with pytest.raises(ValueError, match=r"DenseBlock: num_layers must be an int >= 1; got 0"):
        DenseBlock(0, 5, 2, 3)
    with pytest.raises(ValueError, match=r"DenseBlock: drop_rate must be in \[0, 1\); got 1.5"):
        DenseBlock(2, 5, 2, 3, drop_rate=1.5)
    # The buffer's dtype is x's: parameters in another dtype are named, not silently cast.
    with pytest.raises(ValueError, match=r"conv1_weight\[0\] must have x's dtype torch.float64; got torch.float32"):
        block(torch.randn(2, 5, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"Transition: x must have num_input_features=6 channels; got 5"):
        Transition(6, 3)(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"layer 1: conv1 must be Conv2d"):
        tv = _DenseBlock(2, 4, 2, 2, 0.0)
        tv.denselayer1.conv1 = nn.Conv2d(4, 4, 1, bias=True)
        DenseBlock.from_torchvision(tv)


def test_torch_compile_fullgraph():
    fused, _ = block_pair()
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    for train in (False, True):
        fused.train(train)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(fused)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    fused.eval()
    compiled = torch.compile(fused, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), fused(x))


# Memory against depth ------------------------------------------------------------------------


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after one training forward: every saved tensor's
    storage, once (a view of a kept storage costs nothing more). The activation memory of a
    training step, which on a GPU is what peak memory grows with; counted here on the CPU."""
    storages = {}
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:  # weights are not activation memory
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.requires_grad_())
    return sum(storages.values())


def test_saved_memory_is_linear_in_depth_where_torchvision_s_is_quadratic():
    depths, c0, growth = (6, 12, 24, 48), 16, 8
    x = torch.randn(2, c0, 6, 6)
    ours, naive = [], []
    for layers in depths:
        torch.manual_seed(0)
        original = _DenseBlock(layers, c0, 4, growth, 0.0)
        ours.append(saved_bytes(DenseBlock.from_torchvision(copy.deepcopy(original)), x.clone()))
        naive.append(saved_bytes(original, x.clone()))
    # Per layer: the new channels and a bottleneck of 4*growth, against torchvision's three
    # tensors as wide as the prefix (its concatenation, BatchNorm and ReLU outputs).
    per_pixel_batch = 2 * 6 * 6 * 4  # float32 bytes per channel
    for layers, got in zip(depths, ours):
        assert got <= (c0 + layers * growth + layers * 4 * growth) * per_pixel_batch * 1.05 + 65536
    # The curve's shape: the depths double, so the increments between them grow 2x a step for
    # a linear curve and tend to 4x for a quadratic one (the linear term shows at small depth).
    def growth_of_increments(values):
        steps = [b - a for a, b in zip(values, values[1:])]
        return [b / a for a, b in zip(steps, steps[1:])]

    assert all(1.8 < r < 2.2 for r in growth_of_increments(ours)), ours
    assert all(r > 3.0 for r in growth_of_increments(naive)), naive
    assert ours[-1] < 0.25 * naive[-1]


# DenseNet121 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n, size", [(1, 67), (3, 45)])
def test_densenet121_matches_torchvision(n, size):
    """The whole model from torchvision's state_dict: eval, then a training step (outputs,
    gradients, running statistics), in float64. Batch 1 at 67x67 leaves block 4 a 2x2 map; batch
    3 at 45x45 a 1x1 map, three values a channel for its training BatchNorms."""
    torch.manual_seed(0)
    original = randomized(torchvision.models.densenet121(num_classes=10)).double()
    model = fastconv.models.densenet121(num_classes=10).double()
    model.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(n, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), original.eval()(x), rtol=1e-9, atol=1e-9)
    # Not 1e-9: at batch 1 the last blocks' training BatchNorms see 4 values a channel, which
    # amplifies float64 rounding (see test_optimize's DenseNet121 note); a wrong step is O(1) off.
    model.train(), original.train()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = model(x1), original(x2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    weights = torch.randn_like(want)
    (got * weights).sum().backward(), (want * weights).sum().backward()
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        error = (p.grad - q.grad).norm().item()
        assert error <= 1e-5 * q.grad.norm().item() + 1e-12, f"{name}: {error} of {q.grad.norm()}"
    for (name, b), c in zip(model.named_buffers(), original.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
