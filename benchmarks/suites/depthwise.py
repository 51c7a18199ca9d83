"""depthwise suite: fastconv.depthwise_conv2d against PyTorch (cuDNN), torch.compile and the
eager conv -> BatchNorm2d(eval) -> ReLU6 sequence.

Shapes: MobileNetV2's ten distinct depthwise layers, EfficientNet-style 5x5 and ConvNeXt-style
7x7 layers, all at batch 128 with padding k//2 (benchmarks/FLOORS.md, "Layer shapes").

Cases (the issue's performance targets):
  fwd   fp16 channels_last, no epilogue: vs "pytorch" (F.conv2d on the same tensors, with
        torch.backends.cudnn.benchmark=True as users set it) and "torch.compile" (the
        reference, compiled).
  bwd   fp16 channels_last, grad_input + grad_weight only: vs "pytorch" (autograd of F.conv2d).
        Every input set's forward graph is built once, outside the timing, and the timed call
        is torch.autograd.grad(y, (x, weight), grad_y, retain_graph=True): it runs the
        backward kernels and autograd's bookkeeping, identical for both sides, and no forward.
  fp32 NCHW fwd and bwd, the same two measurements.
  fused fwd fp16 channels_last with scale/shift/ReLU6 (a folded BatchNorm): vs "fastconv plain"
        (the same backend without the epilogue; speedup >= 0.95 means the epilogue costs under
        5%) and "eager conv+bn+relu6" (nn.Conv2d -> nn.BatchNorm2d in eval -> nn.ReLU6; target
        >= 2x); also vs torch.compile of the reference outside --quick.

Memory-bound, so the floor is bytes / copy bandwidth:
  fwd:   read x + write y + read weight                             (+ scale/shift when fused)
  bwd:   read grad_y + read x + write grad_x + read weight + write grad_weight
The "pytorch" baseline records which convolution PyTorch picked (pytorch_conv_backend, from
torch._C._select_conv_backend): cuDNN for channels_last, its own kernel for some NCHW cases.
"""
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common import (DTYPES, auto_choices, backends_to_run, baseline_records, check_fields,
                      conv_bn_act, cudnn_benchmark, max_errors, newly_picked, pytorch_conv_backend,
                      short_error, time_call)
from ..timing import Rotation, rotation_count, synchronize
from . import Suite, register

SUITE = "depthwise"
BATCH = 128


@dataclass(frozen=True)
class Shape:
    model: str
    n: int
    c: int
    h: int       # H = W
    k: int
    stride: int

    @property
    def padding(self):
        return self.k // 2

    @property
    def out_h(self):
        return (self.h + 2 * self.padding - self.k) // self.stride + 1

    @property
    def name(self):
        return f"{self.n}x{self.c}x{self.h}x{self.h} k{self.k} s{self.stride}"


# (C, H, k, stride) at 224x224: benchmarks/FLOORS.md's list for MobileNetV2, EfficientNet-B0's
# 5x5 layers, ConvNeXt-T's 7x7 stages.
MOBILENETV2 = [(32, 112, 3, 1), (96, 112, 3, 2), (144, 56, 3, 1), (144, 56, 3, 2), (192, 28, 3, 1),
               (192, 28, 3, 2), (384, 14, 3, 1), (576, 14, 3, 1), (576, 14, 3, 2), (960, 7, 3, 1)]
EFFICIENTNET = [(240, 28, 5, 1), (672, 14, 5, 2)]
CONVNEXT = [(96, 56, 7, 1), (192, 28, 7, 1), (384, 14, 7, 1), (768, 7, 7, 1)]


def _shapes(model, specs, n=BATCH):
    return [Shape(model, n, *s) for s in specs]


GPU_SHAPES = (_shapes("mobilenetv2", MOBILENETV2) + _shapes("efficientnet", EFFICIENTNET)
              + _shapes("convnext", CONVNEXT))
# --quick: four MobileNetV2 layers (the largest, a stride-2, a mid and the smallest), one 5x5,
# one 7x7; fp32 NCHW on the first only.
GPU_QUICK_SHAPES = (_shapes("mobilenetv2", [MOBILENETV2[i] for i in (0, 3, 6, 9)])
                    + _shapes("efficientnet", EFFICIENTNET[:1]) + _shapes("convnext", CONVNEXT[1:2]))
