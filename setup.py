"""Build script for fastconv.

The Python/Triton part is pure Python. The optional CUDA extension ``fastconv._C``
(csrc/) needs a CUDA build of torch and nvcc, but no GPU, to *build*; it can only *run* on a
GPU. Control with FASTCONV_BUILD_CUDA: 0 = skip, 1 = required (fail loudly; CI's compile
check), unset = auto: build when a GPU is visible, else skip with a one-line reason (twelve
CUDA files for sm_90 take about 11.5 minutes on 2 cores, for kernels that cannot run there).

The build prints one line per compiled unit; FASTCONV_VERBOSE_BUILD=1 prints ninja's full
commands and every unit's compiler output instead. A failing unit's output is always shown.
"""

import glob
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
GB_PER_NVCC_JOB = 2  # peak RSS of one nvcc on a torch-heavy .cu file


class CudaBuildUnavailable(Exception):
    """Raised with a human-readable reason when the extension cannot be built."""


def _build_mode():
    value = os.environ.get("FASTCONV_BUILD_CUDA", "").strip()
    if value not in ("", "0", "1"):
        sys.exit(f"fastconv: FASTCONV_BUILD_CUDA must be 0, 1 or unset, got {value!r}")
    return {"": "auto", "0": "off", "1": "force"}[value]


def _nvcc_toolkit_root(nvcc):
    """Real toolkit root behind `nvcc`, which may be a wrapper script (e.g. /usr/local/bin/nvcc
    exec'ing /usr/local/cuda-13.0/bin/nvcc); torch would otherwise guess /usr/local."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def _fix_cuda_home():
    """Point CUDA_HOME at a toolkit that has the runtime headers, before torch guesses it.

    torch.utils.cpp_extension derives CUDA_HOME from `which nvcc` at import time; with a
    wrapper script on PATH that yields a directory without include/cuda_runtime_api.h.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(nvcc))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime_api.h")):
        return
    root = _nvcc_toolkit_root(nvcc)
    if root and os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
        os.environ["CUDA_HOME"] = root


def _nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _check_cuda_toolchain():
    """Return CUDA_HOME, or raise CudaBuildUnavailable(reason)."""
    try:
        import torch
    except ImportError:
        raise CudaBuildUnavailable(
            "torch is not importable (install torch first and build with --no-build-isolation)")
    if torch.version.cuda is None:
        raise CudaBuildUnavailable(f"torch {torch.__version__} is not a CUDA build")
    _fix_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME or "", "bin", "nvcc")
    if not CUDA_HOME or not os.path.exists(nvcc):
        raise CudaBuildUnavailable("nvcc not found (put it on PATH or set CUDA_HOME)")
    version = _nvcc_version(nvcc)
    torch_major = int(torch.version.cuda.split(".")[0])
    if version is None or version[0] != torch_major:
        raise CudaBuildUnavailable(
            f"nvcc at {nvcc} is CUDA {version}, torch was built with CUDA {torch.version.cuda}")
    if not glob.glob(os.path.join(CSRC, "*.cu")):
        raise CudaBuildUnavailable(f"no CUDA sources in {CSRC}")
    return CUDA_HOME


def _visible_gpu():
    """None when a GPU is visible, else why not (one line).

    The device nodes are checked first: they need no CUDA initialisation. torch's device count
    covers set-ups without them (WSL's /dev/dxg)."""
    if glob.glob("/dev/nvidia[0-9]*"):
        return None
    try:
        import torch

        if torch.cuda.device_count() > 0:
            return None
    except Exception as exc:  # a broken driver is "no GPU" here, not a failed install
        return f"no GPU visible (torch.cuda.device_count() raised {type(exc).__name__}: {exc})"
    return "no GPU visible (no /dev/nvidia* device, torch.cuda.device_count() == 0)"


