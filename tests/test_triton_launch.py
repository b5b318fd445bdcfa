"""Launch-level checks of the Triton kernels that need no GPU.

Device guard: Triton launches on ``torch.cuda.current_device()`` (its driver's
``get_current_device``) and that device's current stream. These tests fake two CUDA devices: the
"current device" is a variable behind torch.cuda.current_device / _exchange_device (what
torch.cuda.device switches), the tensors are FakeTensors on cuda:1, and the kernels' launch
method records the current device instead of launching. Without a guard every launch would see
device 0.

Grid: attention's grid must stay within CUDA's per-axis limits at N*H >= 65,536.
"""

import importlib
import inspect
import re

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.jit import JITFunction, KernelInterface  # noqa: E402

from dit_fast.kernels.triton import _launch  # noqa: E402

MODULES = ["adaln", "attention", "gated_residual", "gelu", "ln_modulate", "patchify",
           "sampler_step"]


def _module(name):
    return importlib.import_module(f"dit_fast.kernels.triton.{name}")


def _kernel_classes():
    classes = {JITFunction}
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.add(InterpretedFunction)
    except ImportError:
        pass
    return classes


@pytest.fixture
def fake_devices(monkeypatch):
    """(state, launches): state["current"] is the fake current CUDA device (0 at start); launches
    collects (kernel name, current device at launch)."""
    state = {"current": 0}
    launches = []

    def exchange(idx):
        prev = state["current"]
        if idx >= 0:
            state["current"] = idx
        return prev

    def launch(self, *args, grid, warmup, **kwargs):
        launches.append((self.__name__, state["current"]))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "_exchange_device", exchange)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", exchange)
    for cls in _kernel_classes():
        monkeypatch.setattr(cls, "run", launch)
    return state, launches


def _fake_cuda1(*shapes):
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    with mode:
        return mode, [torch.randn(s, device="cuda:1") for s in shapes]


def _launch_cases():
    """(name, run, input shapes, launches): launchers whose torch-side work runs on FakeTensors."""
    A, L, G, R = _module("attention"), _module("ln_modulate"), _module("gelu"), \
        _module("gated_residual")
    N, T, H, Dh, D = 2, 33, 2, 72, 144

    def attention(x, dout):
        out, lse = A.attention_fwd(x, H)
        A.attention_bwd(dout, x, out, lse, H)

    return [
        ("attention", attention, [(N, T, 3 * H * Dh), (N, T, H * Dh)], 4),
        ("ln_modulate", lambda x, sh, sc: L.ln_modulate_fwd(x, sh, sc, 1e-6),
         [(N, T, D), (N, D), (N, D)], 1),
        ("gated_residual", R.gated_residual_fwd, [(N, T, D), (N, T, D), (N, D)], 1),
        ("linear_gelu", G.linear_gelu_fwd, [(N, T, D), (40, D), (40,)], 1),
    ]


@pytest.mark.parametrize("name,run,shapes,n_launches", _launch_cases(),
                         ids=[c[0] for c in _launch_cases()])
def test_launches_run_on_the_tensors_device(fake_devices, name, run, shapes, n_launches):
    state, launches = fake_devices
    mode, tensors = _fake_cuda1(*shapes)
    with mode:
        run(*tensors)
    assert len(launches) == n_launches, launches
    assert all(dev == 1 for _, dev in launches), f"launched with another device current: {launches}"
    assert state["current"] == 0  # restored afterwards


def test_guard_leaves_cpu_and_current_device_calls_alone(fake_devices, monkeypatch):
    state, _ = fake_devices
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d))  # would fail if used
    seen = []
    f = _launch.on_tensor_device(lambda *a, **k: seen.append(state["current"]))
    f(torch.zeros(1), 3)
    mode, (x,) = _fake_cuda1((2,))
    state["current"] = 1
    with mode:
        f(1, x=x)
    assert seen == [0, 1] and not entered


def test_every_launcher_is_device_guarded():
    """Every function of the kernel modules that launches a @triton.jit kernel (``kernel[grid]``)
    is wrapped by `on_tensor_device`."""
    checked = 0
    for name in MODULES:
        mod = _module(name)
        kernels = [k for k, v in vars(mod).items() if isinstance(v, KernelInterface)]
        launch = re.compile(r"\b(" + "|".join(map(re.escape, kernels)) + r")\[")
        for fname, fn in vars(mod).items():
            if not inspect.isfunction(fn) or fn.__module__ != mod.__name__:
                continue
            if launch.search(inspect.getsource(inspect.unwrap(fn))):
                assert getattr(fn, "device_guarded", False), f"{name}.{fname} launches unguarded"
                checked += 1
    assert checked >= 15


# ---- attention grid ---------------------------------------------------------------------------

CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


@pytest.mark.parametrize("N,H,T,block", [(1, 1, 1, 128), (4096, 16, 256, 128), (8192, 16, 257, 64),
                                         (65536, 1, 7, 32), (2, 6, 1024, 32)])
def test_attention_grid_fits_cuda_limits(N, H, T, block):
    A = _module("attention")
    grid = A._grid(N, H, T, block)
    assert all(g <= lim for g, lim in zip(grid, CUDA_GRID_LIMITS)), grid
    assert len(grid) <= 3 and all(g >= 1 for g in grid)
    total = 1
    for g in grid:
        total *= g
    assert total == N * H * -(-T // block)  # one program per (n*H + h, token block)


def test_attention_grid_too_large_is_one_clear_error():
    A = _module("attention")
    with pytest.raises(ValueError, match="exceed CUDA's grid limit"):
        A._grid(2 ** 20, 16, 2 ** 16, 64)
