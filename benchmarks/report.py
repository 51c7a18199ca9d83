"""Human-readable output: the printed table, summary.md and the speedup plot.

All three are built from the records alone, so they can be redrawn from saved
JSON: ``python -m benchmarks.report OUTDIR`` (reads every *.json there).
"""
import glob
import math
import os
import sys
from collections import defaultdict

CPU_BANNER = ("CPU RUN - no CUDA device: tiny shapes and a perf_counter timer. These numbers only "
              "show that the harness works; they say nothing about kernel speed.")
CASE_FIELDS = ("case", "activation", "dtype", "layout", "mode")


def _fmt(v, spec=".4g"):
    return "-" if v is None else format(v, spec)


def geomean(values):
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _suites(records):
    return list(dict.fromkeys(r["suite"] for r in records))


def _baselines(records):
    return list(dict.fromkeys(r["baseline"] for r in records if r.get("baseline")))


def case_rows(records, suite):
    """Header and rows for one suite: one row per (case, backend), baselines as columns."""
    recs = [r for r in records if r["suite"] == suite]
    if suite == "ceilings":
        # FLOORS.md's figures are the H200's; elsewhere (a CPU run) the column shows "-".
        header = ["ceiling", "dtype", "ms", "GB/s", "TFLOP/s", "% of FLOORS.md H200"]
        return header, [[r["case"], r["dtype"], _fmt(r["ms"]), _fmt(r["gbps"], ".0f"),
                         _fmt(r["tflops"], ".1f"), _fmt(r.get("pct_of_reference"), ".3g")]
                        for r in recs]
    baselines = _baselines(recs)
    groups = defaultdict(dict)
    for r in recs:
        groups[tuple(r.get(k) for k in CASE_FIELDS) + (r["backend"],)][r["baseline"]] = r
    header = ["case", "act", "dtype", "layout", "mode", "backend", "ms"]
    for b in baselines:
        header += [f"{b} ms", f"x {b}"]
    header += ["GB/s", "% floor", "check"]
    memory = [f for f in ("peak_mb", "saved_mb_batch1", "saved_mb") if any(f in r for r in recs)]
    for field in memory:  # the dense and fused-block training suites: memory beside time, ours then each baseline's
        header += [field.replace("_", " ")] + [f"{b} {field.replace('_', ' ')}" for b in baselines]
    rows = []
    for key, by_bl in groups.items():
        any_r = next(iter(by_bl.values()))
        row = [str(k) for k in key[:-1]] + [key[-1], _fmt(any_r["ms"])]
        for b in baselines:
            r = by_bl.get(b)
            row += [_fmt(r and r["baseline_ms"]),
                    _fmt(r and r["speedup"], ".3g") if r and r["speedup"] else "-"]
        status = any_r.get("check", "")
        if any_r.get("error"):
            status = "ERROR: " + any_r["error"][:60]
        row += [_fmt(any_r["gbps"], ".0f"), _fmt(any_r["pct_of_floor"], ".0f"), status]
        for field in memory:
            row += [_fmt(any_r.get(field), ".4g")] + [_fmt((by_bl.get(b) or {}).get(f"baseline_{field}"), ".4g")
                                                      for b in baselines]  # fmt: skip
        rows.append(row)
    return header, rows


def text_table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line("-" * w for w in widths)] + [line(r) for r in rows])


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def geomean_rows(records):
    """One row per (suite, backend, baseline): the headline numbers."""
    groups = defaultdict(list)
    for r in records:
        if r.get("baseline"):
            groups[(r["suite"], r["backend"], r["baseline"])].append(r)
    header = ["suite", "backend", "baseline", "cases", "geomean speedup", "min", "max",
              "geomean % floor", "baseline % floor", "errors"]
    rows = []
    for (suite, backend, baseline), recs in groups.items():
        sp = [r["speedup"] for r in recs if r["speedup"]]
        errors = sum(1 for r in recs if r.get("error") or r.get("check") == "mismatch")
        rows.append([suite, backend, baseline, len(sp), _fmt(geomean(sp), ".3g"),
                     _fmt(min(sp) if sp else None, ".3g"), _fmt(max(sp) if sp else None, ".3g"),
                     _fmt(geomean([r["pct_of_floor"] for r in recs]), ".0f"),
                     _fmt(geomean([r["baseline_pct_of_floor"] for r in recs]), ".0f"), errors])
    return header, rows


