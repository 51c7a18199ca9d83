"""The classic CNN line through fastconv: AlexNet, VGG-16 (with and without BatchNorm), GoogLeNet
and Inception-V3.

* fastconv.optimize(torchvision's model) computes what the model computes, in eval (both the
  no-grad path that stores into the concatenation buffers and the differentiable one) and in
  training, with the same gradients and BatchNorm updates;
* fastconv.models.X loads torchvision's state_dict with strict=True and computes the same.

Random init with random BatchNorm statistics; fp32 on the CPU, inputs 2x3x64x64 (75x75 for
Inception-V3, its smallest). AlexNet's and VGG's 4096-wide Linears (55M and 120M parameters,
which optimize leaves as they are) are narrowed to 64 in the optimize tests: their float64
copies would take gigabytes and most of the time, and test nothing of fastconv's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fastconv
import fastconv.models
from fastconv.nn.inception import BasicConv2d, InceptionBlock
from fastconv.nn.sequential import FusedSequential
from test_optimize import bn_outside_fastconv, randomized, run

MODELS = ["alexnet", "vgg16", "googlenet", "inception_v3"]
SIZE = {"inception_v3": 75}


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions: one thread runs them several times faster than an oversubscribed
    pool beside other test workers (tests/test_amp_convergence.py measured 8x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchvision_model(name: str, **kwargs) -> nn.Module:
    """torchvision's model with random weights (weights=None), its own init, no aux heads."""
    if name in ("googlenet", "inception_v3"):
        kwargs = dict(aux_logits=False, init_weights=True, **kwargs)  # init_weights: no FutureWarning
    return getattr(torchvision.models, name)(weights=None, **kwargs)


def _narrow_classifier(model: nn.Module) -> None:
    """AlexNet's and VGG's classifier with its 4096-wide hidden Linears 64 wide (see the docstring)."""
    linears = [i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear)]
    for i in linears:
        old = model.classifier[i]
        model.classifier[i] = nn.Linear(old.in_features if i == linears[0] else 64, 64 if i != linears[-1] else 10)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision_model(name, num_classes=10)
    if name in ("alexnet", "vgg16", "vgg16_bn"):
        _narrow_classifier(model)
    if name == "inception_v3":  # std 0.1 convs grow the activations ~10x a block: keep them near 1
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.mul_((2.0 / m.weight[0].numel()) ** 0.5 / m.weight.std())
    return randomized(model)


def fused_kinds(model: nn.Module) -> set:
    return {type(m).__name__ for m in model.modules() if isinstance(m, (FusedSequential, BasicConv2d, InceptionBlock))}


@pytest.mark.parametrize("name", MODELS + ["vgg16_bn"])
def test_optimize_matches_torchvision_in_eval_and_train_with_gradients(name):
    original = build(name)
    optimized = fastconv.optimize(original)
    assert list(optimized.state_dict()) == list(original.state_dict())
    assert fused_kinds(optimized) == {
        "alexnet": {"FusedSequential"}, "vgg16": {"FusedSequential"}, "vgg16_bn": {"FusedSequential"},
        "googlenet": {"BasicConv2d", "InceptionBlock"}, "inception_v3": {"BasicConv2d", "InceptionBlock"},
    }[name]  # fmt: skip
    assert bn_outside_fastconv(optimized) == []
    size = SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size)
    original.eval(), optimized.eval()
    with torch.no_grad():
        want = original(x)
        tolerance = dict(rtol=1e-4, atol=1e-4 * want.abs().max().item())
        torch.testing.assert_close(optimized(x), want, **tolerance)  # the stores into the concat buffers
    torch.testing.assert_close(optimized(x), want, **tolerance)  # eval with gradients wanted: torch.cat
    # The training step in float64 on the torch backend (the kernels' accuracy is their own tests').
    original, optimized = original.double().train(), optimized.double().train()
    x = x.double()
    with fastconv.use_backend("torch"):
        reference, fused = copy.deepcopy(original), copy.deepcopy(optimized)
        want, got = run(reference, x), run(fused, x)  # the same dropout draws
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7 * want.abs().max().item())
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


@pytest.mark.parametrize("name", MODELS)
def test_models_load_torchvision_state_dict_strictly_and_match(name):
    torch.manual_seed(0)
    reference = randomized(torchvision_model(name, num_classes=10))
    model = getattr(fastconv.models, name)(num_classes=10)
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    size = SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = reference.eval()(x)
        torch.testing.assert_close(model.eval()(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        # Training in float64: Inception-V3's last blocks are 1x1 at 75x75, where a batch of 2
        # normalises two values each, ill-conditioned enough that fp32 rounding alone flips them.
        reference, model, x = reference.double(), model.double(), x.double()
        want = run(reference.train(), x)
        torch.testing.assert_close(run(model.train(), x), want, rtol=1e-6, atol=1e-7 * want.abs().max().item())
    for key, buffer in reference.named_buffers():
        torch.testing.assert_close(model.get_buffer(key), buffer, rtol=1e-6, atol=1e-9)
    # Nothing left for optimize: the model is fastconv's already.
    kinds = [type(m) for m in model.modules()]
    assert [type(m) for m in fastconv.optimize(model).modules()] == kinds


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_aux_logits_and_transform_input_as_torchvision(name):
    """The auxiliary heads (keys, training outputs) and transform_input, as torchvision's; the
    inputs are the size the auxiliary heads need (Inception-V3's: 299x299, its own)."""
    size = {"googlenet": 64, "inception_v3": 299}[name]
    torch.manual_seed(0)
    reference = randomized(getattr(torchvision.models, name)(weights=None, aux_logits=True, init_weights=True,
                                                               transform_input=True, num_classes=10))  # fmt: skip
    model = getattr(fastconv.models, name)(aux_logits=True, transform_input=True, num_classes=10)
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    # float64: training BatchNorms over batch 2 through Inception-V3's depth amplify float32
    # rounding past 1e-4 (seen on torch 2.11: 1.6e-5 against a 9e-6 tolerance).
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad(), fastconv.use_backend("torch"):
        want, got = run(reference.double().train(), x), run(model.double().train(), x)
    assert type(got).__name__ == type(want).__name__ and len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * w.abs().max().item())


def test_a_1x1_conv_classifier_head_runs_on_the_pointwise_gemm():
    """SqueezeNet's head (Dropout, 1x1 Conv2d, ReLU, global average pool): the conv + bias + ReLU
    run as the pointwise GEMM with its epilogue, in a FusedSequential with the same keys."""
    from fastconv.ops.conv_bn_act import route

    torch.manual_seed(0)
    original = torchvision.models.squeezenet1_1(weights=None, num_classes=10)
    optimized = fastconv.optimize(original)
    head = optimized.classifier
    assert type(head) is FusedSequential and list(head.state_dict()) == ["1.weight", "1.bias"]
    assert route(head[1].in_channels, head[1].weight.shape, head[1].stride, (0, 0, 0, 0), 1) == "pointwise"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = original.eval()(x)
        torch.testing.assert_close(optimized.eval()(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    original, optimized, x = original.double().train(), optimized.double().train(), x.double()
    want, got = run(original, x), run(optimized, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grads = dict(optimized.named_parameters())
    want_grads = torch.autograd.grad(want.square().sum(), list(original.parameters()))
    got_grads = torch.autograd.grad(got.square().sum(), [grads[k] for k, _ in original.named_parameters()])
    for (key, _), g, w in zip(original.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=lambda m: f"{key}: {m}")
