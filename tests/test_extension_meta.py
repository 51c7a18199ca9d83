"""The extension's Meta kernels agree with the Python fakes.

Every fastconv_cuda op has a Meta kernel that runs the CUDA kernel's argument checks and output
allocation without a GPU, while the public ops (torch.ops.fastconv.*) have Python fakes that
torch.compile and meta tensors use. The two decide the same things (output shapes, dtypes and
layouts) in two languages, so this file calls each C++ op on meta tensors, in NCHW,
channels_last and a channel slice of a wider channels_last buffer, and checks that what it
returns matches the fake of the fastconv op it implements. With FASTCONV_EXPECT_EXTENSION=1
(CI) a missing extension fails these tests instead of skipping them.
"""

from __future__ import annotations

import pytest
import torch

import fastconv
from harness import require_extension

require_extension()

cuda = torch.ops.fastconv_cuda
fake = torch.ops.fastconv  # called directly: the public functions' autocast checks need a real device

LAYOUTS = ("nchw", "channels_last", "channel_slice")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def meta(shape, dtype, layout="nchw"):
    """A meta tensor of `shape`: dense NCHW, dense channels_last, or channels 1..C of a wider
    channels_last buffer (DenseNet's concatenations)."""
    if layout == "channel_slice":
        wide = torch.empty(shape[0], shape[1] + 3, *shape[2:], dtype=dtype, device="meta")
        return wide.contiguous(memory_format=torch.channels_last)[:, 1 : shape[1] + 1]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=memory_format)


def vector(n, dtype=torch.float32):
    return torch.empty(n, dtype=dtype, device="meta")


def assert_same_outputs(ours, theirs):
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        described = f"output {i}: C++ {tuple(a.shape)} {a.dtype} {a.stride()}, fake {tuple(b.shape)} {b.dtype} {b.stride()}"
        assert a.device.type == b.device.type == "meta", described
        assert a.shape == b.shape and a.dtype == b.dtype, described
        assert a.stride() == b.stride(), described


# Each case: (C++ op, its twin, dtype, layout) -> (the C++ op's outputs, the fake's outputs).


def bn_act_forward(dtype, layout):
    x, s = meta((2, 6, 5, 7), dtype, layout), vector(6)
    return cuda.bn_act_forward(x, s, s, 2), fake.bn_act(x, s, s, "relu6")


def bn_act_backward(dtype, layout):
    x, s = meta((2, 6, 5, 7), dtype, layout), vector(6)
    g = meta((2, 6, 5, 7), dtype, "nchw")
    return cuda.bn_act_backward(g, x, s, s, 3), fake.bn_act_backward(g, x, s, s, "silu")


DEPTHWISE = ([2, 2], [1, 0, 2, 1], [1, 1])  # stride, padding (top, left, bottom, right), dilation


def depthwise_inputs(dtype, layout, multiplier=2):
    x = meta((2, 8, 9, 11), dtype, layout)
    return x, torch.empty(8 * multiplier, 1, 3, 3, dtype=dtype, device="meta")


def depthwise_forward(dtype, layout):
    x, w = depthwise_inputs(dtype, layout)
    b, s = torch.empty(16, dtype=dtype, device="meta"), vector(16)
    return (
        cuda.depthwise_forward(x, w, b, *DEPTHWISE, s, s, 1),
        fake.depthwise_conv2d(x, w, b, *DEPTHWISE, s, s, "relu"),
    )


def depthwise_grad_c(x, w):
    # Ho = (9 + 1 + 2 - 3) // 2 + 1 = 5, Wo = (11 + 0 + 1 - 3) // 2 + 1 = 5
    return torch.empty(x.shape[0], w.shape[0], 5, 5, dtype=x.dtype, device="meta")


def depthwise_backward_input(dtype, layout):
    x, w = depthwise_inputs(dtype, layout)
    g = depthwise_grad_c(x, w)
    return (
        cuda.depthwise_backward_input(g, x, w, *DEPTHWISE),
        fake.depthwise_conv2d_backward_input(g, x, w, *DEPTHWISE),
    )


