"""Autotuning that also works in Triton's CPU interpreter.

On a GPU every config is timed on first use per key, and the best is cached. The interpreter
has no device timer (Triton's autotuner fails there with "0 active drivers"), so under
TRITON_INTERPRET=1 only the first config is kept: list the one that suits small CPU test
shapes first. FASTCONV_TRITON_AUTOTUNE=0 does the same on a GPU: the test suite sets it,
because it checks values, not speed, and compiling every config of every specialisation
would take minutes; tests/test_gpu.py runs each config explicitly instead.
"""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    tuned = configs
    if interpreting() or os.environ.get("FASTCONV_TRITON_AUTOTUNE", "1") == "0":
        tuned = configs[:1]

    def decorate(kernel):
        tuner = triton.autotune(configs=tuned, key=key, **kwargs)(kernel)
        tuner.all_configs = list(configs)  # for the test that forces every config in turn
        return tuner

    return decorate


def parallel_programs(device: torch.device) -> int:
    """How many programs keep the device busy: 4 per multiprocessor on a GPU.

    In the interpreter every program costs about 20 ms of Python, so there a handful will do.
    """
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def interpreter_first(interpreter: triton.Config, device: list[triton.Config]) -> list[triton.Config]:
    """The configs to tune over; the first is the one the interpreter (or a run without
    autotuning) uses.

    The interpreter costs per program, not per element, so it gets one large tile that keeps
    CPU test grids to a few programs. On a GPU such a tile would spill registers or, times a
    depthwise window's unrolled taps, take LLVM minutes to compile, so there the first config
    is a moderate one: FASTCONV_TRITON_AUTOTUNE=0 runs only it.
    """
    return [interpreter] + device if interpreting() else device
