"""Inception's units (fastconv/nn/inception.py), AlexNet's and VGG-16's Conv2d -> ReLU runs, and
the conv shapes they bring (1x7/7x1, 1x3/3x1, 5x5, the 11x11 stride-4 stem):

* the shared 1x1 GEMM of a block's branches equals the separate convs, BatchNorm included, in
  eval and in training (each BatchNorm's batch statistics and running update);
* in eval without gradients every branch stores into its slice of the block's output: in a
  NaN-poisoned buffer, exactly what torch.cat would hold, and no aten.cat of activations;
* every block kind (GoogLeNet's Inception, InceptionA..E) against torchvision's, torch and
  Triton backends (Triton only on tiny shapes: its interpreter runs about 40 programs a second);
* fastconv::conv2d_out's epilogue, opcheck; the factorised and large kernels on both backends;
* what optimize refuses (hooks, subclasses) is reported; bad input names the argument.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastconv
from fastconv.nn import inception as fused_inception
from fastconv.nn.inception import BasicConv2d, InceptionBlock
from fastconv.nn.sequential import FusedSequential
from test_optimize import randomized

# The modules (torchvision.models.googlenet and .inception_v3 are also the builder functions' names).
tv_googlenet = importlib.import_module("torchvision.models.googlenet")
tv_inception = importlib.import_module("torchvision.models.inception")

# Each block kind at a small input: (constructor, input channels, spatial size).
BLOCKS = {
    "Inception": (lambda c: tv_googlenet.Inception(c, 8, 6, 8, 4, 8, 8), 12, 5),
    "InceptionA": (lambda c: tv_inception.InceptionA(c, pool_features=8), 12, 5),
    "InceptionB": (lambda c: tv_inception.InceptionB(c), 12, 7),
    "InceptionC": (lambda c: tv_inception.InceptionC(c, channels_7x7=8), 12, 5),
    "InceptionD": (lambda c: tv_inception.InceptionD(c), 12, 7),
    "InceptionE": (lambda c: tv_inception.InceptionE(c), 12, 3),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def block(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """torchvision's block with random weights and BatchNorm statistics, and an input for it."""
    make, channels, size = BLOCKS[kind]
    torch.manual_seed(seed)
    module = randomized(make(channels))
    with torch.no_grad():  # BasicConv2d's default init is not torchvision's model init: keep outputs near 1
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_((2.0 / m.weight[0].numel()) ** 0.5 / m.weight.std())
    return module, torch.randn(2, channels, size, size)


