"""Kernel sources used by dit_fast.ops (Triton kernels in dit_fast.kernels.triton)."""