def depthwise_backward_weight(dtype, layout):
    x, w = depthwise_inputs(dtype, layout)
    g = depthwise_grad_c(x, w)
    return (
        cuda.depthwise_backward_weight(g, x, w, *DEPTHWISE),
        fake.depthwise_conv2d_backward_weight(g, x, w, *DEPTHWISE),
    )


def pointwise_forward(dtype, layout):
    """The C++ op writes into `out`; its twin allocates. So the fake's output is handed to the
    C++ op as `out` (which its checks must accept), and compared with what the fake returns."""
    x = meta((2, 16, 5, 7), dtype, layout)
    w = torch.empty(24, 16, 1, 1, dtype=dtype, device="meta")
    b, s, t = torch.empty(24, dtype=dtype, device="meta"), vector(24), vector(16)
    theirs = fake.pointwise_conv2d(x, w, b, s, s, "relu6", None, False, t, t, "relu")
    out = torch.empty_strided(theirs.shape, theirs.stride(), dtype=theirs.dtype, device="meta")
    cuda.pointwise_forward(x, w[:, :, 0, 0], b, s, s, 2, None, False, t, t, 1, True, out)
    return out, theirs


CONV = ([2, 1], [1, 1, 2, 0], [1, 2], 2)  # stride, padding, dilation, groups


def conv_inputs(dtype, layout):
    return meta((2, 8, 11, 13), dtype, layout), torch.empty(12, 4, 3, 3, dtype=dtype, device="meta")


def conv_bn_act_forward(dtype, layout):
    x, w = conv_inputs(dtype, layout)
    s = vector(12)
    out, _, _ = cuda.conv_bn_act_forward(x, w, None, *CONV, s, s, 4, False, True)
    return out, fake.conv2d_bn_act(x, w, None, *CONV, s, s, "hardswish")


def conv_bn_act_forward_with_stats(dtype, layout):
    x, w = conv_inputs(dtype, layout)
    b = torch.empty(12, dtype=dtype, device="meta")
    return (
        cuda.conv_bn_act_forward(x, w, b, *CONV, None, None, 0, True, True),
        fake.conv2d_batch_stats(x, w, b, *CONV),
    )


def conv_bn_act_out(dtype, layout):
    """The conv stored into a channel slice of a wider buffer (a dense block's, an Inception
    block's): the C++ op and fastconv::conv2d_out's fake return the same statistics."""
    x, w = conv_inputs(dtype, layout)
    out = meta((2, 12, 6, 10), dtype, "channel_slice")  # Ho = (11 + 3 - 3) // 2 + 1, Wo = 13 + 1 - 5 + 1
    return (
        cuda.conv_bn_act_out(x, w, None, *CONV, None, None, 0, True, True, None, False, out),
        fake.conv2d_out(x, w, *CONV, True, out),
    )


def conv_bn_act_out_with_residual(dtype, layout):
    """ResNet's BasicBlock epilogue: relu(bn(conv) + identity), the identity a channel slice;
    fastconv::conv2d_bn_act allocates the output the C++ op then fills."""
    x, w = conv_inputs(dtype, layout)
    s = vector(12)
    residual = meta((2, 12, 6, 10), dtype, "channel_slice")
    out = fake.conv2d_bn_act(x, w, None, *CONV, s, s, "relu", residual, True)
    return (
        (out, *cuda.conv_bn_act_out(x, w, None, *CONV, s, s, 1, False, True, residual, True, out)),
        (fake.conv2d_bn_act(x, w, None, *CONV, s, s, "relu"), vector(0), vector(0)),
    )


def bn_act_avg_pool(dtype, layout):
    """DenseNet's transition pool into the output fastconv::bn_act_avg_pool's fake allocates."""
    x, s = meta((2, 6, 9, 7), dtype, layout), vector(6)
    out = fake.bn_act_avg_pool(x, s, s, "relu")
    assert cuda.bn_act_avg_pool(x, s, s, 1, out) is None
    return out, fake.bn_act_avg_pool(x, s, s, "relu")


