import functools
from pathlib import Path

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
