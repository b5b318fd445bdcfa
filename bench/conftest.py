"""pytest configuration of the kernel microbenchmarks (bench/test_ops_bench.py).

    pytest bench --benchmark-only

Not part of the test suite: pyproject's testpaths = ["tests"], so `python -m pytest -q` at the repository
root never collects this folder. Needs the pytest-benchmark plugin (requirements-test.txt); without it
every benchmark is skipped with that reason.
"""
import os
import sys
from pathlib import Path

import torch

# As tests/conftest.py: Triton's interpreter on machines without a GPU (set before triton kernels import).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401
except ImportError:
    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed (pip install -r requirements-test.txt)")
