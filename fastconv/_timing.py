"""First-call timing for the `auto` backend.

Each candidate runs once to warm up (Triton compiles and autotunes, CUDA kernels pick their
variant) and is then timed over a few calls with CUDA events. The choice is cached by the
caller, so this cost is paid once per op, shape, dtype and layout, as with cudnn.benchmark.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

TIMED_CALLS = 5


def time_candidates(functions: dict[str, Callable], arguments: dict) -> dict[str, float]:
    """Median milliseconds of each candidate that runs; candidates that raise are left out."""
    timings: dict[str, float] = {}
    for name, function in functions.items():
        try:
            function(**arguments)  # warm-up: compilation, autotuning, variant choice
        except Exception:
            continue
        samples = []
        for _ in range(TIMED_CALLS):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            function(**arguments)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        timings[name] = statistics.median(samples)
    return timings
