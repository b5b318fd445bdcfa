import functools
import os
import re
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


# A skip reason that says a test needs a GPU (the skipif marks of GPU-only tests).
_NEEDS_GPU = re.compile(r"GPU|no CUDA device")


def pytest_collection_modifyitems(config, items):
    """Tests that skip for want of a CUDA device get the `gpu` marker (`-m gpu` / `-m "not gpu"`)."""
    for item in items:
        if item.get_closest_marker("gpu") is None and any(
                _NEEDS_GPU.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)
