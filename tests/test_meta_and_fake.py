"""Every public op runs on meta tensors and under FakeTensorMode, with the real run's shape,
dtype and strides: what torch.compile, torch.export and shape inference rely on."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastconv
from harness import random_tensor


def _calls():
    """name -> a call of that public op on tensors from a factory t(*shape, cl=channels_last)."""
    return {
        "bn_act": lambda t: fastconv.bn_act(t(2, 6, 5, 7, cl=True), t(6), t(6), "relu6"),
        "depthwise_conv2d": lambda t: fastconv.depthwise_conv2d(
            t(2, 6, 9, 7, cl=True), t(12, 1, 3, 3), t(12), stride=2, padding="valid", scale=t(12), activation="silu"
        ),
        "pointwise_conv2d": lambda t: fastconv.pointwise_conv2d(
            t(2, 6, 5, 7), t(4, 6, 1, 1), scale=t(4), shift=t(4), residual=t(2, 4, 5, 7), in_scale=t(6),
            in_activation="relu",
        ),
        "conv2d_bn_act": lambda t: fastconv.conv2d_bn_act(
            t(2, 4, 9, 9, cl=True), t(6, 2, 3, 3), stride=2, padding=1, groups=2, shift=t(6), activation="hardswish"
        ),
        "conv2d_batch_stats": lambda t: torch.ops.fastconv.conv2d_batch_stats(
            t(2, 4, 9, 9), t(6, 4, 3, 3), None, (1, 1), (1, 1, 1, 1), (1, 1), 1
        ),
        "batch_norm_stats": lambda t: torch.ops.fastconv.batch_norm_stats(t(2, 6, 5, 7, cl=True)),
        "conv2d_out": lambda t: torch.ops.fastconv.conv2d_out(
            t(2, 4, 9, 9), t(6, 4, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True, t(2, 6, 9, 9, cl=True)
        ),
        "batch_norm_act_backward_accumulate": lambda t: torch.ops.fastconv.batch_norm_act_backward_accumulate(
            t(2, 6, 5, 7), t(2, 6, 5, 7), t(6), t(6), t(6), t(6), "relu", t(2, 6, 5, 7, cl=True)
        ),
        "dense_block_train": lambda t: torch.ops.fastconv.dense_block_train(
            t(2, 3, 5, 7), [t(3), t(5)], [t(3), t(5)], [t(4, 3, 1, 1), t(4, 5, 1, 1)], [t(4), t(4)], [t(4), t(4)],
            [t(2, 4, 3, 3), t(2, 4, 3, 3)], [], 0.0, 1e-5,
        ),
        "bn_act_avg_pool": lambda t: fastconv.bn_act_avg_pool(t(2, 6, 9, 7, cl=True), t(6), t(6), "relu"),
        "batch_norm_act_avg_pool": lambda t: torch.ops.fastconv.batch_norm_act_avg_pool(
            t(2, 6, 9, 7, cl=True), t(6), t(6), t(6), None, "relu"
        ),
        "batch_norm_act_cat": lambda t: torch.ops.fastconv.batch_norm_act_cat(
            [t(2, 6, 5, 7, cl=True), t(2, 3, 5, 7)], [0], [t(6)], [t(6)], [t(6)], [t(6)], "relu"
        ),
        "inverted_residual": lambda t: fastconv.inverted_residual(
            t(2, 4, 9, 7, cl=True), t(12, 4, 1, 1), t(12, 1, 3, 3), t(4, 12, 1, 1), stride=1, expand_scale=t(12),
            expand_shift=t(12), dw_scale=t(12), dw_shift=t(12), project_scale=t(4), project_shift=t(4),
            use_residual=True,
        ),
        "inverted_residual_train": lambda t: fastconv.inverted_residual_train(
            t(2, 4, 9, 7, cl=True), t(12, 4, 1, 1), t(12, 1, 3, 3), t(6, 12, 1, 1), [t(12), t(12), t(12), t(12), t(6), t(6)],
            stride=2,
        ),
        "inverted_residual_train no expand": lambda t: fastconv.inverted_residual_train(
            t(2, 4, 9, 7), None, t(4, 1, 3, 3), t(4, 4, 1, 1), [None, None, t(4), t(4), t(4), t(4)],
            activations=(None, "relu", "relu"), use_residual=True,
        ),
        "dense_block_eval": lambda t: torch.ops.fastconv.dense_block_eval(
            t(2, 3, 5, 7, cl=True), [t(3), t(5)], [t(3), t(5)], [t(4, 3, 1, 1), t(4, 5, 1, 1)], [t(4), t(4)], [t(4), t(4)],
            [t(2, 4, 3, 3), t(2, 4, 3, 3)],
        ),
    }


CASES = list(_calls())


def real_tensors(*shape, cl=False):
    if len(shape) != 4:
        return torch.rand(shape) + 0.5
    return random_tensor(shape, torch.float32, "channels_last" if cl else "nchw", device="cpu")


def meta_tensors(*shape, cl=False):
    t = torch.empty(shape, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if cl and len(shape) == 4 else t


def layout_of(result):
    results = result if isinstance(result, tuple) else (result,)
    return [(tuple(r.shape), r.dtype, r.stride()) for r in results]


@pytest.mark.parametrize("name", CASES)
def test_meta_tensors_give_the_real_run_s_layout(name):
    call = _calls()[name]
    with fastconv.use_backend("torch"):
        real = call(real_tensors)
    meta = call(meta_tensors)
    assert all(r.device.type == "meta" for r in (meta if isinstance(meta, tuple) else (meta,)))
    assert layout_of(meta) == layout_of(real)


@pytest.mark.parametrize("name", CASES)
def test_fake_tensor_mode_gives_the_real_run_s_layout(name):
    call = _calls()[name]
    with fastconv.use_backend("torch"):
        real = call(real_tensors)
    with FakeTensorMode():
        fake = call(real_tensors)
    assert layout_of(fake) == layout_of(real)


def test_modules_run_on_meta_tensors():
    """A whole converted torchvision block, as torch.device("meta") model construction does it."""
    import torchvision

    block = fastconv.nn.convert_conv_bn_act(torchvision.models.mobilenet_v2().features[:3]).eval().to("meta")
    y = block(torch.empty(2, 3, 32, 32, device="meta"))
    assert y.shape == (2, 24, 8, 8) and y.device.type == "meta"
    blocks = fastconv.optimize(torchvision.models.mobilenet_v2().features[:4]).train().to("meta")  # fused training
    y = blocks(torch.empty(2, 3, 32, 32, device="meta"))
    assert y.shape == (2, 24, 8, 8) and y.device.type == "meta"