class AtenOps(TorchDispatchMode):
    """Records (op, output shape) of every aten op dispatched."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


# -- the shared 1x1 GEMM -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Inception", "InceptionA", "InceptionC", "InceptionD", "InceptionE"])
def test_shared_gemm_equals_the_separate_convs(kind):
    reference, x = block(kind)
    fused = InceptionBlock.from_torchvision(copy.deepcopy(reference))
    assert fused._shared == {
        "Inception": ["branch1", "branch2.0", "branch3.0"],
        "InceptionA": ["branch1x1", "branch5x5_1", "branch3x3dbl_1"],
        "InceptionC": ["branch1x1", "branch7x7_1", "branch7x7dbl_1"],
        "InceptionD": ["branch3x3_1", "branch7x7x3_1"],
        "InceptionE": ["branch1x1", "branch3x3_1", "branch3x3dbl_1"],
    }[kind]  # fmt: skip
    fused.eval(), reference.eval()
    with torch.no_grad():
        want = torch.cat([reference.get_submodule(n)(x) for n in fused._shared], 1)
        torch.testing.assert_close(fused._shared_forward(x, fused._shared), want, rtol=1e-5, atol=1e-5)
    # Training, float64: the GEMM's per-channel statistics are each BatchNorm's own.
    fused, reference, x = fused.double().train(), reference.double().train(), x.double()
    want = torch.cat([reference.get_submodule(n)(x) for n in fused._shared], 1)
    torch.testing.assert_close(fused._shared_forward(x, fused._shared), want, rtol=1e-10, atol=1e-10)
    for name in fused._shared:
        bn, ref = fused.get_submodule(name).bn, reference.get_submodule(name).bn
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
        assert bn.num_batches_tracked == ref.num_batches_tracked == 1


# -- each block against torchvision's ------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_branches_store_into_their_slices_of_the_output(kind, channels_last, monkeypatch):
    """Eval without gradients: the output buffer starts as NaN; what comes out is torch.cat's
    result to rounding, every element written, and no aten.cat run."""
    reference, x = block(kind)
    fused = InceptionBlock.from_torchvision(copy.deepcopy(reference)).eval()
    reference.eval()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    poisoned = []

    def nan_output(shape, like, dtype=None):
        layout = fastconv._geometry.output_memory_format(like)
        out = torch.empty(tuple(shape), dtype=dtype or like.dtype, memory_format=layout)
        poisoned.append(out)
        return out.fill_(float("nan"))

    monkeypatch.setattr(fused_inception, "empty_output", nan_output)
    with torch.no_grad():
        want = reference(x)
        fused(x)  # folds the BatchNorms (and concatenates the shared GEMM's weights) into the cache
        poisoned.clear()
        with AtenOps() as ops:
            got = fused(x)
    assert poisoned and got is poisoned[0]
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.ops.aten.cat.default not in [op for op, _ in ops.calls]
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_blocks_match_torchvision_in_eval_and_train_with_gradients(kind):
    reference, x = block(kind)
    fused = fastconv.optimize(reference)
    assert type(fused) is InceptionBlock and list(fused.state_dict()) == list(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)
    reference, fused, x = reference.double().train(), fused.double().train(), x.double().requires_grad_()
    want, got = reference(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(want)
    grads_want = torch.autograd.grad((want * weights).sum(), [x, *reference.parameters()])
    grads_got = torch.autograd.grad((got * weights).sum(), [x, *fused.parameters()])
    for (name, _), g, w in zip([("x", None), *reference.named_parameters()], grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    for (name, buffer), ref in zip(fused.named_buffers(), reference.buffers()):
        torch.testing.assert_close(buffer, ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


TRITON_SHAPES = {  # smaller still than BLOCKS: the interpreter runs ~40 programs a second. InceptionE's
    # fixed 320-448 channels took 66 s here; its 1x3/3x1 kernels are test_conv_shapes_through_the_implicit_gemm's.
    "Inception": (lambda: tv_googlenet.Inception(4, 4, 4, 4, 4, 4, 4), 4, 3),
    "InceptionC": (lambda: tv_inception.InceptionC(4, channels_7x7=4), 4, 3),
}


@pytest.mark.parametrize("kind", sorted(TRITON_SHAPES))
def test_triton_backend_tiny_blocks(kind):
    """The Triton kernels behind each store (conv2d_out's epilogue into a slice, the pointwise
    GEMM's out=, the shared GEMM's statistics in training), under the interpreter."""
    make, channels, size = TRITON_SHAPES[kind]
    torch.manual_seed(0)
    reference = randomized(make())
    x = torch.randn(2, channels, size, size)
    fused = InceptionBlock.from_torchvision(copy.deepcopy(reference))
    with torch.no_grad():
        want = reference.eval()(x)
        with fastconv.use_backend("triton"):
            got = fused.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    if kind == "Inception":  # channels_last: the stores into slices of a channels_last output
        with torch.no_grad(), fastconv.use_backend("triton"):
            got = fused.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    reference.train(), fused.train()
    want = reference(x)
    with fastconv.use_backend("triton"):
        got = fused(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    for buffer, ref in zip(fused.buffers(), reference.buffers()):
        torch.testing.assert_close(buffer, ref, rtol=1e-4, atol=1e-5)


# -- the conv shapes and conv2d_out's epilogue ------------------------------------------------------

# (C_in, C_out, kernel, stride, padding, H): InceptionC/E's factorised kernels, InceptionA's 5x5,
# AlexNet's 11x11 stride-4 stem, Inception-V3's unpadded stride-2 3x3.
SHAPES = [(3, 4, (1, 7), 1, (0, 3), 6), (3, 4, (7, 1), 1, (3, 0), 6), (3, 4, (1, 3), 1, (0, 1), 4),
          (3, 4, (3, 1), 1, (1, 0), 4), (3, 4, 5, 1, 2, 5), (3, 4, 11, 4, 2, 15), (3, 4, 3, 2, 0, 7)]  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[2]}s{s[3]}p{s[4]}")
def test_conv_shapes_through_the_implicit_gemm(shape, backend):
    c_in, c_out, kernel, stride, padding, size = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding)
    x = torch.randn(2, c_in, size, size)
    want = F.relu(conv.double()(x.double()))
    conv.float()
    from fastconv.ops.conv_bn_act import route

    assert route(c_in, conv.weight.shape, conv.stride, (1,) * 4, 1) == "gemm"
    with fastconv.use_backend(backend):
        got = FusedSequential(conv, nn.ReLU())(x)  # bias + ReLU in the epilogue
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conv2d_out_epilogue_into_a_slice(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    weight, bias = torch.randn(4, 3, 1, 7) / 5, torch.randn(4)
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    buffer = torch.randn(2, 9, 5, 6).contiguous(memory_format=torch.channels_last)
    before = buffer.clone()
    with fastconv.use_backend(backend):
        mean, var = torch.ops.fastconv.conv2d_out(x, weight, (1, 1), (0, 3, 0, 3), (1, 1), 1, False, buffer[:, 2:6],
                                                  bias, scale, shift, "relu")  # fmt: skip
    want = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), padding=(0, 3)) * scale.double().view(-1, 1, 1)
                  + shift.double().view(-1, 1, 1))  # fmt: skip
    torch.testing.assert_close(buffer[:, 2:6].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffer[:, :2], before[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(buffer[:, 6:], before[:, 6:], rtol=0, atol=0)
    assert mean.numel() == var.numel() == 0
    if backend == "torch":
        args = (x, weight, (1, 1), (0, 3, 0, 3), (1, 1), 1, False, buffer[:, 2:6].clone(), bias, scale, shift, "relu")
        torch.library.opcheck(torch.ops.fastconv.conv2d_out.default, args)
    with pytest.raises(ValueError, match=r"compute_stats takes no bias or epilogue.*activation='relu'"):
        torch.ops.fastconv.conv2d_out(x, weight, (1, 1), (0, 3, 0, 3), (1, 1), 1, True, buffer[:, 2:6], None, None,
                                      None, "relu")  # fmt: skip
    with pytest.raises(ValueError, match=r"shift must .*\(4,\).*got \(3,\)|shift.*4.*3"):
        torch.ops.fastconv.conv2d_out(x, weight, (1, 1), (0, 3, 0, 3), (1, 1), 1, False, buffer[:, 2:6], None, None,
                                      shift[:3], None)  # fmt: skip


def test_conv_relu_runs_train_with_gradients_on_triton():
    """AlexNet's Conv2d -> ReLU run fused (bias + ReLU epilogue) in training: the gradients of
    the weight, the bias and the input, on the Triton kernels."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                              nn.Conv2d(4, 4, 5, padding=2), nn.ReLU(inplace=True))  # fmt: skip
    fused = fastconv.optimize(reference)
    assert type(fused) is FusedSequential and list(fused.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    x = torch.randn(2, 3, 19, 19, requires_grad=True)
    want = reference(x)
    with fastconv.use_backend("triton"):
        got = fused(x)
        grads_got = torch.autograd.grad(got.square().sum(), [x, *fused.parameters()])
    grads_want = torch.autograd.grad(want.square().sum(), [x, *reference.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


# -- what optimize takes, keeps and refuses -----------------------------------------------------------


def test_basic_conv2d_keeps_its_modules_keys_and_eps():
    torch.manual_seed(0)
    reference = randomized(tv_inception.BasicConv2d(3, 5, kernel_size=(1, 7), padding=(0, 3)))
    conv, bn = reference.conv, reference.bn
    fused = fastconv.optimize(reference, inplace=True)
    assert type(fused) is BasicConv2d and fused.conv is conv and fused.bn is bn and fused.bn.eps == 0.001
    assert list(fused.state_dict()) == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                        "bn.num_batches_tracked"]  # fmt: skip
    x = torch.randn(2, 3, 6, 9)
    want = F.relu(F.batch_norm(F.conv2d(x, conv.weight, padding=(0, 3)), bn.running_mean, bn.running_var, bn.weight,
                               bn.bias, False, 0.0, 0.001))  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), want, rtol=1e-5, atol=1e-5)


