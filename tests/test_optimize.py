"""fastconv.optimize on torchvision models: the same outputs, gradients and BatchNorm updates in
eval and train, nothing fusable left behind, the per-kind converters as parts of its pipeline
in any order, idempotence, and what it refuses or leaves alone.

Random init with random BatchNorm statistics and affine parameters, so that the folds matter;
fp32 on the CPU (the `auto` backend runs the torch reference here), 2x3x64x64 inputs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools

import pytest
import torch
import torchvision
from torch import nn

import fastconv
from fastconv.nn import (
    BatchNormAct2d, ConvBNAct2d, DenseBlock, DepthwiseConv2d, InvertedResidual, PointwiseConv2d, ResNetBlock, Transition,
    convert_blocks,
    convert_conv_bn_act, convert_depthwise, convert_pointwise,
)  # fmt: skip
from fastconv.nn._pipeline import FUSED
from fastconv.nn.attribute_fusion import FoldedBatchNorm2d, FusedConv2d
from fastconv.nn.sequential import run_batchnorms

FASTCONV_OWNERS = FUSED + (BatchNormAct2d,)


def randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return model


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomized(getattr(torchvision.models, name)(num_classes=10))


def structure(model: nn.Module) -> list:
    """(path, class) of every module, and the ids of the parameters: what a conversion decides."""
    return [(name, type(module).__name__) for name, module in model.named_modules()]


def bn_outside_fastconv(model: nn.Module) -> list[str]:
    """Paths of the BatchNorms that no fastconv module owns."""
    found = []

    def visit(module, path):
        fused_runs = run_batchnorms(module)  # a FusedSequential's Conv2d -> BatchNorm2d runs
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, FASTCONV_OWNERS) or id(child) in fused_runs:
                continue
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                found.append(child_path)
            visit(child, child_path)

    visit(model, "")
    return found


def run(model: nn.Module, x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)  # the classifiers' dropout in training
    return model(x)


def verbose_output(model: nn.Module, **kwargs) -> tuple[nn.Module, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = fastconv.optimize(model, verbose=True, **kwargs)
    return result, buffer.getvalue()


MODELS = ["mobilenet_v2", "resnet18", "resnet50", "densenet121", "mobilenet_v3_small"]


@pytest.mark.parametrize("name", MODELS)
def test_optimize_matches_in_eval_and_train_with_gradients(name):
    """fp32 outputs in eval and train; then the training step in float64, where rounding cannot
    hide a wrong gradient: in fp32, BatchNorm biases whose exact gradient is 0 (those feeding a
    conv and a training BatchNorm, which removes any per-channel constant) carry only noise."""
    original = build(name)
    optimized = fastconv.optimize(original)
    assert list(optimized.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(optimized.eval()(x), original.eval()(x), rtol=1e-4, atol=1e-4)
        original.train(), optimized.train()
        torch.testing.assert_close(run(optimized, x), run(original, x), rtol=1e-4, atol=1e-4)
    # 32x32 in float64: the CPU's float64 convolutions' backward is slow at 64x64. On the torch
    # backend: this checks what the modules compute; the kernels' accuracy is their own tests'
    # (under the tests' TRITON_INTERPRET, `auto` may take Triton, whose float64 is not exact).
    original, optimized, x = original.double(), optimized.double(), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    optimized.load_state_dict(original.state_dict())  # the same statistics after the fp32 step's rounding
    with fastconv.use_backend("torch"):
        want, got = run(original, x), run(optimized, x)
    # Not bitwise: at batch 2 and 32x32 DenseNet121's last training BatchNorms see 2 values a
    # channel, and eager torchvision alone turns a 1e-15 relative change of x into 1.6e-8 of its
    # output (measured), so the fused stem's float64 rounding shows up amplified. A wrong fusion
    # is off by O(1).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(want)
    with fastconv.use_backend("torch"):
        (want * weights).sum().backward()
        (got * weights).sum().backward()
    grads = dict(optimized.named_parameters())
    scale = max(p.grad.norm().item() for p in original.parameters())
    for key, parameter in original.named_parameters():
        # Norm-wise per tensor: DenseNet121's random BatchNorms blow its stem's gradient up to
        # ~1e8, where the two BatchNorm backwards' cancellations differ elementwise in float64.
        # DenseNet121 alone gets 1e-3: its stem's exact unit (test_fused_sequential_gradients_are_exact)
        # sits below 120 training BatchNorms, which amplify rounding ~1e7 (see above): ~7e-4.
        error = (grads[key].grad - parameter.grad).norm().item()
        rtol = 1e-3 if name == "densenet121" else 1e-6
        assert error <= rtol * parameter.grad.norm().item() + 1e-9 * scale, f"{key}: {error} of {parameter.grad.norm()}"
    buffers = dict(optimized.named_buffers())
    for key, buffer in original.named_buffers():  # the training step's BatchNorm updates
        torch.testing.assert_close(buffers[key], buffer, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "googlenet"])
def test_frozen_batch_norms_stay_frozen(name):
    """Fine-tuning with frozen BatchNorms (detection backbones: model.train(), every BatchNorm
    .eval()): the optimised model keeps each BatchNorm's own mode, so it computes what the
    original does, running statistics untouched. A fused block's train(mode) once reset them."""
    original = build(name).train()
    for bn in (m for m in original.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.eval()
    optimized = fastconv.optimize(original)
    assert optimized.training
    modes = {key: m.training for key, m in optimized.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert modes and not any(modes.values()), [key for key, mode in modes.items() if mode]
    before = {key: b.clone() for key, b in optimized.named_buffers()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout masks (MobileNetV2's and GoogLeNet's classifiers)
        got = optimized(x)
        torch.manual_seed(1)
        torch.testing.assert_close(got, original(x), rtol=1e-4, atol=1e-4)
    for key, buffer in optimized.named_buffers():
        assert torch.equal(buffer, before[key]), f"{key} changed: a frozen BatchNorm updated its statistics"


@pytest.mark.parametrize("name, counts", [
    ("mobilenet_v2", {InvertedResidual: 17, ConvBNAct2d: 35}),
    ("resnet50", {ResNetBlock: 16, ConvBNAct2d: 4, FusedConv2d: 1, FoldedBatchNorm2d: 1}),
])  # fmt: skip
def test_no_batchnorm_of_an_optimized_model_is_left_outside_a_fastconv_module(name, counts):
    optimized = fastconv.optimize(build(name))
    assert bn_outside_fastconv(optimized) == []
    assert {kind: sum(type(m) is kind for m in optimized.modules()) for kind in counts} == counts
    # Inside the fused units every conv is a plain Conv2d: the unit's kernel runs it.
    assert not any(isinstance(m, (DepthwiseConv2d, PointwiseConv2d)) for m in optimized.modules())


def test_densenet_is_fused_whole():
    """Every dense block becomes a DenseBlock and every transition a Transition (the same keys);
    the stem (conv0, norm0, relu0 in the features Sequential) runs fused in a FusedSequential and
    norm5 with its ReLU is a BatchNormAct2d: no BatchNorm is left on its own."""
    optimized, printed = verbose_output(build("densenet121"))
    assert bn_outside_fastconv(optimized) == []
    kinds = {kind: sum(type(m) is kind for m in optimized.modules()) for kind in (DenseBlock, Transition, BatchNormAct2d)}
    assert kinds == {DenseBlock: 4, Transition: 3, BatchNormAct2d: 1}
    assert "features.denseblock1" in printed and "DenseBlock" in printed
    assert "left alone" not in printed  # its FusedSequential is fastconv's own, not a custom forward


def test_inplace_shares_parameters_and_an_optimizer_step_reaches_the_optimized_model():
    original = build("resnet18")
    parameters = list(original.parameters())
    optimizer = torch.optim.SGD(original.parameters(), lr=0.1)
    optimized = fastconv.optimize(original, inplace=True)
    assert optimized is original
    assert [id(p) for p in optimized.parameters()] == [id(p) for p in parameters]
    x = torch.randn(2, 3, 64, 64)
    optimized.eval()
    with torch.no_grad():
        before = optimized(x)
    reference = fastconv.optimize(copy.deepcopy(original))  # a copy of the pre-step weights
    optimized(x).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = optimized(x)
        torch.testing.assert_close(reference.eval()(x), before)
    assert not torch.allclose(after, before)  # the step reached the fused units (the fold cache refolded)


def test_not_inplace_leaves_the_model_untouched():
    original = build("mobilenet_v2")
    kinds = structure(original)
    optimized = fastconv.optimize(original)
    assert structure(original) == kinds
    assert not set(map(id, optimized.parameters())) & set(map(id, original.parameters()))


CONVERTERS = {
    "blocks": convert_blocks, "fuse": convert_conv_bn_act, "depthwise": convert_depthwise, "pointwise": convert_pointwise,
}  # fmt: skip


def orders():
    """Every order of the four converters, and some with repetitions."""
    names = list(CONVERTERS)
    yield from itertools.permutations(names)
    yield ("depthwise", "pointwise", "fuse", "depthwise", "blocks", "pointwise", "fuse")
    yield ("pointwise", "pointwise", "blocks", "blocks", "depthwise", "fuse", "fuse")


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50"])
def test_every_order_and_repetition_of_the_converters_gives_optimize(name):
    original = build(name).eval()
    want = fastconv.optimize(original)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = want(x)
    for i, order in enumerate(orders()):
        model = copy.deepcopy(original)
        for converter in order:
            model = CONVERTERS[converter](model)
        assert structure(model) == structure(want), order
        assert list(model.state_dict()) == list(original.state_dict())
        if i % 6 == 0:  # outputs for a few: the structure decides them
            with torch.no_grad():
                torch.testing.assert_close(model(x), expected)


def test_converters_never_undo_a_fusion():
    """The issue's case: convert_conv_bn_act then convert_depthwise/convert_pointwise (either
    order) used to leave ConvBNAct2d units whose conv was swapped, which ran unfused."""
    for order in itertools.permutations([convert_conv_bn_act, convert_depthwise, convert_pointwise]):
        model = build("mobilenet_v2")
        for converter in order:
            converter(model)
        units = [m for m in model.modules() if type(m) is ConvBNAct2d]
        assert len(units) == 35 and all(type(unit[0]) is nn.Conv2d for unit in units)


def test_a_fused_unit_with_a_swapped_conv_is_repaired():
    unit = ConvBNAct2d(8, 8, 3, groups=8)
    unit[0] = DepthwiseConv2d.from_conv(unit[0])  # by hand, as the old converters did
    weight = unit[0].weight
    model = fastconv.optimize(nn.Sequential(unit), inplace=True)
    assert type(model[0][0]) is nn.Conv2d and model[0][0].weight is weight


def test_optimize_is_idempotent():
    once = fastconv.optimize(build("mobilenet_v2"))
    twice, printed = verbose_output(once)
    assert structure(twice) == structure(once)
    assert "0 replaced" in printed
    resnet = fastconv.optimize(build("resnet50"))
    assert structure(fastconv.optimize(resnet)) == structure(resnet)


def test_bad_input_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"model must be an nn.Module; got builtins.int"):
        fastconv.optimize(3)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match=r"not a TorchScript module"):
        fastconv.optimize(torch.jit.script(conv))
    with pytest.raises(ValueError, match=r"not a torch.fx.GraphModule"):
        fastconv.optimize(torch.fx.symbolic_trace(conv))
    with pytest.raises(ValueError, match=r"inplace and verbose must be bools; got inplace='yes'"):
        fastconv.optimize(conv, inplace="yes")


def test_a_bare_pattern_is_replaced_as_a_whole():
    torch.manual_seed(0)
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6())).eval()
    optimized = fastconv.optimize(model)
    assert type(optimized) is ConvBNAct2d and optimized.activation == "relu6"
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(optimized(x), model(x))


