"""Shared helpers of tests/test_patchify.py, test_adaln.py and test_sampler_step.py: which
(backend, device) pairs to test here, and skipping with the backend registry's reason."""

import os

import pytest
import torch

from dit_fast import _backends
from dit_fast._backends import use_backend

HAS_CUDA = torch.cuda.is_available()
HAS_C = _backends._probe("cpu") is None
# Triton runs under its interpreter on CPU tensors when there is no GPU (tests/conftest.py sets
# TRITON_INTERPRET=1); the registry lets a *forced* triton backend take CPU tensors then.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


def backend_devices():
    """(backend, device of the tensors it is tested on)."""
    bd = [("reference", "cpu"), ("cpu", "cpu")]
    if HAS_CUDA:
        bd += [("triton", "cuda"), ("cuda", "cuda"), ("reference", "cuda")]
    else:
        bd += [("triton", "cpu") if TRITON_INTERPRET else ("triton", "cuda"), ("cuda", "cuda")]
    return bd


BACKEND_DEVICES = backend_devices()
BD_IDS = [f"{b}-{d}" for b, d in BACKEND_DEVICES]


def require(op: str, backend: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    """Skips unless the forced `backend` can run `op` on `dtype` tensors on `device`."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    with use_backend(backend):
        try:
            _backends.select(op, torch.empty(0, device=device, dtype=dtype))
        except RuntimeError as e:
            pytest.skip(str(e))


def interpreted(backend: str, device: str) -> bool:
    """True for Triton under its (slow) interpreter: keep shapes tiny."""
    return backend == "triton" and device == "cpu"
