"""Triton kernels for CUDA (installed as scm_fast.kernels), one fused op per module."""