GPU_QUICK_FP32_SHAPES = GPU_QUICK_SHAPES[:1]
# On the CPU the run only checks the harness: tiny shapes, seconds in all.
CPU_SHAPES = [Shape("tiny", 2, 16, 14, 3, 1), Shape("tiny", 2, 8, 14, 5, 2), Shape("tiny", 2, 8, 14, 7, 1)]

DEFAULT_BACKENDS = ["cuda", "triton", "auto"]
EPILOGUE_ACT = "relu6"


@dataclass(frozen=True)
class Case:
    shape: Shape
    dtype: str
    layout: str      # "channels_last" or "nchw"
    mode: str        # "fwd" (no grad) or "bwd" (grad_input + grad_weight, backward only)
    fused: bool = False  # scale/shift/relu6 epilogue (fwd only)

    @property
    def activation(self):
        return EPILOGUE_ACT if self.fused else None

    def tensor_bytes(self):
        s, item = self.shape, DTYPES[self.dtype].itemsize
        x = s.n * s.c * s.h * s.h * item
        y = s.n * s.c * s.out_h * s.out_h * item
        w = s.c * s.k * s.k * item
        return x, y, w

    def bytes_moved(self):
        x, y, w = self.tensor_bytes()
        if self.mode == "fwd":
            return x + y + w + (2 * self.shape.c * 4 if self.fused else 0)
        return y + x + x + 2 * w  # read grad_y and x, write grad_x; weight read, grad_weight written

    def flops(self):
        s = self.shape
        macs = s.n * s.c * s.out_h * s.out_h * s.k * s.k
        return 2 * macs * (1 if self.mode == "fwd" else 2)


def _cases(ctx):
    if ctx.device == "cuda":
        shapes = GPU_QUICK_SHAPES if ctx.quick else GPU_SHAPES
        fp32_shapes = GPU_QUICK_FP32_SHAPES if ctx.quick else GPU_SHAPES
        default_low = ["fp16"]
    else:
        shapes = CPU_SHAPES[:1] if ctx.quick else CPU_SHAPES
        fp32_shapes = [] if ctx.quick else CPU_SHAPES[:1]
        default_low = ["fp32"]  # CPU: the harness check, in the dtype the CPU runs well
    low = [d for d in ctx.dtypes if d != "fp32" or ctx.device != "cuda"] if ctx.dtypes else default_low
    want_fp32 = ctx.dtypes is None or "fp32" in ctx.dtypes
    cases = []
    for s in shapes:
        for d in low:
            cases += [Case(s, d, "channels_last", "fwd"), Case(s, d, "channels_last", "bwd"),
                      Case(s, d, "channels_last", "fwd", fused=True)]
    if want_fp32:
        cases += [Case(s, "fp32", "nchw", m) for s in fp32_shapes for m in ("fwd", "bwd")]
    if ctx.device != "cuda" and ctx.quick and len(cases) >= 3:  # fwd, bwd on a 5x5 s2, fused
        cases = [cases[0], Case(CPU_SHAPES[1], cases[0].dtype, "channels_last", "bwd"), cases[2]]
    return cases


def _describe(case):
    return (f"{case.shape.name} {case.dtype} {case.layout} {case.mode}"
            + (f" +{EPILOGUE_ACT}" if case.fused else ""))


# Inputs -------------------------------------------------------------------------------------

@dataclass
class InputSet:
    x: torch.Tensor
    w: torch.Tensor
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    g: torch.Tensor | None  # grad_y (bwd)


def _make_set(case, device):
    s, dtype = case.shape, DTYPES[case.dtype]
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    x = torch.randn(s.n, s.c, s.h, s.h, device=device, dtype=dtype).contiguous(memory_format=fmt)
    # Weights of about 1/k keep the output near unit size, so half precision is not the story.
    w = (torch.randn(s.c, 1, s.k, s.k, device=device) / s.k).to(dtype)
    scale = shift = g = None
    if case.fused:
        # float32, as a folded BatchNorm's are; y*scale+shift spreads over about -3..5, so
        # relu6 clips on both sides.
        scale = 2 + 0.5 * torch.randn(s.c, device=device)
        shift = 1 + 0.5 * torch.randn(s.c, device=device)
    if case.mode == "bwd":
        g = torch.randn(s.n, s.c, s.out_h, s.out_h, device=device, dtype=dtype).contiguous(memory_format=fmt)
        x.requires_grad_(True)
        w.requires_grad_(True)
    return InputSet(x, w, scale, shift, g)