def bn_act_forward_out(dtype, layout):
    """Into a channel slice of fastconv::batch_norm_act_cat's output, the piece in any layout."""
    c, stats = meta((2, 6, 5, 7), dtype, layout), vector(6)
    pieces = [c, meta((2, 3, 5, 7), dtype, "channels_last")]
    out = fake.batch_norm_act_cat(pieces, [0], [stats], [stats], [], [], "relu")
    assert cuda.bn_act_forward_out(c, stats, stats, 1, out[:, :6]) is None
    return out, fake.batch_norm_act_cat(pieces, [0], [stats], [stats], [], [], "relu")


def inverted_residual_forward(dtype, layout):
    """The fused MobileNetV2 block (stride 2, odd sizes, a residual-free projection) into the
    output fastconv::inverted_residual's fake allocates; and without the expansion."""
    x, b = meta((2, 8, 9, 7), dtype, layout), vector(24)
    weights = [torch.empty(shape, dtype=dtype, device="meta") for shape in ((24, 8), (24, 9), (6, 24))]
    geometry = ((2, 2), (1, 1, 1, 1), (1, 1))
    out = fake.inverted_residual(x, weights[0].view(24, 8, 1, 1), weights[1].view(24, 1, 3, 3),
                                 weights[2].view(6, 24, 1, 1), *geometry, None, b, "relu6", None, b, "relu6", None,
                                 vector(6), None, None)  # fmt: skip
    assert cuda.inverted_residual_forward(x, weights[0], b, weights[1], b, weights[2], vector(6), [3, 3], 2, [1, 1],
                                          1, 2, 2, 0, None, out) is None  # fmt: skip
    residual = meta((2, 8, 9, 7), dtype, "channels_last")
    same = fake.inverted_residual(x, None, torch.empty(8, 1, 3, 3, dtype=dtype, device="meta"),
                                  torch.empty(8, 8, 1, 1, dtype=dtype, device="meta"), (1, 1), (1, 1, 1, 1), (1, 1),
                                  None, None, None, None, vector(8), "relu", None, vector(8), None, residual)  # fmt: skip
    cuda.inverted_residual_forward(x, None, None, torch.empty(8, 9, dtype=dtype, device="meta"), vector(8),
                                   torch.empty(8, 8, dtype=dtype, device="meta"), vector(8), [3, 3], 1, [1, 1], 1, 0, 1,
                                   0, residual, same)  # fmt: skip
    return (out, same), (fake.inverted_residual(x, weights[0].view(24, 8, 1, 1), weights[1].view(24, 1, 3, 3),
                                                weights[2].view(6, 24, 1, 1), *geometry, None, b, "relu6", None, b,
                                                "relu6", None, vector(6), None, None), same)  # fmt: skip


def batch_norm_stats(dtype, layout):
    c = meta((2, 6, 5, 7), dtype, layout)
    return cuda.batch_norm_stats(c), fake.batch_norm_stats(c)


def batch_norm_act_backward(dtype, layout):
    c, stats = meta((2, 6, 5, 7), dtype, layout), vector(6)
    g = meta((2, 6, 5, 7), dtype, "channels_last")
    weight = vector(6, dtype)
    return (
        cuda.batch_norm_act_backward(g, c, stats, stats, weight, weight, 2),
        fake.batch_norm_act_backward(g, c, stats, stats, weight, weight, "relu6"),
    )


def batch_norm_act_backward_accumulate(dtype, layout):
    """Adds into grad_c, a prefix slice of a wider buffer (a dense block's gradient buffer)."""
    c, stats = meta((2, 6, 5, 7), dtype, layout), vector(6)
    g = meta((2, 6, 5, 7), dtype, "channels_last")
    grad_c = meta((2, 6, 5, 7), dtype, "channel_slice")
    weight = vector(6, dtype)
    return (
        cuda.batch_norm_act_backward_accumulate(g, c, stats, stats, weight, weight, 1, grad_c),
        fake.batch_norm_act_backward_accumulate(g, c, stats, stats, weight, weight, "relu", grad_c),
    )