def test_hooked_and_subclassed_blocks_are_left_alone_and_reported(capsys):
    class MyInceptionA(tv_inception.InceptionA):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(tv_inception.InceptionA(12, 8), MyInceptionA(288, 8))
    model[0].register_forward_hook(lambda *args: None)
    optimized = fastconv.optimize(model, verbose=True)
    printed = capsys.readouterr().out
    assert type(optimized[0]) is tv_inception.InceptionA and type(optimized[1]) is MyInceptionA
    assert "has a hook" in printed and "subclass of torchvision's InceptionA" in printed
    assert type(optimized[1].branch1x1) is BasicConv2d  # its convs fused one by one, its forward kept
    x = torch.randn(2, 288, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(optimized[1].eval()(x), model[1].eval()(x), rtol=1e-5, atol=1e-5)


def test_a_swapped_batchnorm_runs_unfused():
    """A BatchNorm swapped for another kind after optimize (a subclass, as SyncBatchNorm is) is
    run as it is, through torchvision's own dataflow and torch.cat."""

    class MyBatchNorm(nn.BatchNorm2d):
        pass

    reference, x = block("InceptionA")
    fused = InceptionBlock.from_torchvision(copy.deepcopy(reference)).eval()
    old = fused.branch5x5_1.bn
    new = MyBatchNorm(old.num_features, eps=old.eps)
    new.load_state_dict(old.state_dict())
    fused.branch5x5_1.bn = new
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["Inception", "InceptionA", "InceptionE"])
def test_from_torchvision_shares_parameters_and_leaves_the_block_as_it_was(kind):
    """The torchvision block keeps its own children (GoogLeNet's branch Sequentials included) and
    still computes what it did; the fused block shares every parameter and buffer."""
    reference, x = block(kind)
    before = {name: type(m) for name, m in reference.named_modules()}
    with torch.no_grad():
        want = reference.eval()(x)
    fused = InceptionBlock.from_torchvision(reference)
    assert {name: type(m) for name, m in reference.named_modules()} == before
    assert {id(t) for t in fused.state_dict(keep_vars=True).values()} == {
        id(t) for t in reference.state_dict(keep_vars=True).values()}  # fmt: skip
    assert list(fused.state_dict()) == list(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reference(x), want, rtol=0, atol=0)
        torch.testing.assert_close(fused.eval()(x), want, rtol=1e-4, atol=1e-4)


