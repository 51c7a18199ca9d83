"""The fused block's two CUDA kernels on the CPU: their own source (csrc/
inverted_residual_kernel.cuh on the CUDA cores, csrc/inverted_residual_mma_kernel.cuh on the
tensor cores) compiled by the host compiler against tests/emulation's stand-ins for the CUDA
runtime and for mma.sync, and run with one std::thread a CUDA thread.

No GPU has run those kernels. The emulation checks what can be checked without one: the tile,
window and group arithmetic, the guards and the zero padding, the barriers' placement (a CTA's
threads really run concurrently), shared-memory reads of what no thread wrote (the buffer is
poisoned with NaN), and the fragment layouts, against mma.sync's as the PTX ISA tables give them.
It cannot check the hardware's own behaviour (instruction semantics as executed, bank
conflicts, speed): that is the GPU tests' job.

`emulated_forward_op` stands in for torch.ops.fastconv_cuda.inverted_residual_forward, so that
the Python side (fastconv/ops/inverted_residual.py's folding, biases and argument order) runs
as on a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMULATION = Path(__file__).resolve().parent / "emulation"
# The kernel and the plain headers it includes; gemm_mma.cuh and cuda_runtime.h are the stand-ins'.
KERNEL_SOURCES = ("inverted_residual_kernel.cuh", "inverted_residual_mma_kernel.cuh", "inverted_residual.h",
                  "activations.cuh", "activation_codes.h")  # fmt: skip
STAND_INS = ("cuda_runtime.h", "gemm_mma.cuh", "fused_block.cpp")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _library_path() -> Path:
    """The built library, compiled once per source version (a few seconds)."""
    sources = [ROOT / "csrc" / name for name in KERNEL_SOURCES] + [EMULATION / name for name in STAND_INS]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + torch.__version__.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"fastconv-emulation-{digest}"
    library = cache / "fused_block.so"
    if library.exists():
        return library
    work = Path(tempfile.mkdtemp(prefix="fastconv-emulation-build-"))
    for path in sources:  # one directory: the kernel's quoted includes find the stand-ins
        shutil.copy(path, work / path.name)
    from torch.utils.cpp_extension import include_paths

    command = [compiler(), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
               f"-I{work}", *[f"-I{p}" for p in include_paths()], str(work / "fused_block.cpp"),
               "-o", str(work / "fused_block.so")]  # fmt: skip
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"the emulation did not compile:\n{' '.join(command)}\n{built.stderr[-4000:]}")
    cache.mkdir(parents=True, exist_ok=True)
    os.replace(work / "fused_block.so", library)  # atomic: parallel test workers may race here
    shutil.rmtree(work, ignore_errors=True)
    return library


_LIBRARY = None


def _library():
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = ctypes.CDLL(str(_library_path()))
        _LIBRARY.emulate_fused_block.restype = ctypes.c_int
    return _LIBRARY


def _pointer(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def emulated_forward_op(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias,
                        kernel_size, stride, padding, dilation, act_e, act_d, act_p, residual, out,
                        kernel=0, variant=0):  # fmt: skip
    """fastconv_cuda::inverted_residual_forward on CPU tensors: `kernel` 0 on the CUDA cores, 1 on
    the tensor cores (float16 and bfloat16), whose template `variant` 0 or 1 takes groups of 384
    or 128 output channels a launch."""
    residual_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    shape = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], dw_weight.shape[0], project_weight.shape[0],
             kernel_size[0], kernel_size[1], stride, dilation, padding[0], padding[1], act_e, act_d, act_p,
             out.shape[2], out.shape[3])  # fmt: skip
    strides = (*x.stride(), *residual_strides, *out.stride())
    for name, t in (("expand_weight", expand_weight), ("dw_weight", dw_weight), ("project_weight", project_weight)):
        assert t is None or t.is_contiguous(), f"{name} must be contiguous, as the C++ checks require"
    result = _library().emulate_fused_block(
        int(kernel), DTYPE_CODES[x.dtype], int(variant), (ctypes.c_int64 * 17)(*shape), (ctypes.c_int64 * 12)(*strides),
        _pointer(x), _pointer(expand_weight), _pointer(dw_weight), _pointer(project_weight), _pointer(expand_bias),
        _pointer(dw_bias), _pointer(project_bias), _pointer(residual), _pointer(out),
    )  # fmt: skip
    if result == -1:
        raise RuntimeError("the block's plan outgrows the emulation's 256 KB of shared memory")
    if result == -2:
        raise ValueError(f"the tensor-core kernel takes float16 and bfloat16; got {x.dtype}")
