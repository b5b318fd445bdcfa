"""dit_fast.ops.forecast: the Taylor forecast op, every available backend against the reference.

Ground truth: the reference evaluated in float64 on the same input values; tolerance by out's dtype
(dit_fast/tolerances.py). The Triton backend runs under Triton's interpreter on CPU tensors when
there is no GPU (TRITON_INTERPRET=1, set by conftest.py). Backends that cannot run here are skipped
with the registry's reason.
"""


import pytest
import torch

from dit_fast._backends import use_backend
from dit_fast.ops import taylor_forecast, taylor_forecast_ref, taylor_weights
from dit_fast.ops.forecast import OP_NAME
from dit_fast.tolerances import assert_close

from op_helpers import BACKEND_DEVICES, require

# (K, feature shape): batch 1, odd token counts and hidden sizes, sizes not dividing the blocks
SHAPES = [(1, (1, 1, 72)), (2, (1, 7, 72)), (3, (3, 5, 1000)), (4, (2, 257, 72)), (3, (1, 9, 1152)),
          (2, (5, 1)), (3, (4, 1, 130)), (2, (3, 600))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def factor_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,shape", SHAPES, ids=[f"K{k}-{'x'.join(map(str, s))}" for k, s in SHAPES])
def test_matches_reference(backend, device, dtype, K, shape):
    require(OP_NAME, backend, device, dtype)
    g = torch.Generator().manual_seed(K * 1000 + len(shape))
    factors = torch.randn(K, *shape, generator=g, dtype=factor_dtype(dtype)).to(device)
    w = taylor_weights(2.0, K)
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)  # every element must be written
    ptr = out.data_ptr()
    with use_backend(backend), torch.no_grad():
        res = taylor_forecast(factors, w, out=out)
    assert res is out and out.data_ptr() == ptr            # in place
    expected = taylor_forecast_ref(factors.double(), w)
    assert_close(out.cpu(), expected.cpu(), msg=f"{backend} {dtype}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_order0_is_plain_reuse(backend, device):
    """One factor with weight 1: the cached feature itself, bit for bit (one rounding to out)."""
    require(OP_NAME, backend, device, torch.bfloat16)
    f = torch.randn(1, 3, 33, 200, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(3, 33, 200, dtype=dtype, device=device)
        with use_backend(backend), torch.no_grad():
            taylor_forecast(f, [1.0], out=out)
        assert torch.equal(out, f[0].to(dtype))


def test_cpu_kernel_rounds_like_reference():
    """Separate multiply and add in the kernel, as in the reference: float32 results agree exactly."""
    require(OP_NAME, "cpu", "cpu", torch.float32)
    f = torch.randn(4, 3, 1001)
    w = taylor_weights(3.0, 4)
    out = torch.empty(3, 1001)
    with use_backend("cpu"):
        taylor_forecast(f, w, out=out)
    assert torch.equal(out, taylor_forecast_ref(f, w))


def test_weights():
    assert taylor_weights(3.0, 4) == [1.0, 3.0, 4.5, 4.5]
    assert taylor_weights(0.0, 3) == [1.0, 0.0, 0.0]


def test_allocates_out():
    f = torch.randn(2, 5, 7)
    out = taylor_forecast(f, [1.0, 0.5])
    assert out.dtype == torch.float32 and out.shape == (5, 7)
    torch.testing.assert_close(out, f[0] + 0.5 * f[1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(factors=torch.randn(2, 3).half(), weights=[1.0, 1.0]), "factors must be a float32 or float64"),
    (dict(factors=torch.randn(2, 3), weights=[1.0]), "one value per factor"),
    (dict(factors=torch.randn(17, 3), weights=[1.0] * 17), "one value per factor"),
    (dict(factors=torch.randn(2, 3), weights=[1.0, float("inf")]), "finite"),
    (dict(factors=torch.randn(2, 3), weights="ab"), "sequence of numbers"),
    (dict(factors=torch.randn(3, 2).t(), weights=[1.0, 1.0]), "factors must be contiguous"),
    (dict(factors=torch.randn(2, 3), weights=[1.0, 1.0], out=torch.empty(4)), "out must be a tensor of shape"),
    (dict(factors=torch.randn(2, 3), weights=[1.0, 1.0], out=torch.empty(3, dtype=torch.float64)),
     "out must be float64"),
    (dict(factors=torch.randn(2, 3).double(), weights=[1.0, 1.0], out=torch.empty(3)), "out must be float64"),
    (dict(factors=torch.randn(2, 3, 2), weights=[1.0, 1.0], out=torch.empty(2, 3).t()), "out must be contiguous"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        taylor_forecast(**kwargs)


def test_grad_runs_reference():
    f = torch.randn(2, 4, requires_grad=True)
    out = taylor_forecast(f, [1.0, 2.0])
    out.sum().backward()
    torch.testing.assert_close(f.grad, torch.tensor([[1.0] * 4, [2.0] * 4]))


def test_compile_fullgraph():
    """torch.compile sees through the op (custom op + fake kernel): one graph, same result."""
    f = torch.randn(3, 2, 5, 8)
    w = [1.0, 2.0, 2.0]

    def fn(factors, out):
        taylor_forecast(factors, w, out=out)
        return out * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = torch.empty(2, 5, 8)
    torch.testing.assert_close(compiled(f, out), 2 * taylor_forecast_ref(f, w))
    torch.testing.assert_close(out, taylor_forecast_ref(f, w))
