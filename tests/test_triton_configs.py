"""Every Triton kernel's default config, compiled offline for sm_90: registers and spills.

No GPU needed: a subprocess (this file run as a script, TRITON_INTERPRET=0) calls the real host
functions of fastconv.triton_kernels on CPU tensors with the autotuners' launches captured, so
each kernel gets exactly the arguments and flags the host code passes, then compiles each
captured launch for GPUTarget("cuda", 90, 32) with Triton's bundled ptxas and reads ptxas's
"Used N registers" and "spill stores/loads". A spill in a default config (the first of
interpreter_first's device list, what FASTCONV_TRITON_AUTOTUNE=0 runs and the GPU tests use)
fails the test. `-s` prints the table.

The suite runs under TRITON_INTERPRET=1 without a GPU, and @triton.jit reads it at decoration:
the kernels imported in the test process are interpreter-wrapped, hence the subprocess.

    .venv/bin/python -m pytest -s tests/test_triton_configs.py            # the defaults (~2 min)
    FASTCONV_SPILL_SWEEP=1 .venv/bin/python -m pytest -s -m slow tests/test_triton_configs.py  # every candidate
    .venv/bin/python tests/test_triton_configs.py --all                   # the worker, as JSON
    .venv/bin/python tests/test_triton_configs.py "conv taps fp32 cl" --config="64x64x64 w4 s4"

Under another Triton (3.6, the GPU machine's) in a second venv without fastconv installed:

    python3 -m venv /tmp/venv36 && /tmp/venv36/bin/pip install torch==2.11.0 triton==3.6.0 'numpy<2.4' pytest
    /tmp/venv36/bin/python -m pytest -p no:cacheprovider -s tests/test_triton_configs.py

(the repository root is on pytest's pythonpath; this file maps fastconv.triton_kernels onto
triton_kernels/ itself when fastconv is not installed, as setup.py's package_dir does).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def import_kernels():
    """fastconv.triton_kernels, from the installed package or from a plain source tree."""
    if importlib.util.find_spec("fastconv") is None:
        sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module("fastconv.triton_kernels")
    except ModuleNotFoundError as error:
        if error.name != "fastconv.triton_kernels":
            raise
        import fastconv

        # setup.py installs triton_kernels/ as fastconv.triton_kernels (package_dir).
        fastconv.__path__.append(str(REPO))
        return importlib.import_module("fastconv.triton_kernels")


# --------------------------------------------------------------------------------------------
# The cases: host calls on CPU tensors, each a real specialisation the ops launch. Shapes are
# ImageNet-like (their divisibility by 16 and unit strides shape the code); batch 2 keeps the
# (never touched) CPU allocations small. Each returns the overrides of the captured launches'
# constexprs (INDEX_64 where the real trigger would need a >2**31-element tensor).


def _t(shape, dtype, layout="channels_last"):
    import torch

    t = torch.empty(shape, dtype=getattr(torch, dtype))
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" and t.dim() == 4 else t


def _vec(c, dtype="float32"):
    return _t((c,), dtype)


def case_bn_act(dtype, layout, backward):
    from fastconv.triton_kernels.bn_act import bn_act_backward, bn_act_forward

    x = _t((2, 96, 56, 56), dtype, layout)
    if backward:
        bn_act_backward(_t((2, 96, 56, 56), dtype, layout), x, _vec(96), _vec(96), 3)
    else:
        bn_act_forward(x, _vec(96), _vec(96), 3)


def case_batch_norm(dtype, layout, accumulate=False):
    from fastconv.triton_kernels.batch_norm import batch_norm_act_backward, channel_stats

    c = _t((2, 96, 56, 56), dtype, layout)
    if accumulate:  # a dense block's prefix and its gradient buffer's slice
        buffer = _t((2, 128, 56, 56), dtype, layout)
        c, into = buffer[:, :96], _t((2, 128, 56, 56), dtype, layout)[:, :96]
        batch_norm_act_backward(_t((2, 96, 56, 56), dtype, layout), c, _vec(96), _vec(96), _vec(96), _vec(96), 1, into)
        return
    channel_stats(c)
    batch_norm_act_backward(_t((2, 96, 56, 56), dtype, layout), c, _vec(96), _vec(96), _vec(96), _vec(96), 3)


def case_depthwise(dtype, layout, kernel=3, stride=1, multiplier=1, stats=False, backward=False):
    from fastconv.triton_kernels import depthwise, depthwise_backward

    c = 96
    x = _t((2, c, 56, 56), dtype, layout)
    weight = _t((c * multiplier, 1, kernel, kernel), dtype, "nchw")
    pad = (kernel // 2,) * 4
    if backward:
        ho = (56 + 2 * (kernel // 2) - kernel) // stride + 1
        grad_c = _t((2, c * multiplier, ho, ho), dtype, layout)
        depthwise_backward.depthwise_backward_input(grad_c, x, weight, (stride, stride), pad, (1, 1))
        depthwise_backward.depthwise_backward_weight(grad_c, x, weight, (stride, stride), pad, (1, 1))
    elif stats:
        depthwise.depthwise_forward_with_stats(x, weight, None, (stride, stride), pad, (1, 1))
    else:
        cm = c * multiplier
        depthwise.depthwise_forward(x, weight, None, (stride, stride), pad, (1, 1), _vec(cm), _vec(cm), 3)


def case_pointwise(dtype, layout, tf32=False, stats=False, prologue=False, backward=False):
    from fastconv.triton_kernels import pointwise, pointwise_backward

    k, n = 128, 256
    x = _t((2, k, 28, 28), dtype, layout)
    weight = _t((n, k), dtype)
    out = _t((2, n, 28, 28), dtype, layout)
    if backward:
        # grad_x is the GEMM with the transposed weight; then the weight gradient.
        pointwise.pointwise_gemm(out, weight.t(), x, allow_tf32=tf32)
        pointwise_backward.pointwise_weight_grad(out, x, _vec(k), _vec(k), 2 if prologue else 0, allow_tf32=tf32)
    elif stats:
        pointwise.pointwise_gemm_with_stats(x, weight, out, allow_tf32=tf32)
    elif prologue:
        pointwise.pointwise_gemm(x, weight, out, scale=_vec(n), shift=_vec(n), activation=1,
                                 in_scale=_vec(k), in_shift=_vec(k), in_activation=1, allow_tf32=tf32)
    else:
        pointwise.pointwise_gemm(x, weight, out, scale=_vec(n), shift=_vec(n), activation=3,
                                 residual=_t((2, n, 28, 28), dtype, layout), allow_tf32=tf32)


def case_conv(dtype, layout, c_in=128, c_out=128, kernel=3, stride=1, size=28, tf32=False, stats=False, index_64=False,
              residual=False):  # fmt: skip
    from fastconv.triton_kernels.conv_bn_act import conv_bn_act_forward

    ho = (size + 2 * (kernel // 2) - kernel) // stride + 1
    x = _t((2, c_in, size, size), dtype, layout)
    # On a GPU the host repacks a weight whose input channels are not innermost to channels_last.
    weight = _t((c_out, c_in, kernel, kernel), dtype, "channels_last")
    out = _t((2, c_out, ho, ho), dtype, layout)
    conv_bn_act_forward(x, weight, out, stride=(stride, stride), padding=(kernel // 2,) * 4,
                        scale=_vec(c_out), shift=_vec(c_out), activation=3, compute_stats=stats, allow_tf32=tf32,
                        residual=_t(tuple(out.shape), dtype, layout) if residual else None,
                        activation_after_residual=residual)  # fmt: skip
    return {"INDEX_64": True} if index_64 else {}


def case_inverted_residual(dtype, expand, stride, residual):
    from fastconv.triton_kernels.inverted_residual import fused_block

    c_in, hidden, c_out, size = 24, 144 if expand else 24, 24 if residual else 32, 56
    ho = (size + 2 - 3) // stride + 1
    x = _t((2, c_in, size, size), dtype)
    out = _t((2, c_out, ho, ho), dtype)
    fused_block(x, _t((hidden, c_in), dtype) if expand else None, _vec(hidden) if expand else None,
                _t((hidden, 9), dtype), _vec(hidden), _t((c_out, hidden), dtype), _vec(c_out), out,
                (3, 3), stride, (1, 1), 1, 1 if expand else 0, 1, 0, _t((2, c_out, ho, ho), dtype) if residual else None)


def case_inverted_residual_tiled(dtype, stride, residual):
    """The tiled kernel (inverted_residual_tiled.py: the expansion once per window pixel)."""
    previous = os.environ.get("FASTCONV_FUSED_BLOCK_KERNEL")
    os.environ["FASTCONV_FUSED_BLOCK_KERNEL"] = "tiled"
    try:
        case_inverted_residual(dtype, True, stride, residual)
    finally:
        os.environ.pop("FASTCONV_FUSED_BLOCK_KERNEL")
        if previous is not None:
            os.environ["FASTCONV_FUSED_BLOCK_KERNEL"] = previous


def case_hidden_statistics_tiled(dtype, stride):
    """The tiled statistics pass (inverted_residual_tiled.hidden_stats_tiled)."""
    previous = os.environ.get("FASTCONV_FUSED_BLOCK_KERNEL")
    os.environ["FASTCONV_FUSED_BLOCK_KERNEL"] = "tiled"
    try:
        case_hidden_statistics(dtype, True, stride)
    finally:
        os.environ.pop("FASTCONV_FUSED_BLOCK_KERNEL")
        if previous is not None:
            os.environ["FASTCONV_FUSED_BLOCK_KERNEL"] = previous


def case_hidden_statistics(dtype, expand, stride):
    """The training forward's statistics pass over the depthwise output (no projection)."""
    from fastconv.triton_kernels.inverted_residual import hidden_statistics

    c_in, hidden, size = 24, 144 if expand else 24, 56
    ho = (size + 2 - 3) // stride + 1
    hidden_statistics(_t((2, c_in, size, size), dtype), _t((hidden, c_in), dtype) if expand else None,
                      _vec(hidden) if expand else None, _t((hidden, 9), dtype), (3, 3), stride, (1, 1), (ho, ho), 1,
                      2 if expand else 0)  # fmt: skip


