"""setup.py without a GPU: the package layout a wheel gets, the build's gate and its quiet
ninja runner."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastconv_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


@pytest.fixture(scope="module")
def setup_py():
    return _load_setup()


def test_triton_kernels_and_benchmarks_are_subpackages(setup_py):
    packages = setup_py._packages()
    for name in ("fastconv", "fastconv.triton_kernels", "fastconv.benchmarks", "fastconv.benchmarks.suites"):
        assert name in packages, f"packages: expected {name} among them, got {packages}"
    top = sorted({p.split(".")[0] for p in packages})
    # A top-level triton_kernels would shadow the Triton project's package of that name.
    assert top == ["fastconv"], f"top-level packages: expected ['fastconv'], got {top}"


@pytest.mark.skipif(importlib.util.find_spec("pip") is None, reason="building a wheel needs pip")
def test_wheel_holds_the_kernels_and_the_benchmarks(tmp_path):
    # A copy of the sources, so the build's own build/ folder stays out of the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "results", "*.so", "triton_kernels", "benchmarks")
    for name in ("fastconv", "triton_kernels", "benchmarks"):
        shutil.copytree(os.path.join(ROOT, name), src / name,
                        ignore=ignore if name == "fastconv" else shutil.ignore_patterns("__pycache__", "results"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-qq", "--no-deps", "--no-build-isolation", str(src),
         "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "FASTCONV_BUILD_CUDA": "0"},
    )
    assert out.returncode == 0, f"pip wheel: expected exit 0, got {out.returncode}:\n{out.stdout}\n{out.stderr}"
    (wheel,) = (tmp_path / "wheel").glob("fastconv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kernel in os.listdir(os.path.join(ROOT, "triton_kernels")):
        if kernel.endswith(".py"):
            assert f"fastconv/triton_kernels/{kernel}" in names, f"wheel: expected fastconv/triton_kernels/{kernel}"
    for path in ("fastconv/benchmarks/run.py", "fastconv/benchmarks/suites/__init__.py",
                 "fastconv/benchmarks/FLOORS.md", "fastconv/benchmarks/gpu_check.sh"):
        assert path in names, f"wheel: expected {path}, got {sorted(n for n in names if 'benchmarks' in n)}"
    stray = sorted(n for n in names if n.split("/")[0] in ("triton_kernels", "benchmarks"))
    assert not stray, f"wheel: expected no top-level triton_kernels/ or benchmarks/, got {stray}"


def test_auto_build_without_a_gpu_says_why_in_one_line(setup_py, monkeypatch, capsys):
    monkeypatch.delenv("FASTCONV_BUILD_CUDA", raising=False)
    monkeypatch.setattr(setup_py, "_visible_gpu", lambda: "no GPU visible (test)")
    assert setup_py._cuda_extension() == ([], {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "no GPU visible (test)" in lines[0], f"expected one line with the reason, got {lines}"


def test_build_mode_names_the_variable_and_the_value(setup_py, monkeypatch):
    monkeypatch.setenv("FASTCONV_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match=r"FASTCONV_BUILD_CUDA must be 0, 1 or unset, got 'yes'"):
        setup_py._build_mode()


def test_unit_label_names_the_source(setup_py):
    nvcc = (f"/usr/local/cuda/bin/nvcc -MD -MF x.o.d -I{ROOT}/csrc -c -c {ROOT}/csrc/depthwise.cu "
            "-o /b/depthwise.o -O3")
    assert setup_py._unit_label(nvcc) == "nvcc csrc/depthwise.cu"
    cxx = f"c++ -MMD -MF y.o.d -c {ROOT}/csrc/registration.cpp -o /b/registration.o -O3"
    assert setup_py._unit_label(cxx) == "c++ csrc/registration.cpp"


@pytest.mark.skipif(shutil.which("ninja") is None, reason="needs ninja")
def test_quiet_ninja_prints_a_line_per_unit_and_a_failure_in_full(setup_py, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "1")
    (tmp_path / "build.ninja").write_text(
        "rule cc\n  command = sh -c 'echo \"$in(1): warning #1-D: noise\"; test $in != bad.c || "
        "{ echo \"$in(2): error: broken\"; exit 1; }; touch $out' -c $in\n"
        "build good.o: cc good.c\nbuild bad.o: cc bad.c\n"
    )
    for name in ("good.c", "bad.c"):
        (tmp_path / name).write_text("")
    with pytest.raises(RuntimeError) as error:
        setup_py._run_ninja_quietly(str(tmp_path), False, "Error compiling objects for extension")
    printed = capsys.readouterr().out
    assert "bad.c(2): error: broken" in str(error.value), f"expected the failing unit's output, got {error.value}"
    assert "error: broken" not in printed, f"expected the failure's output once, in the error, got {printed!r}"
    assert "FAILED: c++ bad.c" in printed and "warning" in printed, printed
    assert "noise" not in printed, f"expected warnings counted, not shown, got {printed!r}"
