"""dense suite: DenseNet training with fastconv's dense blocks (fastconv.models.densenet*)
against torchvision's naive blocks (``memory_efficient=False``, a torch.cat per layer) and its
checkpointed ones (``memory_efficient=True``), in one run: step time and peak memory.

Two modes:

* ``train``: one training step (forward under fp16 autocast, cross-entropy, backward) of
  DenseNet121, channels_last, 224x224, batch 64 and 256 (--quick: 64). Peak memory is
  torch.cuda.max_memory_allocated over the step, less what was allocated before it (the
  weights): the activations, the gradients and the workspaces. ``max_batch_estimate`` is how
  many images that peak allows in the GPU's memory, if it grows linearly with the batch.
* ``depth``: activation memory against depth, DenseNet-BC 121/169/201/264. Everywhere, the
  bytes autograd keeps for backward after one forward (saved tensors, each storage once), at
  batch 1, fp32, 224x224, which the CPU can count (``python -m benchmarks.run dense`` on a
  CPU, without --quick); on a GPU also the measured peak of a training step
  at batch 32. torchvision's checkpointed blocks keep their inputs outside saved-tensor hooks,
  so their count is left blank; the GPU's peak measures them.

fastconv runs on the cuda backend on a GPU (its kernels are built ahead; a DenseNet's 58 layer
shapes would each cost Triton compiles and autotuning under `auto`), on `auto` on the CPU;
--backend chooses others. No torch.compile baseline: compiling a DenseNet training step takes minutes, more than a GPU
check's budget. On the CPU only the harness runs: a two-block DenseNet at 32x32, fp32.
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastconv.bench import randomise_batch_norms

from ..common import backends_to_run, short_error, time_call
from . import Suite, register

SUITE = "dense"
NAIVE = "torchvision naive"
CHECKPOINTED = "torchvision memory_efficient"
DEPTHS = {"densenet121": (6, 12, 24, 16), "densenet169": (6, 12, 32, 32), "densenet201": (6, 12, 48, 32),
          "densenet264": (6, 12, 64, 48)}  # fmt: skip
CPU_BLOCKS = (2, 2)  # the CPU's harness check: growth 8, 16 initial features


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    mode: str  # "train" or "depth"
    dtype: str = "fp16"
    size: int = 224


def _cases(ctx):
    if ctx.device == "cpu":
        # The harness check; without --quick also the real depths' counted bytes (224x224,
        # batch 1: seconds each), the figure the CPU can give.
        depths = [Case("densenet-tiny", 1, "depth", "fp32", 32)] if ctx.quick else [
            Case(m, 1, "depth", "fp32") for m in DEPTHS]  # fmt: skip
        return [Case("densenet-tiny", 2, "train", "fp32", 32)] + depths
    batches = (64,) if ctx.quick else (64, 256)
    depths = ("densenet121", "densenet264") if ctx.quick else tuple(DEPTHS)
    return [Case("densenet121", b, "train") for b in batches] + [Case(m, 32, "depth") for m in depths]


def _describe(case):
    return f"{case.model} {case.mode} batch {case.batch}"


def _models(case: Case, device):
    """(fastconv model, torchvision naive, torchvision checkpointed), the same random weights
    and random BatchNorm statistics."""
    import torchvision

    import fastconv

    torch.manual_seed(0)
    if case.model == "densenet-tiny":
        config = dict(growth_rate=8, block_config=CPU_BLOCKS, num_init_features=16, num_classes=10)
    else:
        config = dict(growth_rate=32, block_config=DEPTHS[case.model], num_init_features=64, num_classes=1000)
    naive = randomise_batch_norms(torchvision.models.DenseNet(**config))
    checkpointed = torchvision.models.DenseNet(**config, memory_efficient=True)
    checkpointed.load_state_dict(naive.state_dict())
    ours = fastconv.models.DenseNet(config["growth_rate"], config["block_config"], config["num_init_features"], 4,
                                    0.0, config["num_classes"])  # fmt: skip
    ours.load_state_dict(naive.state_dict(), strict=True)
    return [m.to(device=device, memory_format=torch.channels_last).train() for m in (ours, naive, checkpointed)]


def _step_of(model, x, target, device, dtype):
    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def _peak_bytes(step, device):
    """Peak allocation during one step above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _saved_bytes(model, x):
    """Bytes autograd keeps for backward after one forward: each saved storage once, weights
    excluded (the count tests/test_dense_block_module.py holds to linear in depth)."""
    storages, weights = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def _capacity(device):
    return torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None


def _record(ctx, case, backend, baseline, ms, baseline_ms, peak, baseline_peak, **extra):
    from ..records import make_record

    ratio = peak / baseline_peak if peak and baseline_peak else None
    return make_record(
        ctx.env, suite=SUITE, case=f"{case.model} b{case.batch} {case.size}px", dtype=case.dtype,
        layout="channels_last", mode=case.mode, backend=backend, ms=ms, baseline=baseline, baseline_ms=baseline_ms,
        activation="relu", peak_mb=peak / 2**20 if peak else None,
        baseline_peak_mb=baseline_peak / 2**20 if baseline_peak else None, memory_ratio=ratio, batch=case.batch,
        **extra,
    )  # fmt: skip


