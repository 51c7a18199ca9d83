"""Where a result came from: device, versions, clocks, commit and date.

Every record carries these fields, so a number can always be traced to the
machine and the code that produced it (benchmarks/FLOORS.md, "How to time").
"""
import datetime
import os
import re
import subprocess
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device() -> str:
    """"cuda" when a GPU is usable, else "cpu" (timings then only smoke-test the harness)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if device() == "cuda" else "cpu"


def slug(name: str) -> str:
    """"NVIDIA H200" -> "nvidia-h200": a safe folder name for results/<gpu>/."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _run(cmd, cwd=None):
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str:
    """HEAD's hash, with "-dirty" when tracked or untracked source differs.

    benchmarks/results/ is excluded: writing results must not make the next run "dirty".
    """
    if os.environ.get("BENCH_COMMIT"):
        # For copies of the tree without .git (e.g. a benchmark machine): the caller says.
        return os.environ["BENCH_COMMIT"]
    head = _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if head is None:
        # No git, or a repository without commits yet.
        return "unknown"
    status = _run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"],
                  cwd=REPO_ROOT)
    return head + ("-dirty" if status else "")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
    }


def clocks() -> str | None:
    """SM and memory clocks at the start of the run; a throttled GPU explains odd numbers."""
    if device() != "cuda":
        return None
    return _run(["nvidia-smi", "--id=0", "--format=csv,noheader",
                 "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version"])


def l2_bytes() -> int:
    """The L2 size rotation must exceed; benchmarks/FLOORS.md gives 60 MB for the H200."""
    if device() == "cuda":
        size = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
        if size:
            return int(size)
    return 60 * 2**20


def collect() -> dict:
    """The fields copied into every record."""
    info = {"gpu": gpu_name(), "device": device(), "commit": commit(), "date": utc_now(),
            "clocks": clocks()}
    info.update(versions())
    if device() == "cuda":
        info["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    return info