def _parallel_jobs():
    """MAX_JOBS (default: CPU count), capped so parallel nvcc jobs fit in available memory."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = int(os.environ.get("MAX_JOBS") or cpus or 1)
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        jobs = min(jobs, max(1, kb // (GB_PER_NVCC_JOB * 1024 * 1024)))
    except (OSError, StopIteration, ValueError):
        pass
    return max(1, jobs)


def _site_packages():
    dirs = set(site.getsitepackages()) if hasattr(site, "getsitepackages") else set()
    dirs.update({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    if site.ENABLE_USER_SITE:
        dirs.add(site.getusersitepackages())
    return sorted(d for d in dirs if os.path.isdir(d))


def _library_header_dirs(cuda_home):
    """Include dirs of torch's pip CUDA wheels (nvidia/**/include) holding cuBLAS/cuSPARSE headers.

    ATen/cuda/CUDAContext.h includes cublas_v2.h and cusparse.h, which a minimal toolkit
    lacks. These dirs are added with -isystem, i.e. searched *after* the toolkit's -I dirs,
    so the toolkit's own runtime headers always win over the wheel copies.
    """
    toolkit_inc = os.path.join(cuda_home, "include")
    if all(os.path.exists(os.path.join(toolkit_inc, h)) for h in ("cublas_v2.h", "cusparse.h")):
        return []
    found = []
    for sp in _site_packages():
        for inc in sorted(glob.glob(os.path.join(sp, "nvidia", "**", "include"), recursive=True)):
            has = any(os.path.exists(os.path.join(inc, h)) for h in ("cublas_v2.h", "cusparse.h"))
            if has and inc not in found:
                found.append(inc)
    return found


def _cuda_extension():
    """The fastconv._C extension plus the BuildExtension cmdclass, or ([], {}) when skipped."""
    mode = _build_mode()
    if mode == "off":
        return [], {}
    if mode == "auto":
        # First, so that a machine without a GPU neither probes the toolchain nor imports
        # torch.utils.cpp_extension (which warns about the missing CUDA runtime).
        why_not = _visible_gpu()
        if why_not:
            print(f"fastconv: skipping the CUDA extension: {why_not}; FASTCONV_BUILD_CUDA=1 "
                  "builds it anyway (about 11.5 min on 2 cores)", flush=True)
            return [], {}
    try:
        cuda_home = _check_cuda_toolchain()
    except CudaBuildUnavailable as exc:
        if mode == "force":
            raise RuntimeError(f"fastconv: FASTCONV_BUILD_CUDA=1 but cannot build the CUDA extension: {exc}")
        print(f"fastconv: skipping the CUDA extension: {exc}", flush=True)
        return [], {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    os.environ["MAX_JOBS"] = str(_parallel_jobs())  # read by torch's ninja driver
    system_includes = []
    for inc in _library_header_dirs(cuda_home):
        system_includes += ["-isystem", inc]

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    # No -std flag: BuildExtension appends the standard this torch's headers need: -std=c++17
    # on torch 2.11 (the GPU machine's), -std=c++20 on torch 2.14 (this workplace's);
    # csrc/ is valid in both.
    ext = CUDAExtension(
        name="fastconv._C",
        sources=sources,
        include_dirs=[CSRC],
        extra_compile_args={
            "cxx": ["-O3"] + system_includes,
            # No --use_fast_math: it swaps expf for __expf and breaks SiLU parity with PyTorch.
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + system_includes,
        },
    )
    _quiet_ninja()
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


def _unit_label(command):
    """'nvcc csrc/depthwise.cu' for one of ninja's compile commands."""
    tokens = command.split()
    # The token after the last `-c` that is not itself a flag: torch's nvcc rule reads
    # `... -c -c $in -o $out`.
    sources = [t for prev, t in zip(tokens, tokens[1:]) if prev == "-c" and not t.startswith("-")]
    source = sources[-1] if sources else tokens[-1]
    if source.startswith(ROOT + os.sep):
        source = os.path.relpath(source, ROOT)
    return ("nvcc " if "nvcc" in tokens[0] else "c++ ") + source


