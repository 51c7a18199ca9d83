"""Shared test machinery: inputs, layouts, poisoning, the low-precision oracle, reports.

The oracle follows flash-attention's: an op in float16 or bfloat16 passes when its error
against a float64 reference is at most twice what PyTorch's own eager op makes in that dtype
against the same reference, plus a small absolute slack.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import pytest
import torch

import fastconv
from cuda_emulation import compiler
from fastconv.backends import available, interpreting

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Without a GPU, the cuda backend's cases run on the extension built for the CPU
# (tests/cuda_emulation.py): its real host code and kernels, each CTA as concurrent threads.
# FASTCONV_EMULATED_CUDA=0 skips them instead (as does a machine without a C++20 compiler).
EMULATED_CUDA = not ON_GPU and os.environ.get("FASTCONV_EMULATED_CUDA", "1") == "1" and compiler() is not None
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last", "channel_slice", "spatial_slice")
# The fuzz tests' inputs also come as expanded views (stride 0 over N and W), as `expand` and
# broadcasting make them; outputs are never drawn so (the ops refuse an expanded out).
FUZZ_LAYOUTS = LAYOUTS + ("expanded",)

# The slack added to twice PyTorch's error, relative to the reference's largest magnitude:
# about two units in the last place of each dtype. Triton 3.8's interpreter truncates float32
# to bfloat16 instead of rounding to nearest (seen: 0.0155 against torch's 0.0075 on randn),
# which doubles bfloat16 errors on the CPU; the GPU rounds to nearest.
_RELATIVE_SLACK = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# Each skip reason worded once.
INTERPRETED_BF16_DOT = (
    "tl.dot on bfloat16 operands returns garbage in Triton's CPU interpreter (seen with Triton 3.8; "
    "float16 and float32 are right); tested on the GPU"
)
needs_cuda_backend = pytest.mark.skipif(
    not available()["cuda"].available, reason=f"backend cuda: {available()['cuda'].reason}"
)


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype the contract promises for statistics and parameter gradients: float64 for
    float64 inputs, float32 otherwise (written here again, not imported: the tests' own word)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def require_extension() -> None:
    """At a test module's top: skip the module when fastconv._C is not built, or fail it
    when FASTCONV_EXPECT_EXTENSION=1 (CI, whose build must have produced it)."""
    from fastconv._extension import load_extension

    module, why = load_extension()
    if module is None:
        if os.environ.get("FASTCONV_EXPECT_EXTENSION") == "1":
            raise AssertionError(f"FASTCONV_EXPECT_EXTENSION=1 but {why}")
        pytest.skip(why, allow_module_level=True)


def skip_interpreted_bf16_dot(backend: str, dtype: torch.dtype) -> None:
    """The triton backend's bfloat16 GEMMs are tested on the GPU only (INTERPRETED_BF16_DOT)."""
    if backend.partition(":")[0] == "triton" and dtype == torch.bfloat16 and interpreting():
        pytest.skip(INTERPRETED_BF16_DOT)


