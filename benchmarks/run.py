"""Command line: ``python -m benchmarks.run [suite ...] [--quick] [--out DIR] [--dtype ...]``.

Runs the ceilings first (they are the floor denominators), then each suite's
cases under a progress bar; writes JSON records, summary.md and speedup.png to
--out (default benchmarks/results/<gpu-slug>/), prints the per-case tables and
ends with the geomean summary. The records are rewritten after every case, and
summary.md and the plot after every suite, so a run cut short (a timeout's
SIGINT or SIGTERM) keeps what it measured. With --merge and --single-file, the
records already in --out/records.json stay, each replaced by a new record of the
same key: several runs (gpu_check.sh's steps) add up to one summary.

Exit status: 0 when every case ran and every fastconv result matched the
reference; 1 when a case raised, a backend failed or a result mismatched (a
failing torch.compile baseline is recorded, not counted); 2 for bad arguments.
"""
import argparse
import os
import signal
import sys
import time
import traceback

from . import environment, report
from .records import KEY_FIELDS, read_json, write_json
from .suites import Context, load_all

DTYPE_CHOICES = ("fp16", "bf16", "fp32")
BACKEND_CHOICES = ("cuda", "triton", "torch", "auto")


def _progress(total):
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit="case", mininterval=1.0, dynamic_ncols=True)
    except ImportError:  # bare benchmark machines may lack tqdm; a plain counter will do
        class Plain:
            n = 0
            def set_description(self, s): print(f"[{self.n + 1}/{total}] {s}", flush=True)
            def update(self, k): self.n += k
            def write(self, s): print(s, flush=True)
            def close(self): pass
        return Plain()


def _split(values):
    """--dtype fp16,bf16 and --dtype fp16 bf16 both work."""
    return [v for item in values or [] for v in item.split(",") if v] or None