def test_shared_submodules_work():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    model = randomized(nn.Sequential(block, nn.Conv2d(4, 4, 3, padding=1, groups=4), block)).eval()
    optimized = fastconv.optimize(model)
    assert optimized[0] is optimized[2] and type(optimized[0]) is ConvBNAct2d  # still one module
    assert type(optimized[1]) is DepthwiseConv2d
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(optimized(x), model(x))
    optimized.train(), model.train()
    torch.testing.assert_close(optimized(x), model(x))
    torch.testing.assert_close(optimized[0][1].running_mean, model[0][1].running_mean)


def test_hooks_and_custom_forwards_are_left_alone_and_reported():
    class Custom(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    hooked = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    calls = []
    hooked.register_forward_hook(lambda *args: calls.append(1))
    model = randomized(nn.Sequential(hooked, Custom(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))).eval()
    optimized, printed = verbose_output(model)
    assert type(optimized[0]) is nn.Sequential and type(optimized[1]) is Custom
    assert "has a hook" in printed and "Sequential subclass with its own forward" in printed
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(optimized(x), model(x))
    assert len(calls) == 2


def test_squeeze_excitation_is_reported():
    _, printed = verbose_output(build("mobilenet_v3_small"))
    assert "SqueezeExcitation" in printed and "squeeze-excitation: no fused kernel" in printed


def test_verbose_prints_the_table_and_the_channels_last_hint():
    model = build("resnet18")
    _, printed = verbose_output(model)
    assert "layer1.0  BasicBlock" in printed and "ResNetBlock" in printed
    assert "hint: the model is not channels_last" in printed
    _, printed = verbose_output(model.to(memory_format=torch.channels_last))
    assert "hint" not in printed


def test_channels_last_model_matches():
    original = build("mobilenet_v2").eval().to(memory_format=torch.channels_last)
    optimized = fastconv.optimize(original)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), original(x), rtol=1e-4, atol=1e-4)


