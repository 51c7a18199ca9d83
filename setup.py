"""Build script for fastconv.

The Python/Triton part is pure Python. The optional CUDA extension ``fastconv._C``
(csrc/) is compiled whenever torch is a CUDA build and nvcc is available; a GPU is
never needed to *build* it. Control with FASTCONV_BUILD_CUDA: 0 = skip, 1 = required
(fail loudly), unset = auto (skip with a one-line reason).
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
    # No -std flag: BuildExtension appends the standard this torch's headers need (C++17 on
    # older releases, C++20 since torch 2.10's headers use <compare>); csrc/ is valid in both.
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
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


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
    extras_require={"test": ["pytest", "hypothesis"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
