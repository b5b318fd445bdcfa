import functools
import os
from pathlib import Path

# Triton kernels run under Triton's interpreter on machines without a GPU. TRITON_INTERPRET must be
# set before any @triton.jit kernel module is imported, hence here, at the top of conftest.
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

GOLDEN = Path(__file__).parent / "data" / "golden_A.pt"


@functools.lru_cache(maxsize=1)
def _golden():
    return torch.load(GOLDEN, weights_only=False)


@pytest.fixture(scope="session")
def golden():
    """Tensors computed by the official DiT code (see tests/data/README.md)."""
    return _golden()