def test_bad_input_names_the_argument():
    reference, x = block("InceptionA")
    fused = InceptionBlock.from_torchvision(copy.deepcopy(reference))
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor \(N, C, H, W\); got torch.Size\(\[12, 5, 5\]\)"):
        fused(x[0])
    with pytest.raises(ValueError, match=r"kind must be one of \[.*'InceptionA'.*\]; got 'InceptionZ'"):
        InceptionBlock("InceptionZ", {})
    with pytest.raises(ValueError, match=r"block must be torchvision's Inception or InceptionA..E.*got torch.nn"):
        InceptionBlock.from_torchvision(nn.Sequential())
    with pytest.raises(ValueError, match=r"children\['branch1x1'\] must be a fastconv BasicConv2d .*; got Conv2d"):
        InceptionBlock("InceptionA", {**dict(fused.named_children()), "branch1x1": nn.Conv2d(12, 64, 1)})
    with pytest.raises(ValueError, match=r"children\['branch3x3'\] must be a fastconv BasicConv2d .*; got no such child"):
        InceptionBlock("InceptionB", {})
    with pytest.raises(ValueError, match=r"bn must be an nn.BatchNorm2d, not a subclass.*SyncBatchNorm"):
        BasicConv2d.from_modules(nn.Conv2d(3, 4, 1, bias=False), nn.SyncBatchNorm(4))
    with pytest.raises(ValueError, match=r"bn.num_features must equal conv.out_channels=4; got 5"):
        BasicConv2d.from_modules(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(5))


