"""bn_act suite: y = act(x * scale[c] + shift[c]), the fused BatchNorm-inference + activation.

Memory-bound, so the floor is bytes / copy bandwidth:
  fwd:   read x, write y                          -> 2 * |x| bytes
  train: fwd, then read g and x, write grad_x     -> 5 * |x| bytes
(scale/shift and their gradients are C values: negligible.)

Backends are timed against two baselines in the same process: "eager"
(fastconv.reference.bn_act, the pure-PyTorch composite) and "torch.compile"
of that same reference (Inductor fuses it into one Triton kernel, so it is
the baseline to beat).
"""
import math
from dataclasses import dataclass

import torch

from ..common import DTYPES, backends_to_run, short_error, time_call, tolerance
from ..records import make_record
from ..timing import Rotation, rotation_count, synchronize
from . import Suite, register

# MobileNetV2-style activations at batch 128/256: 58-308 M elements, i.e. 0.1-1.2 GB
# per tensor, far past the 60 MB L2, so the kernels are memory-bound as intended.
GPU_SHAPES = [(128, 32, 112, 112), (128, 144, 56, 56), (256, 96, 56, 56), (256, 576, 14, 14),
              (256, 96, 112, 112)]
GPU_QUICK_SHAPES = [(128, 144, 56, 56), (256, 96, 56, 56)]
# On the CPU the run only checks the harness; tiny shapes keep it to seconds.
CPU_SHAPES = [(2, 16, 16, 16), (2, 32, 8, 8)]
CPU_QUICK_SHAPES = CPU_SHAPES

DEFAULT_DTYPES = {("cuda", False): ["fp16", "bf16", "fp32"], ("cuda", True): ["fp16", "bf16"],
                  ("cpu", False): ["fp32", "bf16"], ("cpu", True): ["fp32"]}
DEFAULT_BACKENDS = ["cuda", "triton", "auto"]


@dataclass(frozen=True)
class Case:
    shape: tuple
    dtype: str
    layout: str      # "nchw" or "channels_last"
    mode: str        # "fwd" (no grad) or "train" (fwd + bwd for x, scale, shift)
    activation: str

    @property
    def name(self):
        return "x".join(map(str, self.shape))

    def bytes_moved(self):
        elems = math.prod(self.shape)
        return elems * DTYPES[self.dtype].itemsize * (2 if self.mode == "fwd" else 5)


def _cases(ctx):
    shapes = {("cuda", False): GPU_SHAPES, ("cuda", True): GPU_QUICK_SHAPES,
              ("cpu", False): CPU_SHAPES, ("cpu", True): CPU_QUICK_SHAPES}[(ctx.device, ctx.quick)]
    dtypes = ctx.dtypes or DEFAULT_DTYPES[(ctx.device, ctx.quick)]
    cases = [Case(s, d, layout, mode, "relu6")
             for s in shapes for d in dtypes
             for layout in ("nchw", "channels_last") for mode in ("fwd", "train")]
    # One silu case: a transcendental activation, to show whether the kernels stay memory-bound.
    cases += [Case(shapes[0], dtypes[0], "channels_last", mode, "silu") for mode in ("fwd", "train")]
    return cases


def _describe(case):
    return f"{case.name} {case.dtype} {case.layout} {case.mode} {case.activation}"


def _make_set(case, device):
    """One input set: (x, scale, shift, grad_out)."""
    dtype = DTYPES[case.dtype]
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    c = case.shape[1]
    # Spread of about +-6 after the affine, so relu6 clips on both sides.
    x = (3 * torch.randn(case.shape, device=device, dtype=dtype)).contiguous(memory_format=fmt)
    # scale/shift in float32, as BatchNorm keeps its parameters under autocast.
    scale = 1 + 0.2 * torch.randn(c, device=device)
    shift = 0.5 * torch.randn(c, device=device)
    train = case.mode == "train"
    g = torch.randn_like(x) if train else None  # randn_like keeps x's memory format
    for t in (x, scale, shift):
        t.requires_grad_(train)
    return x, scale, shift, g


def _step(fn, rotation, case):
    """A zero-argument callable that runs one fwd (or fwd+bwd) on the next input set."""
    act = case.activation
    if case.mode == "fwd":
        def step():
            x, s, b, _ = rotation.next()
            return fn(x, s, b, act)
    else:
        def step():
            x, s, b, g = rotation.next()
            y = fn(x, s, b, act)
            # autograd.grad rather than backward(): nothing accumulates into .grad between calls.
            return torch.autograd.grad(y, (x, s, b), g)
    return step


def _max_err(fn, inputs, act, ref32):
    x, s, b, _ = inputs
    with torch.no_grad():
        y = fn(x, s, b, act)
    return (y.float() - ref32).abs().max().item()


def _time(fn, rotation, case, ctx):
    return time_call(_step(fn, rotation, case), ctx)


def _run(case, ctx):
    import fastconv
    from fastconv import reference

    per_set = math.prod(case.shape) * DTYPES[case.dtype].itemsize * (1 if case.mode == "fwd" else 2)
    n_sets = rotation_count(per_set, ctx.l2_bytes, ctx.device)
    rotation = Rotation(_make_set(case, ctx.device) for _ in range(n_sets))
    first = rotation.sets[0]
    x, s, b, _ = first
    with torch.no_grad():
        ref32 = reference.bn_act(x.float(), s.float(), b.float(), case.activation)

    # Baselines. Eager must work: it is the reference every test compares against.
    eager_err = _max_err(reference.bn_act, first, case.activation, ref32)
    baselines = {"eager": (_time(reference.bn_act, rotation, case, ctx), None)}
    if ctx.compile:
        try:
            torch._dynamo.reset()  # a fresh, static-shape compile per case, as a user would get
            compiled = torch.compile(reference.bn_act, dynamic=False)
            _step(compiled, rotation, case)()  # compile (fwd and bwd graphs) outside timing
            synchronize(ctx.device)
            baselines["torch.compile"] = (_time(compiled, rotation, case, ctx), None)
        except Exception as exc:  # record the failure; the other numbers still count
            baselines["torch.compile"] = (None, short_error(exc))

    tol = tolerance(eager_err, DTYPES[case.dtype], ref32.abs().max().item())
    bytes_moved = case.bytes_moved()
    floor = ctx.floor_ms(bytes_moved)
    common = dict(suite="bn_act", case=case.name, dtype=case.dtype, layout=case.layout,
                  mode=case.mode, activation=case.activation, bytes_moved=bytes_moved,
                  floor_ms=floor, input_sets=n_sets, eager_max_abs_err=eager_err)
    records = []
    for name in backends_to_run(ctx, "bn_act", DEFAULT_BACKENDS):
        with fastconv.use_backend(name):
            try:
                err = _max_err(fastconv.bn_act, first, case.activation, ref32)
                t, error = _time(fastconv.bn_act, rotation, case, ctx), None
            except Exception as exc:
                t, err, error = None, None, short_error(exc)
        for bl_name, (bl_t, bl_error) in baselines.items():
            extra = {}
            if error:
                extra["error"] = error
            if bl_error:
                extra["baseline_error"] = bl_error
            if err is not None:
                extra.update(max_abs_err=err, check="ok" if err <= tol else "mismatch")
            records.append(make_record(
                ctx.env, backend=name, ms=t.ms if t else None,
                ms_p20=t.p20 if t else None, ms_p80=t.p80 if t else None,
                baseline=bl_name, baseline_ms=bl_t.ms if bl_t else None, **common, **extra))
    return records


register(Suite(name="bn_act", cases=_cases, run_case=_run, describe=_describe, order=10))
