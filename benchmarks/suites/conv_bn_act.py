"""conv_bn_act suite: fastconv.nn.ConvBNAct2d (Conv2d -> BatchNorm2d -> activation as one fused
unit) against the eager nn.Sequential of the same modules, and torch.compile of it.

Shapes (fp16, channels_last, 3x3 convs, padding 1, no conv bias):
  mobilenetv2  the stem, 3 -> 32, stride 2, 224x224, batch 128, ReLU6;
  resnet50     torchvision v1.5's 3x3 layers (the stride is in the 3x3): (C, H, stride) =
               (64,56,1), (128,56,2), (128,28,1), (256,28,2), (256,14,1), (512,14,2), (512,7,1),
               C_in = C_out = C, batch 64, ReLU;
  vgg16        its distinct 3x3 layers (C_in, C_out, H) = (3,64,224), (64,64,224), (64,128,112),
               (128,128,112), (128,256,56), (256,256,56), (256,512,28), (512,512,28),
               (512,512,14), stride 1, batch 64, ReLU.

Both sides are the same modules: fastconv's ConvBNAct2d, and `nn.Sequential(*that module)`, which
shares its Conv2d, BatchNorm2d and activation (ReLU/ReLU6 with inplace=True, as torchvision's
Conv2dNormActivation builds them), channels_last; torch.backends.cudnn.benchmark is on during
every case (common.cudnn_benchmark). The BatchNorm has random running statistics and affine
parameters, so that the folded weight is not the conv's own and ReLU6 clips on both sides.
Precision (record `precision`), as each use runs in practice:
  inference  model.half(): parameters and x in fp16.
  train      mixed precision: float32 parameters, x and grad_y in fp16, the step under
             torch.autocast(fp16). Nobody trains BatchNorm with half parameters, and PyTorch sends
             half input with half BN parameters to its own BN kernel, not cuDNN's, so model.half()
             would also give the eager side a weaker BatchNorm than training really uses.
  fp32 (the CPU run, or --dtype fp32): float32 throughout, no autocast.

Cases (record `kind`; the issue's targets):
  inference  ConvBNAct2d in eval (BN folded into the conv weight and a shift, cached; one conv
             kernel with a shift + activation epilogue) vs "eager conv+bn+act" (the Sequential
             in eval: cuDNN conv, then BatchNorm2d, then the activation). Target >= 1.3x.
  compile    the same forward vs "torch.compile frozen max-autotune": torch.compile of the eager
             Sequential with torch._inductor.config.freezing = True (restored after), under
             torch.no_grad(), mode "max-autotune-no-cudagraphs", dynamic=False. Freezing is what
             lets Inductor fold the BatchNorm into the conv (benchmarks/FLOORS.md); max-autotune
             lets it pick its Triton conv template, with the epilogue fused, where that beats
             cuDNN. Without CUDA graphs because fastconv runs without them (benchmarks/FLOORS.md:
             graph both sides or neither), and because a graphed callable copies every new (rotated) input into its
             static buffer, an extra read and write of x per call that no user of a real model
             pays. Target >= 1.0x.
             max-autotune compiles and times many conv configs per shape (up to about a minute
             each on an H200), so only a representative subset runs: COMPILE_SHAPES (the stem,
             one ResNet50 and one VGG16 layer; one ResNet50 layer under --quick). These cases
             come last in the suite, so --time-budget cuts them first; `compile_s` records the
             compile time. Not run when ctx.compile is off (--no-compile, the CPU default): a
             note says so.
  train      forward + backward of ConvBNAct2d in train() (batch statistics computed in the
             conv's epilogue, one normalise + activation pass, a fused BN + activation backward)
             vs "eager conv+bn+act autograd" (the Sequential in train()). The timed step is
             y = f(x); torch.autograd.grad(y, (x, conv.weight, bn.weight, bn.bias), grad_y), so
             nothing accumulates into .grad. Both sides update the shared running statistics
             on every call; that drift is accepted, not reset: a train-mode forward normalises
             with the batch's statistics and only writes the running ones, so it changes no
             computation that is timed or checked (resetting them between calls would add work
             to the timing). Target >= 1.2x.
  bytes      counted, not timed: the activation bytes a training step moves, eager vs fused
             (model below). Target: fused about half of eager. One record per shape, at every
             shape even under --quick (it costs no timing). Its `ms` and `baseline_ms` are
             modelled, not measured: each side's activation bytes over this run's measured copy
             bandwidth (benchmarks/FLOORS.md's 4.3 TB/s when no ceiling was measured), so
             `speedup` is eager bytes / fused bytes: 1.75 by the model below, where "about half" is about 2.
             backend "fused (counted)", baseline "eager (counted)".

The byte-count model (units of A = the output activation, N * C_out * Ho * Wo * itemsize; c is
the conv's output, b the BatchNorm's, y the activation's):
  eager forward    conv writes c                                                   1
                   BN (training) reads c for the statistics, reads c again to
                   normalise, writes b                                             3
                   activation reads b, writes y (in place or not)                  2
  eager backward   activation backward reads grad_y and y, writes grad_b           3
                   BN backward reads grad_b and c for its two reductions, reads
                   them again for the elementwise pass, writes grad_c              5
                                                                           eager: 14 A
  fused forward    conv writes c and computes the batch statistics in its
                   epilogue                                                        1
                   normalise + activation reads c, writes y                        2
  fused backward   reads grad_y and c (the reductions), reads them again (the
                   elementwise pass, act' recomputed from c), writes grad_c        5
                                                                           fused:   8 A
  ratio fused / eager = 8 / 14 = 0.57. The implicit GEMM, which serves every shape here,
  computes the statistics in its epilogue on both GPU backends (only the cuda backend's
  depthwise and pointwise routes would add a statistics pass, +1 A).
  Not counted above, because they are the same on both sides, and listed separately
  (`conv_bytes`): the conv's own traffic, forward read x and the weight; backward, grad_input
  reads grad_c and the weight and writes grad_x, grad_weight reads grad_c and x and writes
  grad_weight: 3 |x| + 2 A + 3 |w|. Per-channel vectors (statistics, BN parameters and their
  gradients) are C values: negligible.
The bytes check traces both training steps (on a small instance of the shape: batch 2, the same
channels, kernel and stride, H <= 16; fastconv under its torch backend, whose ops are the same
custom ops every backend runs) with a TorchDispatchMode and counts each top-level op's reads and
writes of activation tensors (those a conv forward writes, grad_y, and what ops derive from them;
never x or grad_x; views and allocations are not traffic). An op-level trace sees a tensor once
per op, so it counts "touches": the model above less the re-reads inside one kernel (eager BN
forward 1, eager BN backward 2, fused backward 2), i.e. 11 touches eager and 6 fused;
`traced_ops_eager` / `traced_ops_fused` list what was seen. The eager trace may show more than
the model: under autograd, eager ReLU6(inplace=True) first clones its input (hardtanh_'s backward
needs the original), one more read and write of A that the model leaves out. So `check` is "ok"
when the fused trace has exactly the modelled touches and the eager trace at least as many (extra
eager traffic only makes the modelled ratio conservative); "mismatch" otherwise. Each extra eager touch is one more pass over
A: `activation_units_eager_traced` and `activation_bytes_ratio_traced` count them in.

Floors (max(bytes / copy bandwidth, flops / matmul rate); M = N*Ho*Wo, K = C_in*3*3, N = C_out):
  inference  bytes |x| + |y| + |w| (+ the float32 shift, 4*C_out);  flops 2*M*K*N
  train      the fused model's whole traffic, 8 A + 2 A + 3 |x| + 3 |w|;  flops 3 GEMMs, 6*M*K*N
  compile    as inference. bytes records have no floor.

Checks: before timing, each fastconv backend's result is compared with a float64 copy of the eager
Sequential on the first input set (y; in train also grad_x, grad_weight, grad of the BN weight
and bias), with common.tolerance against the eager Sequential's own error in the case's
precision.

On the CPU (the harness check only): tiny shapes in fp32, backend auto (the reference ops), no
torch.compile; --quick runs one case per kind but compile.
"""
import contextlib
import copy
import math
import time
from dataclasses import dataclass

