"""The import graph runs one way: bottom modules, then kernels, then ops, then modules.

    fastconv._geometry, _affine, _validation, activations   import nothing above them
    triton_kernels/ (fastconv.triton_kernels)                 the bottom layer and Triton
    fastconv.reference, backends                              the bottom layer
    fastconv.ops                                              all of the above
    fastconv.nn                                               fastconv.ops
    fastconv.benchmarks, fastconv.demo                        anything

Read from the source with `ast`, not by importing, so a violation fails here even when the
offending import sits inside a function.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

BOTTOM = ("fastconv._geometry", "fastconv._affine", "fastconv._validation", "fastconv.activations")
ABOVE_KERNELS = ("fastconv.ops", "fastconv.nn", "fastconv.reference", "fastconv.backends", "fastconv.benchmarks", "fastconv.demo")


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, absolute or relative, at any depth of its code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def offending(path: pathlib.Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))


def python_files(folder: str) -> list[pathlib.Path]:
    return sorted((ROOT / folder).glob("*.py"))


@pytest.mark.parametrize("path", python_files("triton_kernels"), ids=lambda p: p.name)
def test_kernels_import_nothing_above_them(path):
    assert not offending(path, ABOVE_KERNELS), f"{path.name} imports {offending(path, ABOVE_KERNELS)}"


@pytest.mark.parametrize("name", BOTTOM)
def test_bottom_modules_import_only_the_bottom(name):
    path = ROOT / (name.replace(".", "/") + ".py")
    allowed = set(BOTTOM)
    above = [m for m in imported_modules(path) if m.startswith("fastconv") and not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not above, f"{name} imports {above}"


@pytest.mark.parametrize("name", ("fastconv/reference.py", "fastconv/backends.py"))
def test_reference_and_backends_stay_below_the_ops(name):
    forbidden = ("fastconv.ops", "fastconv.nn", "fastconv.benchmarks", "fastconv.demo")
    assert not offending(ROOT / name, forbidden)


@pytest.mark.parametrize("path", python_files("fastconv/ops"), ids=lambda p: p.name)
def test_ops_do_not_import_the_modules_or_benchmarks(path):
    assert not offending(path, ("fastconv.nn", "fastconv.benchmarks", "fastconv.demo"))


@pytest.mark.parametrize("path", python_files("fastconv/nn") + python_files("fastconv/models"), ids=lambda p: p.name)
def test_modules_and_models_do_not_import_the_benchmarks(path):
    assert not offending(path, ("fastconv.benchmarks", "fastconv.demo"))


def test_the_checker_sees_an_upward_import(tmp_path):
    """The test above cannot pass vacuously: a kernel file with a function-level import of the
    reference is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fastconv.reference import bn_act\n    import fastconv.ops.depthwise\n")
    assert offending(bad, ABOVE_KERNELS) == ["fastconv.ops.depthwise", "fastconv.reference", "fastconv.reference.bn_act"]


def test_no_symlink_links_the_kernels_into_the_package():
    """triton_kernels/ is installed as fastconv.triton_kernels by setuptools' package_dir."""
    assert not (ROOT / "fastconv" / "triton_kernels").is_symlink()
