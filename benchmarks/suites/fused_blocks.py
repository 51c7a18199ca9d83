"""fused_blocks suite: the MobileNetV2 inverted residual as one kernel (fastconv.nn.InvertedResidual
in eval), against torchvision's block on cuDNN (eager) and torch.compile max-autotune of it;
and (mode "train") its training step against eager's, with the activation memory each keeps.

Memory-bound by design: the floor is the block's I/O, x read once and y written once (plus the
residual's read), at the copy bandwidth. The eager chain also writes and reads the expanded
(6x wide) tensor twice; the fused kernel never stores it, at the price of recomputing the
expansion once per depthwise tap (`fastconv.triton_kernels.inverted_residual.traffic`, whose
counts, which need no GPU, are recorded beside the timings: `kernel_flops` against
`block_flops`, `load_bytes` against `io_floor_bytes`).

Shapes: every distinct MobileNetV2 block at batch 128 (benchmarks/FLOORS.md's list), fp16,
channels_last, eval. On the CPU only the harness is checked: one tiny block, fp32.

Mode "train": one step, the forward under fp16 autocast (fp32 parameters, as AMP trains) and
the backward of a fixed random grad_y, for fastconv's fused training op
(fastconv::inverted_residual_train) and eager torchvision. Recorded beside the times:
``saved_mb``, the bytes autograd keeps for backward after the forward (each saved storage
once, weights excluded), against eager's (``memory_ratio``; the target is <= 0.35); on a GPU
also the step's peak. The saved bytes need no GPU: on the CPU, without --quick, every block's
are counted at batch 4 in fp32 (they scale with the batch), untimed.
"""
import copy
from dataclasses import dataclass, replace

import torch

from fastconv.bench import randomise_batch_norms
from fastconv.ops.inverted_residual import forced_kernel, last_kernel

from ..common import DTYPES, backends_to_run, baseline_records, short_error, time_call, tolerance
from ..timing import Rotation, rotation_count, synchronize
from . import Suite, register

SUITE = "fused_blocks"
DEFAULT_BACKENDS = ["triton", "auto"]
EAGER = "eager torchvision InvertedResidual"
COMPILED = "torch.compile max-autotune"


@dataclass(frozen=True)
class Block:
    """One InvertedResidual: (C_in, H=W of its input, C_out, stride, expansion ratio)."""
    c_in: int
    h: int
    c_out: int
    stride: int
    ratio: int
    n: int = 128

    @property
    def name(self):
        return f"{self.n}x{self.c_in}x{self.h}x{self.h}->t{self.ratio}->{self.c_out} s{self.stride}"

    @property
    def residual(self):
        return self.stride == 1 and self.c_in == self.c_out


# torchvision mobilenet_v2's distinct blocks at 224x224: (C_in, H, C_out, stride, t).
MOBILENET_V2 = [Block(*b) for b in [
    (32, 112, 16, 1, 1), (16, 112, 24, 2, 6), (24, 56, 24, 1, 6), (24, 56, 32, 2, 6), (32, 28, 32, 1, 6),
    (32, 28, 64, 2, 6), (64, 14, 64, 1, 6), (64, 14, 96, 1, 6), (96, 14, 96, 1, 6), (96, 14, 160, 2, 6),
    (160, 7, 160, 1, 6), (160, 7, 320, 1, 6),
]]
GPU_QUICK = [MOBILENET_V2[i] for i in (1, 2, 6, 10)]
CPU_BLOCKS = [Block(16, 7, 16, 1, 2, n=1), Block(8, 9, 12, 2, 1, n=1)]


@dataclass(frozen=True)
class Case:
    block: Block
    dtype: str
    layout: str = "channels_last"
    mode: str = "fwd"  # or "train"
    timed: bool = True  # False: the CPU's counted saved bytes only


def _cases(ctx):
    blocks = CPU_BLOCKS if ctx.device == "cpu" else (GPU_QUICK if ctx.quick else MOBILENET_V2)
    dtypes = ctx.dtypes or (["fp32"] if ctx.device == "cpu" else ["fp16"])
    cases = [Case(b, d) for b in blocks for d in dtypes]
    cases += [Case(b, d, mode="train") for b in blocks for d in dtypes]
    if ctx.device == "cpu" and not ctx.quick:
        cases += [Case(replace(b, n=4), "fp32", mode="train", timed=False) for b in MOBILENET_V2]
    return cases