def case_bn_act_pool(dtype, layout):
    from fastconv.triton_kernels.bn_act_pool import bn_act_avg_pool

    x = _t((4, 256, 56, 56), dtype, layout)
    bn_act_avg_pool(x, _vec(256), _vec(256), 1, _t((4, 256, 28, 28), dtype, layout))


CL, NCHW = "channels_last", "nchw"
CASES = {
    # bn_act: rows (channels innermost) and planes kernels, forward and backward.
    "bn_act fp16 cl": (case_bn_act, ("float16", CL, False)),
    "bn_act fp32 nchw": (case_bn_act, ("float32", NCHW, False)),
    "bn_act backward bf16 cl": (case_bn_act, ("bfloat16", CL, True)),
    "bn_act backward fp16 nchw": (case_bn_act, ("float16", NCHW, True)),
    # DenseNet's transition in eval: BatchNorm, ReLU and the 2x2 pool in one pass.
    "bn_act_pool fp16 cl": (case_bn_act_pool, ("float16", CL)),
    "bn_act_pool fp32 nchw": (case_bn_act_pool, ("float32", NCHW)),
    # Training BatchNorm: statistics and backward, rows and planes.
    "batch_norm fp16 cl": (case_batch_norm, ("float16", CL)),
    "batch_norm fp32 nchw": (case_batch_norm, ("float32", NCHW)),
    "batch_norm backward accumulate fp16 cl slice": (case_batch_norm, ("float16", CL, True)),
    # Depthwise forward (rows, planes; 3x3 s1, 5x5 s2, multiplier 2, statistics) and backward.
    "depthwise 3x3 fp16 cl": (case_depthwise, ("float16", CL)),
    "depthwise 5x5 s2 fp32 cl": (case_depthwise, ("float32", CL, 5, 2)),
    "depthwise 3x3 bf16 nchw": (case_depthwise, ("bfloat16", NCHW)),
    "depthwise 3x3 fp16 cl stats": (case_depthwise, ("float16", CL, 3, 1, 1, True)),
    "depthwise 3x3 fp16 nchw stats": (case_depthwise, ("float16", NCHW, 3, 1, 1, True)),
    "depthwise backward 3x3 fp16 cl": (case_depthwise, ("float16", CL, 3, 1, 1, False, True)),
    "depthwise backward 3x3 x2 fp32 cl": (case_depthwise, ("float32", CL, 3, 1, 2, False, True)),
    "depthwise backward 5x5 s2 fp16 nchw": (case_depthwise, ("float16", NCHW, 5, 2, 1, False, True)),
    # Pointwise GEMM: fp16, bf16, fp32 with and without TF32, epilogue with residual, prologue,
    # statistics; backward (the transposed GEMM and the weight gradient).
    "pointwise fp16 cl": (case_pointwise, ("float16", CL)),
    "pointwise bf16 nchw prologue": (case_pointwise, ("bfloat16", NCHW, False, False, True)),
    "pointwise fp32 cl": (case_pointwise, ("float32", CL)),
    "pointwise fp32 tf32 cl stats": (case_pointwise, ("float32", CL, True, True)),
    "pointwise backward fp16 cl": (case_pointwise, ("float16", CL, False, False, True, True)),
    # Implicit GEMM, taps path: issue 10's table (fp32 without TF32 channels_last; its INDEX_64
    # NCHW twin; fp16 NCHW), and the usual fp16/bf16/TF32 ones.
    "conv taps fp32 cl": (case_conv, ("float32", CL)),
    "conv taps fp32 nchw index64": (case_conv, ("float32", NCHW), {"index_64": True}),
    "conv taps fp16 nchw": (case_conv, ("float16", NCHW)),
    "conv taps fp16 cl": (case_conv, ("float16", CL)),
    "conv taps bf16 cl stats": (case_conv, ("bfloat16", CL), {"stats": True}),
    "conv taps fp32 tf32 cl": (case_conv, ("float32", CL), {"tf32": True}),
    # ResNet's BasicBlock ending: relu(bn(conv3x3) + identity) in the epilogue.
    "conv taps fp16 cl residual": (case_conv, ("float16", CL), {"c_in": 64, "c_out": 64, "size": 56, "residual": True}),
    "conv taps fp32 nchw residual": (case_conv, ("float32", NCHW), {"residual": True}),
    # Flattened-K path: the 7x7 s2 stem (3 -> 64 at 224x224, as ResNet's), and its statistics.
    "conv flat stem fp16 cl": (case_conv, ("float16", CL), dict(c_in=3, c_out=64, kernel=7, stride=2, size=224)),
    "conv flat stem fp16 cl stats": (case_conv, ("float16", CL),
                                     dict(c_in=3, c_out=64, kernel=7, stride=2, size=224, stats=True)),
    "conv flat stem fp32 nchw": (case_conv, ("float32", NCHW), dict(c_in=3, c_out=32, kernel=3, stride=2, size=224)),
    # The fused MobileNetV2 block (eval): expansion, 3x3 depthwise, projection, residual.
    "inverted_residual fp16 s1 residual": (case_inverted_residual, ("float16", True, 1, True)),
    "inverted_residual fp32 s2": (case_inverted_residual, ("float32", True, 2, False)),
    "inverted_residual bf16 no expand": (case_inverted_residual, ("bfloat16", False, 1, False)),
    "inverted_residual tiled fp16 s1 residual": (case_inverted_residual_tiled, ("float16", 1, True)),
    "inverted_residual tiled fp32 s2": (case_inverted_residual_tiled, ("float32", 2, False)),
    "inverted_residual tiled bf16 s2": (case_inverted_residual_tiled, ("bfloat16", 2, False)),
    # Its training forward's statistics pass (expansion and depthwise, reduced per channel).
    "inverted_residual stats fp16 s1": (case_hidden_statistics, ("float16", True, 1)),
    "inverted_residual stats fp32 s2": (case_hidden_statistics, ("float32", True, 2)),
    "inverted_residual stats bf16 no expand": (case_hidden_statistics, ("bfloat16", False, 1)),
    "inverted_residual stats tiled fp16 s1": (case_hidden_statistics_tiled, ("float16", 1)),
    "inverted_residual stats tiled fp32 s2": (case_hidden_statistics_tiled, ("float32", 2)),
}


