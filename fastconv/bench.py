"""`python -m fastconv bench`: a whole model, optimised by fastconv, against eager PyTorch
(cuDNN) and torch.compile, in one process.

    python -m fastconv bench --model mobilenet_v2 --batch 256 --dtype fp16 --mode inference \\
        --compare eager,compile,max-autotune --channels-last [--cuda-graphs]
    python -m fastconv bench --all            every model, inference and training
    python -m fastconv bench --traffic        bytes moved, counted (any machine, the CPU too)

For each model and mode it times fastconv.optimize(model) and each baseline (the same
torchvision model with the same random weights and BatchNorm statistics; for mobilenet_v1,
fastconv.models.mobilenet_v1 against the same network in plain layers), checks that
fastconv's output matches eager's, and prints a table: ms per step, images/s, peak memory,
fastconv's speedup over each, and % of the floor, max(FLOPs at 790 TFLOP/s, the optimised
model's counted bytes at 4.3 TB/s), the H200 figures of benchmarks/FLOORS.md. It writes
bench.json and bench.png under --out (default benchmarks/results/bench-<device>/; with
--traffic, traffic.json under benchmarks/results/traffic/).

A training step is the forward under autocast (fp16/bf16; none for fp32), cross-entropy and
the backward. Inference runs under torch.no_grad in eval mode. --cuda-graphs replays a
captured step on every side (inference; a training step is captured with
torch.cuda.make_graphed_callables). On a CPU everything runs, slowly, at the sizes given: use a
small --batch and --size there; only --traffic's counts mean anything on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# The H200 figures the floor is taken at (benchmarks/FLOORS.md: measured copy bandwidth, and the
# bf16 dense matmul rate).
COPY_BYTES_PER_S = 4.3e12
MATMUL_FLOPS_PER_S = 790e12

MODELS = ("mobilenet_v2", "mobilenet_v1", "resnet18", "resnet50", "densenet121", "densenet169", "densenet201", "vgg16_bn", "alexnet",
          "vgg16", "googlenet", "inception_v3")  # fmt: skip
# A model's own image side where it is not 224 (on a GPU or with --traffic), and its smallest
# where the CPU default of 64 is too small; --size overrides both.
MODEL_SIZE = {"inception_v3": 299}
CPU_SIZE = {"inception_v3": 75}
MODES = ("inference", "train")
COMPARISONS = ("eager", "compile", "max-autotune")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Result:
    model: str
    mode: str
    variant: str  # "fastconv" or a baseline
    batch: int
    dtype: str
    channels_last: bool
    cuda_graphs: bool
    device: str
    ms: Optional[float] = None
    images_per_s: Optional[float] = None
    peak_mb: Optional[float] = None
    speedup_of_fastconv: Optional[float] = None  # this variant's ms / fastconv's ms
    pct_of_floor: Optional[float] = None
    floor_ms: Optional[float] = None
    max_abs_err: Optional[float] = None
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def randomise_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Random running statistics and affine parameters for every BatchNorm2d of model (fresh
    ones are the identity, which would let a wrong fold or a missing BatchNorm go unseen), from
    torch's generator: the benchmarks' eager models and their fastconv twins see the same ones."""
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
    return model


