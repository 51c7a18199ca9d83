"""The dense-block ops on random depths, widths, growth rates, bottleneck sizes, map sizes,
layouts and faults, drawn by hypothesis: `dense_block_train` (with its backward) and
`dense_block_eval`. Each example either matches torchvision's block computed eagerly in
float64, or, when a fault was injected, raises a ValueError naming the argument."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import LAYOUTS, mismatch_report, on_backend, seeded
from test_dense_block import eval_args, leaves, make, reference, train_args

BACKENDS = ["torch", "triton"]
FAULTS = [None, None, None, "x channels", "conv1 shape", "norm length", "weight dtype", "list length"]
ARGUMENTS = re.compile(r"\b(x|(norm1|norm2)_(weight|bias)|conv[12]_weight|in_scale|in_shift|scale|shift|"
                       r"dropout_mask|drop_rate|eps)\b")


def _inject(t, fault):
    if fault == "x channels":
        t["x"] = t["x"][:, :-1] if t["x"].shape[1] > 1 else torch.cat([t["x"], t["x"]], 1)
    elif fault == "conv1 shape":
        w = t["conv1_weight"][-1]
        t["conv1_weight"][-1] = torch.randn(w.shape[0] + 1, *w.shape[1:], dtype=w.dtype)
    elif fault == "norm length":
        t["norm2_weight"][0] = torch.rand(t["norm2_weight"][0].shape[0] + 2, dtype=t["norm2_weight"][0].dtype)
    elif fault == "weight dtype":
        t["conv2_weight"][0] = t["conv2_weight"][0].double()
    elif fault == "list length":
        t["conv2_weight"] = t["conv2_weight"][:-1] or [t["conv2_weight"][0], t["conv2_weight"][0]]


def _fuzz(backend, data, train: bool):
    sizes = dict(n=data.draw(st.integers(1 if train else 0, 2), "n"), c0=data.draw(st.integers(1, 6), "c0"),
                 layers=data.draw(st.integers(1, 3), "layers"), growth=data.draw(st.integers(1, 4), "growth"),
                 bn_size=data.draw(st.integers(1, 3), "bn_size"), h=data.draw(st.integers(1, 6), "h"),
                 w=data.draw(st.integers(1, 6), "w"))  # fmt: skip
    layout = data.draw(st.sampled_from(LAYOUTS), "layout")
    fault = data.draw(st.sampled_from(FAULTS), "fault")
    seeded(data.draw(st.integers(0, 2**31 - 1), "seed"))
    t64 = make(layout=layout, train=train, **sizes)
    t = {k: (v.float() if k == "x" else [u.float() for u in v]) for k, v in t64.items()}
    if layout != "nchw":
        t["x"] = t64["x"].float().contiguous(memory_format=torch.channels_last)
    _inject(t, fault if train or fault != "norm length" else None)
    for v in leaves(t) + leaves(t64):
        v.requires_grad_(train)
    try:
        with on_backend(backend):
            if train:
                got = torch.ops.fastconv.dense_block_train(*train_args(t))[0]
                grad_y = torch.randn_like(got)
                grads = torch.autograd.grad(got, [t["x"], *t["conv1_weight"], *t["norm1_weight"]], grad_y)
            else:
                args = list(eval_args(t))
                if fault == "norm length":  # into the folded vectors the op takes in eval
                    args[4] = [torch.rand(args[4][0].shape[0] + 2)] + list(args[4][1:])
                got = torch.ops.fastconv.dense_block_eval(*args)
    except ValueError as error:
        if train and sizes["n"] * sizes["h"] * sizes["w"] == 1 and "more than 1 value per channel" in str(error):
            return  # BatchNorm2d's own refusal of a one-value batch, in its words
        assert fault is not None, f"a valid case raised: {error}"
        assert ARGUMENTS.search(str(error)), f"the message names no argument: {error}"
        return
    assert fault is None, f"fault {fault!r} was accepted"
    want = reference(t64, train=train)
    checks = [("features", got, want)]
    if train:
        expected = torch.autograd.grad(want, [t64["x"], *t64["conv1_weight"], *t64["norm1_weight"]], grad_y.double())
        checks += [(f"grad {i}", g, e) for i, (g, e) in enumerate(zip(grads, expected))]
    # float32 against float64: BatchNorm over a handful of values amplifies rounding (see
    # test_inverted_residual_fuzz.py); a wrong index is off by O(1).
    for name, g, e in checks:
        assert g.shape == e.shape, f"{name}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        if e.numel() == 0:
            continue
        report = mismatch_report(name, g, e, 1e-4 * max(1.0, e.abs().max().item()))
        assert report.startswith(f"{name}: 0 of"), report


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_dense_block_train_random_cases(backend, data):
    _fuzz(backend, data, train=True)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_dense_block_eval_random_cases(backend, data):
    _fuzz(backend, data, train=False)
