"""The training BatchNorm's ops on random strided views, drawn by hypothesis: batch_norm_stats,
batch_norm_act with its backward (batch_norm_act_backward), and the backward added into a given
gradient (batch_norm_act_backward_accumulate), against PyTorch's training BatchNorm in float64,
whose statistics autograd differentiates through.

c and grad_y come in any memory order, with steps, offsets and expanded (stride-0) dimensions:
`y.sum().backward()` hands the backward an expanded grad_y. An expanded grad_c, which the
accumulating backward would write several sums into, is refused by name.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastconv.activations import ACTIVATION_CODES, apply_activation
from fastconv.ops import batch_norm as batch_norm_ops
from fuzzing import strided_views
from harness import DEVICE, assert_matches_reference, backends_under_test, poisoned_allocations, random_tensor, run_backend, seeded

FUZZ_BACKENDS = [p for p in backends_under_test(batch_norm_ops.BACKWARD) if p.values[0] != "cuda" or torch.cuda.is_available()]
EPS = 1e-5
ops = torch.ops.fastconv


def training_batch_norm64(c, weight, bias, activation):
    """act(batch_norm(c)) in training mode, float64, the statistics inside autograd's graph
    (written out: F.batch_norm refuses one value a channel, which the ops accept)."""
    mean = c.mean(dim=(0, 2, 3), keepdim=True)
    z = (c - mean) * torch.rsqrt((c - mean).square().mean(dim=(0, 2, 3), keepdim=True) + EPS)
    if weight is not None:
        z = z * weight.view(1, -1, 1, 1)
    if bias is not None:
        z = z + bias.view(1, -1, 1, 1)
    return apply_activation(z, activation)


def parameters(channels: int, affine: str):
    weight = (torch.rand(channels, device=DEVICE) + 0.5) if affine in ("both", "weight") else None
    bias = torch.randn(channels, device=DEVICE) if affine in ("both", "bias") else None
    return weight, bias


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    view=strided_views(),
    grad_view=strided_views(),
    activation=st.sampled_from(list(ACTIVATION_CODES)),
    affine=st.sampled_from(["both", "weight", "bias", "none"]),
    grad_layout=st.sampled_from(["nchw", "channels_last", "channel_slice"]),
)
def test_random_views_match_training_batch_norm(backend, seed, view, grad_view, activation, affine, grad_layout):
    seeded(seed)
    c = view()
    n, channels, h, w = c.shape
    pixels = n * h * w
    weight, bias = parameters(channels, affine)
    with poisoned_allocations():
        mean, var = run_backend(backend, ops.batch_norm_stats, c)
    if pixels == 0:
        assert mean.isnan().all() and var.isnan().all()  # torch.var_mean's answer for no values
        return
    ref_var, ref_mean = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    spread = (ref_var.sqrt() + ref_mean.abs()).max().item()
    assert_matches_reference("mean", mean, ref_mean, magnitude=spread)
    assert_matches_reference("var", var, ref_var, magnitude=ref_var.max().item(), terms=pixels)

    invstd = torch.rsqrt(var + EPS)
    leaves = [t.requires_grad_(True) for t in (c, weight, bias) if t is not None]
    # grad_y: a view of its own (any order, steps, expanded dimensions) when its shape fits.
    grad_y = grad_view() if grad_view.shape == tuple(c.shape) else torch.randn(c.shape, device=DEVICE).permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    with poisoned_allocations():
        y = run_backend(backend, ops.batch_norm_act, c, mean, invstd, weight, bias, activation)
        grads = run_backend(backend, torch.autograd.grad, y, leaves, grad_y)
    wide = [t.detach().double().requires_grad_(True) for t in leaves]
    named = dict(zip(["c"] + [k for k, t in (("weight", weight), ("bias", bias)) if t is not None], wide))
    y64 = training_batch_norm64(named["c"], named.get("weight"), named.get("bias"), activation)
    grads64 = dict(zip(named, torch.autograd.grad(y64, wide, grad_y.double())))
    sizes = term_sizes(c.detach(), grad_y, ref_mean, invstd, weight, bias)
    assert_matches_reference("y", y, y64, magnitude=sizes["y"])
    for name, got in zip(named, grads):
        assert_matches_reference(f"grad_{name}", got, grads64[name], magnitude=sizes[name])

    # The same backward added into a gradient buffer of its own layout (a dense block's slice).
    grad_c = random_tensor(tuple(c.shape), torch.float32, grad_layout)
    before = grad_c.clone()
    with poisoned_allocations():
        grad_weight, grad_bias = run_backend(backend, ops.batch_norm_act_backward_accumulate, grad_y, c.detach(), mean,
                                             invstd, weight, bias, activation, grad_c)  # fmt: skip
    assert_matches_reference("accumulated grad_c", grad_c, before.double() + grads64["c"],
                             magnitude=sizes["c"] + before.abs().max().item())  # fmt: skip
    for name, got in (("weight", grad_weight), ("bias", grad_bias)):
        if name in named:
            assert_matches_reference(f"accumulated grad_{name}", got, grads64[name], magnitude=sizes[name])


def term_sizes(c, grad_y, mean, invstd, weight, bias) -> dict:
    """The size of the terms each result is computed from, which its float32 rounding error
    scales with (not with the result, which cancellation can make 0). The kernels apply y =
    c * scale + shift with scale = weight * invstd, as ATen's CPU BatchNorm does: with few pixels
    invstd reaches 1/sqrt(eps) = 316 and c * scale is large where y is not (seen: a 1-pixel
    channel, y off by 3e-5 at 0.29, the term 1e2). The gradients' terms: grad_c's
    scale * |g| (three of them), grad_weight's sum |g * (c - mean)| * invstd, grad_bias's sum |g|,
    with |g| <= 1.5 |grad_y| (the activations' largest slope)."""
    view = (1, -1, 1, 1)
    c, g = c.double(), 1.5 * grad_y.double().abs()
    invstd = invstd.double()
    scale = invstd * (weight.double().abs() if weight is not None else 1)
    shift_size = (bias.double().abs() if bias is not None else 0) + (mean.abs() * scale)
    return {
        "y": (c.abs() * scale.view(view) + shift_size.view(view)).max().item(),
        "c": (3 * scale.view(view) * g).max().item(),
        "weight": ((g * (c - mean.view(view)).abs()).sum((0, 2, 3)) * invstd).max().item(),
        "bias": g.sum((0, 2, 3)).max().item(),
    }


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
def test_an_expanded_gradient_buffer_is_refused(backend):
    """Stride 0 over a dimension of size > 1: several of grad_c's elements are one address, and
    the accumulating backward would race its sums into it (it once did, silently, on Triton)."""
    c = random_tensor((2, 3, 4, 5))
    mean, var = ops.batch_norm_stats(c)
    grad_c = torch.zeros(1, 3, 1, 1, device=DEVICE).expand(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"grad_c must not be an expanded view .* strides \(0, 1, 0, 0\)"):
        run_backend(backend, ops.batch_norm_act_backward_accumulate, torch.randn_like(c), c, mean,
                    torch.rsqrt(var + EPS), None, None, "relu", grad_c)  # fmt: skip
