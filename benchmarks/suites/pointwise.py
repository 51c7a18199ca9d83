"""pointwise suite: fastconv.pointwise_conv2d (a 1x1 conv as one GEMM, prologue and epilogue
fused) against cuDNN's eager sequences, cuBLAS and torch.compile.

Shapes (batch 128, fp16, channels_last): MobileNetV2's 19 pointwise layers
(benchmarks/FLOORS.md), the stride-1 1x1 convs of ResNet50, and DenseNet121's bottleneck 1x1
convs.

Cases (the issue's performance targets; record `kind`):
  epilogue  y = relu6(conv1x1(x) * scale + shift), a folded BatchNorm, forward:
            vs "eager conv+bn+relu6" (nn.Conv2d -> nn.BatchNorm2d in eval -> nn.ReLU6, the model
            in half and channels_last, cudnn.benchmark on; target >= 1.4x geomean),
            vs "cublas mm" (torch.mm on the same GEMM: the channels_last x viewed as an (M, K)
            matrix, M = N*H*W, K = C_in, times the (K, C_out) transposed weight view; no
            epilogue; target >= 0.9x),
            and vs "torch.compile" of the reference outside --quick.
            On the matrix-bound ResNet50 shapes (`bound` = "matmul") the target is >= 60% of the
            measured matmul ceiling (`pct_of_matmul_ceiling`; `tflops`).
  prologue  DenseNet121: x is a prefix channel slice of a channels_last concatenation buffer,
            y = conv1x1(relu(x * in_scale + in_shift)) -> 128 channels, the BN -> ReLU fused on
            load and the slice read in place: vs "eager cat+bn+relu+conv" (torch.cat of the
            feature list -> BatchNorm2d (eval) -> ReLU -> Conv2d, torchvision's bn_function;
            target >= 1.5x), and vs its torch.compile outside --quick.
  train     the epilogue case forward + backward (grad of x, weight, scale, shift) vs
            "eager conv+bn+relu6 autograd" (the same modules, BatchNorm in eval so that both
            compute the same function; target >= 1.2x).

Floor = max(bytes / copy bandwidth, flops / matmul rate):
  epilogue  bytes x + y + weight + scale/shift;  flops 2*M*K*C_out
  prologue  bytes x (the slice) + y + weight + in_scale/in_shift;  flops 2*M*K*C_out
  train     bytes 3*x + 2*y + 3*weight (fwd: x, y; bwd: grad_y, x, grad_x);  flops 3 GEMMs
"""
import math
from dataclasses import dataclass

import torch

from ..common import (DTYPES, as_model, auto_choices, backends_to_run, baseline_records,
                      check_fields, conv_bn_act, cudnn_benchmark, folded_batchnorm, max_errors,
                      newly_picked, pytorch_conv_backend, short_error, time_call)
from ..timing import Rotation, rotation_count, synchronize
from . import Suite, register

SUITE = "pointwise"
BATCH = 128
EPILOGUE_ACT = "relu6"
PROLOGUE_ACT = "relu"
GROWTH, BOTTLENECK = 32, 128  # DenseNet121: growth rate, bn_size * growth rate


@dataclass(frozen=True)
class Shape:
    model: str
    n: int
    c_in: int
    h: int       # H = W
    c_out: int
    c_total: int = 0  # DenseNet: x is channels [0, c_in) of a c_total-channel buffer
    c0: int = 0       # DenseNet: the block's input channels (the first feature's width)
    growth: int = GROWTH

    @property
    def m(self):
        return self.n * self.h * self.h

    @property
    def name(self):
        c_in = f"{self.c_in}/{self.c_total}" if self.c_total else str(self.c_in)
        return f"{self.n}x{c_in}x{self.h}x{self.h}->{self.c_out}"


