"""distripy.kernels: the fused Triton kernels, each beside its plain-torch reference.

Installed as the subpackage ``distripy.kernels`` from the top-level ``kernels/`` folder. One op per
file; on CUDA the Triton path runs, on CPU the reference; the tests run the Triton code on CPU
under ``TRITON_INTERPRET=1`` and compare it with the reference.
"""
