"""Test session setup.

Without a GPU the Triton kernels still run, on CPU tensors, in Triton's interpreter; it must be
switched on before any kernel module is imported, because @triton.jit reads it at decoration.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests check values, not speed: one Triton config per kernel (tests/test_triton_configs_gpu.py runs them all).
os.environ.setdefault("FASTCONV_TRITON_AUTOTUNE", "0")

# Every test starts from the default choice, whatever the calling shell exported.
os.environ.pop("FASTCONV_BACKEND", None)

# The tests hold float32 to float32's precision: no TF32 in PyTorch's reference convolutions
# and matmuls, nor in fastconv's GEMMs, which follow the same switches.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
