"""Loads the compiled CUDA extension `fastconv._C`, and remembers why when it cannot.

`import fastconv` must never fail because the extension is missing: a CPU-only machine, a
torch without CUDA, or a build that skipped the extension all leave the `triton` and `torch`
backends working. The `cuda` backend then reports itself unavailable with this reason.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional


@functools.lru_cache(maxsize=None)
def load_extension() -> tuple[Optional[object], str]:
    """(the module, "") when `fastconv._C` loads and registers its ops; (None, why) otherwise."""
    try:
        module = importlib.import_module("fastconv._C")
    except ImportError as error:
        return None, (
            f"the extension fastconv._C is not built ({error}); "
            "build it in place with `FASTCONV_BUILD_CUDA=1 make build`"
        )
    return module, ""
