"""Device guard for Triton launches.

Triton launches on ``torch.cuda.current_device()`` and that device's current stream, not on the
device of the tensors it is given: a call with tensors on cuda:1 while cuda:0 is current would run
with device 0's context and stream. `on_tensor_device` makes the first tensor argument's device
current for the duration of a launcher (as the C++ bindings do with a CUDA guard); it does nothing
for CPU tensors (the interpreter) and costs one device query when the device is already current.
"""

from __future__ import annotations

import functools

import torch


def on_tensor_device(fn):
    """Decorator for a function that launches Triton kernels on its tensor arguments."""

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)

    launcher.device_guarded = True
    return launcher
