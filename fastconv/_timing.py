"""First-call timing for the `auto` backend.

Each candidate runs once to warm up (Triton compiles and autotunes, CUDA kernels pick their
variant) and is then timed over a few calls with CUDA events. The choice is cached by the
caller, so this cost is paid once per op, shape, dtype and layout, as with cudnn.benchmark.
"""

from __future__ import annotations

import os
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


def choose_kernel(env_var: str, launches: dict[str, Callable[[], object]], key: tuple, x: torch.Tensor,
                  chosen: dict) -> str:  # fmt: skip
    """Which of an op's kernels runs a shape: `env_var` names one to force it; otherwise each
    launch is timed at the shape's first call on a GPU and the fastest is cached in `chosen`
    under `key`. Without a GPU timer (the interpreter), inside a graph capture and in
    deterministic mode the first launch runs: the kernels round differently, and deterministic
    mode must take one fixed kernel in every process."""
    forced = os.environ.get(env_var, "auto")
    if forced in launches:
        return forced
    if forced != "auto":
        raise ValueError(f"fastconv: {env_var} must be one of auto, {', '.join(launches)}; got {forced!r}")
    if key in chosen:
        return chosen[key]
    default = next(iter(launches))
    if x.device.type != "cuda" or torch.cuda.is_current_stream_capturing() or torch.are_deterministic_algorithms_enabled():
        return default
    timings = time_candidates({name: (lambda launch=launch: launch()) for name, launch in launches.items()}, {})
    chosen[key] = min(timings, key=timings.get) if timings else default
    return chosen[key]