def _bytes_per_set(case):
    x, y, _ = case.tensor_bytes()
    return x if case.mode == "fwd" else x + 2 * y  # bwd keeps grad_y and each graph's y alive


# The functions compared ---------------------------------------------------------------------

def _reference():
    """fastconv.reference.depthwise_conv2d as call(x, w, stride, padding, scale, shift, act).

    The reference spells padding as (top, left, bottom, right); the public op takes F.conv2d's
    forms. Read which from its signature, so the suite follows the reference if that changes.
    """
    from fastconv import reference
    ref = reference.depthwise_conv2d
    default = inspect.signature(ref).parameters["padding"].default
    four = isinstance(default, tuple) and len(default) == 4

    def call(x, w, stride, padding, scale=None, shift=None, activation=None):
        pad = (padding,) * 4 if four else (padding, padding)
        return ref(x, w, None, (stride, stride), pad, (1, 1),
                   scale=scale, shift=shift, activation=activation)
    return call


def _functions(case, ref):
    """The forward of each contender, as f(InputSet) -> y."""
    import fastconv
    s, act = case.shape, case.activation
    st, pad = s.stride, s.padding
    return {
        "fastconv": lambda i: fastconv.depthwise_conv2d(i.x, i.w, None, st, pad, 1, scale=i.scale,
                                                        shift=i.shift, activation=act),
        "fastconv plain": lambda i: fastconv.depthwise_conv2d(i.x, i.w, None, st, pad, 1),
        "pytorch": lambda i: F.conv2d(i.x, i.w, None, st, pad, 1, s.c),
        "reference": lambda i: ref(i.x, i.w, st, pad, i.scale, i.shift, act),
    }


def _eager_sequence(case, first, device):
    """nn.Conv2d -> nn.BatchNorm2d (eval) -> nn.ReLU6, as a model holds them, computing the
    same function as the fused op on the first input set: BN's running statistics and affine
    parameters give y * scale + shift exactly (mean 0, var 1 - eps, weight scale, bias shift)."""
    s = case.shape
    conv = torch.nn.Conv2d(s.c, s.c, s.k, s.stride, s.padding, groups=s.c, bias=False)
    # model.half() and model.to(memory_format=channels_last), as a user runs inference.
    seq = conv_bn_act(conv, first.w, first.scale, first.shift, EPILOGUE_ACT, device,
                      DTYPES[case.dtype], case.layout == "channels_last")
    return lambda i: seq(i.x)


# Timing -------------------------------------------------------------------------------------

def _time_fwd(f, rotation, ctx):
    with torch.no_grad():
        return time_call(lambda: f(rotation.next()), ctx)


def _time_bwd(f, rotation, ctx):
    """Backward only: each set's graph is built once here; the timed call runs autograd.grad
    on the next retained graph (grad_input and grad_weight), never the forward."""
    graphs = Rotation((f(i), i) for i in rotation.sets)
    synchronize(ctx.device)

    def step():
        y, i = graphs.next()
        return torch.autograd.grad(y, (i.x, i.w), i.g, retain_graph=True)
    return time_call(step, ctx)


def _timer(case):
    return _time_fwd if case.mode == "fwd" else _time_bwd


# Checks -------------------------------------------------------------------------------------

def _outputs(f, i, mode):
    """What the check compares: y (fwd) or (grad_x, grad_weight) (bwd)."""
    if mode == "fwd":
        with torch.no_grad():
            return (f(i),)
    return torch.autograd.grad(f(i), (i.x, i.w), i.g)


def _oracle(case, i, ref):
    """The reference in float64 on the first set."""
    d = lambda t: None if t is None else t.detach().double().requires_grad_(case.mode == "bwd")
    i64 = InputSet(d(i.x), d(i.w), d(i.scale), d(i.shift),
                   None if i.g is None else i.g.double())
    s = case.shape
    return _outputs(lambda j: ref(j.x, j.w, s.stride, s.padding, j.scale, j.shift, case.activation),
                    i64, case.mode)


OUTPUT_NAMES = {"fwd": ("y",), "bwd": ("grad_x", "grad_weight")}


def _auto_choices():
    """What auto has picked so far for the depthwise ops (forward, grad_input, grad_weight)."""
    return auto_choices("fastconv.ops.depthwise", ("FORWARD", "GRAD_INPUT", "GRAD_WEIGHT"))


# One case -----------------------------------------------------------------------------------

