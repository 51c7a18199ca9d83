"""The extension's autotuner (csrc/autotune.h) inside CUDA graphs, and what it reports.

fastconv_cuda::autotune_choices() lists what the autotuner decided, one line per key:
"<op> key=0x<hex> variant=<v|untuned|timing> last=<v> capture_fallbacks=<n>". The GPU tests
check that a graph captured after warm-up replays the tuned variant (not the default), that an
untuned shape under capture gets the default without breaking the capture, and that tuning
while another thread captures leaves that capture valid. The first test runs without a GPU.
With FASTCONV_EXPECT_EXTENSION=1 (CI) a missing extension fails these tests instead of
skipping them.
"""

from __future__ import annotations

import threading

import pytest
import torch

from harness import require_extension

require_extension()

cuda = torch.ops.fastconv_cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (kernels are timed on it)")


def choices(op: str) -> dict[str, dict[str, str]]:
    """{key: {"variant": ..., "last": ..., "capture_fallbacks": ...}} of one op's tuned keys."""
    out = {}
    for line in cuda.autotune_choices():
        name, key, *fields = line.split()
        if name == op:
            out[key.removeprefix("key=")] = dict(field.split("=", 1) for field in fields)
    return out


def test_choices_are_listed_without_a_device():
    assert str(cuda.autotune_choices.default._schema) == "fastconv_cuda::autotune_choices() -> str[]"
    lines = cuda.autotune_choices()
    assert isinstance(lines, list) and all(isinstance(line, str) for line in lines)


def pointwise(pixels: int, c_in: int = 64, c_out: int = 96):
    """A pointwise_forward call on a shape class of its own (the tuning key buckets M by log2)."""
    x = torch.randn(1, c_in, pixels, 1, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, device="cuda", dtype=torch.float16) / c_in**0.5
    out = torch.empty(1, c_out, pixels, 1, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)

    def call():
        cuda.pointwise_forward(x, w, None, None, None, 0, None, False, None, None, 0, False, out)

    expected = torch.einsum("nkhw,jk->njhw", x.float(), w.float())
    return call, out, expected


def new_key(before: dict, after: dict) -> str:
    fresh = set(after) - set(before)
    if not fresh:
        pytest.skip("an earlier test of this process tuned this shape class; the test needs an untuned one")
    (key,) = fresh
    return key


@needs_gpu
def test_a_graph_captured_after_warm_up_replays_the_tuned_variant():
    call, out, expected = pointwise(pixels=3 * 2**17, c_in=40, c_out=24)
    before = choices("pointwise_forward")

    # Untuned under capture: the default variant, counted, and the capture stays valid.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    key = new_key(before, choices("pointwise_forward"))
    entry = choices("pointwise_forward")[key]
    assert entry["variant"] == "untuned" and entry["capture_fallbacks"] == "1"
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)

    # Warm-up outside capture tunes the key.
    call()
    torch.cuda.synchronize()
    entry = choices("pointwise_forward")[key]
    tuned = entry["variant"]
    assert tuned.isdigit() and entry["last"] == tuned

    # Captured again: served from the cache, so the graph holds the tuned variant.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    entry = choices("pointwise_forward")[key]
    assert entry["last"] == tuned and entry["capture_fallbacks"] == "1"
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)


@needs_gpu
def test_tuning_while_another_thread_captures_keeps_that_capture_valid():
    """Timing syncs the host; in the default global capture mode that would invalidate another
    thread's capture, unless the timing thread relaxes its own mode (csrc/autotune.h)."""
    call, out, expected = pointwise(pixels=5 * 2**15, c_in=40, c_out=24)
    before = choices("pointwise_forward")
    a = torch.randn(1 << 20, device="cuda")
    captured, tuned, errors = threading.Event(), threading.Event(), []
    graph = torch.cuda.CUDAGraph()

    def capture():
        try:
            with torch.cuda.graph(graph, capture_error_mode="global"):
                b = a * 2
                captured.set()
                assert tuned.wait(timeout=120), "the tuning thread did not finish"
                b.add_(1)
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(b, a * 2 + 1)
        except Exception as error:  # surfaced in the main thread
            errors.append(error)
            captured.set()

    thread = threading.Thread(target=capture)
    thread.start()
    assert captured.wait(timeout=120)
    try:
        call()  # a fresh key: times every variant, with host syncs, while the capture is open
    finally:
        tuned.set()
        thread.join(timeout=120)
    assert not errors, errors
    torch.cuda.synchronize()
    assert choices("pointwise_forward")[new_key(before, choices("pointwise_forward"))]["variant"].isdigit()
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)
