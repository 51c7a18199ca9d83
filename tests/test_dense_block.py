"""fastconv::dense_block_train and fastconv::dense_block_eval (the dense-block ops) against an
eager float64 DenseNet block: torch.cat, F.batch_norm, ReLU and F.conv2d per layer, as
torchvision computes it. The module tests (torchvision's _DenseBlock, running statistics,
memory) are in test_dense_block_module.py.

Sizes follow the interpreter's cost: each layer is about ten kernel launches forward and
backward, so blocks of 2-3 layers on 5x7 to 7x9 images, one to a few programs a launch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
from harness import DEVICE, assert_matches_reference, backends_under_test, on_backend, random_tensor, wide

BACKENDS = [b for b in backends_under_test() if b.id != "cuda"] + [
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(DEVICE != "cuda", reason="no CUDA device")])
]
EPS = 1e-5


def make(n=2, c0=3, layers=2, growth=2, bn_size=2, h=5, w=7, *, dtype=torch.float64, layout="nchw", train=True,
         shift=0.0):  # fmt: skip
    """A block's tensors: random weights scaled to keep every stage O(1), BatchNorm affines
    around 1 and `shift`, and (eval) running statistics that are not the batch's."""
    p = wide(dtype)
    bottleneck = bn_size * growth
    t = {"x": random_tensor((n, c0, h, w), dtype, layout, device=DEVICE)}
    prefixes = [c0 + j * growth for j in range(layers)]
    t["conv1_weight"] = [(torch.randn(bottleneck, c, 1, 1, device=DEVICE) / c**0.5).to(dtype) for c in prefixes]
    t["conv2_weight"] = [(torch.randn(growth, bottleneck, 3, 3, device=DEVICE) / (3 * bottleneck**0.5)).to(dtype)
                         for _ in prefixes]  # fmt: skip
    for norm, sizes in (("norm1", prefixes), ("norm2", [bottleneck] * layers)):
        t[f"{norm}_weight"] = [(torch.rand(c, device=DEVICE) + 0.5).to(p) for c in sizes]
        t[f"{norm}_bias"] = [(torch.randn(c, device=DEVICE) * 0.5 + shift).to(p) for c in sizes]
        if not train:
            t[f"{norm}_mean"] = [(torch.randn(c, device=DEVICE) * 0.3).to(p) for c in sizes]
            t[f"{norm}_var"] = [(torch.rand(c, device=DEVICE) + 0.5).to(p) for c in sizes]
    return t


def reference(t, train=True, masks=(), drop_rate=0.0, preactivations=None):
    """torchvision's block, eagerly, in the tensors' dtype; `preactivations` collects every
    BatchNorm's output (each ReLU's input)."""
    features = [t["x"]]
    for j in range(len(t["conv1_weight"])):
        h = torch.cat(features, 1)
        for norm, conv, padding in (("norm1", "conv1_weight", 0), ("norm2", "conv2_weight", 1)):
            mean, var = (None, None) if train else (t[f"{norm}_mean"][j], t[f"{norm}_var"][j])
            h = F.batch_norm(h, mean, var, t[f"{norm}_weight"][j].to(h.dtype), t[f"{norm}_bias"][j].to(h.dtype),
                             train, 0.0, EPS)  # fmt: skip
            if preactivations is not None:
                preactivations.append(h.detach())
            h = F.relu(h)
            h = F.conv2d(h, t[conv][j], padding=padding)
        if masks:
            h = h * masks[j].to(h.dtype) / (1 - drop_rate)
        features.append(h)
    return torch.cat(features, 1)


def folded(t, norm):
    scale = [w / torch.sqrt(v + EPS) for w, v in zip(t[f"{norm}_weight"], t[f"{norm}_var"])]
    shift = [b - m * s for b, m, s in zip(t[f"{norm}_bias"], t[f"{norm}_mean"], scale)]
    return scale, shift


def train_args(t, masks=(), drop_rate=0.0):
    return (t["x"], t["norm1_weight"], t["norm1_bias"], t["conv1_weight"], t["norm2_weight"], t["norm2_bias"],
            t["conv2_weight"], list(masks), drop_rate, EPS)  # fmt: skip


def eval_args(t):
    (s1, t1), (s2, t2) = folded(t, "norm1"), folded(t, "norm2")
    return t["x"], s1, t1, t["conv1_weight"], s2, t2, t["conv2_weight"]