def _run(case, ctx):
    with cudnn_benchmark():
        return _run_case(case, ctx)


def _run_case(case, ctx):
    import fastconv

    dtype = DTYPES[case.dtype]
    n_sets = rotation_count(_bytes_per_set(case), ctx.l2_bytes, ctx.device)
    rotation = Rotation(_make_set(case, ctx.device) for _ in range(n_sets))
    first = rotation.sets[0]
    ref = _reference()
    fns = _functions(case, ref)
    timer = _timer(case)
    oracle = _oracle(case, first, ref)

    # The eager error in the same dtype sets the check's tolerance: PyTorch's own conv for the
    # plain cases, the reference (conv in the dtype, epilogue in float32) for the fused one.
    eager_name = "reference" if case.fused else "pytorch"
    eager_errs = max_errors(_outputs(fns[eager_name], first, case.mode), oracle)

    s = case.shape
    baselines = {}  # name -> (Timing or None, error or None)
    extra_common = {}
    if case.fused:
        seq = _eager_sequence(case, first, ctx.device)
        extra_common["sequence_max_abs_err"] = max_errors(_outputs(seq, first, "fwd"), oracle)[0]
        baselines["eager conv+bn+relu6"] = (_time_fwd(seq, rotation, ctx), None)
    else:
        baselines["pytorch"] = (timer(fns["pytorch"], rotation, ctx), None)
        extra_common["pytorch_conv_backend"] = pytorch_conv_backend(first.x, first.w, s.stride,
                                                                    s.padding, s.c)
    compile_here = ctx.compile and case.mode == "fwd" and case.layout == "channels_last" and (
        not case.fused or not ctx.quick)
    if compile_here:
        try:
            torch._dynamo.reset()  # a fresh, static-shape compile per case, as a user would get
            compiled = torch.compile(fns["reference"], dynamic=False)
            with torch.no_grad():
                compiled(first)  # compile outside the timing
            synchronize(ctx.device)
            baselines["torch.compile"] = (_time_fwd(compiled, rotation, ctx), None)
        except Exception as exc:  # record the failure; the other numbers still count
            baselines["torch.compile"] = (None, short_error(exc))

    bytes_moved = case.bytes_moved()
    common = dict(suite=SUITE, case=s.name, dtype=case.dtype, layout=case.layout, mode=case.mode,
                  activation=case.activation or "-", model=s.model, N=s.n, C=s.c, H=s.h, k=s.k,
                  stride=s.stride, padding=s.padding, bytes_moved=bytes_moved, flops=case.flops(),
                  floor_ms=ctx.floor_ms(bytes_moved), input_sets=n_sets, cudnn_benchmark=True,
                  cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,  # PyTorch's fp32 baseline may use TF32
                  timing=("autograd.grad(retain_graph=True) on prebuilt graphs: backward only"
                          if case.mode == "bwd" else "forward under no_grad"),
                  **extra_common)
    records = []
    for name in backends_to_run(ctx, SUITE, _default_backends(ctx)):
        own = dict(baselines)
        extra = {}
        with fastconv.use_backend(name):
            try:
                before = _auto_choices()
                outs = _outputs(fns["fastconv"], first, case.mode)
                picked = newly_picked(before, _auto_choices())
                if picked:
                    extra["auto_picked"] = picked
                extra.update(check_fields(outs, eager_errs, oracle, dtype, OUTPUT_NAMES[case.mode]))
                del outs
                t = timer(fns["fastconv"], rotation, ctx)
            except Exception as exc:
                t, extra["error"] = None, short_error(exc)
            if case.fused:  # the epilogue's cost: the same backend without it, timed next to it
                try:
                    own["fastconv plain"] = (_time_fwd(fns["fastconv plain"], rotation, ctx), None)
                except Exception as exc:
                    own["fastconv plain"] = (None, short_error(exc))
        if case.fused and t and own["fastconv plain"][0]:
            extra["epilogue_overhead_pct"] = 100 * (t.ms / own["fastconv plain"][0].ms - 1)
        records += baseline_records(ctx, name, t, own, common, extra)
    return records


def _default_backends(ctx):
    # On the CPU, auto runs the reference; the Triton interpreter is a test vehicle, far too
    # slow to time by default (ask for it with --backend triton).
    return DEFAULT_BACKENDS if ctx.device == "cuda" else ["auto"]


register(Suite(name=SUITE, cases=_cases, run_case=_run, describe=_describe, order=20))
