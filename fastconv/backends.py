"""Which implementation runs an op: the backend registry and the `auto` choice.

Three backends implement every op:

=========  =================================================================
``cuda``   hand-written CUDA C++ kernels (`csrc/`, the extension fastconv._C)
``triton`` Triton kernels (`triton_kernels/`); on CPU tensors only under the
           interpreter (``TRITON_INTERPRET=1``), which is how CI tests them
``torch``  the pure-PyTorch reference composite (cuDNN for convolutions)
=========  =================================================================

The choice comes from `use_backend` (a context manager), else `set_backend`, else the
environment variable ``FASTCONV_BACKEND``, else ``auto``. An explicitly requested backend that
cannot run a call raises an error saying why. ``auto`` picks per op, shape, dtype and layout:
on a GPU it times each candidate once, on first use, and caches the winner, in the spirit of
``torch.backends.cudnn.benchmark``; a candidate that fails is dropped quietly.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Optional, Sequence

import torch

from fastconv._extension import load_extension

BACKENDS = ("cuda", "triton", "torch")  # also auto's fallback order, fastest expected first
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "FASTCONV_BACKEND"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable; empty when available


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401

        import fastconv.triton_kernels  # noqa: F401
    except Exception as error:  # an ImportError, or a Triton that fails on this platform
        return f"Triton cannot be imported ({type(error).__name__}: {error})"
    return ""


def _status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus(name, True, "")
    if name == "cuda":
        # The device first: without one, building the extension would not help.
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "no CUDA device is visible to torch")
        module, why = load_extension()
        if module is None:
            return BackendStatus(name, False, why)
        return BackendStatus(name, True, "")
    why = _triton_import_error()
    if why:
        return BackendStatus(name, False, why)
    if not torch.cuda.is_available() and not interpreting():
        return BackendStatus(name, False, "no CUDA device, and TRITON_INTERPRET=1 is not set for CPU tensors")
    return BackendStatus(name, True, "")


def available() -> dict[str, BackendStatus]:
    """Every backend with whether it can run here, and why not."""
    return {name: _status(name) for name in BACKENDS}


def report() -> str:
    """`available()` as a table for people: `print(fastconv.backends.report())`."""
    statuses = available()
    width = max(len("backend"), *(len(name) for name in statuses))
    lines = [f"{'backend':<{width}}  available  why not", f"{'-' * width}  ---------  -------"]
    for name, status in statuses.items():
        lines.append(f"{name:<{width}}  {'yes' if status.available else 'no':<9}  {status.reason}".rstrip())
    lines.append(f"in force: {get_backend()} (set_backend, use_backend or ${ENV_VAR})")
    return "\n".join(lines)


def _validated(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"fastconv: {source} must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


_global_backend: Optional[str] = None
_scoped_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastconv_backend", default=None)


def set_backend(name: str) -> None:
    """Select the backend for every op from now on: auto, cuda, triton or torch."""
    global _global_backend
    _global_backend = _validated(name, "set_backend(name)")


def get_backend() -> str:
    """The backend in force: use_backend's, else set_backend's, else $FASTCONV_BACKEND's, else auto."""
    scoped = _scoped_backend.get()
    if scoped is not None:
        return scoped
    if _global_backend is not None:
        return _global_backend
    return _validated(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the body with `name` as the backend; restores the previous choice on exit."""
    token = _scoped_backend.set(_validated(name, "use_backend(name)"))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


# An implementation's own restriction: called with the call's arguments by keyword, it
# returns why it cannot run this call, or None.
Supports = Callable[..., Optional[str]]


def _device_reason(name: str, device: torch.device) -> Optional[str]:
    status = _status(name)
    if not status.available:
        return status.reason
    if name == "cuda" and device.type != "cuda":
        return f"it runs CUDA tensors only; the input is on {device}"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"it runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; the input is on {device}"
    return None


def _always(**arguments) -> Optional[str]:
    return None


class OpImplementations:
    """The implementations of one op, one per backend, and the choice among them.

    Every implementation and every `supports` check takes the call's arguments by keyword, so
    a check names what it reads (`refuse_float64("x")`) instead of guessing positions.
    """

    def __init__(self, op_name: str, accumulates: Sequence[str] = ()) -> None:
        """accumulates: the arguments the op adds into (a dense block's gradient buffer). `auto`
        times the candidates on copies of them: each timed call would add again."""
        self.op_name = op_name
        self._accumulates = tuple(accumulates)
        self._functions: dict[str, Callable] = {}
        self._supports: dict[str, Supports] = {}
        self._auto_choice: dict[Hashable, str] = {}
        self._lock = threading.Lock()

    def register(self, backend: str, function: Callable, supports: Optional[Supports] = None) -> None:
        assert backend in BACKENDS, backend
        self._functions[backend] = function
        self._supports[backend] = supports or _always

    def has(self, backend: str) -> bool:
        return backend in self._functions

    def why_not(self, backend: str, device: torch.device, **arguments) -> Optional[str]:
        """Why `backend` cannot run this call, or None when it can."""
        if backend not in self._functions:
            return f"{self.op_name} has no {backend} implementation"
        return _device_reason(backend, device) or self._supports[backend](**arguments)

    def run(self, backend: str, device: torch.device, **arguments):
        """Run the op on `backend`, or raise saying why it cannot."""
        why = self.why_not(backend, device, **arguments)
        if why is not None:
            raise RuntimeError(f"fastconv: backend {backend!r} cannot run {self.op_name}: {why}")
        return self._functions[backend](**arguments)

    def __call__(self, device: torch.device, key: Hashable, **arguments):
        """Run the op on the backend in force."""
        requested = get_backend()
        if requested != "auto":
            return self.run(requested, device, **arguments)
        return self._run_auto(device, key, arguments)

    def _run_auto(self, device: torch.device, key: Hashable, arguments: dict):
        candidates = [name for name in BACKENDS if self.why_not(name, device, **arguments) is None]
        if device.type != "cuda":
            # On the CPU only the reference is fast: the Triton interpreter is a test vehicle.
            candidates = ["torch"]
        cached = self._auto_choice.get(key)
        if cached in candidates:
            return self._functions[cached](**arguments)
        if len(candidates) == 1 or torch.cuda.is_current_stream_capturing():
            # Timing is impossible inside a CUDA graph capture: use the fallback order.
            return self._run_first_that_works(candidates, arguments)
        if torch.are_deterministic_algorithms_enabled():
            # Timing can pick another backend in another process, which rounds differently:
            # deterministic mode takes the fixed order (the Triton kernels pin their configs too).
            return self._run_first_that_works(candidates, arguments)
        from fastconv._timing import time_candidates

        # Timing runs each candidate several times: what it adds into gets a scratch copy.
        timed = {**arguments, **{name: arguments[name].clone() for name in self._accumulates}}
        timings = time_candidates({name: self._functions[name] for name in candidates}, timed)
        del timed
        winner = min(timings, key=timings.get) if timings else candidates[-1]
        with self._lock:
            self._auto_choice[key] = winner
        return self._functions[winner](**arguments)

    def _run_first_that_works(self, candidates: list[str], arguments: dict):
        for name in candidates[:-1]:
            try:
                return self._functions[name](**arguments)
            except Exception:  # auto falls back quietly; an explicit request would have raised
                continue
        return self._functions[candidates[-1]](**arguments)

    def auto_choices(self) -> dict[Hashable, str]:
        """What `auto` has picked so far, per call key (for benchmarks and debugging)."""
        return dict(self._auto_choice)