def backends_under_test(implementations=None) -> list:
    """Every backend as a pytest param; those that cannot run here are skipped with the reason.

    `implementations` (an op's OpImplementations) also skips the backends that op lacks."""
    params = []
    status = available()
    for name in ("torch", "triton", "cuda"):
        reason = status[name].reason
        if implementations is not None and not implementations.has(name):
            reason = f"{implementations.op_name} has no {name} implementation yet"
        if name == "cuda" and not ON_GPU:
            if EMULATED_CUDA and (implementations is None or implementations.has(name)):
                params.append(pytest.param(name, marks=[pytest.mark.emulated], id="cuda-emulated"))
                continue
            reason = reason or "no CUDA device"
        marks = [pytest.mark.skip(reason=f"backend {name}: {reason}")] if reason else []
        if name == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def random_tensor(
    shape: Sequence[int], dtype: torch.dtype = torch.float32, layout: str = "nchw", device=DEVICE, scale: float = 1.0
) -> torch.Tensor:
    """Fresh normal random data, never zeros, in one of the LAYOUTS.

    channel_slice: channels 2..C+2 of a wider channels_last buffer (channel stride 1, pixel
    stride C+5), as DenseNet reads its concatenated features. spatial_slice: a crop of a larger
    NCHW tensor, so that H and W do not merge into one stride. expanded: one image and one
    column repeated, `randn(1, C, H, 1).expand(N, C, H, W)` (strides 0 over N and W).
    """
    n, c, h, w = shape
    if layout == "expanded":
        return (torch.randn(1, c, h, 1, device=device) * scale).to(dtype).expand(n, c, h, w)
    if layout == "nchw":
        base = torch.randn(n, c, h, w, device=device)
    elif layout == "channels_last":
        base = torch.randn(n, c, h, w, device=device).contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        wide = torch.randn(n, c + 5, h, w, device=device).contiguous(memory_format=torch.channels_last)
        base = wide[:, 2 : c + 2]
    elif layout == "spatial_slice":
        base = torch.randn(n, c, h + 3, w + 4, device=device)[:, :, 1 : h + 1, 3 : w + 3]
    else:
        raise ValueError(layout)
    if dtype == torch.float32:
        return base.mul_(scale)
    # A dtype cast would make the result contiguous again; cast in place of a same-strided copy.
    out = torch.empty_strided(base.shape, base.stride(), dtype=dtype, device=device)
    return out.copy_(base * scale)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Make every torch.empty* inside fill its memory with NaN, so unwritten outputs show.

    PyTorch does this for floating tensors when deterministic algorithms are on and
    torch.utils.deterministic.fill_uninitialized_memory is set; it also holds fastconv to its
    promise of deterministic kernels.
    """
    import torch.utils.deterministic as deterministic

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        deterministic.fill_uninitialized_memory = was_filling


def mismatch_report(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> str:
    """Where and how many elements differ, NaN and inf disagreements included."""
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    error = (actual64 - expected64).abs()
    nan_disagree = actual64.isnan() ^ expected64.isnan()
    inf_disagree = actual64.isinf() ^ expected64.isinf()
    error = torch.where(nan_disagree | inf_disagree, torch.full_like(error, float("inf")), error.nan_to_num(0.0))
    bad = error > tolerance
    lines = [
        f"{name}: {int(bad.sum())} of {error.numel()} elements off by more than {tolerance:.3g}",
        f"  NaN disagreements: {int(nan_disagree.sum())}, inf disagreements: {int(inf_disagree.sum())}",
    ]
    if bad.any():
        worst = int(error.flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), error.shape))
        lines.append(
            f"  worst at {index}: got {actual64[index].item():.8g}, expected {expected64[index].item():.8g}"
        )
        first = [tuple(int(i) for i in idx) for idx in bad.nonzero()[:5]]
        lines.append(f"  first bad indices: {first}")
    return "\n".join(lines)


def assert_matches_reference(
    name: str,
    actual: torch.Tensor,
    reference64: torch.Tensor,
    pytorch_lowp: torch.Tensor | None = None,
    magnitude: float | None = None,
    terms: int = 1,
) -> None:
    """The oracle: |actual - ref| <= 2 * |pytorch_lowp - ref| + slack, elementwise maximum.

    `reference64` is computed in float64. `pytorch_lowp` is plain PyTorch's result in the
    dtype under test; without it (float32 and float64) the slack alone is the tolerance. The
    slack is relative to `magnitude`, by default the reference's largest value; a reduction
    whose terms cancel passes the size of its terms instead (sum |term|), since its rounding
    error scales with them, not with what is left of them; or passes `terms`, the number of
    terms summed into each element: random-signed terms leave a sum about sqrt(terms) times
    smaller than the sum of their sizes, so the slack grows by that factor (seen: a float32
    grad_weight summed over 91 pixels was off by 6e-6 at 2.27, over a slack of 4.6e-6).
    """
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    if actual.numel() == 0:
        return
    if magnitude is None:
        magnitude = reference64.detach().abs().max().item()
    magnitude = max(1.0, magnitude)
    tolerance = _RELATIVE_SLACK[actual.dtype] * magnitude * max(1, terms) ** 0.5
    if pytorch_lowp is not None:
        tolerance += 2 * (pytorch_lowp.detach().double() - reference64.detach().double()).abs().max().item()
    report = mismatch_report(name, actual, reference64, tolerance)
    assert report.startswith(f"{name}: 0 of"), report


def seeded(seed: int) -> None:
    """Seed torch from a hypothesis-drawn integer: fresh inputs for every example, yet the same
    ones when hypothesis replays an example (it reports a failure as flaky otherwise)."""
    torch.manual_seed(seed)


@contextlib.contextmanager
def on_backend(backend: str) -> Iterator[None]:
    """fastconv.use_backend(backend), except that a call outside what the backend declares it
    supports (say, float32 without TF32 on the cuda tensor-core GEMMs, or float64 on any cuda
    kernel) skips the test with the backend's reason: that refusal is the documented behaviour.

    "triton:tiled" and "triton:gather" are the triton backend with the fused block's kernel
    forced, "cuda:cuda_cores" and "cuda:tensor_cores" the cuda backend's (see
    fastconv.ops.inverted_residual.forced_kernel and with_fused_block_kernels)."""
    from fastconv.ops.inverted_residual import forced_kernel

    backend, _, kernel = backend.partition(":")
    emulation = contextlib.nullcontext()
    if backend == "cuda" and EMULATED_CUDA:
        from cuda_emulation import emulated_cuda_backend

        emulation = emulated_cuda_backend()
    with emulation, forced_kernel(backend, kernel), fastconv.use_backend(backend):
        try:
            yield
        except RuntimeError as error:
            if str(error).startswith(f"fastconv: backend {backend!r} cannot run "):
                pytest.skip(str(error))
            raise


def with_fused_block_kernels(params: list) -> list:
    """Backend params (backends_under_test's) plus the fused inverted residual's second kernel of
    each GPU backend, which `auto` only picks by timing on a GPU: "triton:tiled" (the expansion
    once per window pixel; plain "triton" runs the gather kernel wherever there is no GPU timer)
    and "cuda:tensor_cores" (plain "cuda" runs the CUDA-core kernel wherever there is no GPU
    timer, the emulated extension included)."""
    extra = [pytest.param(f"{p.values[0]}:{kernel}", marks=p.marks, id=f"{p.values[0]}-{kernel}")
             for p in params for backend, kernel in (("triton", "tiled"), ("cuda", "tensor_cores"))
             if p.values[0] == backend]  # fmt: skip
    return list(params) + extra


def run_backend(backend: str, function: Callable, *args, **kwargs):
    """function(*args, **kwargs) on `backend` (see on_backend)."""
    with on_backend(backend):
        return function(*args, **kwargs)


def assert_batch_stats(out: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, relative: float = 2e-6) -> None:
    """A kernel's fused batch statistics against float64 statistics of the out it stored: float32 (float64) as the contract says,
    mean within `relative` of the channel's spread and magnitude, var within `relative` of itself."""
    want = wide(out.dtype)
    assert mean.dtype == want and var.dtype == want
    assert mean.shape == var.shape == (out.shape[1],)
    ref_var, ref_mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
    if out.dtype == torch.float64:
        relative = 1e-12
    spread = ref_var.sqrt() + ref_mean.abs()
    mean_error = (mean.double() - ref_mean).abs()
    var_error = (var.double() - ref_var).abs()
    assert (mean_error <= relative * spread + 1e-30).all(), f"mean off by {(mean_error / spread).max():.3g} (relative)"
    assert (var_error <= relative * ref_var + 1e-30).all(), f"var off by {(var_error / ref_var).max():.3g} (relative)"
