"""The benchmark harness runs end to end on the CPU and writes well-formed records."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.run import main

REQUIRED_FIELDS = {
    "suite", "case", "dtype", "layout", "mode", "backend", "ms", "baseline", "baseline_ms",
    "speedup", "pct_of_floor", "gpu", "torch", "triton", "cuda", "cudnn", "commit", "date",
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks run in gpu_check.sh's own step")
@pytest.mark.parametrize("suite", ["bn_act", "depthwise", "pointwise", "conv_bn_act", "fused_blocks", "dense"])
def test_quick_cpu_run_writes_records_summary_and_plot(tmp_path, suite):
    assert main([suite, "--quick", "--backend", "auto", "--single-file", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "records.json").read_text())
    ours = [r for r in records if r["suite"] == suite]
    assert ours, f"no {suite} records"
    for record in ours:
        missing = REQUIRED_FIELDS - set(record)
        assert not missing, f"record lacks {sorted(missing)}: {record}"
        assert record["gpu"] == "cpu"
        if record["mode"] == "depth":  # the dense suite's memory-only records: counted, not timed
            assert record["ms"] is None and record["saved_mb_batch1"] > 0
            continue
        assert record["check"] == "ok"
        assert record["speedup"] == record["baseline_ms"] / record["ms"]
        assert "gbps" in record or "tflops" in record
    assert "CPU" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "speedup.png").stat().st_size > 0


def test_unknown_suite_is_refused():
    assert main(["no_such_suite"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks run in gpu_check.sh's own step")
def test_merged_runs_add_up_to_one_summary(tmp_path):
    args = ["ceilings", "--quick", "--single-file", "--out", str(tmp_path)]
    assert main(args) == 0
    first = json.loads((tmp_path / "records.json").read_text())
    # A second run that measures nothing (a spent budget) keeps the first run's records.
    assert main(args + ["--merge", "--time-budget", "0"]) == 0
    kept = json.loads((tmp_path / "records.json").read_text())
    assert [r["case"] for r in kept] == [r["case"] for r in first], f"expected the first run's records, got {kept}"
    summary = (tmp_path / "summary.md").read_text()
    assert "time budget of 0 s reached" in summary and "torch.compile baseline not run" in summary, summary
    # A run that measures again replaces each record of the same key.
    assert main(args + ["--merge"]) == 0
    again = json.loads((tmp_path / "records.json").read_text())
    assert len(again) == len(first), f"expected {len(first)} records after a re-run, got {len(again)}"


def test_merge_needs_single_file():
    assert main(["ceilings", "--merge"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the reference is shown")
def test_cpu_ceilings_are_not_compared_with_the_h200(tmp_path):
    assert main(["ceilings", "--quick", "--single-file", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "records.json").read_text())
    assert all(r["pct_of_reference"] is None for r in records), records
    assert "% of FLOORS.md H200" in (tmp_path / "summary.md").read_text()