def parse_args(argv, suite_names):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", metavar="suite",
                   help=f"suites to run (default: all): {', '.join(suite_names)}")
    p.add_argument("--quick", action="store_true", help="fewer shapes and dtypes, shorter timing")
    p.add_argument("--out", help="output folder (default benchmarks/results/<gpu-slug>/)")
    p.add_argument("--dtype", action="append", help=f"restrict dtypes: {', '.join(DTYPE_CHOICES)}")
    p.add_argument("--backend", action="append",
                   help=f"fastconv backends to time: {', '.join(BACKEND_CHOICES)} "
                        "(default: cuda, triton, auto where available)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="time the torch.compile baseline (default on a GPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile baseline (default on the CPU: compiling C++ is slow)")
    p.add_argument("--single-file", action="store_true",
                   help="write all records to one records.json instead of <suite>.json")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new case after S seconds; outputs are still written")
    p.add_argument("--merge", action="store_true",
                   help="with --single-file: keep the records already in OUT/records.json "
                        "(a new record replaces the old one of the same key)")
    p.add_argument("--list", action="store_true", help="list suites and exit")
    args = p.parse_args(argv)
    args.dtype, args.backend = _split(args.dtype), _split(args.backend)
    for value, choices, flag in ((args.dtype, DTYPE_CHOICES, "--dtype"),
                                 (args.backend, BACKEND_CHOICES, "--backend")):
        bad = sorted(set(value or []) - set(choices))
        if bad:
            p.error(f"{flag}: unknown {bad}; choose from {list(choices)}")
    bad = sorted(set(args.suites) - set(suite_names))
    if bad:
        p.error(f"unknown suite(s) {bad}; known: {suite_names}")
    if args.merge and not args.single_file:
        p.error("--merge: expected --single-file too (it merges into OUT/records.json), got "
                "--merge alone")
    return args


def default_out(gpu):
    """benchmarks/results/<gpu-slug>/ in a repository checkout; ./benchmark-results/<gpu-slug>/
    for an installed package (python -m fastconv.benchmarks.run), not inside site-packages."""
    if os.path.exists(os.path.join(environment.REPO_ROOT, "setup.py")):
        return os.path.join(environment.REPO_ROOT, "benchmarks", "results", environment.slug(gpu))
    return os.path.join(os.getcwd(), "benchmark-results", environment.slug(gpu))


class _Stopped(BaseException):  # not Exception: suites catch those per case and go on
    pass


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_on_signals():
    """timeout(1) sends SIGTERM, or SIGINT (gpu_check.sh); turn either into an exception so the
    outputs are still written. SIGINT too, explicitly: a process a shell starts in the
    background inherits SIGINT ignored, and Python then raises no KeyboardInterrupt (timeout(1)
    itself resets it for its command). Returns the handlers to restore, or None where none was
    set."""
    def handler(signum, frame):
        raise _Stopped(f"signal {signum}")
    try:
        return {s: signal.signal(s, handler) for s in _STOP_SIGNALS}
    except ValueError:  # not the main thread (main() called from a test runner's thread)
        return None


def main(argv=None) -> int:
    registry = load_all()
    try:
        args = parse_args(argv, list(registry))
    except SystemExit as exc:  # argparse exits; callers of main() get a status instead
        return int(exc.code or 0)
    if args.list:
        print("\n".join(registry))
        return 0

    env = environment.collect()
    device = env["device"]
    # Ceilings always run first: every floor in this run is measured against them.
    names = ["ceilings"] + [n for n in (args.suites or registry) if n != "ceilings"]
    ctx = Context(device=device, quick=args.quick, env=env, dtypes=args.dtype,
                  backends=args.backend,
                  compile=device == "cuda" if args.compile is None else args.compile,
                  l2_bytes=environment.l2_bytes())
    if not ctx.compile:
        ctx.notes.append("torch.compile baseline not run"
                         + (" (CPU default; pass --compile)" if device == "cpu" else ""))
    out = args.out or default_out(env["gpu"])
    previous = []
    if args.merge and os.path.exists(os.path.join(out, "records.json")):
        previous = read_json(os.path.join(out, "records.json"))
        # The earlier runs' notes (skips, budgets) live only in their summary.md.
        ctx.notes += [n for n in report.notes_in_summary(os.path.join(out, "summary.md"))
                      if n not in report.problems(previous)]
    if device == "cpu":
        print(f"*** {report.CPU_BANNER} ***", flush=True)
    print(f"device: {env['gpu']} | torch {env['torch']} | triton {env['triton']} | "
          f"cuda {env['cuda']} | cudnn {env['cudnn']} | commit {env['commit']} | out: {out}",
          flush=True)

    work = [(registry[n], c) for n in names for c in registry[n].cases(ctx)]
    records, failures, skipped = [], 0, 0
    start = time.monotonic()
    bar = _progress(len(work))
    seen_errors = set()
    old_handlers = _stop_on_signals()
    try:
        for i, (suite, case) in enumerate(work):
            if args.time_budget is not None and time.monotonic() - start > args.time_budget:
                skipped += 1
                bar.update(1)
                continue
            bar.set_description(f"{suite.name} {suite.describe(case)}")
            try:
                records += suite.run_case(case, ctx)
            except Exception as exc:
                failures += 1
                msg = f"{suite.name} {suite.describe(case)}: {type(exc).__name__}: {exc}"
                ctx.notes.append(msg.splitlines()[0][:400])
                key = (suite.name, type(exc).__name__, str(exc)[:200])
                if key not in seen_errors:  # one traceback per distinct error, not per case
                    seen_errors.add(key)
                    bar.write(f"FAILED {msg}\n{traceback.format_exc()}")
            finally:
                _free(device)
            # Records so far, after every case: a run killed by its caller's timeout (a long
            # max-autotune compile past --time-budget) still leaves what it measured.
            _write_records(_merged(previous, records), out, args.single_file, names)
            bar.update(1)
            if i + 1 == len(work) or work[i + 1][0] is not suite:
                # The suite's last case: its summary and plot now, not only at the very end.
                _write(_merged(previous, records), ctx, out, args.single_file, names, quiet=True)
    except (KeyboardInterrupt, _Stopped) as exc:
        failures += 1
        ctx.notes.append(f"interrupted ({type(exc).__name__} {exc}) after "
                         f"{time.monotonic() - start:.0f} s: the later cases did not run")
    finally:
        for signum, old in (old_handlers or {}).items():
            signal.signal(signum, old)
    bar.close()
    if skipped:
        ctx.notes.append(f"time budget of {args.time_budget:.0f} s reached: {skipped} case(s) not run")

    _write(_merged(previous, records), ctx, out, args.single_file, names)
    for suite in dict.fromkeys(r["suite"] for r in records):
        print(f"\n== {suite} ==\n" + report.text_table(*report.case_rows(records, suite)))
    for note in ctx.notes:
        print(f"note: {note}")
    print("\n" + report.short_summary(records, env), flush=True)
    bad = [r for r in records if r.get("error") or r.get("check") == "mismatch"]
    return 1 if failures or bad else 0


def _free(device):
    # Drop the case's tensors before the next case allocates its own (GB-sized on the GPU).
    import gc
    gc.collect()
    if device == "cuda":
        import torch
        torch.cuda.empty_cache()


def _key(record):
    return tuple(record.get(k) for k in KEY_FIELDS)


def _merged(previous, records):
    """The earlier runs' records, less those this run measured again, then this run's."""
    if not previous:
        return records
    fresh = {_key(r) for r in records}
    return [r for r in previous if _key(r) not in fresh] + records


def _write_records(records, out, single_file, names):
    os.makedirs(out, exist_ok=True)
    if single_file:
        write_json(records, os.path.join(out, "records.json"))
    else:
        for name in names:
            recs = [r for r in records if r["suite"] == name]
            if recs:
                write_json(recs, os.path.join(out, f"{name}.json"))


def _write(records, ctx, out, single_file, names, quiet=False):
    _write_records(records, out, single_file, names)
    summary = os.path.join(out, "summary.md")
    # Written whole, then renamed, as the records are: a kill mid-write keeps the last one.
    with open(summary + ".tmp", "w") as f:
        f.write(report.summary_markdown(records, ctx.env, ctx.notes))
    os.replace(summary + ".tmp", summary)
    png = report.plot_speedups(records, os.path.join(out, "speedup.png"))
    report.plot_memory(records, os.path.join(out, "memory.png"))  # the dense suite's, when it ran
    if not quiet:
        print(f"wrote {out}: {'records.json' if single_file else '<suite>.json'}, summary.md"
              + (", speedup.png" if png else " (no plot: matplotlib missing or nothing to plot)"))


if __name__ == "__main__":
    sys.exit(main())
