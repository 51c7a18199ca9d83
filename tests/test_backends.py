"""Backend selection: the three ways to choose, the errors, and auto's fallback."""

from __future__ import annotations

import importlib

import pytest
import torch

import fastconv
from fastconv import backends

bn_act_module = importlib.import_module("fastconv.ops.bn_act")
from harness import DEVICE, ON_GPU


def test_available_lists_every_backend_with_a_reason():
    status = fastconv.backends.available()
    assert list(status) == ["cuda", "triton", "torch"]
    assert status["torch"].available
    for entry in status.values():
        assert entry.available == (entry.reason == ""), entry


def test_use_backend_nests_and_restores():
    assert fastconv.get_backend() == "auto"
    with fastconv.use_backend("torch"):
        assert fastconv.get_backend() == "torch"
        with fastconv.use_backend("triton"):
            assert fastconv.get_backend() == "triton"
        assert fastconv.get_backend() == "torch"
    assert fastconv.get_backend() == "auto"


def test_set_backend_is_overridden_by_use_backend():
    try:
        fastconv.set_backend("torch")
        assert fastconv.get_backend() == "torch"
        with fastconv.use_backend("auto"):
            assert fastconv.get_backend() == "auto"
    finally:
        fastconv.set_backend("auto")


def test_environment_variable_chooses_when_nothing_else_does(monkeypatch):
    monkeypatch.setattr(backends, "_global_backend", None)  # as if set_backend was never called
    monkeypatch.setenv("FASTCONV_BACKEND", "Torch")
    assert fastconv.get_backend() == "torch"
    monkeypatch.setenv("FASTCONV_BACKEND", "cudnn")
    with pytest.raises(ValueError, match=r"\$FASTCONV_BACKEND must be one of auto, cuda, triton, torch; got 'cudnn'"):
        fastconv.get_backend()


@pytest.mark.parametrize("call", [fastconv.set_backend, fastconv.use_backend])
def test_unknown_backend_names_the_choices(call):
    with pytest.raises(ValueError, match=r"must be one of auto, cuda, triton, torch; got 'tensorrt'"):
        with call("tensorrt") or fastconv.use_backend("auto"):
            pass


def test_explicit_backend_that_cannot_run_says_why():
    x = torch.randn(1, 2, 3, 3)  # a CPU tensor: the cuda backend never takes one
    with fastconv.use_backend("cuda"), pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run bn_act: "):
        fastconv.bn_act(x, torch.ones(2), torch.zeros(2))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = bn_act_module.FORWARD.why_not("triton", torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_auto_uses_the_reference_on_the_cpu():
    x = torch.randn(2, 3, 4, 4)
    with fastconv.use_backend("auto"):
        y = fastconv.bn_act(x, torch.ones(3), torch.zeros(3), "relu")
    torch.testing.assert_close(y, torch.relu(x))


def test_auto_falls_back_quietly_when_a_candidate_fails():
    implementations = backends.OpImplementations("demo")

    def broken(x):
        raise RuntimeError("kernel failed")

    implementations.register("cuda", broken)
    implementations.register("triton", broken)
    implementations.register("torch", lambda x: x + 1)
    assert implementations._run_first_that_works(["cuda", "triton", "torch"], {"x": 1}) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="auto times its candidates on a GPU only")
def test_auto_times_once_and_caches_its_choice():
    forward = bn_act_module.FORWARD
    x = torch.randn(4, 64, 28, 28, device=DEVICE).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE)
    with fastconv.use_backend("auto"):
        y = fastconv.bn_act(x, scale, shift, "relu6")
    choices = forward.auto_choices()
    assert len(choices) >= 1 and set(choices.values()) <= {"cuda", "triton", "torch"}
    torch.testing.assert_close(y, torch.nn.functional.relu6(x))


def test_backward_runs_on_the_forward_backend_from_another_thread():
    """Autograd runs CUDA backward passes on a worker thread that does not see use_backend();
    the forward's choice must still hold there. Simulated here with a plain thread."""
    import threading

    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    with fastconv.use_backend("torch"):
        y = fastconv.bn_act(x, torch.ones(2), torch.zeros(2), "relu")
    seen = []
    original = bn_act_module.BACKWARD._functions["torch"]

    def spy(**arguments):
        seen.append(fastconv.get_backend())
        return original(**arguments)

    bn_act_module.BACKWARD._functions["torch"] = spy
    try:
        worker = threading.Thread(target=lambda: y.sum().backward())
        worker.start()
        worker.join()
    finally:
        bn_act_module.BACKWARD._functions["torch"] = original
    assert seen == ["torch"]


def test_auto_times_an_accumulating_op_on_scratch_copies(monkeypatch):
    """`auto`'s first-call timing runs every candidate several times; an op that adds into an
    argument (batch_norm_act_backward_accumulate's grad_c) must add once, not once per timed call."""
    import fastconv._timing
    from fastconv.backends import OpImplementations

    implementations = OpImplementations("accumulating test op", accumulates=("into",))
    for name in ("triton", "torch"):
        implementations.register(name, lambda *, into, value: into.add_(value))
    monkeypatch.setattr(implementations, "why_not", lambda name, *args, **kwargs: None if implementations.has(name) else "no")

    def time_candidates(functions, arguments):  # the real one's calls, without CUDA events
        for function in functions.values():
            for _ in range(1 + fastconv._timing.TIMED_CALLS):
                function(**arguments)
        return {name: float(i) for i, name in enumerate(functions)}

    monkeypatch.setattr(fastconv._timing, "time_candidates", time_candidates)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # no CUDA here
    into = torch.zeros(3)
    with fastconv.use_backend("auto"):
        implementations(torch.device("cuda"), "key", into=into, value=torch.ones(3))
    assert into.tolist() == [1.0, 1.0, 1.0]


def test_deterministic_mode_pins_the_triton_configs_and_auto_s_choice(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) every launch of an autotuned Triton kernel
    takes its first config (two processes could tune differently, and configs round
    differently), and `auto` takes the fixed backend order instead of timing."""
    import triton

    import fastconv._timing
    from fastconv.backends import OpImplementations
    from fastconv.triton_kernels import _tuning

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTCONV_TRITON_AUTOTUNE", "1")
    import triton.language as tl

    def noop(x_ptr, n, BLOCK: tl.constexpr):
        pass

    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    kernel = _tuning.autotune(configs=configs, key=["n"])(triton.jit(noop))
    assert isinstance(kernel, _tuning.PinnedWhenDeterministic)
    launched = []
    monkeypatch.setattr(kernel.tuned, "run", lambda *a, **k: launched.append("tuned"))
    monkeypatch.setattr(kernel.pinned, "run", lambda *a, **k: launched.append("pinned"))
    assert [c.kwargs["BLOCK"] for c in kernel.pinned.configs] == [16]
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        kernel[(1,)](None, 4)
        torch.use_deterministic_algorithms(False)
        kernel[(1,)](None, 4)
    finally:
        torch.use_deterministic_algorithms(was)
    assert launched == ["pinned", "tuned"]

    implementations = OpImplementations("deterministic test op")
    for name in ("triton", "torch"):
        implementations.register(name, lambda name=name, **_: name)
    monkeypatch.setattr(implementations, "why_not", lambda name, *a, **k: None if implementations.has(name) else "no")
    monkeypatch.setattr(fastconv._timing, "time_candidates", lambda *a: pytest.fail("timed in deterministic mode"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    try:
        torch.use_deterministic_algorithms(True)
        with fastconv.use_backend("auto"):
            assert implementations(torch.device("cuda"), "key") == "triton"
    finally:
        torch.use_deterministic_algorithms(was)
