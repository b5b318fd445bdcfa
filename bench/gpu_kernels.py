"""Kernel measurements for one GPU (the review's "first 10 minutes", issue 15 item 7): they settle
`auto`'s backend order and the attention design. Results go to --out (JSON + text).

    python bench/gpu_kernels.py --out DIR                  # on a CUDA machine (bench/gpu_check.sh runs it)
    python bench/gpu_kernels.py --out DIR --dry-run        # any machine: tiny shapes, CPU backends, no timing claims

Sections (--sections, default all):
  rowops     bandwidth (GB/s of the bytes each op must move) of ln_modulate, gated_residual_ln_modulate
             (D 1152) and gelu_bias (D 4608, the MLP hidden) at N 32, T 256, for the `cuda` and
             `triton` backends, fp32 and bf16, forward, plus forward+backward time; against
             torch's `copy_` bandwidth on a tensor of the same size.
  attention  attention fwd, bwd and fwd+bwd TFLOP/s at N 32, T 256, H 16, head dim 72 for the
             Triton kernel in bf16, fp32 "ieee" (torch.set_float32_matmul_precision("highest")) and
             fp32 TF32 ("high"), against SDPA (whatever kernel torch picks) and flash-attn (bf16,
             when installed). FLOPs: forward 4*N*H*T^2*d, backward 2.5x that (FlashAttention's count).
  biggrid    one Triton attention launch at N*H = 65,536 (N 4096, H 16, T 16, bf16; the old 2-D
             grid's axis-1 limit, review C2), its max error against attention_ref.
  profile    torch.profiler of one fp32 DiT-XL/2 training step (diffusion loss + AdamW) at batch 32,
             after two warm-up steps: the op table sorted by device time.
Without a CUDA device (and without --dry-run) it says so and exits 0.
A backend that cannot run (not built, not installed) is recorded with the reason, not an error.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SECTIONS = ("rowops", "attention", "biggrid", "profile")
FULL = dict(N=32, T=256, D=1152, M=4608, H=16, Dh=72, model="DiT-XL/2", image=256, batch=32, big_N=4096, big_T=16)
DRY = dict(N=2, T=16, D=96, M=384, H=2, Dh=72, model="DiT-S/2", image=64, batch=2, big_N=2, big_T=5)


class Timer:
    """Median seconds of fn() over `iters` runs after `warmup` (CUDA events on GPU)."""

    def __init__(self, device: str, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ---- row ops ----------------------------------------------------------------------------------

def rowops(device: str, shape: dict, timer: Timer, backends: List[str]) -> List[dict]:
    from dit_fast import use_backend
    from dit_fast.ops import gated_residual_ln_modulate, gelu_bias, ln_modulate

    N, T = shape["N"], shape["T"]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        esize = torch.finfo(dtype).bits // 8

        def make(D, grad=False):
            return torch.randn(N, T, D, device=device, dtype=dtype, requires_grad=grad)

        def vec(D, grad=False):
            return (0.1 * torch.randn(N, D, device=device, dtype=dtype)).requires_grad_(grad)

        # name: (D, inputs(grad) -> args, op, element passes the forward must make over N*T*D)
        cases = {
            "ln_modulate": (shape["D"], lambda D, g: (make(D, g), vec(D, g), vec(D, g)), ln_modulate, 2),
            "gated_residual_ln_modulate": (
                shape["D"], lambda D, g: (make(D, g), make(D, g), vec(D, g), vec(D, g), vec(D, g)),
                gated_residual_ln_modulate, 4),
            "gelu_bias": (shape["M"], lambda D, g: (make(D, g), (0.1 * torch.randn(D, device=device, dtype=dtype))
                                                    .requires_grad_(g)), gelu_bias, 2),
        }
        for name, (D, inputs, op, passes) in cases.items():
            nbytes = passes * N * T * D * esize
            src, dst = make(D), make(D)
            t_copy = timer(lambda: dst.copy_(src))
            rows.append(dict(op="copy_", backend="torch", dtype=str(dtype), D=D, ms=t_copy * 1e3,
                             GBps=2 * N * T * D * esize / t_copy / 1e9))
            for backend in backends:
                row = dict(op=name, backend=backend, dtype=str(dtype), D=D, bytes=nbytes)
                try:
                    with use_backend(backend):
                        args = inputs(D, False)
                        with torch.no_grad():
                            t_fwd = timer(lambda: op(*args))
                        gargs = inputs(D, True)

                        def fwd_bwd():
                            out = op(*gargs)
                            outs = out if isinstance(out, tuple) else (out,)
                            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

                        t_fb = timer(fwd_bwd)
                    row.update(fwd_ms=t_fwd * 1e3, GBps=nbytes / t_fwd / 1e9,
                               copy_fraction=(nbytes / t_fwd) / (2 * N * T * D * esize / t_copy),
                               fwd_bwd_ms=t_fb * 1e3)
                except Exception as e:  # noqa: BLE001 - recorded, the other backends still run
                    row["error"] = _error(e)
                rows.append(row)
    return rows


# ---- attention --------------------------------------------------------------------------------

def attention(device: str, shape: dict, timer: Timer, triton_backend: str) -> List[dict]:
    import torch.nn.functional as F

    from dit_fast import use_backend
    from dit_fast.ops import attention_qkv

    N, T, H, Dh = shape["N"], shape["T"], shape["H"], shape["Dh"]
    D = H * Dh
    fwd_flops = 4 * N * H * T * T * Dh
    rows = []
    try:
        import flash_attn
        flash = flash_attn.flash_attn_qkvpacked_func
    except ImportError as e:
        flash, flash_err = None, _error(e)

    def measure(impl, label, dtype, precision, make_fn):
        row = dict(impl=impl, dtype=str(dtype), fp32_precision=precision if dtype == torch.float32 else "-",
                   label=label)
        prev = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision(precision)
            qkv = torch.randn(N, T, 3 * D, device=device, dtype=dtype, requires_grad=True)
            fn = make_fn()
            with torch.no_grad():
                t_f = timer(lambda: fn(qkv))
            out = fn(qkv)
            dout = torch.randn_like(out)
            t_b = timer(lambda: torch.autograd.grad(fn(qkv), qkv, dout)) - t_f  # (fwd+bwd) - fwd
            row.update(fwd_ms=t_f * 1e3, bwd_ms=t_b * 1e3, fwd_TFLOPs=fwd_flops / t_f / 1e12,
                       bwd_TFLOPs=2.5 * fwd_flops / max(t_b, 1e-12) / 1e12,
                       fwd_bwd_TFLOPs=3.5 * fwd_flops / (t_f + t_b) / 1e12)
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
        finally:
            torch.set_float32_matmul_precision(prev)
        rows.append(row)

    def dit_fast_attention(backend):
        def fn(qkv):
            with use_backend(backend):
                return attention_qkv(qkv, H)
        return lambda: fn

    def sdpa(qkv):
        q, k, v = qkv.view(N, T, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, T, D)

    for dtype, precision in ((torch.bfloat16, "highest"), (torch.float32, "highest"), (torch.float32, "high")):
        mode = "bf16" if dtype == torch.bfloat16 else ("fp32 ieee" if precision == "highest" else "fp32 tf32")
        measure(f"dit_fast[{triton_backend}]", mode, dtype, precision, dit_fast_attention(triton_backend))
        measure("sdpa", mode, dtype, precision, lambda: sdpa)
        if dtype == torch.bfloat16:
            if flash is None:
                rows.append(dict(impl="flash-attn", dtype=str(dtype), label=mode, error=flash_err))
            else:
                measure("flash-attn", mode, dtype, precision,
                        lambda: lambda qkv: flash(qkv.view(N, T, 3, H, Dh)).reshape(N, T, D))
    return rows


# ---- profile ----------------------------------------------------------------------------------

def biggrid(device: str, shape: dict, backend: str) -> dict:
    """The review's launch check: attention at N*H = 65,536 (the old 2-D grid's axis-1 limit),
    bf16 (float32 on the CPU dry run), against attention_ref in float32."""
    from dit_fast import use_backend
    from dit_fast.ops import attention_qkv
    from dit_fast.ops.attention import attention_ref

    N, T, H, Dh = shape["big_N"], shape["big_T"], shape["H"], shape["Dh"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(N, T, 3 * H * Dh, device=device, dtype=dtype, generator=g)
    with use_backend(backend):
        out = attention_qkv(qkv, H)
    ref = attention_ref(qkv.float(), H)
    return dict(backend=backend, N=N, H=H, T=T, head_dim=Dh, dtype=str(dtype), NxH=N * H,
                max_err=(out.float() - ref).abs().max().item(), finite=bool(torch.isfinite(out).all()))


def profile(device: str, shape: dict, out_dir: str) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from dit_fast import DiT_models
    from dit_fast.diffusion import create_diffusion

    torch.manual_seed(0)
    latent = shape["image"] // 8
    model = DiT_models[shape["model"]](input_size=latent).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    diffusion = create_diffusion(timestep_respacing="")
    B = shape["batch"]
    x = torch.randn(B, 4, latent, latent, device=device)
    y = torch.randint(0, 1000, (B,), device=device)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (B,), device=device)
        loss = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32, no TF32: the profile's subject
    try:
        for _ in range(2):
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch_profile(activities=activities, record_shapes=True) as prof:
            step()
            if device == "cuda":
                torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    finally:
        torch.set_float32_matmul_precision(prev)
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=50)
    name = f"profile_{shape['model'].replace('/', '_')}_train_fp32.txt"
    with open(os.path.join(out_dir, name), "w") as f:
        f.write(f"one fp32 training step of {shape['model']} at {shape['image']} px, batch {B}, "
                f"{device}: {seconds * 1e3:.1f} ms under the profiler\n\n{table}\n")
    return dict(model=shape["model"], batch=B, step_ms_profiled=seconds * 1e3, table=name)


# ---- main -------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_kernels.json and the profile table")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on this machine's CPU backends, one iteration: checks the script runs")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        p.error(f"--sections: unknown {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if not os.path.isdir(args.out):
        p.error(f"--out {args.out}: not a directory")
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_kernels: no CUDA device (torch {torch.__version__}): nothing measured "
              "(--dry-run checks the script on CPU)")
        return 0

    if args.dry_run:
        device, shape, timer = "cpu", DRY, Timer("cpu", 0, 1)
        row_backends, attn_backend = ["cpu", "reference"], "cpu"
    else:
        device, shape, timer = "cuda", FULL, Timer("cuda", args.warmup, args.iters)
        row_backends, attn_backend = ["cuda", "triton"], "triton"
    result: Dict[str, object] = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        torch=torch.__version__, shape=shape, dry_run=args.dry_run)
    for section in sections:
        t0 = time.perf_counter()
        try:
            if section == "rowops":
                result[section] = rowops(device, shape, timer, row_backends)
            elif section == "attention":
                result[section] = attention(device, shape, timer, attn_backend)
            elif section == "biggrid":
                result[section] = biggrid(device, shape, attn_backend)
            else:
                result[section] = profile(device, shape, args.out)
        except Exception as e:  # noqa: BLE001 - one section failing leaves the others
            result[section] = dict(error=_error(e))
        print(f"gpu_kernels: {section} done in {time.perf_counter() - t0:.1f}s")
    path = os.path.join(args.out, "gpu_kernels.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for section in ("rowops", "attention"):
        for row in result.get(section) or []:
            print(f"  {section}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in row.items()))
    failed = [s for s in sections if isinstance(result.get(s), dict) and "error" in result[s]]
    for s in failed:
        print(f"gpu_kernels: {s} FAILED: {result[s]['error']}")
    print(f"gpu_kernels: wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