def build(name: str, device, channels_last: bool) -> torch.nn.Module:
    """The eager model: torchvision's (fastconv's plain-layer MobileNetV1 for mobilenet_v1, which
    torchvision lacks), random weights and random BatchNorm statistics (no download)."""
    import torchvision

    import fastconv.models

    torch.manual_seed(0)
    if name == "mobilenet_v1":
        model = fastconv.models.mobilenet_v1_eager()
    else:
        # No auxiliary heads (a training step's loss is the logits'); init_weights: torchvision's own, without its warning.
        options = dict(aux_logits=False, init_weights=True) if name in ("googlenet", "inception_v3") else {}
        model = getattr(torchvision.models, name)(weights=None, **options)
    randomise_batch_norms(model)
    with torch.no_grad():
        if name == "inception_v3":
            # torchvision's init (truncated normal, std 0.1, for every conv) under running statistics
            # that do not normalise grows the activations to 1e14 at 299x299 (measured): inf in
            # fp16. He-scaled convs (std sqrt(2 / fan_in)) keep them near 1.
            for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
                conv.weight.mul_((2.0 / conv.weight[0].numel()) ** 0.5 / conv.weight.std())
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def optimised(name: str, eager: torch.nn.Module) -> torch.nn.Module:
    """fastconv's model for eager: fastconv.optimize(eager), or for mobilenet_v1 (not a torchvision
    model optimize knows) fastconv.models.mobilenet_v1 with eager's weights."""
    import fastconv

    if name != "mobilenet_v1":
        return fastconv.optimize(eager)
    weight = next(eager.parameters())
    model = fastconv.models.mobilenet_v1().to(weight.device)
    model.load_state_dict(eager.state_dict())
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        model = model.to(memory_format=torch.channels_last)
    return model


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _autocast(device_type: str, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()  # also on meta, which has no autocast
    return torch.autocast(device_type=device_type, dtype=dtype)


def _step(model, x, target, mode: str, dtype) -> Callable[[], None]:
    if mode == "inference":
        model.eval()

        def infer():
            with torch.no_grad(), _autocast(x.device.type, dtype):
                model(x)
        return infer
    model.train()

    def train():
        with _autocast(x.device.type, dtype):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        for p in model.parameters():
            p.grad = None
    return train


def _graphed(step: Callable[[], None], model, x, target, mode: str, dtype) -> Callable[[], None]:
    """The step replayed from a CUDA graph: inference captures it whole; training captures the
    model's forward and backward with make_graphed_callables (the loss stays eager)."""
    if mode == "inference":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step()  # warm-up on a side stream, as torch.cuda.graphs asks
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph.replay
    with _autocast("cuda", dtype):
        graphed = torch.cuda.make_graphed_callables(model, (x,))
    return _step(graphed, x, target, mode, dtype)


def _time(step: Callable[[], None], device: str, steps: int) -> tuple[float, Optional[float]]:
    """(median ms per step, peak MiB of one step above what was allocated before it)."""
    step()  # warm-up: autotuning, cuDNN's choices, compilation
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    samples = []
    for _ in range(steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), peak


def counted(model, batch: int, size: int, mode: str, dtype, channels_last: bool) -> tuple[int, int]:
    """(bytes the model's ops read and write, FLOPs) of one step, counted on meta tensors: no
    memory, no GPU, the model's full batch (benchmarks/traffic.py's ByteCounter, torch's
    FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastconv.benchmarks.traffic import count_bytes

    model = copy.deepcopy(model).to("meta")
    half = dtype if dtype != torch.float32 else None
    if half is not None:
        model = model.to(half)  # autocast does not run on meta: the step's convs in its dtype
    x = torch.empty(batch, 3, size, size, device="meta", dtype=half or torch.float32)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    target = torch.zeros(batch, dtype=torch.long, device="meta")
    step = _step(model, x, target, mode, torch.float32)
    step()  # what modules cache (folded BatchNorms) is not per-step traffic
    ops = count_bytes(step)
    # FLOPs of the forward; a training step's backward is taken as twice the forward's work
    # (FlopCounterMode's backward formulas count a depthwise conv's as a dense conv's: 7x
    # MobileNetV2's real backward).
    flops = FlopCounterMode(display=False)
    with flops:
        _step(model, x, target, "inference", torch.float32)()
    return sum(r + w for _, r, w in ops), flops.get_total_flops() * (3 if mode == "train" else 1)


def auto_picks() -> dict:
    """Every choice `auto` has cached so far, {(op name, call key): backend}, over fastconv's ops."""
    import importlib
    import pkgutil

    import fastconv.ops
    from fastconv.backends import OpImplementations

    picks = {}
    for info in pkgutil.iter_modules(fastconv.ops.__path__):
        module = importlib.import_module(f"fastconv.ops.{info.name}")
        for value in vars(module).values():
            if isinstance(value, OpImplementations):
                picks.update({(value.op_name, key): backend for key, backend in value.auto_choices().items()})
    return picks


def picked_per_layer(before: dict, after: dict) -> list[dict]:
    """The choices made between two auto_picks() snapshots, one row per op call shape: the op,
    its tensors' shapes (x, weight, ...) and dtype, and the backend auto took."""
    rows = []
    for (op, key), backend in after.items():
        if before.get((op, key)) == backend:
            continue
        # call_key's tensor parts are (shape, strides, dtype, device).
        tensors = [p for p in key if isinstance(p, tuple) and len(p) == 4 and isinstance(p[2], torch.dtype)]
        rows.append(dict(op=op, shapes=[list(t[0]) for t in tensors], dtype=str(tensors[0][2]) if tensors else None,
                         backend=backend))  # fmt: skip
    return rows


def _picked_summary(rows: list[dict]) -> str:
    counts: dict = {}
    for row in rows:
        counts.setdefault(row["op"], {}).setdefault(row["backend"], 0)
        counts[row["op"]][row["backend"]] += 1
    per_op = (f"{op}: " + ", ".join(f"{b} x{n}" for b, n in sorted(c.items())) for op, c in sorted(counts.items()))
    return "; ".join(per_op)


def _variants(name: str, args, device: str) -> dict:
    eager = build(name, device, args.channels_last)
    variants = {"fastconv": optimised(name, eager)}
    for comparison in args.compare:
        if comparison == "eager":
            variants["eager"] = eager
        elif comparison == "compile":
            variants["torch.compile"] = torch.compile(copy.deepcopy(eager))
        elif comparison == "max-autotune":
            variants["torch.compile max-autotune"] = torch.compile(copy.deepcopy(eager), mode="max-autotune")
    return variants


def run_case(name: str, mode: str, args, device: str, progress=None) -> list[Result]:
    dtype = DTYPES[args.dtype]
    variants = _variants(name, args, device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    common = dict(model=name, mode=mode, batch=args.batch, dtype=args.dtype, channels_last=args.channels_last,
                  cuda_graphs=args.cuda_graphs, device=device)  # fmt: skip
    floor_ms = None
    if device == "cuda":
        nbytes, flops = counted(variants["fastconv"], args.batch, args.size, mode, dtype, args.channels_last)
        floor_ms = max(nbytes / COPY_BYTES_PER_S, flops / MATMUL_FLOPS_PER_S) * 1e3
    # The check: fastconv's eval output against eager's on a slice of the batch.
    with torch.no_grad(), _autocast(device, dtype):
        probe = x[:2]
        eager = variants["eager"] if "eager" in variants else build(name, device, args.channels_last)
        want = eager.eval()(probe).float()
        err = (variants["fastconv"].eval()(probe).float() - want).abs().max().item()
    results = []
    for variant, model in variants.items():
        if progress:
            progress(f"{name} {mode} {variant}")
        result = Result(variant=variant, floor_ms=floor_ms, **common)
        before = auto_picks() if variant == "fastconv" else None
        try:
            step = _step(model, x, target, mode, dtype)
            if args.cuda_graphs and device == "cuda":
                step = _graphed(step, model, x, target, mode, dtype)
            result.ms, result.peak_mb = _time(step, device, args.steps)
            result.images_per_s = args.batch / result.ms * 1e3
            result.pct_of_floor = floor_ms / result.ms * 100 if floor_ms else None
        except Exception as exc:  # recorded: the other variants still count
            result.error = _short(exc)
        if variant == "fastconv":
            result.max_abs_err = err
            # What auto took for each layer's op (on a GPU; a CPU runs the torch reference only).
            # The check above ran the probe batch first, so these are the full batch's shapes.
            result.extra["auto_choices"] = picked_per_layer(before, auto_picks())
        results.append(result)
        if progress:
            progress(None)  # this variant is done
    ours = results[0].ms
    for result in results:
        if ours and result.ms:
            result.speedup_of_fastconv = result.ms / ours
    return results


def table(results: list[Result]) -> str:
    header = ["model", "mode", "variant", "ms/step", "images/s", "peak MiB", "fastconv speedup", "% floor", "note"]
    rows = [header]
    for r in results:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)
        note = r.error or (f"max |fastconv - eager| = {r.max_abs_err:.3g}" if r.max_abs_err is not None else "")
        if r.extra.get("auto_choices"):
            note += f"; auto took {_picked_summary(r.extra['auto_choices'])}"
        rows.append([r.model, r.mode, r.variant, fmt(r.ms, ".3f"), fmt(r.images_per_s, ".0f"), fmt(r.peak_mb, ".0f"),
                     fmt(r.speedup_of_fastconv, ".2f"), fmt(r.pct_of_floor, ".1f"), note])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def plot(results: list[Result], path: str) -> Optional[str]:
    """Bars of images/s per variant, one group per (model, mode). None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = list(dict.fromkeys((r.model, r.mode) for r in results))
    variants = list(dict.fromkeys(r.variant for r in results))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        values = {(r.model, r.mode): r.images_per_s or 0 for r in results if r.variant == variant}
        ax.bar([j + i * width for j in range(len(groups))], [values.get(g, 0) for g in groups], width, label=variant)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{m}\n{mode}" for m, mode in groups], fontsize=8)
    ax.set_ylabel("images/s (higher is better)")
    where = results[0].device if results else ""
    ax.set_title(f"fastconv bench, {results[0].dtype if results else ''}, {where}"
                 + (" (CPU RUN: not kernel speed)" if where == "cpu" else ""), fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=110, format="png")
    os.replace(path + ".tmp", path)
    plt.close(fig)
    return path


def traffic(name: str, mode: str, args) -> dict:
    """The bytes one step of the eager model's aten ops and of the optimised model's ops read
    and write (each op's inputs once, its outputs once), counted on meta tensors."""
    dtype = DTYPES[args.dtype]
    eager = build(name, "cpu", args.channels_last)
    fused = optimised(name, eager)
    eager_bytes, flops = counted(eager, args.batch, args.size, mode, dtype, args.channels_last)
    ours_bytes, _ = counted(fused, args.batch, args.size, mode, dtype, args.channels_last)
    return dict(model=name, mode=mode, batch=args.batch, size=args.size, dtype=args.dtype, eager_bytes=eager_bytes,
                fastconv_bytes=ours_bytes, ratio=eager_bytes / ours_bytes, flops=flops,
                byte_floor_ms=ours_bytes / COPY_BYTES_PER_S * 1e3)  # fmt: skip


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m fastconv bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="mobilenet_v2", choices=MODELS)
    p.add_argument("--batch", type=int, default=None, help="default 256 on a GPU or with --traffic, else 2")
    p.add_argument("--size", type=int, default=None,
                   help="image side; default 224 (inception_v3: 299) on a GPU or with --traffic, "
                        "else 64 (inception_v3: 75)")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default fp16 on a GPU, fp32 on a CPU")
    p.add_argument("--mode", default="inference", choices=MODES)
    p.add_argument("--compare", default="eager,compile", help=f"comma-separated: {', '.join(COMPARISONS)}")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--all", action="store_true", help="every model, inference and train")
    p.add_argument("--traffic", action="store_true", help="count the bytes moved instead of timing")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--backend", default=None, choices=("auto", "cuda", "triton", "torch"),
                   help="fastconv's backend (default: auto, or FASTCONV_BACKEND)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/bench-<device>/)")
    args = p.parse_args(argv)
    args.compare = [c for c in args.compare.split(",") if c]
    unknown = [c for c in args.compare if c not in COMPARISONS]
    if unknown:
        p.error(f"--compare takes {', '.join(COMPARISONS)}; got {', '.join(unknown)}")
    on_gpu = torch.cuda.is_available() or args.traffic  # counting runs on meta tensors: any size
    args.batch = (256 if on_gpu else 2) if args.batch is None else args.batch
    args.model_size = ((MODEL_SIZE if on_gpu else CPU_SIZE) if args.size is None else {})  # per model, see _for_model
    args.size = (224 if on_gpu else 64) if args.size is None else args.size
    args.dtype = args.dtype or ("fp16" if on_gpu else "fp32")  # CPU autocast's fp16 convs crawl
    if args.batch < 1 or args.size < 32 or args.steps < 1:
        p.error(f"--batch and --steps must be >= 1 and --size >= 32; got {args.batch}, {args.steps}, {args.size}")
    return args


