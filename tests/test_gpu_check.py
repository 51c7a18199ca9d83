"""benchmarks/gpu_check.sh's plan, checked without a GPU: the steps in order of value, caps
that fit the budget, and no more outputs than come back from the GPU machine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")
# Most valuable first (issue 10): correctness, then memory errors, then the headline numbers.
ORDER = [
    "env", "build", "backends", "smoke", "memcheck", "bench-headline", "bench-model", "bench-compile",
    "gpu-tests", "racecheck", "bench-bn_act",
]
# What a run on the GPU machine returns: at most 8 files, at most 2 folders deep.
MAX_OUTPUTS = 8
# The default budget leaves a rerun on the warm machine inside its 15 minutes of device time.
DEFAULT_BUDGET_S = 540

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="gpu_check.sh needs bash")


def _plan(**env):
    base = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_BUDGET_S"}  # the default's
    out = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, timeout=30,
                         env={**base, **env})
    assert out.returncode == 0, f"gpu_check.sh --plan exited {out.returncode}: {out.stderr}"
    lines = out.stdout.splitlines()
    steps = [(m.group(1), int(m.group(2)))
             for m in (re.match(r"step (\S+) (\d+)s", line) for line in lines) if m]
    budget = int(re.match(r"budget (\d+)s", lines[0]).group(1))
    outputs = next(line for line in lines if line.startswith("outputs ")).split()[1:]
    return budget, steps, outputs


def test_plan_runs_the_steps_in_order_of_value():
    _, steps, _ = _plan()
    names = [name for name, _ in steps]
    assert names == ORDER, f"steps: expected {ORDER}, got {names}"


def test_plan_caps_fit_the_default_budget():
    budget, steps, _ = _plan()
    total = sum(cap for _, cap in steps)
    assert budget == DEFAULT_BUDGET_S, f"default budget: expected {DEFAULT_BUDGET_S} s, got {budget} s"
    assert total <= budget, f"caps: expected a sum within the {budget} s budget, got {total} s ({steps})"
    assert all(cap >= 10 for _, cap in steps), f"caps: expected each >= 10 s (a step under 10 s is not run), got {steps}"


def test_plan_reports_a_budget_from_the_environment():
    budget, _, _ = _plan(GPU_CHECK_BUDGET_S="300")
    assert budget == 300, f"GPU_CHECK_BUDGET_S=300: expected budget 300 s, got {budget} s"


def test_plan_outputs_fit_what_comes_back():
    _, _, outputs = _plan()
    assert len(outputs) <= MAX_OUTPUTS, f"outputs: expected at most {MAX_OUTPUTS}, got {len(outputs)}: {outputs}"
    assert all(o.count("/") <= 1 for o in outputs), f"outputs: expected at most 2 folders deep, got {outputs}"
    for required in ("gpu_check.log", "junit.xml", "summary.md"):
        assert required in outputs, f"outputs: expected {required} among them, got {outputs}"


def test_bad_arguments_are_refused():
    out = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, f"no arguments: expected exit 2, got {out.returncode}"
    assert "usage" in out.stderr, f"no arguments: expected a usage line, got {out.stderr!r}"
