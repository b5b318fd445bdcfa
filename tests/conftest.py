"""pytest configuration of the test suite. Tiers (markers registered in pyproject.toml):

    python -m pytest -q -m "not slow"       # everyday work: under 2 minutes on 2 idle cores
    python -m pytest -q                     # everything (CI)
    python -m pytest -q -m gpu              # the tests that need a CUDA device
    python -m pytest -q --durations=30      # ... and list the 30 slowest tests

A test that takes seconds on a CPU-only machine is marked `slow` where it is defined.
"""
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


@pytest.fixture
def one_thread():
    """One CPU thread for the test (tiny runs are faster without threads on a shared machine);
    a module takes it for every test with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A skip reason that says a test needs a GPU ("needs a GPU", "need a GPU", "no CUDA device").
_NEEDS_GPU = re.compile(r"\bneeds? a GPU\b|\bno CUDA device\b")


def pytest_collection_modifyitems(config, items):
    """Tests that skip for want of a CUDA device get the `gpu` marker (`-m gpu` / `-m "not gpu"`)."""
    for item in items:
        if item.get_closest_marker("gpu") is None and any(
                _NEEDS_GPU.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _restore_tf32_settings():
    """CLIs run in-process set torch's global TF32 switches (sample_ddp's --tf32, as the official
    script does); each test starts from the same settings."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])
