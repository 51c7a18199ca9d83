"""fastconv::inverted_residual: the MobileNetV2 inverted residual and the depthwise-separable
(MobileNetV1) block as one op, the expanded tensor never in memory on the triton backend.

    e = act_e(conv1x1(x, expand_weight) * expand_scale + expand_shift)     (absent: e = x)
    d = act_d(dwconv(e, dw_weight, stride, padding, dilation) * dw_scale + dw_shift)
    y = act_p(conv1x1(d, project_weight) * project_scale + project_shift) (+ residual)

One schema serves both blocks: the depthwise-separable block is the inverted residual without
the expansion (expand_weight None), with an activation after the projection. The public
functions `inverted_residual` and `depthwise_separable_conv2d` fill in its arguments.

Backends: `triton` is the fused kernel with both GEMMs on the tensor cores
(triton_kernels/inverted_residual.py, two kernels timed at a shape's first call); `cuda` the
same dataflow in CUDA C++, also two kernels timed at the first call: on the CUDA cores
(csrc/inverted_residual_kernel.cuh: fp32 FMAs, 4x4 tiles, one launch per 384 output channels,
a tile's input window in 96 KB of shared memory: every MobileNetV2 and MobileNetV1 block in
half precision, and float32) and, in half precision with even channel counts, on the tensor
cores (csrc/inverted_residual_mma_kernel.cuh: mma.sync GEMMs, 8x8 tiles);
FASTCONV_CUDA_FUSED_BLOCK_KERNEL=cuda_cores|tensor_cores forces one. Both backends get the
scales folded into the weights on the host per call, a weight-sized multiply that the modules
avoid by passing folded weights and no scales. `torch` is the unfused reference chain
(fastconv.reference), also the CPU default and the float64 path. `auto` times the GPU two.

Inference only: the fused op has no backward. When gradients are wanted the public functions
run the same chain as fastconv's unfused, differentiable ops (pointwise_conv2d,
depthwise_conv2d), and a backward through a direct torch.ops call raises, saying so, rather
than return no gradients. The modules' training path is the unfused ops too.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import torch

from fastconv import reference
from fastconv._geometry import empty_output, normalise_geometry
from fastconv._timing import choose_kernel
from fastconv._validation import check_channel_vector, check_shape, fail
from fastconv.activations import activation_code
from fastconv.backends import OpImplementations
from fastconv.ops._autocast import register_autocast
from fastconv.ops._common import (
    allow_tf32,
    autocast_inputs,
    call_key,
    check_activation_input,
    check_like,
    contiguous_vectors,
    conv_output_size,
    refuse_float64,
)

# The schema's arguments after (x, expand_weight, dw_weight, project_weight), in order.
_OPTIONS = (
    "stride", "padding", "dilation", "expand_scale", "expand_shift", "expand_activation", "dw_scale", "dw_shift",
    "dw_activation", "project_scale", "project_shift", "project_activation", "residual",
)  # fmt: skip


def _check_weight(name: str, weight: torch.Tensor, x: torch.Tensor, shape_text: str, rows: int, columns: int,
                  columns_from: str) -> None:  # fmt: skip
    """A (rows, columns, 1, 1) 1x1 weight; `columns_from` says where the column count comes from."""
    check_like(name, weight, x)
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        fail(f"{name} must have shape {shape_text}, a 1x1 conv; got {tuple(weight.shape)}")
    if weight.shape[1] != columns:
        fail(f"{name}.shape[1] must equal {columns_from} {columns}; got {weight.shape[1]}")
    if rows is not None and weight.shape[0] != rows:
        fail(f"{name}.shape[0] must equal {rows}; got {weight.shape[0]}")


def _check(x, expand_weight, dw_weight, project_weight, stride, padding, dilation, expand_scale, expand_shift,
           expand_activation, dw_scale, dw_shift, dw_activation, project_scale, project_shift, project_activation,
           residual) -> tuple:  # fmt: skip
    """Checks every argument; returns the output shape."""
    check_activation_input(x)
    c_in = x.shape[1]
    if expand_weight is not None:
        _check_weight("expand_weight", expand_weight, x, "(C_hid, C_in, 1, 1)", None, c_in, "x's input channels")
        hidden, hidden_from = expand_weight.shape[0], "expand_weight's output channels"
    else:
        for name, value in (("expand_scale", expand_scale), ("expand_shift", expand_shift)):
            if value is not None:
                fail(f"{name} must be None when expand_weight is None (no expansion); got a tensor")
        if expand_activation is not None:
            fail(f"expand_activation must be None when expand_weight is None (no expansion); got {expand_activation!r}")
        hidden, hidden_from = c_in, "x's channels (no expansion)"
    check_like("dw_weight", dw_weight, x)
    if dw_weight.dim() != 4 or dw_weight.shape[1] != 1:
        fail(f"dw_weight must have shape (C_hid, 1, kh, kw), a depthwise conv; got {tuple(dw_weight.shape)}")
    if dw_weight.shape[0] != hidden:
        fail(f"dw_weight.shape[0] must equal {hidden_from} {hidden}; got {dw_weight.shape[0]}")
    if hidden == 0:
        fail("the hidden width (dw_weight.shape[0]) must be >= 1; got 0")
    _check_weight("project_weight", project_weight, x, "(C_out, C_hid, 1, 1)", None, hidden, "dw_weight's channels")
    c_out = project_weight.shape[0]
    height, width = conv_output_size(x, dw_weight, tuple(stride), tuple(padding), tuple(dilation))
    for name, vector, length, per in (
        ("expand_scale", expand_scale, hidden, "hidden channel"), ("expand_shift", expand_shift, hidden, "hidden channel"),
        ("dw_scale", dw_scale, hidden, "hidden channel"), ("dw_shift", dw_shift, hidden, "hidden channel"),
        ("project_scale", project_scale, c_out, "output channel"), ("project_shift", project_shift, c_out, "output channel"),
    ):  # fmt: skip
        check_channel_vector(vector, name, length, x, per=per)
    for name, activation in (("expand_activation", expand_activation), ("dw_activation", dw_activation),
                             ("project_activation", project_activation)):  # fmt: skip
        activation_code(activation, name)
    shape = (x.shape[0], c_out, height, width)
    if residual is not None:
        check_like("residual", residual, x)
        check_shape(residual, "residual", shape)
    return shape


# Backend implementations: each writes into `out` -------------------------------------------------


def _forward_torch(*, out, x, expand_weight, dw_weight, project_weight, stride, padding, dilation, expand_scale,
                   expand_shift, expand_activation, dw_scale, dw_shift, dw_activation, project_scale, project_shift,
                   project_activation, residual):  # fmt: skip
    """The unfused chain, each intermediate written in x's dtype as eager PyTorch would."""
    h = x
    if expand_weight is not None:
        h = reference.pointwise_conv2d(h, expand_weight, None, expand_scale, expand_shift, expand_activation)
    h = reference.depthwise_conv2d(h, dw_weight, None, stride, padding, dilation, dw_scale, dw_shift, dw_activation)
    y = reference.pointwise_conv2d(h, project_weight, None, project_scale, project_shift, project_activation, residual)
    return out.copy_(y)