def test_from_modules_refuse_what_they_cannot_honour():
    bn_act = BatchNormAct2d(4, "relu6")
    with pytest.raises(ValueError, match=r"bn must be an nn.BatchNorm2d, not a subclass.*BatchNormAct2d"):
        BatchNormAct2d.from_modules(bn_act)
    with pytest.raises(ValueError, match=r"bn must be an nn.BatchNorm2d, not a subclass.*BatchNormAct2d"):
        ConvBNAct2d.from_modules(nn.Conv2d(3, 4, 3), bn_act)

    class SameConv(nn.Conv2d):  # timm's Conv2dSame: its own forward (dynamic padding)
        pass

    with pytest.raises(ValueError, match=r"conv must be an nn.Conv2d .*not a subclass.*SameConv"):
        ConvBNAct2d.from_modules(SameConv(3, 4, 3), nn.BatchNorm2d(4))
    depthwise = DepthwiseConv2d(4, 4, 3, groups=4)
    unit = ConvBNAct2d.from_modules(depthwise, nn.BatchNorm2d(4), nn.ReLU())
    assert type(unit[0]) is nn.Conv2d and unit[0].weight is depthwise.weight


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50"])
def test_torch_compile_fullgraph_has_no_graph_breaks(name):
    if name == "mobilenet_v2":
        model, x = fastconv.optimize(build(name).features[:4]).eval(), torch.randn(2, 3, 32, 32)
    else:  # a Bottleneck with its downsample, and the stem's fused conv
        resnet = fastconv.optimize(build(name))
        model, x = nn.Sequential(resnet.conv1, resnet.bn1, resnet.layer1[0]).eval(), torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_timm_batchnormact_is_refused_not_dropped():
    timm = pytest.importorskip("timm")
    bn = timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU6)
    with pytest.raises(ValueError, match=r"not a subclass"):
        BatchNormAct2d.from_modules(bn)


