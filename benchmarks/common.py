"""Helpers shared by the suites: dtype names, backend selection, the result check, errors."""
import torch

from .timing import bench, synchronize

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def short_error(exc):
    """One line for a record: the exception type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def backends_to_run(ctx, suite, defaults):
    """Requested backends (else ``defaults``) that can run here; the rest go to ctx.notes once."""
    import fastconv
    avail = fastconv.backends.available()
    run = []
    for name in ctx.backends or defaults:
        info = avail.get(name)
        if name == "auto" or (info is not None and info.available):
            run.append(name)
        else:
            note = f"{suite}: backend {name!r} skipped: {getattr(info, 'reason', 'unknown backend')}"
            if note not in ctx.notes:
                ctx.notes.append(note)
    return run


def tolerance(eager_err, dtype, ref_max):
    """Error allowed in the pre-timing check.

    Twice what eager makes in the same dtype (flash-attention's oracle, STYLE.md) plus a few
    ulps of the largest output, for fma and fast-exp differences. It flags wrong results, not
    ulps: the tests hold the kernels to the strict standard.
    """
    return 2 * eager_err + 8 * torch.finfo(dtype).eps * max(1.0, ref_max)


def time_call(step, ctx):
    """bench() of a zero-argument callable, synchronised after."""
    t = bench(step, ctx.device, ctx.quick)
    synchronize(ctx.device)
    return t
