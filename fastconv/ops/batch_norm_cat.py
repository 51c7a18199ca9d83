"""fastconv::batch_norm_act_cat: the training BatchNorm + activation of several branches, each
written straight into its channel slice of one output, the concatenation an Inception block
returns:

    out = cat([act((c_i - mean_i) * invstd_i * weight_i + bias_i) for each piece i], dim=1)

A piece given without statistics (mean_i and invstd_i None) is copied as it is: InceptionB/D's
max-pool branch, or a branch whose BatchNorm is frozen (its conv already applied it).

Why. In training each branch's last unit is conv -> BatchNorm (batch statistics) -> ReLU, so
its output exists only after the statistics do, and eager (or fastconv's per-unit path) writes
every branch output y_i, then torch.cat reads each back and writes the concatenation: two
passes over the block's output that this op removes. Per block, in elements:

    per-unit BatchNorm, then torch.cat:  read c_i, write y_i; read y_i, write out   -> 4 per channel
    this op:                             read c_i, write out (its slice)            -> 2 per channel

The backward is unchanged: torch.cat's backward is free (views of the gradient), and here each
piece's gradient is the training BatchNorm's one-pass backward (batch_norm_act_backward) of its
slice of grad_out, read in place; a copied piece's gradient is its slice of grad_out. What is
kept for backward is what the per-unit BatchNorm keeps, c_i and the statistics. Counted
(benchmarks/traffic.py, batch 256, fp16): GoogLeNet's training step 34.63 -> 33.04 GB, of which
1.27 GB is the concatenation's pass (predicted: 2 x 633 MB of branch outputs), Inception-V3's
76.80 -> 74.29 GB. Unmeasured on a GPU.

The pieces share one dtype, device, batch and spatial size; the output is in the first piece's
memory format (torch.cat's, when the pieces agree). Backends: each piece's pass is bn_act's
kernel storing through the slice's strides (cuda: fastconv_cuda::bn_act_forward_out; triton:
triton_kernels/bn_act.py with `out`); torch: the reference, copied in.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastconv import reference
from fastconv._affine import batch_norm_scale_shift
from fastconv._geometry import empty_output
from fastconv._validation import check_same_device, check_same_dtype, fail
from fastconv.activations import activation_code
from fastconv.backends import OpImplementations, get_backend, use_backend
from fastconv.ops._common import call_key, check_activation_input, contiguous_vectors, refuse_float64
from fastconv.ops.batch_norm import check_batch_norm_arguments

# One piece's BatchNorm + activation into its slice of the output --------------------------------


def _into_cuda(*, c, scale, shift, activation, out):
    torch.ops.fastconv_cuda.bn_act_forward_out(c, scale, shift, activation_code(activation), out)


def _into_triton(*, c, scale, shift, activation, out):
    from fastconv.triton_kernels.bn_act import bn_act_forward

    scale, shift = contiguous_vectors(scale, shift)
    bn_act_forward(c, scale, shift, activation_code(activation), out=out)


def _into_torch(*, c, scale, shift, activation, out):
    out.copy_(reference.bn_act(c, scale, shift, activation))


INTO = OpImplementations("batch_norm_act_cat (one piece into its slice)")
INTO.register("cuda", _into_cuda, refuse_float64("c"))
INTO.register("triton", _into_triton)
INTO.register("torch", _into_torch)


# Checks -----------------------------------------------------------------------------------------


def _check(pieces, normalised, mean, invstd, weight, bias, activation) -> tuple[int, int, int, int]:
    """Every argument checked; returns the output's shape."""
    if not isinstance(pieces, (list, tuple)) or len(pieces) == 0:
        fail(f"pieces must be a non-empty list of 4-D tensors; got {pieces!r}")
    if list(normalised) != sorted(set(normalised)) or any(not 0 <= i < len(pieces) for i in normalised):
        fail(f"normalised must be increasing indices into pieces (0..{len(pieces) - 1}); got {list(normalised)}")
    for name, values in (("mean", mean), ("invstd", invstd), ("weight", weight), ("bias", bias)):
        if len(values) != len(normalised) and not (name in ("weight", "bias") and len(values) == 0):
            fail(f"{name} must have one entry per normalised piece ({len(normalised)})"
                 f"{' or none (no affine)' if name in ('weight', 'bias') else ''}; got {len(values)}")  # fmt: skip
    first = pieces[0]
    check_activation_input(first, "pieces[0]")
    for i, piece in enumerate(pieces):
        name = f"pieces[{i}]"
        check_activation_input(piece, name)
        check_same_device(name, piece, "pieces[0]", first)
        check_same_dtype(name, piece, "pieces[0]", first)
        others = (piece.shape[0], *piece.shape[2:])
        if others != (first.shape[0], *first.shape[2:]):
            fail(f"{name} must have pieces[0]'s batch and spatial size (N, H, W) = "
                 f"{(first.shape[0], *first.shape[2:])}; got {others}")  # fmt: skip
    for k, i in enumerate(normalised):
        w, b = (weight[k] if weight else None), (bias[k] if bias else None)
        try:
            check_batch_norm_arguments(pieces[i], mean[k], invstd[k], w, b, activation)
        except ValueError as error:  # name the entry: "mean must ..." -> "mean[1] (of pieces[2]) must ..."
            message = str(error).removeprefix("fastconv: ")
            for vector in ("mean", "invstd", "weight", "bias"):
                if message.startswith(f"{vector} "):
                    message = f"{vector}[{k}] (of pieces[{i}]){message[len(vector):]}"
            fail(message.replace("c's ", f"pieces[{i}]'s ").replace("channel of c", f"channel of pieces[{i}]"))
    activation_code(activation)
    return first.shape[0], sum(p.shape[1] for p in pieces), first.shape[2], first.shape[3]


