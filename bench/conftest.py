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


def pytest_collection_modifyitems(config, items):
    """Without the pytest-benchmark plugin (not installed, or -p no:benchmark) every benchmark is skipped."""
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not installed or not active "
                                   "(pip install -r requirements-test.txt)")
    for item in items:
        item.add_marker(skip)