@pytest.mark.parametrize("name, expected", [
    ("mobilenet_v2", {"aten.relu.default": 0, "aten.hardtanh.default": 0}),
    # Bottleneck: conv3's epilogue adds the shortcut and applies the ReLU (no aten.relu left).
    ("resnet50", {"aten.relu.default": 0, "fastconv.pointwise_conv2d.default": 33}),
    # BasicBlock: conv2's (3x3) implicit GEMM adds the shortcut and applies the ReLU.
    ("resnet18", {"aten.relu.default": 0, "fastconv.conv2d_bn_act.default": 20}),
])  # fmt: skip
def test_exported_eval_graph_has_no_batch_norm_left(name, expected):
    """The fusions are taken, not only installed: the issue's converters left 51 aten.batch_norm
    in an exported MobileNetV2."""
    model = fastconv.optimize(build(name)).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if "batch_norm" in t]
    assert {op: targets.count(op) for op in expected} == expected


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["BasicBlock", "Bottleneck"])
def test_resnet_block_in_eval_has_torchvision_gradients(kind, backend):
    """Frozen-BatchNorm fine-tuning (detection backbones train so): in eval the last conv's
    epilogue adds the shortcut before the ReLU, and its backward must give torchvision's
    gradients for x, every weight and every BatchNorm affine, shortcut included."""
    torch.manual_seed(0)
    block_class = getattr(torchvision.models.resnet, kind)
    downsample = nn.Sequential(nn.Conv2d(8, 4 * block_class.expansion, 1, 2, bias=False),
                               nn.BatchNorm2d(4 * block_class.expansion))  # fmt: skip
    block = randomized(block_class(8, 4, stride=2, downsample=downsample)).double().eval()
    fused = ResNetBlock.from_torchvision(copy.deepcopy(block)).eval()
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    want = block(xs[0])
    with fastconv.use_backend(backend):
        got = fused(xs[1])
        grad_y = torch.randn_like(want)
        got_grads = torch.autograd.grad(got, [xs[1], *fused.parameters()], grad_y)
    want_grads = torch.autograd.grad(want, [xs[0], *block.parameters()], grad_y)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    names = ["x"] + [name for name, _ in block.named_parameters()]
    for name, g, w in zip(names, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9, msg=lambda m: f"grad of {name}: {m}")