def _describe(case):
    return f"{case.block.name} {case.dtype}{'' if case.mode == 'fwd' else ' ' + case.mode}"


def _torchvision_block(block: Block, device, dtype):
    """torchvision's InvertedResidual with random BatchNorm statistics and affine parameters
    (the defaults, mean 0 and variance 1, would hide a wrong fold)."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    module = randomise_batch_norms(InvertedResidual(block.c_in, block.c_out, block.stride, block.ratio))
    return module.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()


def _traffic(block: Block, element_size: int):
    from fastconv.triton_kernels.inverted_residual import traffic

    hidden = block.c_in * block.ratio
    return traffic(block.n, block.c_in, block.h, block.h, hidden, block.c_out, stride=block.stride,
                   expand=block.ratio != 1, residual=block.residual, element_size=element_size)


def _run(case, ctx):
    if case.mode == "train":
        return _run_train(case, ctx)
    import fastconv

    block, dtype, device = case.block, DTYPES[case.dtype], ctx.device
    eager = _torchvision_block(block, device, dtype)
    fused = fastconv.nn.InvertedResidual.from_torchvision(copy.deepcopy(eager)).eval()
    x_bytes = block.n * block.c_in * block.h * block.h * dtype.itemsize
    sets = rotation_count(x_bytes, ctx.l2_bytes, device)
    rotation = Rotation(
        torch.randn(block.n, block.c_in, block.h, block.h, device=device, dtype=dtype)
        .contiguous(memory_format=torch.channels_last) for _ in range(sets)
    )
    first = rotation.sets[0]
    with torch.no_grad():
        ref32 = _torchvision_block(block, device, torch.float32)(first.float())
        eager_err = (eager(first).float() - ref32).abs().max().item()

    def step_of(module):
        def step():
            with torch.no_grad():
                return module(rotation.next())
        return step

    baselines = {EAGER: (time_call(step_of(eager), ctx), None)}
    if ctx.compile:
        try:
            torch._dynamo.reset()
            compiled = torch.compile(eager, mode="max-autotune", dynamic=False)
            step_of(compiled)()  # compile and autotune outside the timing
            synchronize(device)
            baselines[COMPILED] = (time_call(step_of(compiled), ctx), None)
        except Exception as exc:  # recorded; the other numbers still count
            baselines[COMPILED] = (None, short_error(exc))

    counted = _traffic(block, dtype.itemsize)
    io_bytes = counted.io_floor_bytes
    common = dict(
        suite=SUITE, case=block.name, dtype=case.dtype, layout=case.layout, mode=case.mode, activation="relu6",
        bytes_moved=io_bytes, flops=counted.flops, floor_ms=ctx.floor_ms(io_bytes), input_sets=sets,
        eager_max_abs_err=eager_err, unfused_bytes=counted.unfused_bytes, load_bytes=counted.load_bytes, dram_bytes_estimate=counted.dram_bytes_estimate,
        kernel_flops=counted.kernel_flops, tiled_kernel_flops=counted.tiled_kernel_flops, C_in=block.c_in, C_out=block.c_out, H=block.h, stride=block.stride,
        expansion=block.ratio, N=block.n,
    )  # fmt: skip
    tol = tolerance(eager_err, dtype, ref32.abs().max().item())
    records = []
    backends = backends_to_run(ctx, SUITE, DEFAULT_BACKENDS)
    if "triton" in backends and block.ratio != 1:
        # Each of the triton backend's two fused kernels forced, beside the one its first-call
        # timing keeps: both times are the evidence for that choice (and for the tiled kernel).
        backends += ["triton:gather", "triton:tiled"]
    if "cuda" in backends and dtype != torch.float32:
        backends += ["cuda:cuda_cores", "cuda:tensor_cores"]  # likewise the cuda backend's two
    for backend in backends:
        extra = {}
        name, _, kernel = backend.partition(":")
        with fastconv.use_backend(name), forced_kernel(name, kernel):
            try:
                with torch.no_grad():
                    err = (fused(first).float() - ref32).abs().max().item()
                extra.update(max_abs_err=err, check="ok" if err <= tol else "mismatch")
                t = time_call(step_of(fused), ctx)
                # Which of its two kernels the first call's timing kept.
                if backend == "triton" and block.ratio != 1:
                    extra["triton_kernel"] = last_kernel("triton")
                if backend == "cuda":
                    extra["cuda_kernel"] = last_kernel("cuda")
            except Exception as exc:
                t, extra["error"] = None, short_error(exc)
        records += baseline_records(ctx, backend, t, baselines, common, extra)
    return records


def _saved_bytes(step) -> int:
    """Bytes autograd keeps for backward over one forward, `step()`: each saved storage once,
    parameters excluded (they are kept whatever the kernel)."""
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def _peak_bytes(step, device):
    if device != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated() - base


def _run_train(case, ctx):
    """One training step (see the module docstring), fastconv's fused training op against eager."""
    import fastconv

    block, device = case.block, ctx.device
    dtype = DTYPES[case.dtype]
    eager = _torchvision_block(block, device, torch.float32).train()
    fused = fastconv.nn.InvertedResidual.from_torchvision(copy.deepcopy(eager)).train()
    torch.manual_seed(1)
    x = torch.randn(block.n, block.c_in, block.h, block.h, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ho = (block.h - 1) // block.stride + 1
    grad_y = torch.randn(block.n, block.c_out, ho, ho, device=device).contiguous(memory_format=torch.channels_last)

    def forward(module):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            return module(x)

    def step_of(module):
        def step():
            forward(module).backward(grad_y.to(dtype))
            module.zero_grad(set_to_none=True)
            x.grad = None
        return step

    def grads(module):
        y = forward(module)
        grad_x, *_ = torch.autograd.grad(y, [x], grad_y.to(y.dtype))
        return y.float(), grad_x.float()

    common = dict(suite=SUITE, case=block.name, dtype=case.dtype, layout=case.layout, mode="train",
                  activation="relu6", C_in=block.c_in, C_out=block.c_out, H=block.h, stride=block.stride,
                  expansion=block.ratio, N=block.n)  # fmt: skip
    baseline_saved = _saved_bytes(lambda: forward(eager))
    records = []
    for backend in backends_to_run(ctx, SUITE, DEFAULT_BACKENDS):
        extra = dict(baseline_saved_mb=baseline_saved / 2**20)
        with fastconv.use_backend(backend):
            try:
                saved = _saved_bytes(lambda: forward(fused))
                extra.update(saved_mb=saved / 2**20, memory_ratio=saved / baseline_saved)
                t = bl = None
                if case.timed:
                    with torch.no_grad():
                        ref = copy.deepcopy(eager)
                    ref_y, ref_x = grads(ref)  # the same step in eager, in the step's dtype...
                    y, grad_x = grads(copy.deepcopy(fused))
                    ref32 = copy.deepcopy(eager).float()
                    with torch.autocast(device, enabled=False):
                        want_y = ref32(x)
                        want_x, *_ = torch.autograd.grad(want_y, [x], grad_y)  # ...and in fp32, the oracle
                    errs = [(y - want_y).abs().max().item(), (grad_x - want_x).abs().max().item()]
                    eager_errs = [(ref_y - want_y).abs().max().item(), (ref_x - want_x).abs().max().item()]
                    ok = all(e <= tolerance(ee, dtype, w.abs().max().item())
                             for e, ee, w in zip(errs, eager_errs, (want_y, want_x)))  # fmt: skip
                    extra.update(max_abs_err=max(errs), eager_max_abs_err=max(eager_errs), check="ok" if ok else "mismatch")
                    t = time_call(step_of(fused), ctx)
                    bl = time_call(step_of(eager), ctx)
                    extra.update(peak_mb=_mb(_peak_bytes(step_of(fused), device)),
                                 baseline_peak_mb=_mb(_peak_bytes(step_of(eager), device)))  # fmt: skip
            except Exception as exc:
                t, bl, extra["error"] = None, None, short_error(exc)
        records += baseline_records(ctx, backend, t, {EAGER: (bl, None)}, common, extra)
    return records


def _mb(n):
    return None if n is None else n / 2**20


register(Suite(name=SUITE, cases=_cases, run_case=_run, describe=_describe, order=50))