import torch

from ..ceilings import H200_REFERENCE
from ..common import (DTYPES, auto_choices, backends_to_run, baseline_records, check_fields,
                      cudnn_benchmark, max_errors, newly_picked, pytorch_conv_backend,
                      short_error, time_call)
from .. import traffic
from ..records import make_record
from ..timing import Rotation, rotation_count, synchronize
from . import Suite, register
from .conv_bn_act_cases import (COMPILE_SHAPES, CPU_SHAPES, GPU_QUICK_COMPILE, GPU_QUICK_INFERENCE,
                                GPU_QUICK_TRAIN, GPU_SHAPES, Case, _route, activation_units,
                                conv_bytes)

SUITE = "conv_bn_act"
# The order the cases run in: bytes first (it costs no timing), compile last (--time-budget cuts
# the most expensive cases first).
KINDS = ("bytes", "inference", "train", "compile")
COMPILE_MODE = "max-autotune-no-cudagraphs"
EAGER = "eager conv+bn+act"
EAGER_TRAIN = "eager conv+bn+act autograd"
COMPILED = "torch.compile frozen max-autotune"


DEFAULT_BACKENDS = ["cuda", "triton", "auto"]


# Cases -------------------------------------------------------------------------------------

def _cases(ctx):
    if ctx.device == "cuda":
        if ctx.quick:
            inference, train, compiled = GPU_QUICK_INFERENCE, GPU_QUICK_TRAIN, GPU_QUICK_COMPILE
        else:
            inference, train, compiled = GPU_SHAPES, GPU_SHAPES, COMPILE_SHAPES
        bytes_shapes = GPU_SHAPES
        dtypes = ctx.dtypes or ["fp16"]
    else:
        if ctx.quick:
            inference, train, bytes_shapes = CPU_SHAPES[:1], CPU_SHAPES[1:2], CPU_SHAPES[2:]
        else:
            inference = train = bytes_shapes = CPU_SHAPES
        compiled = CPU_SHAPES[1:2]
        dtypes = ctx.dtypes or ["fp32"]  # CPU: the harness check, in the dtype the CPU runs well
    if not ctx.compile:
        compiled = []
        _note(ctx, f"{SUITE}: torch.compile baseline (freezing, {COMPILE_MODE}) not run "
                   "(--no-compile, or the CPU default)")
    elif len(compiled) < len(inference):
        _note(ctx, f"{SUITE}: torch.compile baseline (freezing, {COMPILE_MODE}) on {len(compiled)} "
                   f"of {len(inference)} inference shapes only (max-autotune compiles take up to a "
                   "minute per shape); these cases run last, so --time-budget cuts them first")
    by_kind = {"inference": inference, "train": train, "bytes": bytes_shapes, "compile": compiled}
    return [Case(s, d, kind) for kind in KINDS for d in dtypes for s in by_kind[kind]]


