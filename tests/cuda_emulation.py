"""fastconv's CUDA extension built for the CPU: every csrc/ file, host code and kernels alike,
compiled by the host compiler against tests/emulation's stand-ins for the CUDA runtime, the
CUDA headers of c10 and ATen, and the tensor-core instructions, and registered as the
`fastconv_emulated` op library with CPU kernels. Its ops take CPU tensors and run the real
checks, the real launch arithmetic and the real kernels, each CTA as concurrent std::threads.

No GPU has run fastconv's CUDA kernels. The emulation checks what can be checked without one:
index and tile arithmetic, guards, zero padding, barriers' placement (a CTA's threads really
run concurrently, so a missing __syncthreads shows as a wrong value), warp shuffles,
shared-memory reads of what no thread wrote (dynamic shared memory is NaN-poisoned), and the
fragment layouts of ldmatrix and mma.sync, against the PTX ISA's tables. It cannot show the
hardware's own behaviour (instruction semantics as executed, memory ordering beyond barriers,
bank conflicts, speed): that is the GPU tests' job.

The source is transformed on the way in, mechanically: `k<<<grid, block, shared, stream>>>(args)`
becomes `::emulation::Launch(grid, block, shared, stream).run(k, args)`, the library
`fastconv_cuda` becomes `fastconv_emulated` (so that it can sit beside the real extension),
its CUDA registrations become CPU ones, `t.is_cuda()` becomes `t.is_cpu()`, and
`__shared__ alignas(n)` becomes `alignas(n) __shared__`.
`emulated_ops()` builds it once per source version (about 2 minutes on 2 cores, cached under
the temporary directory) and returns torch.ops.fastconv_emulated.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
STAND_INS = Path(__file__).resolve().parent / "emulation"
SOURCE_SUFFIXES = (".cu", ".cpp", ".cuh", ".h")


def compiler() -> str | None:
    """The host compiler torch.utils.cpp_extension will call, if there is one."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _launch_start(text: str, end: int) -> int:
    """Where the kernel expression ending at `end` (just before `<<<`) begins: identifiers,
    `::`, and balanced <...> and [...] (kernel templates, tables of kernels)."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    while i > 0:
        c = text[i - 1]
        if c.isalnum() or c in "_:":
            i -= 1
        elif c in ">]":
            opening, depth = {">": "<", "]": "["}[c], 0
            while i > 0:
                i -= 1
                if text[i] == c:
                    depth += 1
                elif text[i] == opening:
                    depth -= 1
                    if depth == 0:
                        break
        else:
            break
    return i


def rewrite_launches(text: str) -> str:
    """`k<<<config>>>(args` -> `::emulation::Launch(config).run(k, args`."""
    out, position = [], 0
    for match in re.finditer(r"<<<", text):
        if match.start() < position:
            continue
        start = _launch_start(text, match.start())
        close = text.index(">>>", match.end())
        paren = text.index("(", close)
        assert text[close + 3 : paren].strip() == "", f"unexpected launch syntax near {text[start:paren + 1]!r}"
        kernel = text[start : match.start()].strip()
        config = text[match.end() : close]
        out.append(text[position:start])
        out.append(f"::emulation::Launch({config}).run({kernel}, ")
        position = paren + 1
    out.append(text[position:])
    return "".join(out)


def transform(text: str) -> str:
    text = rewrite_launches(text)
    text = text.replace("fastconv_cuda", "fastconv_emulated")
    text = re.sub(r"TORCH_LIBRARY_IMPL\(fastconv_emulated,\s*CUDA,", "TORCH_LIBRARY_IMPL(fastconv_emulated, CPU,", text)
    # `__shared__ alignas(16) T x[]` is CUDA's order; with __shared__ a `static`, C++ wants the
    # attribute first.
    text = re.sub(r"__shared__\s+alignas\((\w+)\)", r"alignas(\1) __shared__", text)
    return text.replace(".is_cuda()", ".is_cpu()")


def _sources_digest() -> str:
    digest = hashlib.sha256(torch.__version__.encode())
    for directory in (CSRC, STAND_INS):
        for path in sorted(directory.rglob("*")):
            if path.is_file() and path.suffix in SOURCE_SUFFIXES:
                digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def _prepare(source_dir: Path) -> list[str]:
    """The transformed copy of csrc/ (the stand-in mma_instructions.cuh in place of the real
    one); returns the translation units, .cu renamed .cpp."""
    source_dir.mkdir(parents=True, exist_ok=True)
    units = []
    for path in sorted(CSRC.iterdir()):
        if path.suffix not in SOURCE_SUFFIXES:
            continue
        name = path.stem + ".cpp" if path.suffix == ".cu" else path.name
        _write_if_changed(source_dir / name, transform(path.read_text()))
        if name.endswith(".cpp"):
            units.append(str(source_dir / name))
    _write_if_changed(source_dir / "mma_instructions.cuh", (STAND_INS / "mma_instructions.cuh").read_text())
    return units


def _write_if_changed(path: Path, text: str) -> None:
    """Leaves an unchanged file's timestamp alone: ninja would rebuild everything newer (every
    test process prepares the sources again)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


_OPS = None


def emulated_ops():
    """torch.ops.fastconv_emulated, built and loaded on first use."""
    global _OPS
    if _OPS is None:
        from torch.utils.cpp_extension import load

        build = Path(tempfile.gettempdir()) / f"fastconv-emulated-{_sources_digest()}"
        build.mkdir(parents=True, exist_ok=True)
        # One test process at a time prepares and builds: another's rewrite of a source could
        # land while this one's ninja compiles it.
        with open(build / "prepare.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            units = _prepare(build / "src")
            load(
                name="fastconv_emulated", sources=units, build_directory=str(build), is_python_module=False,
                extra_include_paths=[str(STAND_INS), str(build / "src")],
                extra_cflags=["-O1", "-std=c++20", "-pthread", "-Wno-unknown-pragmas", "-Wno-unused-variable"],
                extra_ldflags=["-pthread"], verbose=os.environ.get("FASTCONV_VERBOSE_BUILD") == "1",
            )  # fmt: skip
        _OPS = torch.ops.fastconv_emulated
    return _OPS


@contextlib.contextmanager
def emulated_cuda_backend() -> Iterator[None]:
    """Inside, fastconv's `cuda` backend runs CPU tensors on the emulated extension: it reports
    itself available, accepts CPU inputs, and torch.ops.fastconv_cuda is the emulated library."""
    import fastconv.backends as backends

    ops = emulated_ops()
    status, device_reason = backends._status, backends._device_reason

    def emulated_status(name: str):
        return backends.BackendStatus(name, True, "") if name == "cuda" else status(name)

    def emulated_device_reason(name: str, device: torch.device):
        if name == "cuda":
            return None if device.type == "cpu" else f"the emulated extension runs CPU tensors; the input is on {device}"
        return device_reason(name, device)

    previous = torch.ops.__dict__.get("fastconv_cuda")
    backends._status, backends._device_reason = emulated_status, emulated_device_reason
    torch.ops.fastconv_cuda = ops
    try:
        yield
    finally:
        backends._status, backends._device_reason = status, device_reason
        if previous is None:
            del torch.ops.fastconv_cuda
        else:
            torch.ops.fastconv_cuda = previous