def _run_ninja_quietly(build_directory, verbose, error_prefix):
    """torch's _run_ninja_build, printing '[3/14] nvcc csrc/depthwise.cu' per unit instead of
    every 1.5 KB command line, and a failing unit's command and output in full."""
    command = ["ninja", "-v"]
    if os.environ.get("MAX_JOBS", "").isdigit():
        command += ["-j", os.environ["MAX_JOBS"]]
    sys.stdout.flush()
    proc = subprocess.Popen(command, cwd=build_directory, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    status = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
    failed, in_failure, warned, current = [], False, {}, None
    for line in proc.stdout:
        line = line.rstrip("\n")
        match = status.match(line)
        if match:
            # Piped (not a terminal), ninja prints a unit's status line when it finishes,
            # followed by that unit's compiler output.
            in_failure, current = False, _unit_label(match.group(3))
            print(f"[{match.group(1)}/{match.group(2)}] {current}", flush=True)
        elif line.startswith("FAILED: "):
            in_failure = True
            failed.append(line)
            print(f"FAILED: {current} (its output follows the build)", flush=True)
        elif in_failure or line.startswith("ninja: "):
            failed.append(line)
        elif current and re.search(r"warning( #\S+)?:", line):
            warned[current] = warned.get(current, 0) + 1
    rc = proc.wait()
    if warned:
        print(f"fastconv: compiler warnings hidden ({', '.join(f'{u}: {n}' for u, n in warned.items())}); "
              "FASTCONV_VERBOSE_BUILD=1 shows them", flush=True)
    if rc != 0:
        # setuptools prints the message: the failing units' commands and compiler output.
        raise RuntimeError(f"{error_prefix}: ninja exited with {rc}:\n" + "\n".join(failed))


def _quiet_ninja():
    """Route BuildExtension's ninja run through _run_ninja_quietly; with FASTCONV_VERBOSE_BUILD=1,
    through torch's own runner, verbose whatever setuptools' verbosity (`setup.py -q` makes it
    silent). Left alone when torch's helper has another signature than the (build_directory,
    verbose, error_prefix) of torch 2.11 and 2.14."""
    import inspect

    import torch
    import torch.utils.cpp_extension as cpp_extension

    original = getattr(cpp_extension, "_run_ninja_build", None)
    try:
        params = list(inspect.signature(original).parameters) if original else None
    except (TypeError, ValueError):
        params = None
    if params != ["build_directory", "verbose", "error_prefix"]:
        print(f"fastconv: torch {torch.__version__}'s ninja runner takes {params}, not "
              "(build_directory, verbose, error_prefix): torch's own output", flush=True)
        return
    if os.environ.get("FASTCONV_VERBOSE_BUILD", "") not in ("", "0"):
        cpp_extension._run_ninja_build = (
            lambda build_directory, verbose, error_prefix: original(build_directory, True, error_prefix))
        return
    cpp_extension._run_ninja_build = _run_ninja_quietly


# The top-level triton_kernels/ and benchmarks/ folders are installed *inside* the package,
# as fastconv.triton_kernels and fastconv.benchmarks: a top-level `triton_kernels` package
# would shadow the Triton project's package of that name, and an installed fastconv can then
# run its own benchmarks (`python -m fastconv.benchmarks.run`).
PACKAGE_DIR = {"fastconv.triton_kernels": "triton_kernels", "fastconv.benchmarks": "benchmarks"}


def _packages():
    packages = find_packages(include=["fastconv", "fastconv.*"])
    for name, folder in PACKAGE_DIR.items():
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return packages


def main():
    ext_modules, cmdclass = _cuda_extension()
    setup(
        name="fastconv",
        version="0.1.0",
        description="Fused Triton and CUDA C++ kernels for CNN convolution blocks in PyTorch",
        python_requires=">=3.10",
        packages=_packages(),
        package_dir=PACKAGE_DIR,
        package_data={"fastconv.benchmarks": ["*.md", "*.sh"]},
        install_requires=[
            "torch>=2.6",
            "triton>=3.2; sys_platform == 'linux'",
            "numpy",
            "tqdm",
            "matplotlib",
        ],
        extras_require={"test": ["pytest", "pytest-xdist", "hypothesis"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


# pip and `python setup.py` run this file as __main__; tests/test_setup.py imports it.
if __name__ == "__main__":
    main()
