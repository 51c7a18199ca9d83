"""The fused inverted_residual kernel compiles for sm_90 without spilling, offline (no GPU).

The interpreter runs code that the compiler rejects (seen: a helper returning a tensor in one
constexpr branch and a float in the other passed every interpreted test, then failed to
compile), so the GPU's first run must not be the first compile. A subprocess (this file run as
a script, TRITON_INTERPRET=0: @triton.jit reads it at import) calls the real host function on
CPU tensors with the autotuner's launch captured, compiles the default config for
GPUTarget("cuda", 90, 32), and runs Triton's bundled ptxas -v on the PTX.

    .venv/bin/python tests/test_inverted_residual_compile.py [--all]   # the worker, as JSON
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


def _ptxas():
    import triton.backends.nvidia as nvidia

    path = Path(nvidia.__file__).parent / "bin" / "ptxas"
    return path if path.exists() else None


def _usage(ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        done = subprocess.run([str(_ptxas()), "-v", f"--gpu-name={arch}", str(source), "-o", str(source.with_suffix(".o"))],
                              capture_output=True, text=True, check=True)  # fmt: skip
    stores, loads, regs = (int(v) for v in _PTXAS.search(done.stderr + done.stdout).groups())
    return {"regs": regs, "spill_stores": stores, "spill_loads": loads}


def worker(every_config: bool) -> list[dict]:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    class OfflineDriver:  # Triton's launch path, targeting sm_90 with no device
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(OfflineDriver())
    launches = []

    def capture(self, *args, **kwargs):
        kwargs.pop("grid")
        kwargs.pop("warmup", None)
        launches.append((self, dict(zip(self.arg_names, args)), kwargs))

    Autotuner.run = capture
    from fastconv.triton_kernels import inverted_residual

    def call(dtype, expand, residual, stride=1, k=3):
        c_in, c_hid, c_out = (24, 144, 24) if expand else (64, 64, 128)
        cl = torch.channels_last
        x = torch.empty(8, c_in, 56, 56, dtype=dtype).contiguous(memory_format=cl)
        size = (56 - 1) // stride + 1
        out = torch.empty(8, c_out, size, size, dtype=dtype).contiguous(memory_format=cl)
        inverted_residual.fused_block(
            x, torch.empty(c_hid, c_in, dtype=dtype) if expand else None, torch.empty(c_hid) if expand else None,
            torch.empty(c_hid, k * k, dtype=dtype), torch.empty(c_hid), torch.empty(c_out, c_hid, dtype=dtype),
            torch.empty(c_out), out, (k, k), stride, ((k - 1) // 2, (k - 1) // 2), 1, 2 if expand else 0, 2,
            0 if expand else 2, x if residual else None,
        )  # fmt: skip

    cases = {
        "expand-fp16-residual": (torch.float16, True, True),
        "expand-bf16-s2": (torch.bfloat16, True, False, 2),
        "expand-fp32": (torch.float32, True, False),
        "separable-fp16-k5": (torch.float16, False, False, 1, 5),
    }
    rows = []
    for name, args in cases.items():
        launches.clear()
        call(*args)
        (tuner, nargs, kwargs), = launches
        for config in tuner.all_configs if every_config else tuner.all_configs[:1]:
            blocks = "x".join(str(v) for v in config.kwargs.values())
            row = {"case": name, "config": f"{blocks} w{config.num_warps} s{config.num_stages}"}
            try:
                compiled = tuner.fn.warmup(**nargs, **kwargs, **config.all_kwargs(), grid=(1,))
                row.update(_usage(compiled.asm["ptx"]))
            except Exception as error:  # noqa: BLE001 - reported per config
                row["error"] = f"{type(error).__name__}: {error}"[-2000:]
            rows.append(row)
    return rows


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="a GPU run compiles the kernel itself")
def test_default_config_compiles_for_sm90_without_spills(tmp_path):
    if _ptxas() is None:
        pytest.skip("Triton's NVIDIA backend has no bundled ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert rows and all("error" not in row for row in rows), json.dumps(rows, indent=1)
    spills = [row for row in rows if row["spill_stores"] or row["spill_loads"]]
    assert not spills, f"the default config spills on sm_90: {spills}"


if __name__ == "__main__":
    print(json.dumps(worker("--all" in sys.argv)))
