"""`python -m fastconv bench ...` (fastconv/bench.py) and `python -m fastconv demo` (fastconv/demo.py)."""

import sys

USAGE = """usage: python -m fastconv {bench,demo} [options]

  bench   a whole model, optimised, against eager PyTorch and torch.compile (--help for options)
  demo    what `make demo` runs: a short bench on a GPU, an optimize-and-check demo on a CPU"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from fastconv import bench

        return bench.main(rest)
    if command == "demo":
        from fastconv import demo

        return demo.main(rest)
    print(f"python -m fastconv: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
