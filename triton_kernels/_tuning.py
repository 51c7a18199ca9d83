"""Autotuning that also works in Triton's CPU interpreter.

On a GPU every config is timed on first use per key, and the best is cached. The interpreter
has no device timer (Triton's autotuner fails there with "0 active drivers"), so under
TRITON_INTERPRET=1 only the first config is kept: list the one that suits small CPU test
shapes first. FASTCONV_TRITON_AUTOTUNE=0 does the same on a GPU: the test suite sets it,
because it checks values, not speed, and compiling every config of every specialisation
would take minutes; tests/test_triton_configs_gpu.py runs each config explicitly instead.

When it does tune, a candidate that spills registers is dropped before it is timed: it costs a
benchmark and loses anyway (measured: 128x256x64 taps tiles spilled 1.2 to 2 KB per thread
on sm_90). tests/test_triton_configs.py keeps the defaults spill-free, offline.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def least_spilling(configs: list[triton.Config], spills: Callable[[triton.Config], Optional[int]]) -> list[triton.Config]:
    """The configs whose kernel spills nothing, in order; if every one spills, the one that
    spills least. spills(config) compiles it and says how much it spills (None: unknown, kept).
    """
    counts = [(config, spills(config)) for config in configs]
    free = [config for config, n in counts if not n]
    if free:
        return free
    return [min(counts, key=lambda pair: pair[1])[0]]


def compiled_spills(kernel, named_args: dict, kwargs: dict, config: triton.Config) -> Optional[int]:
    """How many registers one config of `kernel` (a JITFunction) spills for these arguments,
    from the compiled and loaded kernel: nothing is launched. The autotuner's timing then
    reuses the compile. None when the kernel does not load (out of shared memory, say): the
    autotuner's own benchmark reports that."""
    launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}  # the launch's own
    try:
        compiled = kernel.warmup(**named_args, **launch, **config.all_kwargs(), grid=(1,))
        compiled._init_handles()
    except Exception:  # noqa: BLE001 - left to the benchmark, which skips configs that fail
        return None
    return compiled.n_spills


def _spill_pruner(kernel):
    """An early_config_prune for Triton's autotuner (fn(configs, named_args, **kwargs), the
    same in Triton 3.6 and 3.8). The autotuner calls it only for a key it has not tuned yet."""

    def prune(configs, named_args, **kwargs):
        return least_spilling(configs, lambda config: compiled_spills(kernel, named_args, kwargs, config))

    return prune


class PinnedWhenDeterministic:
    """An autotuned kernel that launches its first config whenever
    torch.use_deterministic_algorithms(True) is on.

    The configs of a kernel sum in different orders (a GEMM's BLOCK_K steps, a reduction's
    BLOCK_M pixels a step), so two processes that tune a shape differently round differently.
    PyTorch's deterministic mode promises the same bits run to run and process to process, so
    there every launch takes the one pinned config (spill-free on sm_90:
    tests/test_triton_configs.py), as cuDNN gives up its benchmark choice. Otherwise it is the
    autotuner, whose attributes it exposes."""

    _OWN = ("tuned", "pinned")

    def __init__(self, tuned, pinned) -> None:
        object.__setattr__(self, "tuned", tuned)
        object.__setattr__(self, "pinned", pinned)

    def __getitem__(self, grid):
        chosen = self.pinned if torch.are_deterministic_algorithms_enabled() else self.tuned
        return chosen[grid]

    def __getattr__(self, name):
        return getattr(self.tuned, name)

    def __setattr__(self, name, value):  # a test forcing `configs` sets the autotuner's
        setattr(self.tuned, name, value)


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    tuned = configs
    if interpreting() or os.environ.get("FASTCONV_TRITON_AUTOTUNE", "1") == "0":
        tuned = configs[:1]

    def decorate(kernel):
        options = dict(kwargs)
        if len(tuned) > 1:  # never under the interpreter, nor without autotuning
            options.setdefault("prune_configs_by", {"early_config_prune": _spill_pruner(kernel)})
        tuner = triton.autotune(configs=tuned, key=key, **options)(kernel)
        tuner.all_configs = list(configs)  # for the test that forces every config in turn
        if len(tuned) == 1:
            return tuner  # the one config is already the pinned one
        pinned = triton.autotune(configs=configs[:1], key=key, **kwargs)(kernel)
        return PinnedWhenDeterministic(tuner, pinned)

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