def _fold(weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """weight (rows, ...) as a 2-D (rows, columns) matrix with row r multiplied by scale[r], in
    fp32 and rounded back to the weight's dtype once (what the modules' cached fold does)."""
    matrix = weight.reshape(weight.shape[0], -1)
    if scale is None:
        return matrix
    return (matrix.float() * scale.float()[:, None]).to(weight.dtype)


def _forward_triton(*, out, x, expand_weight, dw_weight, project_weight, stride, padding, dilation, expand_scale,
                    expand_shift, expand_activation, dw_scale, dw_shift, dw_activation, project_scale, project_shift,
                    project_activation, residual):  # fmt: skip
    from fastconv.triton_kernels import inverted_residual

    expand = _fold(expand_weight, expand_scale) if expand_weight is not None else None
    expand_shift, dw_shift, project_shift = contiguous_vectors(expand_shift, dw_shift, project_shift)
    return inverted_residual.fused_block(
        x, expand, expand_shift, _fold(dw_weight, dw_scale), dw_shift, _fold(project_weight, project_scale),
        project_shift, out, tuple(dw_weight.shape[2:]), stride[0], (padding[0], padding[1]), dilation[0],
        activation_code(expand_activation), activation_code(dw_activation), activation_code(project_activation),
        residual, allow_tf32(),
    )  # fmt: skip


def _forward_cuda(*, out, x, expand_weight, dw_weight, project_weight, stride, padding, dilation, expand_scale,
                  expand_shift, expand_activation, dw_scale, dw_shift, dw_activation, project_scale, project_shift,
                  project_activation, residual):  # fmt: skip
    def matrix(weight, scale):
        return _fold(weight, scale).contiguous()

    def bias(shift):
        return shift.float().contiguous() if shift is not None else None

    arguments = (
        x, matrix(expand_weight, expand_scale) if expand_weight is not None else None, bias(expand_shift),
        matrix(dw_weight, dw_scale), bias(dw_shift), matrix(project_weight, project_scale), bias(project_shift),
        list(dw_weight.shape[2:]), stride[0], [padding[0], padding[1]], dilation[0],
        activation_code(expand_activation), activation_code(dw_activation), activation_code(project_activation),
        residual, out,
    )  # fmt: skip

    def tensor_cores():
        why = _tensor_core_kernel_supports(x, expand_weight is not None, dw_weight, stride[0], dilation[0])
        if why is not None:  # a forced choice says so (as the backends do); the first-call timing leaves it out
            raise RuntimeError(f"fastconv: backend 'cuda' cannot run inverted_residual with "
                               f"FASTCONV_CUDA_FUSED_BLOCK_KERNEL=tensor_cores: its tensor-core kernel: {why}")
        torch.ops.fastconv_cuda.inverted_residual_forward(*arguments, kernel=1)

    launches = {
        "cuda_cores": lambda: torch.ops.fastconv_cuda.inverted_residual_forward(*arguments, kernel=0),
        "tensor_cores": tensor_cores,
    }
    key = (tuple(x.shape), x.dtype, x.stride(), expand_weight is not None, tuple(dw_weight.shape), project_weight.shape[0],
           stride[0], dilation[0], tuple(padding), out.stride(), residual is not None)  # fmt: skip
    global last_cuda_kernel
    last_cuda_kernel = choose_kernel("FASTCONV_CUDA_FUSED_BLOCK_KERNEL", launches, key, x, _CHOSEN_CUDA_KERNEL)
    launches[last_cuda_kernel]()
    return out


# Which CUDA kernel runs a shape (fastconv._timing.choose_kernel): the CUDA-core kernel (every
# dtype) or, in half precision, the tensor-core one; FASTCONV_CUDA_FUSED_BLOCK_KERNEL=
# cuda_cores|tensor_cores forces one (the GPU tests run both).
_CHOSEN_CUDA_KERNEL: dict = {}
last_cuda_kernel = "cuda_cores"  # the kernel of the latest call (the benchmark records it)


def last_kernel(backend: str) -> str:
    """The fused-block kernel that `backend`'s ("cuda" or "triton") latest call ran."""
    if backend == "cuda":
        return last_cuda_kernel
    from fastconv.triton_kernels import inverted_residual as kernels

    return kernels.last_kernel


# The variable that forces each GPU backend's choice of fused-block kernel.
KERNEL_ENVIRONMENT = {"triton": "FASTCONV_FUSED_BLOCK_KERNEL", "cuda": "FASTCONV_CUDA_FUSED_BLOCK_KERNEL"}


@contextlib.contextmanager
def forced_kernel(backend: str, kernel: str) -> Iterator[None]:
    """Inside, `backend`'s fused block runs `kernel` ("gather" or "tiled" for triton,
    "cuda_cores" or "tensor_cores" for cuda); nothing changes when kernel is empty."""
    if not kernel:
        yield
        return
    name = KERNEL_ENVIRONMENT[backend]
    previous = os.environ.get(name)
    os.environ[name] = kernel
    try:
        yield
    finally:
        os.environ.pop(name)
        if previous is not None:
            os.environ[name] = previous

# csrc/inverted_residual_mma.cu's limits: fp16/bf16, even channel counts, and an 8x8 tile's
# window (x staged when there is an expansion, e in chunks of 32 channels, d over the tile, in
# rows padded to 16 pixels and 16 + 8 channels, 2 bytes each) within 160 KB of shared memory.
_TENSOR_CORE_MAX_SHARED = 160 * 1024


def _tensor_core_shared_bytes(window_pixels: int, c_in: int, expand: bool) -> int:
    rows = -(-window_pixels // 16) * 16
    staged_x = rows * (-(-c_in // 16) * 16 + 8) * 2 if expand else 0
    return staged_x + rows * 40 * 2 + 64 * 40 * 2


def _tensor_core_kernel_supports(x: torch.Tensor, expand: bool, dw_weight: torch.Tensor, stride: int,
                                 dilation: int) -> Optional[str]:  # fmt: skip
    """Why the tensor-core kernel cannot take a block the CUDA-core kernel takes, or None."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes float16 and bfloat16; got {x.dtype}"
    c_in, c_hid = x.shape[1], dw_weight.shape[0]
    if c_in % 2 or c_hid % 2:
        return f"it needs even C_in and C_hid (it loads channel pairs); got C_in {c_in}, C_hid {c_hid}"
    kh, kw = dw_weight.shape[2:]
    window = ((8 - 1) * stride + (kh - 1) * dilation + 1) * ((8 - 1) * stride + (kw - 1) * dilation + 1)
    needed = _tensor_core_shared_bytes(window, c_in, expand)
    if needed > _TENSOR_CORE_MAX_SHARED:
        return f"its 8x8 tile's window needs {needed} bytes of shared memory, over {_TENSOR_CORE_MAX_SHARED}"
    return None


# csrc/inverted_residual.cu's limit: a tile's input window of x (with the chunk's expansion)
# fits 96 KB of shared memory. Any number of output channels: one launch per 384.
_CUDA_MAX_SHARED = 96 * 1024


def _cuda_supports(**arguments) -> Optional[str]:
    why = _triton_supports(**arguments)
    if why is not None:
        return why.replace("its fused kernel", "its CUDA kernel")
    (kh, kw), stride, dilation = arguments["dw_weight"].shape[2:], arguments["stride"][0], arguments["dilation"][0]
    if stride > 4 or dilation > 4 or max(kh, kw) > 15 or max(arguments["padding"][:2]) > 64:
        return (f"its CUDA kernel takes strides and dilations up to 4, windows up to 15x15 and paddings up to 64; "
                f"got stride {stride}, dilation {dilation}, a {kh}x{kw} window, padding {list(arguments['padding'])}")
    # A 4x4 tile's window of x in x's dtype (rounded up to 16 bytes), then float chunks of
    # 32 hidden channels of e over the window and of d over the tile (csrc/inverted_residual.cu).
    window = ((4 - 1) * stride + (kh - 1) * dilation + 1) * ((4 - 1) * stride + (kw - 1) * dilation + 1)
    x = arguments["x"]
    needed = -(-window * x.shape[1] * x.element_size() // 16) * 16 + (window * 32 + 16 * 32) * 4
    if needed > _CUDA_MAX_SHARED:
        return f"its CUDA kernel's tile window needs {needed} bytes of shared memory, over {_CUDA_MAX_SHARED}"
    return None


def _triton_supports(**arguments) -> Optional[str]:
    why = refuse_float64("x")(**arguments)
    if why is not None:
        return "its fused kernel takes float32, float16 and bfloat16 (the torch backend runs float64); got float64"
    stride, dilation = arguments["stride"], arguments["dilation"]
    if stride[0] != stride[1] or dilation[0] != dilation[1]:
        return f"its kernel takes the same stride and dilation along both axes; got stride {list(stride)}, dilation {list(dilation)}"
    return None


FORWARD = OpImplementations("inverted_residual")
FORWARD.register("cuda", _forward_cuda, _cuda_supports)
FORWARD.register("triton", _forward_triton, _triton_supports)
FORWARD.register("torch", _forward_torch)


# Registered op ---------------------------------------------------------------------------------


@torch.library.custom_op("fastconv::inverted_residual", mutates_args=())
def inverted_residual_op(
    x: torch.Tensor,
    expand_weight: Optional[torch.Tensor],
    dw_weight: torch.Tensor,
    project_weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    expand_scale: Optional[torch.Tensor],
    expand_shift: Optional[torch.Tensor],
    expand_activation: Optional[str],
    dw_scale: Optional[torch.Tensor],
    dw_shift: Optional[torch.Tensor],
    dw_activation: Optional[str],
    project_scale: Optional[torch.Tensor],
    project_shift: Optional[torch.Tensor],
    project_activation: Optional[str],
    residual: Optional[torch.Tensor],
) -> torch.Tensor:
    options = dict(zip(_OPTIONS, (
        tuple(stride), tuple(padding), tuple(dilation), expand_scale, expand_shift, expand_activation, dw_scale,
        dw_shift, dw_activation, project_scale, project_shift, project_activation, residual,
    )))  # fmt: skip
    out = empty_output(_check(x, expand_weight, dw_weight, project_weight, **options), x)
    if out.numel() == 0:
        return out
    key = call_key(x, expand_weight, dw_weight, project_weight, *options.values())
    return FORWARD(
        x.device, key, out=out, x=x, expand_weight=expand_weight, dw_weight=dw_weight, project_weight=project_weight,
        **options,
    )  # fmt: skip


@inverted_residual_op.register_fake
def _(x, expand_weight, dw_weight, project_weight, *options):
    return empty_output(_check(x, expand_weight, dw_weight, project_weight, *options), x)


def _setup_context(ctx, inputs, output) -> None:
    pass


def _backward(ctx, grad_y):
    # Reached only through a direct torch.ops call with inputs that want gradients (the public
    # functions route those calls to the unfused ops): say so instead of returning zeros.
    raise RuntimeError(
        "fastconv: torch.ops.fastconv.inverted_residual is inference-only (no fused backward yet); call "
        "fastconv.inverted_residual or fastconv.depthwise_separable_conv2d, which run fastconv's unfused "
        "differentiable ops when gradients are wanted"
    )


inverted_residual_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(inverted_residual_op, cast=("x", "expand_weight", "dw_weight", "project_weight", "residual"))


# The unfused, differentiable chain -------------------------------------------------------------


def _unfused(x, expand_weight, dw_weight, project_weight, stride, padding, dilation, expand_scale, expand_shift,
             expand_activation, dw_scale, dw_shift, dw_activation, project_scale, project_shift, project_activation,
             residual):  # fmt: skip
    """The block as fastconv's own unfused ops, each with its autograd: the path that gradients
    take (the fused op has none yet). Checked first as the fused op checks, so both paths refuse
    the same calls with the same messages."""
    _check(x, expand_weight, dw_weight, project_weight, stride, padding, dilation, expand_scale, expand_shift,
           expand_activation, dw_scale, dw_shift, dw_activation, project_scale, project_shift, project_activation,
           residual)  # fmt: skip
    ops = torch.ops.fastconv
    h = x
    if expand_weight is not None:
        h = ops.pointwise_conv2d(h, expand_weight, scale=expand_scale, shift=expand_shift, activation=expand_activation)
    h = ops.depthwise_conv2d(h, dw_weight, None, stride, padding, dilation, dw_scale, dw_shift, dw_activation)
    return ops.pointwise_conv2d(
        h, project_weight, scale=project_scale, shift=project_shift, activation=project_activation, residual=residual
    )


def _wants_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _run(x, expand_weight, dw_weight, project_weight, stride, padding, dilation, vectors: dict, activations: dict,
         residual):  # fmt: skip
    if not isinstance(x, torch.Tensor) or not isinstance(dw_weight, torch.Tensor) or not isinstance(project_weight, torch.Tensor):
        fail(f"x, dw_weight and project_weight must be tensors; got {type(x).__name__}, {type(dw_weight).__name__} "
             f"and {type(project_weight).__name__}")  # fmt: skip
    if dw_weight.dim() != 4:
        fail(f"dw_weight must have shape (C_hid, 1, kh, kw), a depthwise conv; got {tuple(dw_weight.shape)}")
    stride_, padding_, dilation_ = normalise_geometry(tuple(dw_weight.shape[2:]), stride, padding, dilation)
    x, expand_weight, dw_weight, project_weight, residual = autocast_inputs(x, expand_weight, dw_weight, project_weight, residual)
    args = (
        x, expand_weight, dw_weight, project_weight, stride_, padding_, dilation_,
        vectors["expand_scale"], vectors["expand_shift"], activations["expand"],
        vectors["dw_scale"], vectors["dw_shift"], activations["dw"],
        vectors["project_scale"], vectors["project_shift"], activations["project"], residual,
    )  # fmt: skip
    if _wants_grad(x, expand_weight, dw_weight, project_weight, residual, *vectors.values()):
        return _unfused(*args)
    return torch.ops.fastconv.inverted_residual(*args)


# Public functions ----------------------------------------------------------------------------


def inverted_residual(
    x: torch.Tensor,
    expand_weight: Optional[torch.Tensor],
    dw_weight: torch.Tensor,
    project_weight: torch.Tensor,
    *,
    stride=1,
    expand_scale: Optional[torch.Tensor] = None,
    expand_shift: Optional[torch.Tensor] = None,
    dw_scale: Optional[torch.Tensor] = None,
    dw_shift: Optional[torch.Tensor] = None,
    project_scale: Optional[torch.Tensor] = None,
    project_shift: Optional[torch.Tensor] = None,
    activation: Optional[str] = "relu6",
    use_residual: bool = False,
    padding=None,
    dilation=1,
) -> torch.Tensor:
    """MobileNetV2's inverted residual with its BatchNorms folded, fused into one kernel.

    y = bn_p(conv1x1(act(bn_d(dw(act(bn_e(conv1x1(x, expand_weight))), dw_weight))), project_weight)) (+ x)

    Each bn_* is `v * scale + shift` per channel (a folded BatchNorm; None is 1 or 0). The
    projection is linear, as in MobileNetV2.

    Args:
        x: (N, C_in, H, W) in fp32, fp16 or bf16 (fp64 on the torch backend); channels_last is
            the kernel's layout, a channel slice of a channels_last buffer is read in place, and
            NCHW is converted to channels_last once (one copy of x) before the kernel.
        expand_weight: (C_hid, C_in, 1, 1), or None for expansion ratio 1 (MobileNetV2's first
            block: the depthwise reads x, and expand_scale/expand_shift must be None).
        dw_weight: (C_hid, 1, k, k). project_weight: (C_out, C_hid, 1, 1). All in x's dtype.
        stride: 1 or 2 (an int or a pair). padding: default (k - 1) // 2 * dilation.
        expand_scale, expand_shift, dw_scale, dw_shift: (C_hid,); project_scale, project_shift:
            (C_out,); x's dtype or float32.
        activation: after the expansion and the depthwise conv: "relu6" (MobileNetV2's), "relu",
            "silu", "hardswish" or None.
        use_residual: add x to the output; needs stride 1 and C_in == C_out.

    Returns:
        (N, C_out, Ho, Wo) in x's dtype, channels_last when x's channels are innermost.
        Differentiable: when gradients are wanted it runs fastconv's unfused ops instead of the
        fused kernel (which has no backward yet).
    """
    if not isinstance(dw_weight, torch.Tensor) or dw_weight.dim() != 4:
        fail(f"dw_weight must be a 4-D tensor (C_hid, 1, kh, kw); got {getattr(dw_weight, 'shape', type(dw_weight).__name__)}")
    kernel = tuple(dw_weight.shape[2:])
    dilation_ = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    if padding is None:
        padding = tuple((k - 1) // 2 * d for k, d in zip(kernel, dilation_))
    residual = None
    if use_residual:
        if not isinstance(x, torch.Tensor) or not isinstance(project_weight, torch.Tensor):
            fail("x and project_weight must be tensors")
        stride_pair = (stride, stride) if isinstance(stride, int) else tuple(stride)
        if tuple(stride_pair) != (1, 1):
            fail(f"use_residual needs stride 1 (the output has x's size); got stride {stride!r}")
        if project_weight.shape[0] != x.shape[1]:
            fail(
                f"use_residual needs project_weight.shape[0] (C_out) equal to x's {x.shape[1]} channels (C_in); "
                f"got {project_weight.shape[0]}"
            )
        residual = x
    vectors = dict(expand_scale=expand_scale, expand_shift=expand_shift, dw_scale=dw_scale, dw_shift=dw_shift,
                   project_scale=project_scale, project_shift=project_shift)  # fmt: skip
    activations = dict(expand=activation if expand_weight is not None else None, dw=activation, project=None)
    return _run(x, expand_weight, dw_weight, project_weight, stride, padding, dilation, vectors, activations, residual)


def depthwise_separable_conv2d(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    pw_weight: torch.Tensor,
    *,
    stride=1,
    padding=1,
    dilation=1,
    dw_scale: Optional[torch.Tensor] = None,
    dw_shift: Optional[torch.Tensor] = None,
    dw_activation: Optional[str] = "relu6",
    pw_scale: Optional[torch.Tensor] = None,
    pw_shift: Optional[torch.Tensor] = None,
    pw_activation: Optional[str] = "relu6",
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The MobileNetV1 block (timm's DepthwiseSeparableConv without SE), fused into one kernel:

    y = pw_act(conv1x1(dw_act(dw(x, dw_weight) * dw_scale + dw_shift), pw_weight) * pw_scale + pw_shift) (+ residual)

    It is the inverted residual without the expansion (the same op and kernel).

    Args:
        x: (N, C, H, W); layouts as in `inverted_residual` (NCHW converted to channels_last once).
        dw_weight: (C, 1, k, k). pw_weight: (C_out, C, 1, 1). In x's dtype.
        stride, padding, dilation: the depthwise conv's, as F.conv2d takes them (padding may be
            an int, a pair, "same" or "valid"; the default 1 suits k = 3).
        dw_scale, dw_shift: (C,); pw_scale, pw_shift: (C_out,): folded BatchNorms, x's dtype or fp32.
        dw_activation, pw_activation: None, "relu", "relu6", "silu" or "hardswish".
        residual: (N, C_out, Ho, Wo) or None, added after pw_activation.

    Returns:
        (N, C_out, Ho, Wo) in x's dtype, channels_last when x's channels are innermost;
        differentiable through fastconv's unfused ops, as `inverted_residual`.
    """
    vectors = dict(expand_scale=None, expand_shift=None, dw_scale=dw_scale, dw_shift=dw_shift, project_scale=pw_scale,
                   project_shift=pw_shift)  # fmt: skip
    activations = dict(expand=None, dw=dw_activation, project=pw_activation)
    return _run(x, None, dw_weight, pw_weight, stride, padding, dilation, vectors, activations, residual)