# --------------------------------------------------------------------------------------------
# The worker (TRITON_INTERPRET=0, in its own process).

_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


def ptxas_usage(log: str) -> dict:
    """Registers, spill stores and loads (bytes) and stack frame from `ptxas -v`'s log."""
    match = _PTXAS.search(log)
    if match is None:
        raise ValueError(f"no resource usage in ptxas's log:\n{log}")
    stack, stores, loads, regs = map(int, match.groups())
    return {"regs": regs, "spill_stores": stores, "spill_loads": loads, "stack": stack}


def _ptxas_path():
    import triton.backends.nvidia as nvidia

    path = Path(nvidia.__file__).parent / "bin" / "ptxas"
    return path if path.exists() else None


def _offline_driver():
    """A driver for Triton's launch path that targets sm_90 and has no device."""
    import torch
    from triton.backends.compiler import GPUTarget

    class OfflineDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    return OfflineDriver()


def _compile(tuner, nargs, kwargs, config) -> dict:
    """Compile one launch with one config; ptxas's resource usage."""
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # printed, on a cache miss, by Triton's own ptxas call
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        kernel = tuner.fn.warmup(**nargs, **kwargs, **config.all_kwargs(), grid=(1,))
    seconds = time.perf_counter() - start
    log = out.getvalue()
    if "Used" not in log:  # a cache hit: run ptxas on the PTX ourselves
        log = _run_ptxas(kernel.asm["ptx"])
    return {**ptxas_usage(log), "seconds": round(seconds, 2)}


