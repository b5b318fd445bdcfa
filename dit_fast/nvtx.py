"""NVTX ranges for Nsight Systems / Nsight Compute: the DiT blocks and dit_fast's ops show up by name
on the timeline.

    DIT_FAST_NVTX=1 nsys profile -t cuda,nvtx python bench/throughput.py --quick
    # or, in code:  dit_fast.nvtx.enable()

Off by default, and always off without CUDA (`enable` returns whether ranges are now emitted).
While off, `range(...)` returns one shared null context and `annotate`'s wrapper calls the function
straight away: the cost is a flag test. Under torch.compile the ranges are skipped during tracing
(``torch.compiler.is_compiling()``), so ``fullgraph=True`` still compiles: compiled regions show up as
Inductor's kernels instead (profile eager runs to see the per-op ranges).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, TypeVar

import torch

__all__ = ["enable", "enabled", "range", "annotate", "ENV_VAR"]

ENV_VAR = "DIT_FAST_NVTX"
_NULL = contextlib.nullcontext()
_enabled = False

F = TypeVar("F", bound=Callable)


def enable(on: bool = True) -> bool:
    """Turns the ranges on (or off with on=False); returns whether they are emitted now (never
    without CUDA)."""
    global _enabled
    _enabled = bool(on) and torch.cuda.is_available()
    return _enabled


def enabled() -> bool:
    return _enabled


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc) -> bool:
        torch.cuda.nvtx.range_pop()
        return False


def range(name: str, *args):  # noqa: A001 - mirrors torch.cuda.nvtx.range
    """Context manager: an NVTX range named ``name % args`` (formatted only when emitted)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if not _enabled:
        return _NULL
    return _Range(name % args if args else name)


def annotate(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function runs inside an NVTX range `name`."""
    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not _enabled or torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            with _Range(name):
                return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return deco


if os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
    enable()
