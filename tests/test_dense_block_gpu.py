"""The dense-block ops on a GPU, at DenseNet121's channel counts (64 input features, growth 32,
bottleneck 128) on a small odd map: both GPU backends, float16 and bfloat16 (bfloat16 tl.dot
is wrong in the CPU interpreter, so this is its only test), train and eval, forward and
backward, against float64 with the 2x-PyTorch rule.

Named "sanitizer" so that gpu_check.sh's smoke step runs it first, and its cuda share under
compute-sanitizer memcheck and racecheck.
"""

from __future__ import annotations

import pytest
import torch

from harness import ON_GPU
from test_dense_block import check_block

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dense_block_sanitizer_subset(backend, dtype, train):
    check_block(backend, dtype, train, n=2, c0=64, layers=3, growth=32, bn_size=4, h=9, w=7)