# (C_in, H, C_out) at 224x224.
MOBILENETV2 = [(32, 112, 16), (16, 112, 96), (96, 56, 24), (24, 56, 144), (144, 56, 24),
               (144, 28, 32), (32, 28, 192), (192, 28, 32), (192, 14, 64), (64, 14, 384),
               (384, 14, 64), (384, 14, 96), (96, 14, 576), (576, 14, 96), (576, 7, 160),
               (160, 7, 960), (960, 7, 160), (960, 7, 320), (320, 7, 1280)]
# torchvision's ResNet50 (v1.5: the stride is in the 3x3), every distinct stride-1 1x1 conv.
RESNET50 = [(64, 56, 64), (64, 56, 256), (256, 56, 64), (256, 56, 128), (128, 28, 512),
            (512, 28, 128), (512, 28, 256), (256, 14, 1024), (1024, 14, 256), (1024, 14, 512),
            (512, 7, 2048), (2048, 7, 512)]
# DenseNet121's blocks: (C0, H, layers); layer j reads C0 + 32*j channels of the block's
# C0 + 32*layers-channel buffer. Each block at its first, a middle and its last layer.
DENSENET121_BLOCKS = [(64, 56, 6), (128, 28, 12), (256, 14, 24), (512, 7, 16)]
DENSENET121_LAYERS = [(0, 3, 5), (0, 6, 11), (0, 12, 23), (0, 15)]
# Forward + backward: a handful of MobileNetV2 layers, expansions and projections.
TRAIN = [(16, 112, 96), (96, 56, 24), (24, 56, 144), (192, 28, 32), (64, 14, 384), (960, 7, 320)]


def _plain(model, specs, n=BATCH):
    return [Shape(model, n, *s) for s in specs]


def _dense(c0, h, j, layers, n=BATCH, growth=GROWTH, c_out=BOTTLENECK):
    return Shape("densenet121", n, c0 + growth * j, h, c_out, c_total=c0 + growth * layers, c0=c0,
                 growth=growth)


GPU_EPILOGUE = _plain("mobilenetv2", MOBILENETV2) + _plain("resnet50", RESNET50)
GPU_PROLOGUE = [_dense(c0, h, j, layers) for (c0, h, layers), js
                in zip(DENSENET121_BLOCKS, DENSENET121_LAYERS) for j in js]
GPU_TRAIN = _plain("mobilenetv2", TRAIN)
# --quick: MobileNetV2's largest layer, a 56 projection, a 14 expansion and its widest 7x7;
# ResNet50's memory-bound 64->256@56 and matrix-bound 2048->512@7; DenseNet block 1, layer 3;
# a 56 expansion and a 14 projection in training.
GPU_QUICK_EPILOGUE = (_plain("mobilenetv2", [MOBILENETV2[i] for i in (1, 4, 9, 18)])
                      + _plain("resnet50", [RESNET50[i] for i in (1, 11)]))
GPU_QUICK_PROLOGUE = [_dense(64, 56, 3, 6)]
GPU_QUICK_TRAIN = _plain("mobilenetv2", [(24, 56, 144), (384, 14, 64)])
# On the CPU the run only checks the harness: tiny shapes, seconds in all.
CPU_EPILOGUE = [Shape("tiny", 2, 16, 8, 24), Shape("tiny", 2, 24, 4, 40)]
CPU_PROLOGUE = [_dense(8, 8, 2, 4, n=2, growth=4, c_out=16)]
CPU_TRAIN = [Shape("tiny", 2, 16, 8, 24)]

DEFAULT_BACKENDS = ["cuda", "triton", "auto"]
KINDS = ("epilogue", "prologue", "train")