def _note(ctx, text):
    if text not in ctx.notes:
        ctx.notes.append(text)


def _describe(case):
    return f"{case.shape.model} {case.shape.name} {case.dtype} {case.kind}"


# The modules and inputs -------------------------------------------------------------------------

def _module(case, device, seed=0):
    """ConvBNAct2d with random weights, BN running statistics and affine parameters, in the
    case's dtype and channels_last. The eager side is nn.Sequential(*module): the same modules.

    Conv weights of about 1/sqrt(fan_in) keep c near unit size; running_var about 1/4 and
    gamma about 1 scale it by about 2, beta about 1 shifts it, so the activation's input spreads
    over about -3..5 and ReLU6 clips on both sides (in train mode the batch statistics
    normalise c instead, and the same gamma and beta give a similar spread)."""
    from fastconv.nn import ConvBNAct2d
    s = case.shape
    gen = torch.Generator().manual_seed(seed)
    m = ConvBNAct2d(s.c_in, s.c_out, s.k, s.stride, s.padding, activation=s.activation)
    conv, bn = m[0], m[1]
    fan_in = s.c_in * s.k * s.k
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / math.sqrt(fan_in))
        bn.running_mean.copy_(0.2 * torch.randn(s.c_out, generator=gen))
        bn.running_var.copy_(0.25 * (0.8 + 0.4 * torch.rand(s.c_out, generator=gen)))
        bn.weight.copy_(1 + 0.2 * torch.randn(s.c_out, generator=gen))
        bn.bias.copy_(1 + 0.5 * torch.randn(s.c_out, generator=gen))
    dtype = torch.float32 if _autocast(case) else DTYPES[case.dtype]
    return m.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def _autocast(case):
    """True where the case runs under torch.autocast: train in a half dtype."""
    return case.kind in ("train", "bytes") and DTYPES[case.dtype] != torch.float32


