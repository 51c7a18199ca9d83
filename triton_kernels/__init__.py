"""Triton kernels of fastconv, one module per op family.

Installed as `fastconv.triton_kernels` (setup.py's package_dir maps this folder there), never
as a top-level `triton_kernels`, which would shadow the Triton project's package of that name.
These modules import only torch, Triton and fastconv's bottom layer (fastconv._geometry,
fastconv._affine): tests/test_layering.py fails otherwise.
"""
