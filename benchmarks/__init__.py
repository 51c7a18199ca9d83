"""Benchmarks for fastconv: ``python -m benchmarks.run [suite ...]``.

See benchmarks/README.md for usage and benchmarks/NOTES.md for how to read results.
"""
