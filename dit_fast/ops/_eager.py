"""When an op may skip its torch.library custom-op / autograd layers (the eager inference path)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["eager_inference"]


def eager_inference(*tensors: Optional[Tensor]) -> bool:
    """True when an op may call its backend kernel directly instead of its custom op: not tracing
    (torch.compile), no gradient needed for any of `tensors` (None entries are ignored), and no
    torch dispatch mode active — FlopCounterMode, FakeTensorMode, ... must see the named op (its
    flop formula, its fake impl). Skipping the layers saves tens of microseconds per call."""
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return torch._C._len_torch_dispatch_stack() == 0
