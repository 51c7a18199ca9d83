"""Benchmark records: one flat dict per (case, backend, baseline), saved as JSON.

Derived fields (speedup, GB/s, % of floor) are computed here, in one place, so
every suite reports them the same way.
"""
import json
import os

# Fields that identify a result; everything else is a measurement or provenance.
KEY_FIELDS = ("suite", "case", "activation", "dtype", "layout", "mode", "backend", "baseline")
ENV_FIELDS = ("gpu", "device", "torch", "triton", "cuda", "cudnn", "python", "commit", "date",
              "clocks", "sm_count")


def _ratio(a, b):
    return a / b if a is not None and b else None


def make_record(env: dict, *, suite, case, dtype, layout, mode, backend, ms,
                baseline=None, baseline_ms=None, bytes_moved=None, flops=None,
                floor_ms=None, **extra) -> dict:
    """Build one record.

    bytes_moved: the ideal traffic (what the floor counts), so gbps is "effective"
      bandwidth and comparable across implementations.
    floor_ms: max(bytes / copy bandwidth, flops / matmul rate) from this run's ceilings.
    """
    rec = {
        "suite": suite, "case": case, "dtype": dtype, "layout": layout, "mode": mode,
        "backend": backend, "ms": ms,
        "baseline": baseline, "baseline_ms": baseline_ms,
        "speedup": _ratio(baseline_ms, ms),
        "gbps": _ratio(bytes_moved, ms * 1e6 if ms else None) if bytes_moved else None,
        "tflops": _ratio(flops, ms * 1e9 if ms else None) if flops else None,
        "floor_ms": floor_ms,
        "pct_of_floor": _ratio(floor_ms * 100 if floor_ms else None, ms),
        "baseline_pct_of_floor": _ratio(floor_ms * 100 if floor_ms else None, baseline_ms),
        "bytes": bytes_moved, "flops": flops,
    }
    rec.update(extra)
    for k in ENV_FIELDS:
        rec[k] = env.get(k)
    return rec


def write_json(records, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Written whole, then renamed: a run killed mid-write leaves the previous file intact.
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(path + ".tmp", path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
