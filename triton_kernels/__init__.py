"""Triton kernels of fastconv, one module per op family.

Installed as `fastconv.triton_kernels` (`fastconv/triton_kernels` links here), never as a
top-level `triton_kernels`, which would shadow the Triton project's package of that name.
"""