def _run_ptxas(ptx: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "kernel.ptx"
        src.write_text(ptx)
        arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        done = subprocess.run([str(_ptxas_path()), "-v", f"--gpu-name={arch}", str(src), "-o", str(src.with_suffix(".o"))],
                              capture_output=True, text=True, check=True)
    return done.stderr + done.stdout


def _config_label(config) -> str:
    blocks = "x".join(str(v) for v in config.kwargs.values())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def worker(case_names, every_config: bool, labels=()) -> list[dict]:
    if _ptxas_path() is None:
        return [{"skip": "Triton's NVIDIA backend has no bundled ptxas"}]
    import triton
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    driver.set_active(_offline_driver())
    launches = []

    def capture(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        nargs = dict(zip(self.arg_names, args))
        launches.append((self, nargs, kwargs))
        if callable(grid):  # the host code may read the config the grid function saw
            grid({**nargs, **kwargs, **self.all_configs[0].all_kwargs()})

    Autotuner.run = capture
    import_kernels()
    rows = []
    for name in case_names:
        function, args, *options = CASES[name]
        launches.clear()
        overrides = function(*args, **(options[0] if options else {})) or {}
        for tuner, nargs, kwargs in list(launches):
            kwargs = {**kwargs, **{k: v for k, v in overrides.items() if k in tuner.arg_names}}
            configs = tuner.all_configs if every_config or labels else tuner.all_configs[:1]
            for index, config in enumerate(configs):
                if labels and _config_label(config) not in labels:
                    continue
                row = {"case": name, "kernel": tuner.base_fn.__name__, "config": _config_label(config),
                       "default": index == 0, "triton": triton.__version__}
                try:
                    row.update(_compile(tuner, nargs, kwargs, config))
                except Exception as error:  # noqa: BLE001 - reported per config, not fatal
                    row["error"] = f"{type(error).__name__}: {error}"[:500]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# The tests.


def run_worker(tmp_path, *flags) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "FASTCONV_TRITON_AUTOTUNE": "0",
           "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}  # fresh: ptxas runs, and logs
    done = subprocess.run([sys.executable, __file__, *flags], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise AssertionError(f"worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    rows = json.loads(done.stdout)
    if rows and "skip" in rows[0]:
        pytest.skip(rows[0]["skip"])
    return rows


def format_table(rows) -> str:
    lines = [f"{'case':38} {'kernel':24} {'config':22} {'regs':>4} {'spill st/ld B':>14} {'s':>5}"]
    for r in rows:
        usage = r.get("error") or f"{r['regs']:4} {r['spill_stores']:>7}/{r['spill_loads']:<6} {r['seconds']:5.1f}"
        mark = "*" if r["default"] else " "
        lines.append(f"{r['case']:38} {r['kernel']:24} {mark}{r['config']:21} {usage}")
    return "\n".join(lines)


def _skip_without_nvidia_backend():
    triton = pytest.importorskip("triton")
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError as error:
        pytest.skip(f"Triton {triton.__version__} has no NVIDIA backend: {error}")


def spilled(row) -> bool:
    return "error" not in row and (row["spill_stores"] > 0 or row["spill_loads"] > 0)


def test_default_configs_compile_for_sm90_without_spills(tmp_path, record_property):
    """Every kernel's default config, in every case, compiles for sm_90 and spills nothing."""
    _skip_without_nvidia_backend()
    rows = run_worker(tmp_path, *CASES)
    print("\n" + format_table(rows))
    record_property("sm90_usage", json.dumps(rows))
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['case']} {r['kernel']} {r['config']}: {r['error']}" for r in errors)
    kernels = {r["kernel"] for r in rows}
    assert len(kernels) >= 18, f"only {sorted(kernels)} compiled: a host path moved?"
    spills = [r for r in rows if spilled(r)]
    assert not spills, "default configs spill on sm_90:\n" + format_table(spills)


# Every candidate of every case: hundreds of compiles, an hour on one core. The suite does not
# deselect `slow`, so this one also waits for its variable.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTCONV_SPILL_SWEEP") != "1", reason="set FASTCONV_SPILL_SWEEP=1 (an hour of compiles)")
def test_every_candidate_report(tmp_path, record_property):
    """Every candidate: reported, and a candidate that spills in every case it is compiled for
    fails (the autotuner drops spilling candidates anyway; one that never survives is dead)."""
    _skip_without_nvidia_backend()
    rows = run_worker(tmp_path, "--all", *CASES)
    print("\n" + format_table(rows))
    record_property("sm90_usage", json.dumps(rows))
    by_candidate = {}
    for r in rows:
        by_candidate.setdefault((r["kernel"], r["config"]), []).append(r)
    dead = [k for k, rs in by_candidate.items() if all(spilled(r) for r in rs)]
    assert not dead, f"candidates that spill in every case: {dead}"


# --------------------------------------------------------------------------------------------
# The autotuner's spill pruning (_tuning.py), with a fake compile: no GPU, no ptxas.


@pytest.fixture(autouse=True)
def _kernels_importable():
    import_kernels()  # a plain source tree too (the Triton 3.6 venv)


def _configs(n):
    import triton

    return [triton.Config({"BLOCK": 16 * 2**i}, num_warps=4) for i in range(n)]


def test_least_spilling_keeps_the_spill_free_in_order():
    from fastconv.triton_kernels._tuning import least_spilling

    configs = _configs(4)
    spills = dict(zip(configs, [12, 0, None, 0]))  # None: did not load, left to the benchmark
    assert least_spilling(configs, spills.get) == [configs[1], configs[2], configs[3]]


def test_least_spilling_when_all_spill_keeps_the_least():
    from fastconv.triton_kernels._tuning import least_spilling

    configs = _configs(3)
    spills = dict(zip(configs, [300, 8, 90]))
    assert least_spilling(configs, spills.get) == [configs[1]]


class _FakeCompiled:
    def __init__(self, n_spills, fail=False):
        self.n_spills, self.fail = n_spills, fail

    def _init_handles(self):
        if self.fail:
            raise RuntimeError("out of resources: shared memory")


class _FakeJit:
    """Stands in for the JITFunction: warmup() records its call and 'compiles'."""

    def __init__(self, spills_by_block):
        self.spills_by_block, self.calls = spills_by_block, []

    def warmup(self, *args, grid, **kwargs):
        self.calls.append((args, grid, kwargs))
        spills = self.spills_by_block[kwargs["BLOCK"]]
        return _FakeCompiled(spills, fail=spills is None)


def test_compiled_spills_compiles_without_launching():
    from fastconv.triton_kernels._tuning import compiled_spills

    config = _configs(1)[0]
    jit = _FakeJit({16: 5})
    # The autotuner passes the launch's grid and warmup flag along with its constexprs.
    assert compiled_spills(jit, {"x_ptr": "x", "n": 7}, {"grid": (9,), "warmup": False, "ACT": 2}, config) == 5
    (args, grid, kwargs), = jit.calls
    assert args == () and grid == (1,)
    assert kwargs == {"x_ptr": "x", "n": 7, "ACT": 2, **config.all_kwargs()}
    assert compiled_spills(_FakeJit({16: None}), {}, {}, config) is None  # does not load: kept


def _tuned_kernel(monkeypatch, interpret: str, autotune_env: str):
    import triton
    import triton.language as tl

    from fastconv.triton_kernels import _tuning

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setenv("FASTCONV_TRITON_AUTOTUNE", autotune_env)

    def kernel(x_ptr, n, BLOCK: tl.constexpr):
        pass

    return _tuning.autotune(configs=_configs(3), key=["n"])(triton.jit(kernel))


def test_autotune_prunes_spilling_candidates_before_timing(monkeypatch):
    from fastconv.triton_kernels import _tuning

    tuner = _tuned_kernel(monkeypatch, "0", "1")
    spills = {16: 40, 32: 0, 64: 0}
    monkeypatch.setattr(_tuning, "compiled_spills", lambda kernel, nargs, kwargs, config: spills[config.kwargs["BLOCK"]])
    tuner.nargs = {"x_ptr": None, "n": 3}
    # Triton's own entry point (the same in 3.6 and 3.8): early_config_prune(configs, nargs, **kwargs).
    assert [c.kwargs["BLOCK"] for c in tuner.prune_configs({"grid": (1,), "warmup": False})] == [32, 64]
    spills[32] = spills[64] = 7
    assert [c.kwargs["BLOCK"] for c in tuner.prune_configs({})] == [32]


@pytest.mark.parametrize("interpret, autotune_env", [("1", "1"), ("0", "0")])
def test_no_pruning_with_one_config(monkeypatch, interpret, autotune_env):
    """The interpreter and FASTCONV_TRITON_AUTOTUNE=0 keep one config: nothing to prune, and
    nothing compiled for it."""
    tuner = _tuned_kernel(monkeypatch, interpret, autotune_env)
    assert len(tuner.configs) == 1 and tuner.early_config_prune is None
    assert len(tuner.all_configs) == 3


if __name__ == "__main__":
    arguments = sys.argv[1:]
    every = "--all" in arguments
    labels = [a.split("=", 1)[1] for a in arguments if a.startswith("--config=")]  # "64x64x64 w4 s4"
    names = [a for a in arguments if not a.startswith("--")] or list(CASES)
    print(json.dumps(worker(names, every, labels)))
