"""Ceilings suite: copy bandwidth and bf16 matmul rate (always run first).

Its run_case also stores the values in ctx.ceilings, the floor denominators
for every later suite.
"""
from .. import ceilings
from ..records import make_record
from . import Suite, register


def _pct_of_reference(value, key, ctx):
    """(reference, % of it), or (None, None) on the CPU.

    The references are the H200's (benchmarks/FLOORS.md). A 2-core CPU copies at about
    35 GB/s and multiplies at about 0.1 TFLOP/s: 0.8 % and 0.02 % of them, which the
    table's whole-percent format showed as 0, a figure that says nothing."""
    if ctx.device != "cuda":
        return None, None
    ref = ceilings.H200_REFERENCE[key]
    return ref, 100 * value / ref


def _cases(ctx):
    return ["copy", "matmul"]


def _run(case, ctx):
    if case == "copy":
        t, nbytes = ceilings.copy_bandwidth(ctx.device, ctx.quick)
        gbps = nbytes / (t.ms * 1e6)
        ctx.ceilings["copy_gbps"] = gbps
        ref, pct = _pct_of_reference(gbps, "copy_gbps", ctx)
        return [make_record(ctx.env, suite="ceilings", case=f"copy {nbytes // 2 // 2**20} MiB",
                            dtype="fp32", layout="-", mode="-", backend="torch", ms=t.ms,
                            bytes_moved=nbytes, ms_p20=t.p20, ms_p80=t.p80,
                            reference=ref, pct_of_reference=pct)]
    t, flops, n, dtype = ceilings.matmul_rate(ctx.device, ctx.quick)
    tflops = flops / (t.ms * 1e9)
    ctx.ceilings["matmul_tflops"] = tflops
    ref, pct = _pct_of_reference(tflops, "matmul_tflops", ctx)
    return [make_record(ctx.env, suite="ceilings", case=f"matmul {n}^3", dtype=dtype,
                        layout="-", mode="-", backend="torch", ms=t.ms, flops=flops,
                        ms_p20=t.p20, ms_p80=t.p80,
                        reference=ref, pct_of_reference=pct)]


register(Suite(name="ceilings", cases=_cases, run_case=_run, order=0))