def _device_slug() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(0).lower()).strip("-")


def _for_model(args, name: str):
    """args with the image side of model `name` (see MODEL_SIZE)."""
    return argparse.Namespace(**{**vars(args), "size": args.model_size.get(name, args.size)})


def main(argv=None) -> int:
    args = _parse(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [(m, mode) for m in MODELS for mode in MODES] if args.all else [(args.model, args.mode)]
    # Counts are the same on any machine; timings are the device's.
    out = args.out or os.path.join("benchmarks", "results", "traffic" if args.traffic else f"bench-{_device_slug()}")
    os.makedirs(out, exist_ok=True)
    if args.traffic:
        rows = []
        for name, mode in cases:
            row = traffic(name, mode, _for_model(args, name))
            rows.append(row)
            print(f"{name} {mode} batch {row['batch']} {row['size']}px {row['dtype']}: eager ops move "
                  f"{row['eager_bytes'] / 1e9:.3f} GB, fastconv's {row['fastconv_bytes'] / 1e9:.3f} GB "
                  f"({row['ratio']:.2f}x less); {row['flops'] / 1e9:.1f} GFLOP", flush=True)  # fmt: skip
        _write(os.path.join(out, "traffic.json"), _merged(os.path.join(out, "traffic.json"), rows))
        return 0
    if device == "cpu":
        print("*** CPU RUN: no CUDA device. The timings check that the command works, not kernel speed. ***")
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(cases) * (1 + len(args.compare)), unit="variant", dynamic_ncols=True)
        progress = lambda text: bar.set_description(text) if text else bar.update(1)  # noqa: E731
    except ImportError:
        bar, progress = None, lambda text: text and print(f"... {text}", flush=True)
    import fastconv

    results = []
    chosen = fastconv.use_backend(args.backend) if args.backend else contextlib.nullcontext()
    for name, mode in cases:
        with chosen:
            results += run_case(name, mode, _for_model(args, name), device, progress)
        _write(os.path.join(out, "bench.json"), [asdict(r) for r in results])  # kept as it goes
    if bar is not None:
        bar.close()
    print(table(results))
    png = plot(results, os.path.join(out, "bench.png"))
    print(f"wrote {out}/bench.json" + (f" and {png}" if png else ""))
    return 1 if any(r.error for r in results if r.variant == "fastconv") else 0


_ROW_KEY = ("model", "mode", "batch", "size", "dtype")


def _merged(path: str, rows: list[dict]) -> list[dict]:
    """rows in place of the same (model, mode, batch, size, dtype) rows of the file at path, the
    others kept: `--traffic --model X` refreshes X's rows without dropping the other models'."""
    try:
        with open(path) as f:
            kept = json.load(f)
    except (OSError, ValueError):
        kept = []
    fresh = {tuple(row[k] for k in _ROW_KEY): row for row in rows}
    merged = [fresh.pop(tuple(row.get(k) for k in _ROW_KEY), row) for row in kept if isinstance(row, dict)]
    return merged + list(fresh.values())


def _write(path: str, rows) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
