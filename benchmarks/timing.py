"""Timing: Triton's do_bench medians on the GPU, a perf_counter median on the CPU.

Inputs are rotated: each call takes the next of several input sets whose total
size exceeds L2, so no call reads data the previous call left in cache
(benchmarks/FLOORS.md, "How to time"). do_bench also flushes L2 between calls; rotation
keeps the numbers honest even where a timer does not.
"""
import math
import statistics
import time
from dataclasses import dataclass

import torch

QUANTILES = [0.5, 0.2, 0.8]  # median first; the 20th/80th percentiles show the spread


@dataclass
class Timing:
    ms: float   # median
    p20: float
    p80: float


def rotation_count(bytes_per_set: int, l2_bytes: int, device: str, max_sets: int = 64) -> int:
    """How many input sets to rotate through so that together they exceed L2 twice over.

    Large sets (hundreds of MB) need two: one being read while the other is evicted.
    On the CPU, rotation is not what is being measured, so keep memory small.
    """
    if device != "cuda":
        return 2
    return max(2, min(max_sets, math.ceil(2 * l2_bytes / max(1, bytes_per_set))))


class Rotation:
    """Cycles through input sets; each call of ``next()`` returns the next one."""

    def __init__(self, sets):
        self.sets = list(sets)
        self.i = 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s


def _cpu_bench(fn, warmup_s: float, rep_s: float, max_reps: int = 200) -> Timing:
    # Warm up for a fixed time (caches, lazy init), then time single calls.
    end = time.perf_counter() + warmup_s
    fn()
    while time.perf_counter() < end:
        fn()
    times = []
    end = time.perf_counter() + rep_s
    while len(times) < 3 or (time.perf_counter() < end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1]=p20, q[7]=p80
    return Timing(statistics.median(times), q[1], q[7])


def bench(fn, device: str, quick: bool = False) -> Timing:
    """Median time of ``fn()`` in ms, with the 20th and 80th percentiles."""
    if device == "cuda":
        import triton.testing
        # Quick runs shorten warm-up and repetition time, not the method.
        warmup, rep = (10, 40) if quick else (25, 100)
        ms, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=QUANTILES)
        return Timing(ms, p20, p80)
    warmup_s, rep_s = (0.01, 0.05) if quick else (0.05, 0.3)
    return _cpu_bench(fn, warmup_s, rep_s)


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()
