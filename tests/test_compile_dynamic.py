"""torch.compile(dynamic=True, fullgraph=True) of optimised models: one graph serves every
batch and image size (the fake implementations take symbolic sizes), in eval and in training
(the BatchNorm running updates included), and matches eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch._dynamo.utils import counters

import fastconv


def _models():
    torch.manual_seed(0)
    mobilenet = fastconv.optimize(torchvision.models.mobilenet_v2(num_classes=10).features[:5])
    return {"mobilenet_v2 blocks": (mobilenet, 3), "dense block": (fastconv.nn.DenseBlock(2, 8, 2, 4), 8)}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["mobilenet_v2 blocks", "dense block"])
def test_one_dynamic_graph_for_every_size(name, train):
    module, channels = _models()[name]
    module.train(train)
    eager = copy.deepcopy(module)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, dynamic=True, fullgraph=True, backend="eager")
    with fastconv.use_backend("torch"):
        for n, size in ((2, 32), (3, 40), (5, 24)):
            x = torch.randn(n, channels, size, size)
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for (key, got), want in zip(module.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("mode", ["default", "max-autotune"])
@pytest.mark.parametrize("name", ["mobilenet_v2 blocks", "dense block"])
def test_inductor_modes_compile_fullgraph_and_train(name, mode):
    """Inductor itself (not the eager backend), default and max-autotune, fullgraph: the eval
    output and a training step's output, input gradient and parameter gradients match eager.
    fastconv's ops stay opaque calls to Inductor; what it compiles and tunes is around them."""
    module, channels = _models()[name]
    eager = copy.deepcopy(module)
    torch._dynamo.reset()
    compiled = torch.compile(module, mode=mode, fullgraph=True)
    x = torch.randn(2, channels, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), rtol=1e-4, atol=1e-4)
    x.requires_grad_(True)
    y, want = compiled.train()(x), eager.train()(x)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    weights = torch.randn_like(want)
    grads = torch.autograd.grad((y * weights).sum(), [x, *module.parameters()])
    expected = torch.autograd.grad((want * weights).sum(), [x, *eager.parameters()])
    for got, wanted in zip(grads, expected):
        torch.testing.assert_close(got, wanted, rtol=1e-4, atol=1e-4)
