"""Helpers shared by the suites: dtype names, backend selection, the result check, errors,
the eager conv -> BatchNorm -> activation modules, and turning timings into records."""
import contextlib
import importlib
import math

import torch

from .records import make_record
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


# Checks against an oracle with several outputs (y, or the gradients) ------------------------

def max_errors(outs, oracle):
    """Max abs error of each output against its oracle (float64)."""
    return [(o.double() - r).abs().max().item() for o, r in zip(outs, oracle)]


def check_outputs(errs, eager_errs, oracle, dtype):
    """(ok, index of the output nearest its tolerance): every output within tolerance()."""
    ratios = []
    for e, ee, r in zip(errs, eager_errs, oracle):
        tol = tolerance(ee, dtype, r.abs().max().item())
        ratios.append(e / tol if tol else math.inf)
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    return ratios[worst] <= 1, worst


def check_fields(outs, eager_errs, oracle, dtype, output_names):
    """Record fields of a backend's result check: its worst output against eager's error there,
    "ok" or "mismatch", and each output's errors when there are several (gradients)."""
    errs = max_errors(outs, oracle)
    ok, worst = check_outputs(errs, eager_errs, oracle, dtype)
    fields = dict(max_abs_err=errs[worst], eager_max_abs_err=eager_errs[worst],
                  checked_output=output_names[worst], check="ok" if ok else "mismatch")
    if len(errs) > 1:
        for name, err, eager_err in zip(output_names, errs, eager_errs):
            fields[f"max_abs_err_{name}"] = err
            fields[f"eager_max_abs_err_{name}"] = eager_err
    return fields


def auto_choices(module_name, attrs):
    """What auto has picked so far for an op module's OpImplementations, {(attr, key): backend}."""
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        return {}
    out = {}
    for attr in attrs:
        impl = getattr(mod, attr, None)
        if impl is not None and hasattr(impl, "auto_choices"):
            out.update({(attr, k): v for k, v in impl.auto_choices().items()})
    return out


def newly_picked(before, after):
    """"op=backend" for each auto choice made between two auto_choices() snapshots, or None."""
    picked = sorted({f"{op.lower()}={v}" for (op, k), v in after.items() if before.get((op, k)) != v})
    return ", ".join(picked) or None


# The PyTorch baselines ------------------------------------------------------------------------

@contextlib.contextmanager
def cudnn_benchmark():
    """torch.backends.cudnn.benchmark = True for the body, as users set it: the baselines get
    cuDNN's best algorithm (and so does auto's torch candidate). Restored after."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def pytorch_conv_backend(x, w, stride, padding, groups):
    """The convolution PyTorch dispatches these tensors to (Cudnn, CudaDepthwise2d, ...)."""
    try:
        b = torch._C._select_conv_backend(x, w, None, [stride] * 2, [padding] * 2, [1, 1],
                                          False, [0, 0], groups)
        return str(b).rsplit(".", 1)[-1]
    except Exception:  # a private API: its absence costs a label, not the run
        return None


ACTIVATION_MODULES = {"relu": torch.nn.ReLU, "relu6": torch.nn.ReLU6, "silu": torch.nn.SiLU,
                      "hardswish": torch.nn.Hardswish}


def folded_batchnorm(scale, shift):
    """nn.BatchNorm2d in eval computing x * scale + shift exactly: running mean 0, running var
    1 - eps (so 1 / sqrt(var + eps) = 1), weight scale, bias shift."""
    bn = torch.nn.BatchNorm2d(scale.numel())
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1 - bn.eps)
        bn.weight.copy_(scale.detach())
        bn.bias.copy_(shift.detach())
    return bn.eval()


def as_model(module, device, dtype, channels_last):
    """model.to(device, dtype, memory_format) as a user runs inference (BatchNorm in eval)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return module.to(device=device, dtype=dtype, memory_format=fmt).eval()


def conv_bn_act(conv, weight, scale, shift, activation, device, dtype, channels_last):
    """nn.Sequential(conv, BatchNorm2d (eval), activation) computing the same function as a
    fused conv with epilogue act(conv * scale + shift): conv takes `weight`, the BatchNorm is
    folded_batchnorm(scale, shift)."""
    with torch.no_grad():
        conv.weight.copy_(weight.detach().float())
    seq = torch.nn.Sequential(conv, folded_batchnorm(scale, shift), ACTIVATION_MODULES[activation]())
    return as_model(seq, device, dtype, channels_last)


# Records --------------------------------------------------------------------------------------

def baseline_records(ctx, backend, t, baselines, common, extra):
    """One record per baseline for a backend's Timing ``t`` (None when it failed).

    baselines: {name: (Timing or None, error or None)}; common and extra go into every record.
    """
    records = []
    for bl_name, (bl_t, bl_error) in baselines.items():
        rec_extra = dict(extra)
        if bl_error:
            rec_extra["baseline_error"] = bl_error
        records.append(make_record(
            ctx.env, backend=backend, ms=t.ms if t else None,
            ms_p20=t.p20 if t else None, ms_p80=t.p80 if t else None,
            baseline=bl_name, baseline_ms=bl_t.ms if bl_t else None,
            baseline_ms_p20=bl_t.p20 if bl_t else None, baseline_ms_p80=bl_t.p80 if bl_t else None,
            **common, **rec_extra))
    return records
