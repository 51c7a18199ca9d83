"""Suite registry.

A suite is one file in this folder that calls ``register(Suite(...))``; it is
found automatically, so adding a benchmark (depthwise, pointwise, conv_bn_act)
touches no other file.

A suite gives a list of cases (so the progress bar knows the total) and a
function that runs one case and returns its records.
"""
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

_REGISTRY: dict = {}


@dataclass
class Context:
    """What every suite needs to know about this run."""
    device: str                    # "cuda" or "cpu"
    quick: bool
    env: dict                      # environment.collect(), copied into records
    dtypes: list | None = None     # names ("fp16", ...) requested with --dtype, else suite default
    backends: list | None = None   # fastconv backends requested with --backend, else all available
    compile: bool = True           # run the torch.compile baseline
    l2_bytes: int = 60 * 2**20
    ceilings: dict = field(default_factory=dict)  # copy_gbps, matmul_tflops (filled first)
    notes: list = field(default_factory=list)     # one-off remarks for the summary (skips, ...)

    def floor_ms(self, bytes_moved=0, flops=0):
        """max(bytes / copy bandwidth, flops / matmul rate); None without ceilings."""
        terms = []
        if bytes_moved:
            if not self.ceilings.get("copy_gbps"):
                return None
            terms.append(bytes_moved / (self.ceilings["copy_gbps"] * 1e6))
        if flops:
            if not self.ceilings.get("matmul_tflops"):
                return None
            terms.append(flops / (self.ceilings["matmul_tflops"] * 1e9))
        return max(terms) if terms else None


@dataclass
class Suite:
    name: str
    cases: Callable[[Context], list]           # -> list of case objects
    run_case: Callable[[Any, Context], list]   # (case, ctx) -> list of record dicts
    describe: Callable[[Any], str] = str       # short case label for the progress bar
    order: int = 100                           # lower runs first; ceilings is 0


def register(suite: Suite) -> Suite:
    if suite.name in _REGISTRY:
        raise ValueError(f"suite {suite.name!r} registered twice")
    _REGISTRY[suite.name] = suite
    return suite


def load_all() -> dict:
    """Import every module in this package (each registers itself); name -> Suite."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))
