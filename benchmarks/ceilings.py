"""The device's ceilings, measured in the same run as the kernels they judge.

- Copy bandwidth: one large device-to-device copy, counting bytes read plus
  written (benchmarks/FLOORS.md: about 4.3 TB/s on the H200). It is the floor denominator
  for memory-bound kernels.
- bf16 matmul rate: 8192^3 on random data (zeros would let the tensor cores
  idle at lower power and overstate the rate; benchmarks/FLOORS.md: 769-798 TFLOP/s).

On the CPU, sizes shrink so the run stays short; the numbers only exercise the code.
"""
import torch

from .timing import bench

# Values from benchmarks/FLOORS.md, for a "% of the reference" check of each measurement on a
# GPU (suites/ceilings.py).
H200_REFERENCE = {"copy_gbps": 4300.0, "matmul_tflops": 769.0}


def copy_bandwidth(device: str, quick: bool):
    """Returns (Timing, bytes moved per copy)."""
    # 2 GiB source on the GPU: far beyond L2, long enough that launch cost vanishes.
    nbytes = 2 * 2**30 if device == "cuda" else 32 * 2**20
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, quick)
    return t, 2 * nbytes


def matmul_rate(device: str, quick: bool):
    """Returns (Timing, flops per call, n, dtype name)."""
    if device == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 256, torch.float32  # bf16 matmul on a 2-core CPU takes seconds
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = bench(lambda: torch.mm(a, b, out=c), device, quick)
    return t, 2 * n**3, n, str(dtype).replace("torch.", "")