def problems(records):
    """Lines for failed backends, failed baselines and mismatches (deduplicated)."""
    out = []
    for r in records:
        label = " ".join(str(r.get(k)) for k in ("suite",) + CASE_FIELDS)
        if r.get("error"):
            out.append(f"{label} {r['backend']}: {r['error']}")
        if r.get("check") == "mismatch":
            out.append(f"{label} {r['backend']}: result mismatch, max abs err {r['max_abs_err']:.3g}"
                       f" (eager in the same dtype: {r.get('eager_max_abs_err', float('nan')):.3g})")
        if r.get("baseline_error"):
            out.append(f"{label} baseline {r['baseline']}: {r['baseline_error']}")
    return list(dict.fromkeys(out))


NOTES_HEADING = "## Notes, skips and failures"


def notes_in_summary(path):
    """The notes a summary.md written by summary_markdown lists, in order; [] without one."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    if NOTES_HEADING not in lines:
        return []
    notes = []
    for line in lines[lines.index(NOTES_HEADING) + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("- "):
            notes.append(line[2:])
    return notes


def summary_markdown(records, env, notes=()):
    lines = ["# fastconv benchmark summary", ""]
    if env.get("device") == "cpu":
        lines += [f"> **{CPU_BANNER}**", ""]
    fields = ["gpu", "clocks", "torch", "triton", "cuda", "cudnn", "python", "commit", "date"]
    lines += [md_table(fields, [[_fmt(env.get(f), "") for f in fields]]), ""]
    lines += ["## Geomean speedup per (suite, backend, baseline)", "",
              "speedup = baseline ms / backend ms; % floor = floor ms / ms * 100, the floor from "
              "this run's measured ceilings.", ""]
    ceil = [f"{r['case']} {r['dtype']}: " + (f"{r['gbps']:.0f} GB/s" if r.get("gbps") else
                                             f"{r['tflops']:.1f} TFLOP/s")
            for r in records if r["suite"] == "ceilings" and r.get("ms")]
    if ceil:
        lines += ["Ceilings measured in this run: " + "; ".join(ceil) + ".", ""]
    lines += [md_table(*geomean_rows(records)), ""]
    trouble = list(dict.fromkeys(list(notes) + problems(records)))
    if trouble:
        lines += [NOTES_HEADING, ""] + [f"- {t}" for t in trouble] + [""]
    lines += ["## Per case", ""]
    for suite in _suites(records):
        lines += [f"### {suite}", "", md_table(*case_rows(records, suite)), ""]
    return "\n".join(lines)


def short_summary(records, env):
    """The few lines worth reading last in a log."""
    head = [CPU_BANNER] if env.get("device") == "cpu" else []
    return "\n".join(head + [f"{env.get('gpu')} | torch {env.get('torch')} | triton "
                             f"{env.get('triton')} | commit {env.get('commit')}",
                             text_table(*geomean_rows(records))])


def plot_speedups(records, path):
    """Horizontal bars: speedup of each backend over each baseline, one panel per
    (suite, baseline), one bar group per case. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return None
    panels = [(s, b) for s in _suites(records) if s != "ceilings"
              for b in _baselines([r for r in records if r["suite"] == s])]
    if not panels:
        return None
    heights = []
    for s, b in panels:
        heights.append(len({tuple(r.get(k) for k in CASE_FIELDS)
                            for r in records if r["suite"] == s and r["baseline"] == b}))
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(9, sum(1.2 + 0.28 * h for h in heights)),
                             gridspec_kw={"height_ratios": [max(h, 2) for h in heights]})
    for ax, (suite, baseline) in zip(axes[:, 0], panels):
        recs = [r for r in records if r["suite"] == suite and r["baseline"] == baseline]
        cases = list(dict.fromkeys(tuple(r.get(k) for k in CASE_FIELDS) for r in recs))
        backends = list(dict.fromkeys(r["backend"] for r in recs))
        bar_h = 0.8 / max(1, len(backends))
        for i, backend in enumerate(backends):
            by_case = {tuple(r.get(k) for k in CASE_FIELDS): r["speedup"]
                       for r in recs if r["backend"] == backend and r["speedup"]}
            present = [(j, by_case[c]) for j, c in enumerate(cases) if c in by_case]
            # Bars grow from 1x: left for slower, right for faster than the baseline.
            ax.barh([j + i * bar_h for j, _ in present], [v - 1 for _, v in present], left=1,
                    height=bar_h, label=backend)
        values = [r["speedup"] for r in recs if r["speedup"]] + [1.0]
        ax.set_xlim(min(values) / 1.3, max(values) * 1.3)
        # Log scale: a 0.5x and a 2x bar are equally long.
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yticks([j + 0.4 - bar_h / 2 for j in range(len(cases))])
        ax.set_yticklabels([" ".join(str(v) for v in c) for c in cases], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"speedup over {baseline} (higher is better)")
        where = recs[0].get("gpu")
        if recs[0].get("device") == "cpu":
            where = "CPU RUN, harness check only, not kernel speed"
        ax.set_title(f"{suite} vs {baseline} - {where}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    # Written whole, then renamed: a run killed mid-write keeps the previous plot.
    fig.savefig(path + ".tmp", dpi=110, format="png")
    os.replace(path + ".tmp", path)
    plt.close(fig)
    return path


def plot_memory(records, path):
    """The dense suite's memory against depth: one line per implementation, the CPU-counted
    saved bytes at batch 1 and, from a GPU run, the measured peak of a training step.
    Returns the path, or None without matplotlib or depth records."""
    recs = [r for r in records if r["suite"] == "dense" and r["mode"] == "depth"]
    if not recs:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(f, title) for f, title in (("saved_mb_batch1", "saved for backward, batch 1, fp32 (counted)"),
                                          ("peak_mb", "peak of a training step (measured)"))
              if any(r.get(f) for r in recs)]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(5.5 * len(panels), 4))
    for ax, (field, title) in zip(axes[0], panels):
        lines = {"fastconv": {}}
        for r in recs:
            lines["fastconv"][r["layers"]] = r.get(field)
            lines.setdefault(r["baseline"], {})[r["layers"]] = r.get(f"baseline_{field}")
        for name, points in lines.items():
            xs = sorted(k for k, v in points.items() if v)
            if xs:
                ax.plot(xs, [points[k] for k in xs], marker="o", label=name)
        batch = recs[0].get("batch")
        ax.set_title(title if field != "peak_mb" else f"{title}, batch {batch}", fontsize=9)
        ax.set_xlabel("dense layers (DenseNet-BC 121/169/201/264)")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=110, format="png")
    os.replace(path + ".tmp", path)
    plt.close(fig)
    return path


def main(argv=None):
    """Redraw summary.md and the plot from saved JSON records in OUTDIR."""
    from .records import read_json
    out = (argv or sys.argv[1:] or ["."])[0]
    records = [r for p in sorted(glob.glob(os.path.join(out, "*.json"))) for r in read_json(p)]
    if not records:
        print(f"no records in {out}", file=sys.stderr)
        return 1
    env = records[0]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(records, env))
    plot_speedups(records, os.path.join(out, "speedup.png"))
    plot_memory(records, os.path.join(out, "memory.png"))
    print(short_summary(records, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
