"""fastconv::batch_norm_act_cat, the training BatchNorm + activation of several branches written
straight into their channel slices of one output (Inception's training concatenation): against
float64 BatchNorm then torch.cat, on every layout of pieces, copied pieces among them, odd sizes,
half precision within twice PyTorch's error, gradcheck, batch 0, a NaN-poisoned output, opcheck,
and bad input named; then InceptionBlock in training, with no aten.cat left."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.benchmarks.traffic import bytes_by_op, count_bytes
from fastconv.ops import batch_norm_cat
from fastconv.ops.batch_norm_cat import batch_norm_act_cat
from harness import (
    DEVICE,
    LAYOUTS,
    assert_matches_reference,
    backends_under_test,
    on_backend,
    poisoned_allocations,
    random_tensor,
)

BACKENDS = backends_under_test(batch_norm_cat.INTO)
FLOAT64_BACKENDS = [p for p in BACKENDS if p.values[0] != "cuda"]  # the CUDA kernels take no float64


def _pieces(widths, dtype, layouts, affine=True, copied=(), size=(3, 9, 7)):
    """Each piece (c, weight, bias), random; `copied` the indices of pieces without a BatchNorm."""
    n, h, w = size
    pieces = []
    for i, (width, layout) in enumerate(zip(widths, layouts)):
        c = random_tensor((n, width, h, w), dtype, layout, scale=2.0)
        if i in copied or not affine:
            pieces.append((c, None, None))
            continue
        pieces.append((c, (torch.rand(width, device=DEVICE) + 0.5).to(dtype), torch.randn(width, device=DEVICE).to(dtype)))
    return pieces


def _statistics(c):
    mean, var = torch.ops.fastconv.batch_norm_stats(c.detach())
    return mean, torch.rsqrt(var + 1e-5)


def _reference(pieces, copied, activation):
    """torch.cat of F.batch_norm (training) + activation per piece, differentiable."""
    outs = []
    for i, (c, weight, bias) in enumerate(pieces):
        if i in copied:
            outs.append(c)
            continue
        y = F.batch_norm(c, None, None, weight, bias, training=True, eps=1e-5)
        outs.append(fastconv.activations.apply_activation(y, activation))
    return torch.cat(outs, 1)


def _run(backend, pieces, copied, activation):
    """(out, grads of every leaf, grad_out, leaves)."""
    leaves = [t.requires_grad_(True) for piece in pieces for t in piece if t is not None]
    with poisoned_allocations(), on_backend(backend):
        stats = [(None, None) if i in copied else _statistics(c) for i, (c, _, _) in enumerate(pieces)]
        out = batch_norm_act_cat([p[0] for p in pieces], [s[0] for s in stats], [s[1] for s in stats],
                                 [p[1] for p in pieces], [p[2] for p in pieces], activation)  # fmt: skip
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads, grad_out, leaves


def _check_against_float64(out, grads, grad_out, leaves, pieces, copied, activation, yardstick=None):
    wide = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(wide)
    wide_pieces = [tuple(next(it) if t is not None else None for t in piece) for piece in pieces]
    want = _reference(wide_pieces, copied, activation)
    lowp = None if yardstick is None else yardstick(leaves)
    assert_matches_reference("out", out, want, None if lowp is None else lowp[0])
    reduced = out.shape[0] * out.shape[2] * out.shape[3]
    wants = torch.autograd.grad(want, wide, grad_out.double())
    lows = [None] * len(wants) if lowp is None else lowp[1]
    for k, (got, expected, low) in enumerate(zip(grads, wants, lows)):
        assert_matches_reference(f"grad of leaf {k}", got, expected, low, terms=reduced)


@pytest.mark.parametrize("activation", ["relu", None])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_batch_norm_then_cat(backend, layout, activation):
    """Three BatchNorm'd pieces in the layout under test and one copied (a pool branch), odd widths."""
    copied = {2}
    pieces = _pieces((5, 3, 4, 7), torch.float32, (layout, "channels_last", layout, "nchw"), copied=copied)
    out, grads, grad_out, leaves = _run(backend, pieces, copied, activation)
    assert out.shape == (3, 19, 9, 7)
    assert out.is_contiguous(memory_format=torch.channels_last) == (pieces[0][0].stride(1) == 1)
    _check_against_float64(out, grads, grad_out, leaves, pieces, copied, activation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_affine_parameters(backend):
    pieces = _pieces((4, 6), torch.float32, ("channels_last", "channels_last"), affine=False)
    out, grads, grad_out, leaves = _run(backend, pieces, set(), "relu")
    _check_against_float64(out, grads, grad_out, leaves, pieces, set(), "relu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_within_twice_pytorch_s_error(backend, dtype):
    # SiLU: no kink whose derivative half-precision rounding could flip at random elements.
    copied = {1}
    pieces = _pieces((8, 6, 16), dtype, ("channels_last",) * 3, copied=copied, size=(4, 8, 10))
    out, grads, grad_out, leaves = _run(backend, pieces, copied, "silu")

    def yardstick(leaves):
        # PyTorch's own half-precision training BatchNorm (float32 inside, as on a GPU), then cat.
        half = [t.detach().requires_grad_(True) for t in leaves]
        it = iter(half)
        half_pieces = [tuple(next(it) if t is not None else None for t in piece) for piece in pieces]
        wide = [tuple(None if t is None else t.float() for t in piece) for piece in half_pieces]
        result = _reference(wide, copied, "silu").to(dtype)
        return result, torch.autograd.grad(result, half, grad_out)

    assert out.dtype == dtype
    _check_against_float64(out, grads, grad_out, leaves, pieces, copied, "silu", yardstick)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "torch"])