def leaves(t):
    """x and the parameters (the running statistics are not differentiable)."""
    return [t["x"]] + [v for key in sorted(t) if key != "x" and not key.endswith(("_mean", "_var")) for v in t[key]]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_train_forward_statistics_and_layout(layout):
    t = make(n=3, layers=3, h=7, w=9, layout=layout)
    with fastconv.use_backend("torch"):
        features, mean, var, bottlenecks, bottleneck_mean, bottleneck_var = torch.ops.fastconv.dense_block_train(*train_args(t))
    want = reference(t)
    torch.testing.assert_close(features, want, rtol=1e-12, atol=1e-12)
    assert features.is_contiguous(memory_format=torch.channels_last)
    # The shared statistics are every channel's batch statistics (biased variance).
    ref_var, ref_mean = torch.var_mean(want, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)
    assert bottlenecks.shape == (3, 3, 4, 7, 9) and bottleneck_mean.shape == bottleneck_var.shape == (3, 4)
    for j in range(3):
        assert bottlenecks[j].is_contiguous(memory_format=torch.channels_last)
        ref_var, ref_mean = torch.var_mean(bottlenecks[j], dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(bottleneck_mean[j], ref_mean)
        torch.testing.assert_close(bottleneck_var[j], ref_var)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eval_forward(layout):
    t = make(layers=3, layout=layout, train=False)
    with fastconv.use_backend("torch"):
        features = torch.ops.fastconv.dense_block_eval(*eval_args(t))
    torch.testing.assert_close(features, reference(t, train=False), rtol=1e-12, atol=1e-12)


def test_train_gradcheck():
    t = make(n=2, c0=2, layers=2, growth=2, bn_size=1, h=3, w=4)
    inputs = leaves(t)
    for v in inputs:
        v.requires_grad_()
    keys = [key for key in sorted(t) if key != "x"]

    def call(x, *flat):
        u = {"x": x}
        for i, key in enumerate(keys):
            u[key] = list(flat[2 * i : 2 * i + 2])
        return torch.ops.fastconv.dense_block_train(*train_args(u))[0]

    with fastconv.use_backend("torch"):
        assert torch.autograd.gradcheck(call, tuple(inputs), eps=1e-6, atol=1e-6)


def test_eval_gradcheck():
    t = make(n=2, c0=2, layers=2, growth=2, bn_size=1, h=3, w=4, train=False)
    x, s1, t1, w1, s2, t2, w2 = eval_args(t)
    flat = [x, *s1, *t1, *w1, *s2, *t2, *w2]
    flat = [v.detach().requires_grad_() for v in flat]

    def call(x, *rest):
        lists = [list(rest[2 * i : 2 * i + 2]) for i in range(6)]
        return torch.ops.fastconv.dense_block_eval(x, *lists)

    with fastconv.use_backend("torch"):
        assert torch.autograd.gradcheck(call, tuple(flat), eps=1e-6, atol=1e-6)


def test_dropout_masks_apply_as_f_dropout_and_their_gradient():
    t = make(layers=3)
    masks = [torch.rand(2, 2, 5, 7, device=DEVICE) > 0.3 for _ in range(3)]
    for v in leaves(t):
        v.requires_grad_()
    with fastconv.use_backend("torch"):
        got = torch.ops.fastconv.dense_block_train(*train_args(t, masks, 0.3))[0]
    want = reference(t, masks=masks, drop_rate=0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(want)
    grads = torch.autograd.grad((got * weights).sum(), leaves(t))
    want_grads = torch.autograd.grad((want * weights).sum(), leaves(t))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_opcheck(train):
    t = make(layers=2, train=train)
    for v in leaves(t):
        v.requires_grad_()
    with fastconv.use_backend("torch"):
        if train:
            torch.library.opcheck(torch.ops.fastconv.dense_block_train.default, train_args(t))
            masks = [torch.rand(2, 2, 5, 7, device=DEVICE) > 0.5 for _ in range(2)]
            torch.library.opcheck(torch.ops.fastconv.dense_block_train.default, train_args(t, masks, 0.5))
        else:
            args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else [v.detach().requires_grad_() for v in a]
                    for a in eval_args(t)]  # fmt: skip
            torch.library.opcheck(torch.ops.fastconv.dense_block_eval.default, tuple(args))


# float32's gradient tolerance, relative to the largest gradient (they sum over pixels and
# layers). Half precision is held to PyTorch's own block's error in that dtype (check_block).
GRAD_TOLERANCE = {torch.float32: 2e-4}


def check_block(backend, dtype, train, **sizes):
    """The block on `backend` in `dtype` (channels_last; BatchNorm vectors in float32) against
    the float64 reference: features within 2x of PyTorch's own eager block in that dtype plus
    the slack, and the gradients of x, conv1_weight and norm1_weight."""
    # Half precision: no pre-activation may sit within rounding of a ReLU's kink, or that
    # element's gradient flips by O(1) on one side and not the other (see the gradient check
    # below; seen: one CI run in about 20 failed so with shifts around 2, which left a few of
    # about 1400 pre-activations within 0.02 of 0). Shifts around 4, and a draw that still has
    # one is drawn again: 88% of draws pass in training, 16% in eval (the running statistics do
    # not normalise, so the pre-activations spread wider; measured over 300 draws each), so 200
    # draws all fail with odds under 1e-15. float32 keeps shift 0, so that it tests the ReLUs'
    # masks: its rounding moves a pre-activation by about 1e-7, so a flip is that much rarer
    # (none seen).
    t64 = make(layout="channels_last", train=train, shift=0.0 if dtype == torch.float32 else 4.0, **sizes)
    for _ in range(200 if dtype != torch.float32 else 0):
        preactivations = []
        reference(t64, train=train, preactivations=preactivations)
        if min(z.abs().min().item() for z in preactivations) >= 0.02:
            break
        t64 = make(layout="channels_last", train=train, shift=4.0, **sizes)
    else:
        assert dtype == torch.float32, "200 draws in a row had a pre-activation within 0.02 of a kink"
    t = {k: (v.to(dtype) if k == "x" else [u.to(dtype) if "conv" in k else u.float() for u in v]) for k, v in t64.items()}
    t["x"] = t["x"].contiguous(memory_format=torch.channels_last)
    for v in leaves(t) + leaves(t64):
        v.requires_grad_()
    with on_backend(backend):
        if train:
            got = torch.ops.fastconv.dense_block_train(*train_args(t))[0]
        else:
            got = torch.ops.fastconv.dense_block_eval(*eval_args(t))
        weights = torch.randn(got.shape, device=DEVICE)
        grads = torch.autograd.grad((got.float() * weights).sum(), [t["x"], *t["conv1_weight"], *t["norm1_weight"]])
    want = reference(t64, train=train)
    want_grads = torch.autograd.grad((want * weights.double()).sum(), [t64["x"], *t64["conv1_weight"], *t64["norm1_weight"]])
    lowp = lowp_grads = None
    if dtype != torch.float32:
        # PyTorch's own block in the dtype, forward and backward: the 2x rule's yardstick.
        wants_grad = lambda k: not k.endswith(("_mean", "_var"))  # noqa: E731  (running statistics)
        eager = {k: [u.detach().clone().requires_grad_(wants_grad(k)) for u in v] if isinstance(v, list) else
                 v.detach().clone().requires_grad_() for k, v in t.items()}  # fmt: skip
        eager_lowp = {**eager, **{k: [u.to(dtype) for u in v] for k, v in eager.items() if "norm" in k}}
        lowp = reference(eager_lowp, train=train)
        lowp_grads = torch.autograd.grad((lowp.float() * weights).sum(),
                                         [eager["x"], *eager["conv1_weight"], *eager["norm1_weight"]])  # fmt: skip
    assert_matches_reference("features", got, want, lowp)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        error = (g.double() - w).abs()
        if lowp_grads is None:
            tolerance = GRAD_TOLERANCE[dtype] * w.abs().max().item() + 1e-6
            assert error.max().item() <= tolerance, f"grad {i}: off by {error.max().item():.3g} > {tolerance:.3g}"
            continue
        # Half precision: the ReLUs' kinks make any one draw's error a lottery. Where rounding
        # moves a pre-activation across 0, that element's gradient flips by O(1), and its
        # BatchNorm and the weight gradient's sum over pixels spread the change; eager PyTorch and
        # fastconv round differently, so each hits different kinks (12 draws, batch 4 on 7x9:
        # max errors either 0.005-0.03 or 0.2-2.6 of gradients up to 8, eager's and ours on the
        # large side in turn; mean errors ours/eager 0.05-3.0, median 0.85; one draw in 40 had
        # 0.069 against eager's 0.0033 at gradients up to 12). So the data keep most
        # pre-activations away from the kink (shift above), the 2x rule holds the mean error,
        # plus 1% of the largest gradient for the lottery's tail (a wrong formula moves the mean
        # by tens of percent), and the largest error is held within the gradients' size.
        # A BatchNorm weight's gradient has a handful of elements, each a sum in which one kink
        # can decide (measured: 0.28 against eager's 0.0026 at 5.2, eval, 1 draw in 12): it is
        # held only to the bound below here, and exactly by the float32 run.
        eager_error = (lowp_grads[i].double() - w).abs()
        scale = w.abs().max().item()
        mean, eager_mean = error.mean().item(), eager_error.mean().item()
        is_norm_weight = i > len(t["conv1_weight"])
        if not is_norm_weight:
            assert mean <= 2 * eager_mean + 1e-2 * scale + 1e-6, f"grad {i}: mean error {mean:.3g}, eager's {eager_mean:.3g}"
        assert error.max().item() <= scale + 2 * eager_error.max().item(), f"grad {i}: off by {error.max().item():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backends_forward_and_backward(backend, dtype, train):
    """Each backend's kernels; odd sizes (bfloat16 is the GPU's: INTERPRETED_BF16_DOT)."""
    check_block(backend, dtype, train, n=2, layers=2, growth=3, h=5, w=7)


def test_empty_batch():
    t = make(n=0)
    for v in leaves(t):
        v.requires_grad_()
    with fastconv.use_backend("torch"):
        features, mean, *_ = torch.ops.fastconv.dense_block_train(*train_args(t))
        assert features.shape == (0, 7, 5, 7) and mean.isnan().all()
        features.sum().backward()
    assert t["x"].grad.shape == t["x"].shape
    t = make(n=0, train=False)
    with fastconv.use_backend("torch"):
        assert torch.ops.fastconv.dense_block_eval(*eval_args(t)).shape == (0, 7, 5, 7)


def _bad(**changes):
    t = make()
    args = list(train_args(t))
    names = ["x", "norm1_weight", "norm1_bias", "conv1_weight", "norm2_weight", "norm2_bias", "conv2_weight",
             "dropout_mask", "drop_rate", "eps"]  # fmt: skip
    for name, change in changes.items():
        args[names.index(name)] = change(args[names.index(name)])
    return args


@pytest.mark.parametrize("changes, message", [
    ({"x": lambda x: x[0]}, r"x must be a 4-D tensor"),
    ({"conv1_weight": lambda w: [w[0], w[1][:, :4]]}, r"conv1_weight\[1\] must have shape \(4, 5, 1, 1\) \(layer 1 reads 5 channels\); got \(4, 4, 1, 1\)"),
    ({"conv1_weight": lambda w: [w[0].float(), w[1]]}, r"conv1_weight\[0\] must have x's dtype torch.float64; got torch.float32|conv1_weight\[0\].*float64.*float32"),
    ({"conv2_weight": lambda w: [v[:0] for v in w]}, r"growth_rate\) must be >= 1; got 0"),
    ({"conv2_weight": lambda w: w[:1]}, r"conv2_weight must have one weight per layer \(2, as conv1_weight\); got 1"),
    ({"norm1_weight": lambda v: [v[0], v[1][:3]]}, r"norm1_weight\[1\] must have shape \(5,\)"),
    ({"dropout_mask": lambda m: [torch.ones(2, 2, 5, 7, dtype=torch.bool)] * 2}, r"dropout_mask must be empty or one mask per layer \(2\) with drop_rate > 0"),
    ({"dropout_mask": lambda m: [torch.ones(2, 2, 5, 7)] * 2, "drop_rate": lambda p: 0.5}, r"dropout_mask\[0\] must be a bool tensor of shape \(2, 2, 5, 7\); got torch.float32"),
    ({"drop_rate": lambda p: 1.0}, r"drop_rate must be in \[0, 1\); got 1.0"),
    ({"x": lambda x: x[:1, :, :1, :1]}, r"Expected more than 1 value per channel when training"),
])  # fmt: skip
def test_bad_input_names_the_argument(changes, message):
    with fastconv.use_backend("torch"), pytest.raises(ValueError, match=message):
        torch.ops.fastconv.dense_block_train(*_bad(**changes))


def test_autocast_casts_the_weight_lists():
    """Raw ops under autocast: x and every conv weight in the region's dtype, the BatchNorm
    vectors left in float32, as F.conv2d and BatchNorm run."""
    t = make(dtype=torch.float32, train=False)
    with fastconv.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        features = torch.ops.fastconv.dense_block_eval(*eval_args(t))
    assert features.dtype == torch.bfloat16
    torch.testing.assert_close(features.float(), reference(make_like(t), train=False).float(), rtol=0.05, atol=0.05)


def make_like(t):
    return {k: [v.double() for v in vs] if isinstance(vs, list) else vs.double() for k, vs in t.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_batch_norm_backward_accumulates_into_a_buffer_slice(backend, layout):
    """fastconv::batch_norm_act_backward_accumulate: grad_c added into a channel slice of a
    wider gradient buffer; the buffer's other channels untouched; opcheck."""
    n, c, h, w = 2, 5, 5, 7
    x = random_tensor((n, c, h, w), torch.float32, layout, device=DEVICE)
    grad_y = random_tensor((n, c, h, w), torch.float32, layout, device=DEVICE)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    mean, invstd = mean.float(), torch.rsqrt(var + EPS).float()
    weight, bias = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    buffer = random_tensor((n, c + 3, h, w), torch.float32, layout, device=DEVICE)
    before = buffer.clone()
    with on_backend(backend):
        gw, gb = torch.ops.fastconv.batch_norm_act_backward_accumulate(grad_y, x, mean, invstd, weight, bias, "relu",
                                                                       buffer[:, 1 : c + 1])  # fmt: skip
    want, want_w, want_b = fastconv.reference.batch_norm_act_backward(
        grad_y.double(), x.double(), mean.double(), invstd.double(), weight.double(), bias.double(), "relu"
    )
    torch.testing.assert_close(buffer[:, 1 : c + 1].double(), before[:, 1 : c + 1].double() + want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffer[:, :1], before[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(buffer[:, c + 1 :], before[:, c + 1 :], rtol=0, atol=0)
    torch.testing.assert_close(gw.double(), want_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), want_b, rtol=1e-5, atol=1e-5)
    if backend == "torch":
        torch.library.opcheck(torch.ops.fastconv.batch_norm_act_backward_accumulate.default,
                              (grad_y, x, mean, invstd, weight, bias, "relu", buffer[:, 1 : c + 1].clone()))  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stats", [True, False], ids=["stats", "plain"])
def test_conv_writes_into_a_buffer_slice(backend, stats):
    """fastconv::conv2d_out: the 3x3 conv stored into a channel slice of a wider channels_last
    buffer, its other channels untouched, and the statistics of what was stored; opcheck."""
    x = random_tensor((2, 6, 5, 7), torch.float32, "channel_slice", device=DEVICE)
    weight = torch.randn(3, 6, 3, 3, device=DEVICE) / 7
    buffer = random_tensor((2, 9, 5, 7), torch.float32, "channels_last", device=DEVICE)
    before = buffer.clone()
    with on_backend(backend):
        mean, var = torch.ops.fastconv.conv2d_out(x, weight, (1, 1), (1, 1, 1, 1), (1, 1), 1, stats, buffer[:, 4:7])
    want = F.conv2d(x.double(), weight.double(), padding=1)
    torch.testing.assert_close(buffer[:, 4:7].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffer[:, :4], before[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(buffer[:, 7:], before[:, 7:], rtol=0, atol=0)
    if stats:
        ref_var, ref_mean = torch.var_mean(buffer[:, 4:7].double(), dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)
    else:
        assert mean.numel() == var.numel() == 0
    if backend == "torch":
        torch.library.opcheck(torch.ops.fastconv.conv2d_out.default,
                              (x, weight, (1, 1), (1, 1, 1, 1), (1, 1), 1, stats, buffer[:, 4:7].clone()))  # fmt: skip
    with on_backend(backend), pytest.raises(ValueError, match=r"out must not overlap x"):
        wide = torch.randn(2, 12, 5, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
        torch.ops.fastconv.conv2d_out(wide[:, :6], weight, (1, 1), (1, 1, 1, 1), (1, 1), 1, stats, wide[:, 3:6])
    with on_backend(backend), pytest.raises(ValueError, match=r"out must have shape \(2, 3, 5, 7\); got \(2, 2, 5, 7\)"):
        torch.ops.fastconv.conv2d_out(x, weight, (1, 1), (1, 1, 1, 1), (1, 1), 1, stats, buffer[:, 4:6])
