"""`python -m fastconv demo` (what `make demo` runs; also `python -m fastconv.demo`).

On a GPU: a short `python -m fastconv bench` of MobileNetV2 against eager cuDNN. On a CPU:
torchvision's MobileNetV2 and DenseNet121 with random weights and BatchNorm statistics go
through fastconv.optimize, which prints what it swapped; the demo checks that their outputs
match the originals', and prints the bytes one inference step moves, counted, against eager's.
`--ops` adds the op-level check: every op on every backend that can run here (the Triton
kernels in Triton's interpreter) against the float64 PyTorch reference, one line per case.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    # Let the Triton kernels run on CPU tensors; must precede their import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastconv  # noqa: E402
from fastconv import reference  # noqa: E402

_LAYOUTS = {
    "NCHW": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
}
# About two units in the last place of each dtype, relative to the output's magnitude.
_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _bn_act_cases(device: torch.device):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for layout, arrange in _LAYOUTS.items():
            for activation in ("relu6", "silu"):
                x = arrange(torch.randn(2, 24, 9, 11, device=device) * 3).to(dtype)
                scale = torch.randn(24, device=device) * 0.5 + 1
                shift = torch.randn(24, device=device)
                yield f"bn_act {activation}", dtype, layout, fastconv.bn_act, reference.bn_act, (x, scale, shift, activation)


def _depthwise_cases(device: torch.device):
    for dtype in (torch.float32, torch.float16):
        for layout, arrange in _LAYOUTS.items():
            x = arrange(torch.randn(2, 32, 13, 11, device=device)).to(dtype)
            weight = (torch.randn(32, 1, 3, 3, device=device) / 3).to(dtype)
            scale, shift = torch.randn(32, device=device) * 0.5 + 1, torch.randn(32, device=device)

            def ours(x, weight, scale, shift):
                return fastconv.depthwise_conv2d(x, weight, None, 2, 1, scale=scale, shift=shift, activation="relu6")

            def theirs(x, weight, scale, shift):
                return reference.depthwise_conv2d(x, weight, None, (2, 2), (1, 1, 1, 1), (1, 1), scale, shift, "relu6")

            yield "depthwise 3x3 s2", dtype, layout, ours, theirs, (x, weight, scale, shift)


def _pointwise_cases(device: torch.device):
    for dtype in (torch.float32, torch.float16):
        for layout, arrange in _LAYOUTS.items():
            x = arrange(torch.randn(2, 48, 7, 9, device=device)).to(dtype)
            weight = (torch.randn(32, 48, 1, 1, device=device) / 7).to(dtype)
            scale, shift = torch.randn(32, device=device) * 0.5 + 1, torch.randn(32, device=device)
            in_scale, in_shift = torch.rand(48, device=device) + 0.5, torch.randn(48, device=device)

            def ours(x, weight, scale, shift, in_scale, in_shift):
                return fastconv.pointwise_conv2d(
                    x, weight, scale=scale, shift=shift, activation="relu6", in_scale=in_scale, in_shift=in_shift,
                    in_activation="relu",
                )  # fmt: skip

            def theirs(x, weight, scale, shift, in_scale, in_shift):
                return reference.pointwise_conv2d(x, weight, None, scale, shift, "relu6", None, False, in_scale, in_shift, "relu")

            yield "pointwise bn-relu", dtype, layout, ours, theirs, (x, weight, scale, shift, in_scale, in_shift)


def _conv_bn_act_cases(device: torch.device):
    for dtype in (torch.float32, torch.float16):
        for layout, arrange in _LAYOUTS.items():
            x = arrange(torch.randn(2, 3, 15, 13, device=device)).to(dtype)  # MobileNet's stem, small
            weight = (torch.randn(16, 3, 3, 3, device=device) / 5).to(dtype)
            scale, shift = torch.randn(16, device=device) * 0.5 + 1, torch.randn(16, device=device)

            def ours(x, weight, scale, shift):
                return fastconv.conv2d_bn_act(x, weight, None, 2, 1, scale=scale, shift=shift, activation="relu6")

            def theirs(x, weight, scale, shift):
                return reference.conv2d(x, weight, None, (2, 2), (1, 1, 1, 1), (1, 1), 1, scale, shift, "relu6")

            yield "conv 3x3 s2 bn", dtype, layout, ours, theirs, (x, weight, scale, shift)


def correctness_demo() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"fastconv {fastconv.__version__}, torch {torch.__version__}, device {device}")
    print(fastconv.backends.report())
    runnable = [name for name, status in fastconv.backends.available().items() if status.available]
    print()
    print(f"{'op':18s} {'backend':8s} {'dtype':9s} {'layout':14s} {'max error':>10s} {'allowed':>9s}  verdict")
    failures = 0
    cases = (*_bn_act_cases(device), *_depthwise_cases(device), *_pointwise_cases(device), *_conv_bn_act_cases(device))
    for op, dtype, layout, ours, theirs, args in cases:
        expected = theirs(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
        magnitude = max(1.0, expected.abs().max().item())
        for backend in runnable:
            with fastconv.use_backend(backend):
                try:
                    got = ours(*args)
                except RuntimeError as error:  # this backend does not implement the op yet
                    print(f"{op:18s} {backend:8s} {str(dtype)[6:]:9s} {layout:14s}  skipped: {error}")
                    continue
            error = (got.double() - expected).abs().max().item() / magnitude
            ok = error <= _TOLERANCE[dtype]
            failures += not ok
            print(
                f"{op:18s} {backend:8s} {str(dtype)[6:]:9s} {layout:14s} {error:10.2e} {_TOLERANCE[dtype]:9.1e}  "
                f"{'ok' if ok else 'FAIL'}"
            )
    print(f"\n{'all cases match' if not failures else f'{failures} cases FAILED'} (errors relative to max |reference|)")
    return 1 if failures else 0


def model_demo() -> int:
    """optimize() on torchvision's MobileNetV2 and DenseNet121: what was swapped, the output
    error against the original (eval, fp32, 2x3x64x64), and the counted bytes of one step."""
    from fastconv import bench

    failures = 0
    for name in ("mobilenet_v2", "densenet121"):
        print(f"\n== {name} (torchvision, random weights and BatchNorm statistics) ==")
        original = bench.build(name, "cpu", channels_last=False).eval()
        optimised = fastconv.optimize(original, verbose=True).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            want, got = original(x), optimised(x)
        error = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
        ok = error <= 1e-4
        failures += not ok
        eager_bytes, _ = bench.counted(original, 256, 224, "inference", torch.float16, True)
        ours_bytes, _ = bench.counted(optimised, 256, 224, "inference", torch.float16, True)
        print(f"{name}: max |optimised - original| = {error:.2e} of max |output| ({'ok' if ok else 'FAIL'})")
        print(f"{name}: one inference step at batch 256, 224x224, fp16, channels_last moves {eager_bytes / 1e9:.2f} GB "
              f"in eager PyTorch's ops and {ours_bytes / 1e9:.2f} GB in fastconv's: {eager_bytes / ours_bytes:.2f}x "
              "less (counted: python -m fastconv bench --traffic)")  # fmt: skip
    return 1 if failures else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if torch.cuda.is_available():
        from fastconv import bench

        return bench.main(["--model", "mobilenet_v2", "--batch", "64", "--compare", "eager", "--channels-last"])
    status = model_demo()
    if "--ops" in argv:
        status |= correctness_demo()
    return status


if __name__ == "__main__":
    sys.exit(main())