def _precision(case):
    if _autocast(case):
        return f"autocast {case.dtype}, float32 parameters"
    return "float32" if DTYPES[case.dtype] == torch.float32 else f"model in {case.dtype}"


def _amp(case, device):
    """torch.autocast in the case's dtype where it trains in mixed precision, else nothing."""
    if _autocast(case):
        return torch.autocast(device, dtype=DTYPES[case.dtype])
    return contextlib.nullcontext()


def _eager(module):
    """The eager Sequential sharing the module's Conv2d, BatchNorm2d and activation."""
    return torch.nn.Sequential(*module)


def _params(module):
    """What a train step differentiates besides x: conv weight, BN weight and bias."""
    return module[0].weight, module[1].weight, module[1].bias


@dataclass
class InputSet:
    x: torch.Tensor
    g: torch.Tensor | None  # grad_y (train)


def _make_set(case, device, shape=None):
    s, dtype, cl = shape or case.shape, DTYPES[case.dtype], torch.channels_last
    x = torch.randn(s.n, s.c_in, s.h, s.h, device=device, dtype=dtype).contiguous(memory_format=cl)
    g = None
    if case.kind in ("train", "bytes"):
        g = torch.randn(s.n, s.c_out, s.out_h, s.out_h, device=device,
                        dtype=dtype).contiguous(memory_format=cl)
        x.requires_grad_(True)
    return InputSet(x, g)


def _bytes_per_set(case):
    x, a, _ = case.tensor_bytes()
    return x + (a if case.kind == "train" else 0)


# Timing and checks -------------------------------------------------------------------------------

def _time_fwd(f, rotation, ctx):
    with torch.no_grad():
        return time_call(lambda: f(rotation.next().x), ctx)


def _time_train(module, rotation, ctx, amp):
    """y = module(x) under `amp`, then autograd.grad of x and the parameters (outside it, as a
    training loop calls backward)."""
    params = _params(module)

    def step():
        i = rotation.next()
        with amp:
            y = module(i.x)
        return torch.autograd.grad(y, (i.x,) + params, i.g)
    return time_call(step, ctx)