@pytest.mark.parametrize("kind", ["Inception", "InceptionA", "InceptionB"])
def test_autocast_gives_eager_dtypes_and_values(kind):
    """CPU bfloat16 autocast (torch backend: the interpreter's bfloat16 dots are not exact): the
    output dtype is eager's (bfloat16, or float32 where InceptionB's max-pool branch of a float32
    x makes torch.cat promote), the values eager's within bfloat16 rounding."""
    reference, x = block(kind)
    fused = InceptionBlock.from_torchvision(copy.deepcopy(reference)).eval()
    reference.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), fastconv.use_backend("torch"):
        want, got = reference(x), fused(x)
    assert got.dtype == want.dtype == (torch.float32 if kind == "InceptionB" else torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_conv_act_backward_reads_the_output_instead_of_recomputing(activation):
    """conv2d_bn_act with only an activation (AlexNet's conv + bias + ReLU): the backward takes the
    ReLU's derivative from y, 0 at and beyond the kinks as torch's, and runs no second conv forward."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # some outputs exactly on the kinks (c == 0, c == 6)
        weight[0].zero_(), bias[0].zero_()
        weight[1].zero_(), bias[1].fill_(6.0)
    act = torch.relu if activation == "relu" else F.relu6
    want = act(F.conv2d(x, weight, bias, padding=1))
    with fastconv.use_backend("torch"):
        y = torch.ops.fastconv.conv2d_bn_act(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1, None, None, activation)
        g = torch.randn_like(y)
        with AtenOps() as ops:
            got = torch.autograd.grad(y, [x, weight, bias], g)
    ran = [op for op, _ in ops.calls]
    assert torch.ops.fastconv.conv2d_bn_act.default not in ran and torch.ops.aten.convolution.default not in ran
    assert torch.ops.aten.convolution_backward.default in ran  # the recording sees the backward's ops
    for a, b in zip(got, torch.autograd.grad(want, [x, weight, bias], g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_dynamo_sees_no_graph_break_and_an_empty_batch_runs():
    reference, x = block("InceptionA")
    fused = InceptionBlock.from_torchvision(copy.deepcopy(reference)).eval()
    with torch.no_grad():
        assert fused(x[:0]).shape == reference.eval()(x[:0]).shape == (0, 232, 5, 5)
        assert torch._dynamo.explain(fused)(x).graph_break_count == 0  # the stores into the output
    assert torch._dynamo.explain(fused.train())(x).graph_break_count == 0  # the shared GEMM's statistics


def test_feature_extraction_traces_a_fused_googlenet():
    """torchvision's create_feature_extractor (torch.fx) on an optimized GoogLeNet: each fastconv
    module one node, the features those of the original."""
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    original = randomized(torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                                        num_classes=10)).eval()  # fmt: skip
    nodes = {"inception3b": "a", "inception4e": "b"}
    extractor = create_feature_extractor(fastconv.optimize(original), nodes)
    want = create_feature_extractor(original, nodes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, expected = extractor(x), want(x)
    for key in nodes.values():
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


def test_export_and_compile_keep_the_stores_into_the_output():
    """torch.export under no_grad: the graph stores with conv2d_out / pointwise_conv2d_out and
    concatenates no activation; torch.compile(fullgraph=True) runs the block (12 s of Inductor here)."""
    reference, x = block("InceptionA")
    fused = InceptionBlock.from_torchvision(copy.deepcopy(reference)).eval()
    reference.eval()
    with torch.no_grad():
        want = reference(x)
        program = torch.export.export(fused, (x,))
        targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
        assert "fastconv.conv2d_out.default" in targets and "fastconv.pointwise_conv2d_out.default" in targets
        # The folds (and the shared GEMM's weight concatenation) are in the graph; no activation's cat.
        cats = [tuple(node.meta["val"].shape) for node in program.graph.nodes if str(node.target) == "aten.cat.default"]
        assert not [shape for shape in cats if shape[0] == x.shape[0]]
        torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.compile(fused, fullgraph=True)(x), want, rtol=1e-5, atol=1e-5)