def _backend(ctx):
    import fastconv

    backends = backends_to_run(ctx, SUITE, ["cuda"] if ctx.device == "cuda" else ["auto"])
    return backends[0] if backends else "auto", fastconv.use_backend


def _run_train(case, ctx, models, dtype):
    device = ctx.device
    backend, use_backend = _backend(ctx)
    x = torch.randn(case.batch, 3, case.size, case.size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, models[1].classifier.out_features, (case.batch,), device=device)
    ours, naive, checkpointed = models
    # The check: fastconv's eval output against torchvision's fp32 one, within 2x of
    # torchvision's own error in the step's dtype (plus a few ulps).
    with torch.no_grad():
        probe = x[:2]
        ref32 = naive.eval()(probe).float()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32), use_backend(backend):
            eager_err = (naive(probe).float() - ref32).abs().max().item()
            err = (ours.eval()(probe).float() - ref32).abs().max().item()
        naive.train(), ours.train()
    tol = 2 * eager_err + 8 * torch.finfo(dtype).eps * max(1.0, ref32.abs().max().item())
    timings, peaks = {}, {}
    for name, model in (("fastconv", ours), (NAIVE, naive), (CHECKPOINTED, checkpointed)):
        step = _step_of(model, x, target, device, dtype)
        if name == "fastconv":
            step = _on_backend(step, use_backend, backend)
        try:
            step()  # warm-up: autotuning, cuDNN's choices, the allocator's pools
            peaks[name] = _peak_bytes(step, device)
            timings[name] = time_call(step, ctx)
        except Exception as exc:  # recorded; the other numbers still count
            timings[name], peaks[name] = None, short_error(exc)
    if device == "cpu":  # the CPU's figure: bytes kept for backward
        peaks = {"fastconv": _saved_bytes(ours, x), NAIVE: _saved_bytes(naive, x), CHECKPOINTED: None}
    capacity, records = _capacity(device), []
    ours_peak = peaks["fastconv"] if isinstance(peaks["fastconv"], int) else None
    for baseline in (NAIVE, CHECKPOINTED):
        base_peak = peaks[baseline] if isinstance(peaks[baseline], int) else None
        extra = dict(max_abs_err=err, eager_max_abs_err=eager_err, check="ok" if err <= tol else "mismatch")
        for label, value in (("fastconv", peaks["fastconv"]), (baseline, peaks[baseline])):
            if isinstance(value, str):
                extra["error" if label == "fastconv" else "baseline_error"] = value
        if capacity and ours_peak:
            extra["max_batch_estimate"] = int(capacity * 0.97 / (ours_peak / case.batch))
        if capacity and base_peak:
            extra["baseline_max_batch_estimate"] = int(capacity * 0.97 / (base_peak / case.batch))
        t, bt = timings["fastconv"], timings[baseline]
        records.append(_record(ctx, case, backend, baseline, t.ms if t else None, bt.ms if bt else None,
                               ours_peak, base_peak, **extra))  # fmt: skip
    return records


def _on_backend(step, use_backend, backend):
    def on_backend():
        with use_backend(backend):
            step()
    return on_backend


def _run_depth(case, ctx, models, dtype):
    backend, use_backend = _backend(ctx)
    ours, naive, checkpointed = [copy.deepcopy(m).float().cpu() for m in models]
    x = torch.randn(1, 3, case.size, case.size)
    with use_backend("torch"):  # counted bytes are the same on every backend; the CPU's own is fastest
        saved = {"fastconv": _saved_bytes(ours, x), NAIVE: _saved_bytes(naive, x)}
    peaks = dict.fromkeys(("fastconv", NAIVE, CHECKPOINTED))
    if ctx.device == "cuda":
        xb = torch.randn(case.batch, 3, case.size, case.size, device="cuda").contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (case.batch,), device="cuda")
        for name, model in zip(peaks, models):
            step = _step_of(model, xb, target, "cuda", dtype)
            if name == "fastconv":
                step = _on_backend(step, use_backend, backend)
            try:
                step()
                peaks[name] = _peak_bytes(step, "cuda")
            except Exception as exc:
                peaks[name] = short_error(exc)
    records = []
    for baseline in (NAIVE, CHECKPOINTED):
        extra = dict(saved_mb_batch1=saved["fastconv"] / 2**20,
                     baseline_saved_mb_batch1=saved[baseline] / 2**20 if saved.get(baseline) else None,
                     layers=sum(DEPTHS.get(case.model, CPU_BLOCKS)))  # fmt: skip
        ours_peak, base_peak = (p if isinstance(p, int) else None for p in (peaks["fastconv"], peaks[baseline]))
        for label, value in (("error", peaks["fastconv"]), ("baseline_error", peaks[baseline])):
            if isinstance(value, str):
                extra[label] = value
        records.append(_record(ctx, case, backend, baseline, None, None, ours_peak, base_peak, **extra))
    return records


def _run(case, ctx):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case.dtype]
    models = _models(case, ctx.device)
    return (_run_train if case.mode == "train" else _run_depth)(case, ctx, models, dtype)


register(Suite(name=SUITE, cases=_cases, run_case=_run, describe=_describe, order=60))