OUTPUT_NAMES = {"fwd": ("y",),
                "train": ("y", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias")}


def _outputs(module, i, mode, amp=None):
    """What the check compares: y (fwd), or y and the gradients (train)."""
    if mode == "fwd":
        with torch.no_grad():
            return (module(i.x),)
    with amp or contextlib.nullcontext():
        y = module(i.x)
    return (y.detach(),) + tuple(torch.autograd.grad(y, (i.x,) + _params(module), i.g))


def _oracle(case, module, i):
    """The eager Sequential in float64 (a copy: the timed modules are untouched) on the first set.

    Without cudnn.benchmark: which float64 algorithm runs does not matter, and searching them at
    VGG16's sizes would cost seconds per case."""
    seq = _eager(copy.deepcopy(module)).double()
    seq.train(case.mode == "train")
    x = i.x.detach().double().requires_grad_(case.mode == "train")
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        return _outputs(seq, InputSet(x, None if i.g is None else i.g.double()), case.mode)
    finally:
        torch.backends.cudnn.benchmark = old


def _auto_choices():
    """What auto has picked so far for the ops a ConvBNAct2d runs."""
    out = {}
    for mod, attrs in (("conv_bn_act", ("FORWARD", "WITH_STATS")),
                       ("batch_norm", ("STATS", "BACKWARD")), ("bn_act", ("FORWARD", "BACKWARD"))):
        out.update({(f"{mod}_{a}", k): v
                    for (a, k), v in auto_choices(f"fastconv.ops.{mod}", attrs).items()})
    return out


def _compile_baseline(eager, rotation, first, oracle, ctx):
    """(Timing or None, error or None, extra fields): torch.compile of the eager Sequential,
    frozen, max-autotune without CUDA graphs, compiled outside the timing."""
    extra = {"compile_mode": COMPILE_MODE, "compile_freezing": True}
    try:
        torch._dynamo.reset()  # a fresh, static-shape compile per case, as a user would get
        compiled = torch.compile(eager, mode=COMPILE_MODE, dynamic=False)
        with torch._inductor.config.patch(freezing=True), torch.no_grad():
            t0 = time.perf_counter()
            y = compiled(first.x)  # compile outside the timing
            synchronize(ctx.device)
            extra["compile_s"] = time.perf_counter() - t0
            extra["compile_max_abs_err"] = max_errors((y,), oracle)[0]
            del y
            t = _time_fwd(compiled, rotation, ctx)
        return t, None, extra
    except Exception as exc:  # record the failure; the other numbers still count
        return None, short_error(exc), extra
    finally:
        torch._dynamo.reset()


# One case -----------------------------------------------------------------------------------

def _run(case, ctx):
    with cudnn_benchmark():
        if case.kind == "bytes":
            return _run_bytes(case, ctx)
        return _run_timed(case, ctx)


def _run_timed(case, ctx):
    import fastconv

    dtype, s = DTYPES[case.dtype], case.shape
    train = case.mode == "train"
    module = _module(case, ctx.device).train(train)
    eager = _eager(module)
    n_sets = rotation_count(_bytes_per_set(case), ctx.l2_bytes, ctx.device)
    rotation = Rotation(_make_set(case, ctx.device) for _ in range(n_sets))
    first = rotation.sets[0]
    oracle = _oracle(case, module, first)
    # The eager Sequential's error in the same dtype sets the check's tolerance.
    amp = _amp(case, ctx.device)
    eager_errs = max_errors(_outputs(eager, first, case.mode, amp), oracle)

    extra_common = {}
    if case.kind == "train":
        baselines = {EAGER_TRAIN: (_time_train(eager, rotation, ctx, amp), None)}
    elif case.kind == "inference":
        baselines = {EAGER: (_time_fwd(eager, rotation, ctx), None)}
        extra_common["pytorch_conv_backend"] = pytorch_conv_backend(first.x, module[0].weight,
                                                                    s.stride, s.padding, 1)
    else:
        t, error, extra_common = _compile_baseline(eager, rotation, first, oracle, ctx)
        baselines = {COMPILED: (t, error)}

    bytes_moved, flops = case.bytes_moved(), case.flops()
    mem_floor, mm_floor = ctx.floor_ms(bytes_moved), ctx.floor_ms(0, flops)
    m, k, n = s.gemm
    common = dict(suite=SUITE, case=s.name, dtype=case.dtype, layout=case.layout, mode=case.mode,
                  activation=s.activation, kind=case.kind, model=s.model, N=s.n, C_in=s.c_in,
                  C_out=s.c_out, H=s.h, Ho=s.out_h, k=s.k, stride=s.stride, padding=s.padding,
                  route=_route(s), gemm_m=m, gemm_k=k, gemm_n=n, bytes_moved=bytes_moved,
                  flops=flops, floor_ms=ctx.floor_ms(bytes_moved, flops),
                  memory_floor_ms=mem_floor, matmul_floor_ms=mm_floor,
                  bound=None if mem_floor is None or mm_floor is None else
                  ("matmul" if mm_floor > mem_floor else "memory"),
                  precision=_precision(case), input_sets=n_sets, cudnn_benchmark=True,
                  cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                  timing=("forward + autograd.grad of x, conv weight, BN weight and bias, train()"
                          if train else "forward under no_grad, eval()"),
                  **extra_common)
    if train:
        common["activation_units_eager"] = activation_units(s)["eager"]
        common["activation_units_fused"] = activation_units(s)["fused"]

    records = []
    for name in backends_to_run(ctx, SUITE, _default_backends(ctx)):
        extra = {}
        with fastconv.use_backend(name):
            try:
                before = _auto_choices()
                outs = _outputs(module, first, case.mode, amp)  # eval: builds the fold cache
                picked = newly_picked(before, _auto_choices())
                if picked:
                    extra["auto_picked"] = picked
                extra.update(check_fields(outs, eager_errs, oracle, dtype, OUTPUT_NAMES[case.mode]))
                del outs
                t = (_time_train(module, rotation, ctx, amp) if train
                     else _time_fwd(module, rotation, ctx))
            except Exception as exc:
                t, extra["error"] = None, short_error(exc)
        records += baseline_records(ctx, name, t, baselines, common, extra)
    for r in records:  # the share of the matmul ceiling
        r["pct_of_matmul_ceiling"] = 100 * mm_floor / r["ms"] if mm_floor and r["ms"] else None
        r["baseline_pct_of_matmul_ceiling"] = (100 * mm_floor / r["baseline_ms"]
                                               if mm_floor and r["baseline_ms"] else None)
    return records


# The bytes case --------------------------------------------------------------------------------

def _trace(case, module, i, device, backend=None):
    """[(op, reads, writes)] of one training step of module on input set i."""
    def step():
        with _amp(case, device):
            y = module(i.x)
        torch.autograd.grad(y, (i.x,) + _params(module), i.g)

    return traffic.trace(step, i.g, backend)


def _run_bytes(case, ctx):
    s = case.shape
    x, a, w = case.tensor_bytes()
    units = activation_units(s)
    eager_bytes, fused_bytes = units["eager"] * a, units["fused"] * a
    own = conv_bytes(case)

    # The check: the op-level structure of both training steps on a small instance.
    small = Case(s.small(), case.dtype, "bytes")
    module = _module(small, ctx.device).train()
    first = _make_set(small, ctx.device)
    extra = {}
    try:
        fused_ops = _trace(small, module, first, ctx.device, backend="torch")
        eager_ops = _trace(small, _eager(module), first, ctx.device)
        traced_eager, traced_fused = traffic.touches(eager_ops), traffic.touches(fused_ops)
        ok = traced_eager >= units["eager_touches"] and traced_fused == units["fused_touches"]
        eager_traced_units = units["eager"] + max(0, traced_eager - units["eager_touches"])
        extra.update(check="ok" if ok else "mismatch", traced_touches_eager=traced_eager,
                     activation_units_eager_traced=eager_traced_units,
                     activation_bytes_ratio_traced=units["fused"] / eager_traced_units,
                     traced_touches_fused=traced_fused, traced_ops_eager=traffic.ops_text(eager_ops),
                     traced_ops_fused=traffic.ops_text(fused_ops), traced_shape=small.shape.name)
    except Exception as exc:
        extra["error"] = short_error(exc)

    gbps = ctx.ceilings.get("copy_gbps")
    source = "measured copy bandwidth" if gbps else "benchmarks/FLOORS.md's H200 copy bandwidth"
    gbps = gbps or H200_REFERENCE["copy_gbps"]
    return [make_record(
        ctx.env, suite=SUITE, case=s.name, dtype=case.dtype, layout=case.layout, mode=case.mode,
        activation=s.activation, kind=case.kind, backend="fused (counted)",
        ms=fused_bytes / (gbps * 1e6), baseline="eager (counted)",
        baseline_ms=eager_bytes / (gbps * 1e6),
        timing=f"counted, not timed: ms = activation bytes / {source} ({gbps:.0f} GB/s)",
        model=s.model, N=s.n, C_in=s.c_in, C_out=s.c_out, H=s.h, Ho=s.out_h, k=s.k,
        stride=s.stride, padding=s.padding, route=_route(s), precision=_precision(case),
        activation_size_bytes=a, activation_units_eager=units["eager"],
        activation_units_fused=units["fused"], activation_bytes_eager=eager_bytes,
        activation_bytes_fused=fused_bytes, activation_bytes_ratio=fused_bytes / eager_bytes,
        conv_bytes=own, total_bytes_eager=eager_bytes + own, total_bytes_fused=fused_bytes + own,
        total_bytes_ratio=(fused_bytes + own) / (eager_bytes + own),
        model_touches_eager=units["eager_touches"], model_touches_fused=units["fused_touches"],
        **extra)]


def _default_backends(ctx):
    # On the CPU, auto runs the reference; the Triton interpreter is a test vehicle, far too
    # slow to time by default (ask for it with --backend triton).
    return DEFAULT_BACKENDS if ctx.device == "cuda" else ["auto"]


register(Suite(name=SUITE, cases=_cases, run_case=_run, describe=_describe, order=40))
