"""Triton kernels. Each module defines AOT_SPECS = [(kernel, signature, constexprs), ...]:
representative specializations that tests compile ahead of time for sm_80 / sm_90."""