def test_resnet_block_with_a_swapped_child_runs_its_children_as_they_are():
    """A child of another kind (as SyncBatchNorm under DDP): torchvision's order, nothing dropped."""
    torch.manual_seed(0)
    block = randomized(torchvision.models.resnet.Bottleneck(16, 4)).eval()
    fused = ResNetBlock.from_torchvision(copy.deepcopy(block))
    block.bn2 = fused.bn2 = nn.GroupNorm(2, 4)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x))


def test_vgg_features_become_a_fused_sequential_with_the_same_keys():
    from fastconv.nn._pipeline import Report, convert, leftovers
    from fastconv.nn.sequential import FusedSequential

    torch.manual_seed(0)
    original = randomized(torchvision.models.vgg11_bn(num_classes=10))
    original.classifier = nn.Linear(512 * 7 * 7, 10)  # not 120M parameters to copy in every order
    optimized = fastconv.optimize(original)
    assert type(optimized.features) is FusedSequential
    assert list(optimized.state_dict()) == list(original.state_dict())
    report = Report()
    leftovers(optimized, report)
    assert not [row for row in report.skipped if "BatchNorm" in row[1]]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(optimized.eval()(x), original.eval()(x), rtol=1e-4, atol=1e-4)
    original.train(), optimized.train()
    want, got = run(original, x), run(optimized, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    weights = torch.randn_like(want)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    grads = dict(optimized.named_parameters())
    for key, parameter in original.named_parameters():
        torch.testing.assert_close(grads[key].grad, parameter.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{key}: {m}")
    for order in itertools.permutations(CONVERTERS):  # the converters' orders give the same model
        model = copy.deepcopy(original)
        for converter in order:
            model = CONVERTERS[converter](model)
        assert structure(model) == structure(optimized), order
    assert structure(convert(copy.deepcopy(optimized))) == structure(optimized)


def test_a_slice_of_a_fused_sequential_is_fused_and_runs():
    from fastconv.nn.sequential import FusedSequential

    optimized = fastconv.optimize(build("densenet121"))
    assert type(optimized.features) is FusedSequential and type(optimized.features[:4]) is FusedSequential
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(optimized.features[:4].eval()(x), build("densenet121").features[:4].eval()(x),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_fused_sequential_gradients_are_exact():
    torch.manual_seed(0)
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 4, 1))).double().train()  # fmt: skip
    optimized = fastconv.optimize(model)
    assert type(optimized).__name__ == "FusedSequential"
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with fastconv.use_backend("torch"):
        want, got = model(x), optimized(x)
        weights = torch.randn_like(want)
        (want * weights).sum().backward()
        (got * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for (key, p), q in zip(model.named_parameters(), optimized.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(optimized[1].running_var, model[1].running_var, rtol=1e-12, atol=1e-12)