def test_batch_norm_act_cat_sanitizer_subset(backend):
    """Small fp16 forward and backward into slices of a channels_last output, pieces in NCHW,
    a channel slice and channels_last (unaligned slice offsets: 5 and 8 channels in), one
    copied; for gpu_check's smoke run, memcheck and racecheck."""
    copied = {1}
    pieces = _pieces((5, 3, 11), torch.float16, ("channel_slice", "nchw", "channels_last"), copied=copied,
                     size=(2, 9, 7))  # fmt: skip
    out, grads, grad_out, leaves = _run(backend, pieces, copied, "silu")  # no kink for fp16 rounding to flip
    assert out.is_contiguous(memory_format=torch.channels_last)
    _check_against_float64(out, grads, grad_out, leaves, pieces, copied, "silu")


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_gradcheck_float64(backend):
    pieces = _pieces((3, 2), torch.float64, ("channels_last", "nchw"), size=(2, 3, 4)) + _pieces(
        (2,), torch.float64, ("nchw",), copied={0}, size=(2, 3, 4))  # fmt: skip

    def function(c0, w0, b0, c1, w1, b1, c2):
        # The statistics inside the function: gradcheck perturbs c, and they must follow it.
        stats = [_statistics(c0), _statistics(c1), (None, None)]
        return batch_norm_act_cat([c0, c1, c2], [s[0] for s in stats], [s[1] for s in stats], [w0, w1, None],
                                  [b0, b1, None], "silu")  # fmt: skip

    inputs = tuple(t.requires_grad_(True) for piece in pieces for t in piece if t is not None)
    with on_backend(backend):
        assert torch.autograd.gradcheck(function, inputs, fast_mode=backend == "triton")


def test_batch_zero_and_opcheck():
    c0, c1 = torch.randn(0, 3, 5, 4), torch.randn(0, 2, 5, 4)
    stats = torch.zeros(3), torch.ones(3)
    out = batch_norm_act_cat([c0, c1], [stats[0], None], [stats[1], None], [None, None], [None, None], "relu")
    assert out.shape == (0, 5, 5, 4)
    pieces = _pieces((3, 4), torch.float32, ("channels_last", "channels_last"), size=(2, 5, 7))
    (c0, w0, b0), (c1, _, _) = pieces
    mean, invstd = _statistics(c0)
    with fastconv.use_backend("torch"):
        torch.library.opcheck(torch.ops.fastconv.batch_norm_act_cat.default,
                              ([c0.requires_grad_(), c1.requires_grad_()], [0], [mean], [invstd],
                               [w0.requires_grad_()], [b0], "relu"))  # fmt: skip
        torch.library.opcheck(torch.ops.fastconv.batch_norm_act_cat.default,
                              ([c1.requires_grad_(), c0], [0, 1], [_statistics(c1)[0], mean],
                               [_statistics(c1)[1], invstd], [], [], None))  # fmt: skip