# The op -----------------------------------------------------------------------------------------
# Tensor[] lists, not Tensor?[]: autograd differentiates through a list of tensors only when
# none of its entries is None (torch._library.autograd.not_list_of_tensor), hence the indices
# of the normalised pieces beside lists of their vectors.


def _slices(widths: Sequence[int]) -> list[slice]:
    bounds, start = [], 0
    for width in widths:
        bounds.append(slice(start, start + width))
        start += width
    return bounds


@torch.library.custom_op("fastconv::batch_norm_act_cat", mutates_args=())
def batch_norm_act_cat_op(
    pieces: list[torch.Tensor],
    normalised: list[int],
    mean: list[torch.Tensor],
    invstd: list[torch.Tensor],
    weight: list[torch.Tensor],
    bias: list[torch.Tensor],
    activation: Optional[str],
) -> torch.Tensor:
    """cat over pieces of act((c - mean[k]) * invstd[k] * weight[k] + bias[k]) for piece
    normalised[k], and of the piece itself for every other piece; mean and invstd each piece's
    own batch statistics (as fastconv::batch_norm_act takes them: their effect is in the
    piece's gradient); weight and bias empty for no affine."""
    out = empty_output(_check(pieces, normalised, mean, invstd, weight, bias, activation), pieces[0])
    if out.numel() == 0:
        return out
    where = _slices([p.shape[1] for p in pieces])
    for i, piece in enumerate(pieces):
        if i not in normalised:
            out[:, where[i]].copy_(piece)
    for k, i in enumerate(normalised):
        target, piece = out[:, where[i]], pieces[i]
        scale, shift = batch_norm_scale_shift(mean[k], invstd[k], weight[k] if weight else None,
                                              bias[k] if bias else None)  # fmt: skip
        if piece.dtype != torch.float64:
            scale, shift = scale.float(), shift.float()
        INTO(piece.device, call_key(piece, scale, activation, target), c=piece, scale=scale, shift=shift.to(scale.dtype),
             activation=activation, out=target)  # fmt: skip
    return out


@batch_norm_act_cat_op.register_fake
def _(pieces, normalised, mean, invstd, weight, bias, activation):
    return empty_output(_check(pieces, normalised, mean, invstd, weight, bias, activation), pieces[0])