# The C++ op each case exercises.
CASES = {
    bn_act_forward: "bn_act_forward",
    bn_act_backward: "bn_act_backward",
    depthwise_forward: "depthwise_forward",
    depthwise_backward_input: "depthwise_backward_input",
    depthwise_backward_weight: "depthwise_backward_weight",
    pointwise_forward: "pointwise_forward",
    conv_bn_act_forward: "conv_bn_act_forward",
    conv_bn_act_forward_with_stats: "conv_bn_act_forward",
    conv_bn_act_out: "conv_bn_act_out",
    conv_bn_act_out_with_residual: "conv_bn_act_out",
    bn_act_avg_pool: "bn_act_avg_pool",
    bn_act_forward_out: "bn_act_forward_out",
    inverted_residual_forward: "inverted_residual_forward",
    batch_norm_stats: "batch_norm_stats",
    batch_norm_act_backward: "batch_norm_act_backward",
    batch_norm_act_backward_accumulate: "batch_norm_act_backward_accumulate",
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=lambda case: case.__name__)
def test_meta_kernel_agrees_with_the_fake(case, dtype, layout):
    ours, theirs = case(dtype, layout)
    assert_same_outputs(ours, theirs)


def test_every_op_with_a_meta_kernel_has_a_case():
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastconv_cuda::")]
    with_meta = {n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv_cuda::{n}", "Meta")}
    assert with_meta == set(CASES.values())


def test_cuda_backend_is_built_and_waits_for_a_device():
    status = fastconv.backends.available()["cuda"]
    assert status.available == torch.cuda.is_available()
    if not status.available:
        assert status.reason == "no CUDA device is visible to torch"


@pytest.mark.parametrize("out_shape, out_dtype, expanded, pattern", [
    ((2, 6, 4, 4), torch.float16, False, r"'out' must be of shape \(2, 6, 4, 3\), but got shape \[2, 6, 4, 4\]"),
    ((2, 6, 4, 3), torch.float32, False, r"'out' must be x's dtype \(Half\), but got Float"),
    ((2, 6, 4, 3), torch.float16, True, r"'out' must be a tensor whose elements do not overlap one another, but got strides \[0, 1, 0, 0\]"),
], ids=["shape", "dtype", "expanded"])  # fmt: skip
def test_bn_act_avg_pool_checks_name_the_argument(out_shape, out_dtype, expanded, pattern):
    x, s = meta((2, 6, 9, 7), torch.float16), vector(6)
    out = torch.empty(1, 6, 1, 1, dtype=out_dtype, device="meta").expand(out_shape) if expanded else meta(out_shape, out_dtype)
    with pytest.raises(RuntimeError, match=pattern):
        cuda.bn_act_avg_pool(x, s, s, 1, out)
    with pytest.raises(RuntimeError, match=r"'x' must be at least 2x2 for a 2x2 pool, but got shape \[2, 6, 1, 7\]"):
        cuda.bn_act_avg_pool(meta((2, 6, 1, 7), torch.float16), s, s, 1, meta((2, 6, 0, 3), torch.float16))


@pytest.mark.parametrize("out, pattern", [
    (lambda: meta((2, 6, 5, 6), torch.float16), r"'out' must be x's shape \[2, 6, 5, 7\], but got \[2, 6, 5, 6\]"),
    (lambda: meta((2, 6, 5, 7), torch.float32), r"'out' must be x's dtype \(Half\), but got Float"),
    (lambda: torch.empty(1, 6, 1, 1, dtype=torch.float16, device="meta").expand(2, 6, 5, 7),
     r"'out' must be a tensor whose elements do not overlap one another, but got strides \[0, 1, 0, 0\]"),
], ids=["shape", "dtype", "expanded"])  # fmt: skip
def test_bn_act_forward_out_checks_name_the_argument(out, pattern):
    x, s = meta((2, 6, 5, 7), torch.float16), vector(6)
    with pytest.raises(RuntimeError, match=pattern):
        cuda.bn_act_forward_out(x, s, s, 1, out())


def test_inverted_residual_forward_checks_name_the_argument():
    """The CUDA kernel's limits and layout needs, refused by name (the op routes such blocks to
    Triton's kernel; a direct call must not launch)."""
    def call(c_in=8, c_hid=24, c_out=6, dw_shape=None, project=None, x_shape=None):
        x = meta(x_shape or (2, c_in, 9, 7), torch.float16)
        we = torch.empty(c_hid, c_in, dtype=torch.float16, device="meta")
        wd = torch.empty(dw_shape or (c_hid, 9), dtype=torch.float16, device="meta")
        wp = project if project is not None else torch.empty(c_out, c_hid, dtype=torch.float16, device="meta")
        out = meta((x.shape[0], wp.shape[0], 5, 4), torch.float16)
        cuda.inverted_residual_forward(x, we, None, wd, None, wp, None, [3, 3], 2, [1, 1], 1, 2, 2, 0, None, out)

    call()  # valid
    call(c_out=400)  # two groups of output channels
    with pytest.raises(RuntimeError, match=r"'project_weight' must be a contiguous \(C_out, C_hid\) = \(6, 24\) matrix"):
        call(project=torch.empty(24, 6, dtype=torch.float16, device="meta").t())
    with pytest.raises(RuntimeError, match=r"'dw_weight' must be a contiguous \(C_hid, kh \* kw\) = \(24, 9\) matrix"):
        call(dw_shape=(24, 3, 3))
    with pytest.raises(RuntimeError, match=r"'x' must be few enough input channels for a tile's 9x9 window in 98304 bytes"
                                           r" of shared memory .*, but got 640 channels of 2 bytes: 116096 bytes"):  # fmt: skip
        call(c_in=640, c_hid=640)


@pytest.mark.parametrize("c_in, c_hid, c_out, stride, k, fits", [
    (160, 960, 320, 1, 3, True),  # MobileNetV2's widest blocks
    (96, 576, 160, 2, 3, True),
    (32, 32, 16, 1, 3, True),
    (256, 256, 256, 2, 3, True),  # MobileNetV1's blocks, all of them in half precision:
    (512, 512, 512, 1, 3, True),  # two groups of output channels
    (512, 512, 1024, 2, 3, True),  # a 9x9 window of 512 fp16 channels: 81 KB of shared memory
    (1024, 1024, 1024, 1, 3, True),  # a 6x6 window of 1024: 72 KB
    (640, 640, 640, 2, 3, False),  # a 9x9 window of 640: 111 KB
    (64, 384, 385, 1, 3, True),
    (8, 16, 8, 5, 3, False),  # stride 5
])  # fmt: skip
def test_inverted_residual_cuda_routing_mirrors_the_kernel_s_limits(c_in, c_hid, c_out, stride, k, fits):
    """fastconv::inverted_residual sends a block to the CUDA kernel exactly when the kernel's
    own checks accept it (its Python mirror of the C++ limits), so `auto` never times a call that
    would raise and an explicit cuda backend says why before launching."""
    from fastconv.ops.inverted_residual import _cuda_supports

    x = meta((2, c_in, 15, 15), torch.float16)
    weights = {"expand_weight": torch.empty(c_hid, c_in, 1, 1, dtype=torch.float16, device="meta"),
               "dw_weight": torch.empty(c_hid, 1, k, k, dtype=torch.float16, device="meta"),
               "project_weight": torch.empty(c_out, c_hid, 1, 1, dtype=torch.float16, device="meta")}  # fmt: skip
    geometry = {"stride": (stride, stride), "padding": (k // 2,) * 4, "dilation": (1, 1)}
    routed = _cuda_supports(x=x, **weights, **geometry) is None
    out = meta((2, c_out, (15 + 2 * (k // 2) - k) // stride + 1, (15 + 2 * (k // 2) - k) // stride + 1), torch.float16)
    try:
        cuda.inverted_residual_forward(x, weights["expand_weight"].view(c_hid, c_in), None,
                                       weights["dw_weight"].view(c_hid, k * k), None,
                                       weights["project_weight"].view(c_out, c_hid), None, [k, k], stride,
                                       [k // 2, k // 2], 1, 2, 2, 0, None, out)  # fmt: skip
        accepted = True
    except RuntimeError:
        accepted = False
    assert routed == accepted == fits


@pytest.mark.parametrize("c_in, c_hid, c_out, stride, k, expand, dtype, fits", [
    (160, 960, 320, 1, 3, True, torch.float16, True),  # MobileNetV2's widest stride-1 block
    (96, 576, 160, 2, 3, True, torch.bfloat16, True),  # its widest stride-2 block: a 17x17 window, 92 KB
    (32, 32, 16, 1, 3, False, torch.float16, True),  # the first block: x's chunks read from global memory
    (1024, 1024, 1024, 1, 3, False, torch.bfloat16, True),  # MobileNetV1's: no window of x staged
    (512, 512, 1024, 2, 3, False, torch.float16, True),
    (24, 24, 24, 1, 3, True, torch.float16, True),  # an expansion of ratio 1 still stages x
    (512, 512, 512, 2, 3, True, torch.float16, False),  # 304 padded pixels x 520 halves of x: 310 KB
    (24, 144, 24, 1, 3, True, torch.float32, False),  # float32 takes the CUDA-core kernel only
    (25, 150, 24, 1, 3, True, torch.float16, False),  # odd C_in: channel pairs
    (24, 145, 24, 1, 3, True, torch.float16, False),  # odd C_hid
])  # fmt: skip
def test_inverted_residual_tensor_core_choice_mirrors_the_kernel_s_limits(c_in, c_hid, c_out, stride, k, expand,
                                                                          dtype, fits):  # fmt: skip
    """The cuda backend offers its tensor-core kernel to the first-call timing exactly when the
    kernel's own checks (kernel=1) accept the block, and a refused block names `kernel` and why."""
    from fastconv.ops.inverted_residual import _tensor_core_kernel_supports

    x = meta((2, c_in, 15, 15), dtype)
    we = torch.empty(c_hid, c_in, dtype=dtype, device="meta") if expand else None
    wd = torch.empty(c_hid, k * k, dtype=dtype, device="meta")
    wp = torch.empty(c_out, c_hid, dtype=dtype, device="meta")
    offered = _tensor_core_kernel_supports(x, expand, wd.view(c_hid, 1, k, k), stride, 1) is None
    size = (15 + 2 * (k // 2) - k) // stride + 1
    out = meta((2, c_out, size, size), dtype)
    try:
        cuda.inverted_residual_forward(x, we, None, wd, None, wp, None, [k, k], stride, [k // 2, k // 2], 1,
                                       2 if expand else 0, 2, 0, None, out, kernel=1)  # fmt: skip
        accepted = True
    except RuntimeError as error:
        assert "'kernel' must be a block the tensor-core kernel takes" in str(error)
        accepted = False
    assert offered == accepted == fits


def test_inverted_residual_forward_kernel_code_is_checked():
    x = meta((2, 8, 9, 7), torch.float16)
    wd = torch.empty(8, 9, dtype=torch.float16, device="meta")
    wp = torch.empty(6, 8, dtype=torch.float16, device="meta")
    out = meta((2, 6, 5, 4), torch.float16)
    with pytest.raises(RuntimeError, match=r"'kernel' must be 0 \(CUDA cores\) or 1 \(tensor cores\), but got 2"):
        cuda.inverted_residual_forward(x, None, None, wd, None, wp, None, [3, 3], 2, [1, 1], 1, 0, 2, 0, None, out,
                                       kernel=2)  # fmt: skip