@dataclass(frozen=True)
class Case:
    shape: Shape
    dtype: str
    kind: str  # "epilogue", "prologue" (DenseNet) or "train"
    layout: str = "channels_last"

    @property
    def mode(self):
        return "train" if self.kind == "train" else "fwd"

    @property
    def activation(self):
        return f"in_{PROLOGUE_ACT}" if self.kind == "prologue" else EPILOGUE_ACT

    def tensor_bytes(self):
        s, item = self.shape, DTYPES[self.dtype].itemsize
        return s.m * s.c_in * item, s.m * s.c_out * item, s.c_in * s.c_out * item

    def bytes_moved(self):
        x, y, w = self.tensor_bytes()
        if self.kind == "epilogue":
            return x + y + w + 8 * self.shape.c_out  # scale, shift in float32
        if self.kind == "prologue":
            return x + y + w + 8 * self.shape.c_in   # in_scale, in_shift in float32
        return 3 * x + 2 * y + 3 * w  # fwd: x, y, w; bwd: grad_y, x, grad_x, w, grad_w

    def gemm_flops(self):
        s = self.shape
        return 2 * s.m * s.c_in * s.c_out

    def flops(self):
        return self.gemm_flops() * (3 if self.kind == "train" else 1)  # y; grad_x and grad_w


def _cases(ctx):
    if ctx.device == "cuda":
        pick = ((GPU_QUICK_EPILOGUE, GPU_QUICK_PROLOGUE, GPU_QUICK_TRAIN) if ctx.quick
                else (GPU_EPILOGUE, GPU_PROLOGUE, GPU_TRAIN))
        dtypes = ctx.dtypes or ["fp16"]
    else:
        pick = ((CPU_EPILOGUE[:1], CPU_PROLOGUE, CPU_TRAIN) if ctx.quick
                else (CPU_EPILOGUE, CPU_PROLOGUE, CPU_TRAIN))
        dtypes = ctx.dtypes or ["fp32"]  # CPU: the harness check, in the dtype the CPU runs well
    return [Case(s, d, kind) for kind, shapes in zip(KINDS, pick) for d in dtypes for s in shapes]


def _describe(case):
    return f"{case.shape.model} {case.shape.name} {case.dtype} {case.kind}"


# Inputs -------------------------------------------------------------------------------------

@dataclass
class InputSet:
    x: torch.Tensor                 # (N, C_in, H, W) channels_last; DenseNet: buffer[:, :C_in]
    w: torch.Tensor                 # (C_out, C_in, 1, 1)
    scale: torch.Tensor | None      # epilogue, float32 (a folded BatchNorm's)
    shift: torch.Tensor | None
    in_scale: torch.Tensor | None   # prologue, float32
    in_shift: torch.Tensor | None
    g: torch.Tensor | None          # grad_y (train)
    features: list | None           # DenseNet: the eager side's feature list; x is their concat
    a2d: torch.Tensor | None        # cuBLAS: x viewed as (M, C_in)
    w2d: torch.Tensor | None        # cuBLAS: the weight viewed as (C_in, C_out)