def _setup_context(ctx, inputs, output) -> None:
    pieces, normalised, mean, invstd, weight, bias, activation = inputs
    # A copied piece needs nothing kept: its gradient is its slice of grad_out.
    ctx.save_for_backward(*(pieces[i] for i in normalised), *mean, *invstd, *weight, *bias)
    ctx.normalised, ctx.affine = list(normalised), len(weight) > 0
    ctx.widths, ctx.activation = [p.shape[1] for p in pieces], activation
    ctx.backend = get_backend()  # autograd's CUDA worker thread does not see use_backend()


def _backward(ctx, grad_out):
    needs = ctx.needs_input_grad
    count = len(ctx.normalised)
    saved = list(ctx.saved_tensors)
    cs, mean, invstd = saved[:count], saved[count : 2 * count], saved[2 * count : 3 * count]
    weight, bias = (saved[3 * count : 4 * count], saved[4 * count :]) if ctx.affine else ([None] * count,) * 2
    where = _slices(ctx.widths)
    grad_pieces = [grad_out[:, where[i]] for i in range(len(ctx.widths))]  # a copied piece's: its slice
    grad_weight, grad_bias = [], []
    with use_backend(ctx.backend):
        for k, i in enumerate(ctx.normalised):
            grad_c, grad_w, grad_b = torch.ops.fastconv.batch_norm_act_backward(
                grad_pieces[i], cs[k], mean[k], invstd[k], weight[k], bias[k], ctx.activation
            )
            grad_pieces[i] = grad_c
            if ctx.affine:
                grad_weight.append(grad_w.to(weight[k].dtype))
                grad_bias.append(grad_b.to(bias[k].dtype))
    # Each list argument's gradient is a list of its length (None where none is wanted).
    wanted = lambda grads, needs: [g if want else None for g, want in zip(grads, needs)]
    nones = [None] * count
    return (wanted(grad_pieces, needs[0]), None, nones, nones, wanted(grad_weight, needs[4]),
            wanted(grad_bias, needs[5]), None)  # fmt: skip


batch_norm_act_cat_op.register_autograd(_backward, setup_context=_setup_context)


def batch_norm_act_cat(pieces: Sequence[torch.Tensor], mean: Sequence[Optional[torch.Tensor]],
                       invstd: Sequence[Optional[torch.Tensor]], weight: Sequence[Optional[torch.Tensor]],
                       bias: Sequence[Optional[torch.Tensor]], activation: Optional[str] = "relu") -> torch.Tensor:  # fmt: skip
    """See the module docstring: the concatenation of the pieces' training BatchNorm +
    activation, or of the pieces themselves where mean and invstd are None; each list has one
    entry per piece (weight and bias None for no affine, and for a copied piece)."""
    pieces = list(pieces)
    for name, values in (("mean", mean), ("invstd", invstd), ("weight", weight), ("bias", bias)):
        if len(values) != len(pieces):
            fail(f"{name} must have one entry per piece ({len(pieces)}); got {len(values)}")
    normalised = [i for i, m in enumerate(mean) if m is not None]
    for i in range(len(pieces)):
        if (mean[i] is None) != (invstd[i] is None):
            fail(f"mean[{i}] and invstd[{i}] must both be given (a BatchNorm'd piece) or both be None (a copied "
                 f"one); got {'mean' if mean[i] is not None else 'invstd'}[{i}] alone")  # fmt: skip
        for name, values in (("weight", weight), ("bias", bias)):
            if mean[i] is None and values[i] is not None:
                fail(f"{name}[{i}] must be None for a piece copied as it is (mean[{i}] None); got a tensor")
    weights, biases = _affine(pieces, normalised, weight, "weight", 1.0), _affine(pieces, normalised, bias, "bias", 0.0)
    return torch.ops.fastconv.batch_norm_act_cat(pieces, normalised, [mean[i] for i in normalised],
                                                 [invstd[i] for i in normalised], weights, biases, activation)  # fmt: skip


def _affine(pieces, normalised, values, name: str, identity: float) -> list[torch.Tensor]:
    """The normalised pieces' vectors: none when no piece has one, else each piece's, the
    identity (float32, BatchNorm's precision) standing in for a piece without one."""
    given = [values[i] for i in normalised]
    if all(v is None for v in given):
        return []
    return [v if v is not None else torch.full((pieces[i].shape[1],), identity, device=pieces[i].device)
            for v, i in zip(given, normalised)]  # fmt: skip