def test_bad_input_names_the_argument():
    (c0, w0, b0), (c1, w1, b1) = _pieces((3, 4), torch.float32, ("nchw", "nchw"), size=(2, 5, 7))
    m0, i0 = _statistics(c0)
    m1, i1 = _statistics(c1)
    op = batch_norm_act_cat
    with pytest.raises(ValueError, match=r"pieces must be a non-empty list"):
        op([], [], [], [], [], "relu")
    with pytest.raises(ValueError, match=r"invstd must have one entry per piece \(2\); got 1"):
        op([c0, c1], [m0, m1], [i0], [w0, w1], [b0, b1], "relu")
    with pytest.raises(ValueError, match=r"pieces\[1\] must have pieces\[0\]'s batch and spatial size .*\(2, 5, 7\); "
                                         r"got \(2, 5, 6\)"):  # fmt: skip
        op([c0, c1[..., :6]], [m0, m1], [i0, i1], [w0, w1], [b0, b1], "relu")
    with pytest.raises(ValueError, match=r"pieces\[1\] must have pieces\[0\]'s dtype torch.float32; got torch.float64"):
        op([c0, c1.double()], [m0, None], [i0, None], [w0, None], [b0, None], "relu")
    with pytest.raises(ValueError, match=r"mean\[1\] and invstd\[1\] must both be given .* got mean\[1\] alone"):
        op([c0, c1], [m0, m1], [i0, None], [w0, w1], [b0, b1], "relu")
    with pytest.raises(ValueError, match=r"weight\[1\] must be None for a piece copied as it is"):
        op([c0, c1], [m0, None], [i0, None], [w0, w1], [b0, None], "relu")
    with pytest.raises(ValueError, match=r"mean\[1\] \(of pieces\[1\]\) must have shape \(4,\); got \(3,\)"):
        op([c0, c1], [m0, m0], [i0, i1], [w0, w1], [b0, b1], "relu")
    with pytest.raises(ValueError, match=r"bias\[0\] \(of pieces\[0\]\) must have shape \(3,\), one value per channel of "
                                         r"pieces\[0\]; got \(4,\)"):  # fmt: skip
        op([c0, c1], [m0, m1], [i0, i1], [w0, w1], [b1, b1], "relu")
    with pytest.raises(ValueError, match=r"mean\[0\] \(of pieces\[1\]\) must have dtype torch.float32 .*; got "
                                         r"torch.float64"):  # fmt: skip
        op([c0, c1], [None, m1.double()], [None, i1], [None, w1], [None, b1], "relu")
    raw = torch.ops.fastconv.batch_norm_act_cat
    with pytest.raises(ValueError, match=r"normalised must be increasing indices into pieces \(0..1\); got \[1, 0\]"):
        raw([c0, c1], [1, 0], [m1, m0], [i1, i0], [], [], "relu")
    with pytest.raises(ValueError, match=r"normalised must be increasing indices into pieces \(0..1\); got \[2\]"):
        raw([c0, c1], [2], [m1], [i1], [], [], "relu")
    with pytest.raises(ValueError, match=r"weight must have one entry per normalised piece \(2\) or none \(no "
                                         r"affine\); got 1"):  # fmt: skip
        raw([c0, c1], [0, 1], [m0, m1], [i0, i1], [w0], [b0, b1], "relu")
    with pytest.raises(ValueError, match=r"activation"):
        op([c0, c1], [m0, m1], [i0, i1], [w0, w1], [b0, b1], "gelu")
    with pytest.raises(ValueError, match=r"pieces\[1\] must be a 4-D tensor"):
        op([c0, c1[0]], [m0, None], [i0, None], [w0, None], [b0, None], "relu")


# InceptionBlock in training ---------------------------------------------------------------------


def _activation_cats(module, x) -> int:
    """aten.cat calls over activations (the batch's N leading): the shared GEMM's weights and
    BatchNorm vectors are concatenated too, parameter-sized."""
    from test_inception import AtenOps

    with AtenOps() as ops:
        module(x)
    return sum(op is torch.ops.aten.cat.default and len(shape) == 4 and shape[0] == x.shape[0] and shape[2:] != (1, 1)
               for op, shape in ops.calls)  # fmt: skip


@pytest.mark.parametrize("kind", ["Inception", "InceptionB", "InceptionE"])
def test_inception_training_concatenates_in_the_batch_norm_pass(kind):
    """Training: one batch_norm_act_cat per block and no aten.cat of activations (the copied
    pool branch of InceptionB goes through the op too); the same output, gradients and running
    statistics as torchvision's block; the output buffer NaN-poisoned, so every element is written."""
    from test_inception import block

    reference, x = block(kind)
    fused = fastconv.optimize(copy.deepcopy(reference)).train()
    reference.train()
    counted = copy.deepcopy(fused)
    x = x.requires_grad_(True)
    with poisoned_allocations():
        y = fused(x)
    assert _activation_cats(counted, x.detach()) == 0
    assert bytes_by_op(count_bytes(lambda: counted(x.detach())))["fastconv::batch_norm_act_cat"][0] == 1
    want = reference(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(want)
    grads = torch.autograd.grad((y * weights).sum(), [x, *fused.parameters()])
    expected = torch.autograd.grad((want * weights).sum(), [x, *reference.parameters()])
    for (name, _), got, w in zip([("x", None), *reference.named_parameters()], grads, expected):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    fused_buffers = dict(fused.named_buffers())
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(fused_buffers[name], buffer, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_inception_training_with_a_frozen_branch_copies_it_in():
    """A branch whose BatchNorm is frozen (eval) inside a training block: its folded output is
    a copied piece, the others still normalised in the pass."""
    from test_inception import block

    reference, x = block("InceptionA")
    reference.train()
    reference.branch5x5_2.eval()
    fused = fastconv.optimize(copy.deepcopy(reference))
    assert not fused.branch5x5_2.bn.training
    assert _activation_cats(copy.deepcopy(fused), x) == 0
    assert "fastconv::batch_norm_act_cat" in bytes_by_op(count_bytes(lambda: copy.deepcopy(fused)(x)))
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-5)