def _make_set(case, device):
    s, dtype = case.shape, DTYPES[case.dtype]
    cl = torch.channels_last

    def act(c):  # (N, c, H, W) channels_last
        return torch.randn(s.n, c, s.h, s.h, device=device, dtype=dtype).contiguous(memory_format=cl)

    # Weights of about 1/sqrt(C_in) keep the conv's output near unit size.
    w = (torch.randn(s.c_out, s.c_in, 1, 1, device=device) / math.sqrt(s.c_in)).to(dtype)
    scale = shift = in_scale = in_shift = g = features = a2d = w2d = None
    if case.kind == "prologue":
        # The block's input, then one growth-wide feature per earlier layer, as torchvision
        # keeps them; the buffer holds their concatenation in its first c_in channels.
        features = [act(s.c0)] + [act(s.growth) for _ in range((s.c_in - s.c0) // s.growth)]
        buffer = act(s.c_total)
        x = buffer[:, :s.c_in]
        x.copy_(torch.cat(features, 1))
        in_scale = 1 + 0.2 * torch.randn(s.c_in, device=device)
        in_shift = 0.2 * torch.randn(s.c_in, device=device)
    else:
        x = act(s.c_in)
        # y * scale + shift spreads over about -3..5, so relu6 clips on both sides.
        scale = 2 + 0.5 * torch.randn(s.c_out, device=device)
        shift = 1 + 0.5 * torch.randn(s.c_out, device=device)
    if case.kind == "epilogue":
        a2d = x.permute(0, 2, 3, 1).reshape(s.m, s.c_in)
        assert a2d.data_ptr() == x.data_ptr(), "the (M, K) matrix must be a view of x"
        w2d = w.view(s.c_out, s.c_in).t()
    if case.kind == "train":
        g = act(s.c_out)
        for t in (x, w, scale, shift):
            t.requires_grad_(True)
    return InputSet(x, w, scale, shift, in_scale, in_shift, g, features, a2d, w2d)


def _bytes_per_set(case):
    x, y, w = case.tensor_bytes()
    return x + w + (y if case.kind == "train" else 0)  # train also reads grad_y


# The functions compared ---------------------------------------------------------------------

def _fastconv(case):
    import fastconv
    if case.kind == "prologue":
        return lambda i: fastconv.pointwise_conv2d(i.x, i.w, in_scale=i.in_scale, in_shift=i.in_shift,
                                                   in_activation=PROLOGUE_ACT)
    return lambda i: fastconv.pointwise_conv2d(i.x, i.w, scale=i.scale, shift=i.shift,
                                               activation=EPILOGUE_ACT)


def _reference_tensors(case):
    """fastconv.reference.pointwise_conv2d for this case, as
    f(x, w, scale, shift, in_scale, in_shift)."""
    from fastconv import reference
    act = None if case.kind == "prologue" else EPILOGUE_ACT
    in_act = PROLOGUE_ACT if case.kind == "prologue" else None

    def ref(x, w, scale, shift, in_scale, in_shift):
        return reference.pointwise_conv2d(x, w, None, scale, shift, act, None, False,
                                          in_scale, in_shift, in_act)
    return ref


def _on_set(f):
    return lambda i: f(i.x, i.w, i.scale, i.shift, i.in_scale, i.in_shift)


def _wrt(i):
    """The leaves a train step differentiates: x, weight, scale, shift."""
    return i.x, i.w, i.scale, i.shift


def _eager_epilogue(case, first, device):
    """nn.Conv2d (1x1) -> nn.BatchNorm2d (eval) -> nn.ReLU6 in the case's dtype, channels_last,
    computing the fused op's function (common.folded_batchnorm)."""
    s = case.shape
    conv = torch.nn.Conv2d(s.c_in, s.c_out, 1, bias=False)
    return conv_bn_act(conv, first.w, first.scale, first.shift, EPILOGUE_ACT, device,
                       DTYPES[case.dtype], True)


def _eager_prologue(case, first, device):
    """torchvision's dense-layer bottleneck: BatchNorm2d (eval) -> ReLU(inplace) -> Conv2d 1x1,
    applied to torch.cat of the feature list (the caller does the cat)."""
    s = case.shape
    conv = torch.nn.Conv2d(s.c_in, s.c_out, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(first.w.detach().float())
    seq = torch.nn.Sequential(folded_batchnorm(first.in_scale, first.in_shift),
                              torch.nn.ReLU(inplace=True), conv)
    return as_model(seq, device, DTYPES[case.dtype], True)


# Timing -------------------------------------------------------------------------------------

def _time_fwd(f, rotation, ctx):
    with torch.no_grad():
        return time_call(lambda: f(rotation.next()), ctx)


def _time_train(f, wrt, rotation, ctx):
    """Forward and backward: y = f(set); autograd.grad(y, wrt(set), grad_y) (nothing accumulates
    into .grad between calls)."""
    def step():
        i = rotation.next()
        return torch.autograd.grad(f(i), wrt(i), i.g)
    return time_call(step, ctx)


# Checks -------------------------------------------------------------------------------------

OUTPUT_NAMES = {"fwd": ("y",), "train": ("y", "grad_x", "grad_weight", "grad_scale", "grad_shift")}


def _outputs(f, i, mode, wrt=_wrt):
    """What the check compares: y (fwd), or y and the gradients (train)."""
    if mode == "fwd":
        with torch.no_grad():
            return (f(i),)
    y = f(i)
    return (y.detach(),) + tuple(torch.autograd.grad(y, wrt(i), i.g))


def _oracle(case, i, ref):
    """The reference in float64 on the first set."""
    train = case.mode == "train"
    d = lambda t: None if t is None else t.detach().double().requires_grad_(train)
    i64 = InputSet(d(i.x), d(i.w), d(i.scale), d(i.shift), d(i.in_scale), d(i.in_shift),
                   None if i.g is None else i.g.double(), None, None, None)
    return _outputs(_on_set(ref), i64, case.mode)


def _auto_choices():
    """What auto has picked so far for the ops a pointwise call runs (its backward uses bn_act's)."""
    out = {}
    for mod, attrs in (("pointwise", ("FORWARD", "WEIGHT_GRAD")), ("bn_act", ("FORWARD", "BACKWARD"))):
        out.update({(f"{mod}_{a}", k): v
                    for (a, k), v in auto_choices(f"fastconv.ops.{mod}", attrs).items()})
    return out


# One case -----------------------------------------------------------------------------------

def _run(case, ctx):
    with cudnn_benchmark():
        return _run_case(case, ctx)


def _baselines(case, ctx, rotation, first, oracle, ref):
    """{name: (Timing or None, error or None)} and fields for every record."""
    baselines, extra = {}, {}
    if case.kind == "train":
        seq = _eager_epilogue(case, first, ctx.device)
        params = (seq[0].weight, seq[1].weight, seq[1].bias)
        eager_wrt = lambda i: (i.x,) + params
        eager = lambda i: seq(i.x)
        errs = max_errors(_outputs(eager, first, "train", eager_wrt), oracle)
        extra.update({f"sequence_max_abs_err_{n}": e for n, e in zip(OUTPUT_NAMES["train"], errs)})
        baselines["eager conv+bn+relu6 autograd"] = (_time_train(eager, eager_wrt, rotation, ctx), None)
        return baselines, extra
    if case.kind == "epilogue":
        seq = _eager_epilogue(case, first, ctx.device)
        eager = lambda i: seq(i.x)
        name = "eager conv+bn+relu6"
    else:
        seq = _eager_prologue(case, first, ctx.device)
        eager = lambda i: seq(torch.cat(i.features, 1))
        name = "eager cat+bn+relu+conv"
    extra["sequence_max_abs_err"] = max_errors(_outputs(eager, first, "fwd"), oracle)[0]
    conv_input = first.x.contiguous(memory_format=torch.channels_last)  # what the eager conv gets
    extra["pytorch_conv_backend"] = pytorch_conv_backend(conv_input, first.w, 1, 0, 1)
    baselines[name] = (_time_fwd(eager, rotation, ctx), None)
    if case.kind == "epilogue":
        baselines["cublas mm"] = (_time_fwd(lambda i: torch.mm(i.a2d, i.w2d), rotation, ctx), None)
    if ctx.compile and not ctx.quick:
        label = "torch.compile" if case.kind == "epilogue" else "torch.compile cat+bn+relu+conv"
        try:
            torch._dynamo.reset()  # a fresh, static-shape compile per case, as a user would get
            if case.kind == "epilogue":
                compiled = torch.compile(ref, dynamic=False)
                f = _on_set(compiled)
            else:  # what a user gets from compiling the eager DenseNet layer
                compiled = torch.compile(lambda feats: seq(torch.cat(feats, 1)), dynamic=False)
                f = lambda i: compiled(i.features)
            with torch.no_grad():
                f(first)  # compile outside the timing
            synchronize(ctx.device)
            baselines[label] = (_time_fwd(f, rotation, ctx), None)
        except Exception as exc:  # record the failure; the other numbers still count
            baselines[label] = (None, short_error(exc))
    return baselines, extra


def _run_case(case, ctx):
    import fastconv

    dtype = DTYPES[case.dtype]
    s = case.shape
    n_sets = rotation_count(_bytes_per_set(case), ctx.l2_bytes, ctx.device)
    rotation = Rotation(_make_set(case, ctx.device) for _ in range(n_sets))
    first = rotation.sets[0]
    ref = _reference_tensors(case)
    oracle = _oracle(case, first, ref)
    # The eager error in the same dtype sets the check's tolerance: the reference (the conv in
    # the dtype, prologue and epilogue in float32), forward or forward + backward.
    eager_errs = max_errors(_outputs(_on_set(ref), first, case.mode), oracle)
    baselines, extra_common = _baselines(case, ctx, rotation, first, oracle, ref)

    bytes_moved, flops = case.bytes_moved(), case.flops()
    floor = ctx.floor_ms(bytes_moved, flops)
    mem_floor, mm_floor = ctx.floor_ms(bytes_moved), ctx.floor_ms(0, flops)
    common = dict(suite=SUITE, case=s.name, dtype=case.dtype, layout=case.layout, mode=case.mode,
                  activation=case.activation, kind=case.kind, model=s.model, N=s.n, C_in=s.c_in,
                  C_out=s.c_out, H=s.h, gemm_m=s.m, gemm_k=s.c_in, gemm_n=s.c_out,
                  bytes_moved=bytes_moved, flops=flops, floor_ms=floor,
                  memory_floor_ms=mem_floor, matmul_floor_ms=mm_floor,
                  bound=None if mem_floor is None or mm_floor is None else
                  ("matmul" if mm_floor > mem_floor else "memory"),
                  input_sets=n_sets, cudnn_benchmark=True,
                  cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                  matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                  timing=("forward + autograd.grad of x, weight, scale, shift" if case.mode == "train"
                          else "forward under no_grad"),
                  **extra_common)
    if case.kind == "prologue":
        common.update(C_total=s.c_total, C0=s.c0, x_stride=list(first.x.stride()),
                      x_is_slice=not first.x.is_contiguous(memory_format=torch.channels_last))

    fn = _fastconv(case)
    records = []
    for name in backends_to_run(ctx, SUITE, _default_backends(ctx)):
        extra = {}
        with fastconv.use_backend(name):
            try:
                before = _auto_choices()
                outs = _outputs(fn, first, case.mode)
                picked = newly_picked(before, _auto_choices())
                if picked:
                    extra["auto_picked"] = picked
                extra.update(check_fields(outs, eager_errs, oracle, dtype, OUTPUT_NAMES[case.mode]))
                del outs
                t = (_time_train(fn, _wrt, rotation, ctx) if case.mode == "train"
                     else _time_fwd(fn, rotation, ctx))
            except Exception as exc:
                t, extra["error"] = None, short_error(exc)
        records += baseline_records(ctx, name, t, baselines, common, extra)
    for r in records:  # the share of the matmul ceiling: target 3 on the matrix-bound shapes
        r["pct_of_matmul_ceiling"] = 100 * mm_floor / r["ms"] if mm_floor and r["ms"] else None
        r["baseline_pct_of_matmul_ceiling"] = (100 * mm_floor / r["baseline_ms"]
                                               if mm_floor and r["baseline_ms"] else None)
    return records


def _default_backends(ctx):
    # On the CPU, auto runs the reference; the Triton interpreter is a test vehicle, far too
    # slow to time by default (ask for it with --backend triton).
    return DEFAULT_BACKENDS if ctx.device == "cuda" else ["auto"]


register(Suite(name=SUITE, cases=_cases, run_case=_run, describe=_describe, order=30))
