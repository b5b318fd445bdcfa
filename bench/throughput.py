"""Throughput of DiT implementations: dit_fast's backends against the reference, torch.compile and diffusers.

    python bench/throughput.py                       # CPU: DiT-S/2, 256 px, batch 8; GPU: DiT-XL/2, bf16, batch 32
    python bench/throughput.py --quick --modes forward --impls reference,dit_fast

Modes (one timed iteration each):
- forward: one forward pass of the batch (inference mode);
- train: forward + backward + AdamW step of the diffusion training loss (mixed precision: fp32 weights
  under autocast for bf16/fp16), each with its training script's optimizer: the official
  torch.optim.AdamW for the reference models, dit_fast.train.make_optimizer (fused) for dit_fast's;
- sample: one classifier-free-guided sampler step (250-step DDPM, scale 4): the model on the doubled
  batch [cond; uncond] and the sampler update. Reference implementations run the official path
  (forward_with_cfg + p_sample); dit_fast runs the model once on the doubled batch and its fused guided
  step (GaussianDiffusion.p_sample_step_cfg). The full 250-step sample time is derived: 250 x ms.

Implementations: reference (dit_fast's model under the reference backend: the official math),
reference+compile (torch.compile of it: the baseline a user would pick instead), diffusers
(DiTTransformer2DModel), official (--reference-repo), dit_fast[<backend>] for each backend that runs
here, dit_fast+compile (torch.compile of the dit_fast model, automatic backend), and on CPU
dit_fast-blas: dit_fast[cpu] with torch's GEMM for the Linear layers instead of dit_fast.ops.linear's
(DIT_FAST_CPU_GEMM=0), which isolates those GEMMs' share (the two are the same in train mode, where
torch's GEMM runs). On CPU the default list times the two compiled rows in forward mode only (the
CPU compile takes about a minute per model), so the default run stays within about 5 minutes.

Every implementation runs in this one process, on the same weights and inputs. After warm-up they are
timed in turns (A B C A B C ...), so that a machine's drift hits all of them alike; the table gives the
median and the min-max of the turns. Columns:
- gflops: the paper's Gflops (multiply-accumulates per image, forward; dit_fast.flops.dit_gflops);
  gflop_fwd: true GFLOP per image of one forward (dit_fast.flops.true_gflop_per_image); gflop: true
  GFLOP per image of the mode (x3 for a training step's forward + backward; x2 images per guided step);
- ms: median time per iteration (ms_min, ms_max: the spread of the turns); img/s;
- tflops: achieved TFLOP/s from `gflop`;
- mfu: tflops over the peak matmul throughput of the device in that dtype, measured in this run
  (one large square GEMM, best of >= 5 runs, at the start and at the end of the run: the higher);
  bf16 rows on a CPU without bf16 dot products use the fp32 peak (their matmuls run in fp32);
- speedup: time of `reference` in the same mode over this row's time (speedup_min: the same from the
  fastest turns, the steadier figure on a shared machine);
- gemm_eff: time of the model's GEMMs alone (every Linear / conv-as-GEMM / attention matmul of the
  mode, timed one by one at the model's shapes in that dtype) over the row's time: the fraction of
  the step that the matmuls would take if everything else were free (1.0 = nothing but GEMMs;
  in the peak's dtype, as for mfu).
Writes a JSON (--out, default bench/results/<device>-<model>.json) and a PNG bar chart beside it.
"""
import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dit_fast  # noqa: E402
from dit_fast import DiT_models, _backends  # noqa: E402
from dit_fast.diffusion import create_diffusion  # noqa: E402
from dit_fast.flops import dit_config, dit_gflops, true_gflop_per_image  # noqa: E402
from dit_fast.ops.linear import cpu_isa_info, linear_paths  # noqa: E402
from dit_fast.train import make_optimizer  # noqa: E402

MODES = ("forward", "train", "sample")
IMPLS = ("reference", "reference+compile", "diffusers", "official", "dit_fast", "dit_fast+compile", "dit_fast-blas")
CPU_COMPILE_MODES = ("forward",)  # the compiled rows' modes in the default CPU list
# bf16 rows' modes in the default list on CPUs without bf16 dot products: inference only (training
# under autocast runs torch's bf16 GEMMs, ~30x slower there)
CPU_EMULATED_BF16_MODES = ("forward", "sample")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CFG_SCALE = 4.0
SAMPLE_STEPS = 250
NUM_CLASSES = 1000  # DiT_models default; label NUM_CLASSES is the null class
# True GFLOP per image of each mode, in units of one forward's.
MODE_FLOP_FACTOR = {"forward": 1, "train": 3, "sample": 2}


# ----------------------------------------------------------------------------- implementations

class Impl:
    """One implementation to time: builds its model (x, t, y) -> out in a dtype, runs under its backend.
    cfg: how a guided sampler step is run: "method" (the model's own forward_with_cfg + p_sample),
    "wrap" (forward_with_cfg's computation around the callable + p_sample) or "fused" (one forward on
    the doubled batch + GaussianDiffusion.p_sample_step_cfg, dit_fast's fused guided step)."""

    def __init__(self, name, build, dtype, backend=None, cfg="method", env=None, modes=MODES, ours=False):
        self.name, self.build, self.dtype, self.backend, self.cfg = name, build, dtype, backend, cfg
        self.env, self.modes = env or {}, modes
        self.ours = ours  # a dit_fast model: trains with dit_fast.train's optimizer

    def context(self, device, autocast):
        stack = contextlib.ExitStack()
        if self.backend is not None:
            stack.enter_context(dit_fast.use_backend(self.backend))
        if autocast:
            stack.enter_context(torch.autocast(device.type, dtype=self.dtype))
        for key, value in self.env.items():
            stack.callback(_restore_env, key, os.environ.get(key))
            os.environ[key] = value
        return stack


def _restore_env(key, value):
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


class DiffusersAdapter(torch.nn.Module):
    """diffusers' DiTTransformer2DModel behind the official (x, t, y) signature."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        return self.model(x, timestep=t, class_labels=y).sample


def _with_cfg(model):
    """forward_with_cfg for any (x, t, y) model, as the official DiT computes it (3 guided channels)."""
    def fn(x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = eps.chunk(2)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
    return fn


def build_impls(args, base, device):
    """The implementations named in --impls that can run here, with a reason for each one skipped."""
    impls, skipped = [], {}
    wanted = args.impls.split(",")
    fp32 = torch.float32
    compile_modes = CPU_COMPILE_MODES if args.cpu_default_impls else MODES
    emulated_bf16 = args.cpu_default_impls and not _cpu_has_bf16()

    def modes_for(dname, modes=MODES):
        return tuple(m for m in modes if m in CPU_EMULATED_BF16_MODES) if emulated_bf16 and dname == "bf16" else modes

    def clone(dtype):
        return copy.deepcopy(base).to(device=device, dtype=dtype)

    if "reference" in wanted:
        impls.append(Impl("reference", clone, fp32, backend="reference"))
    if "reference+compile" in wanted:
        impls.append(Impl("reference+compile", lambda d: torch.compile(clone(d)), fp32, backend="reference",
                          cfg="wrap", modes=compile_modes))
    if "diffusers" in wanted:
        try:
            from dit_fast.interop.diffusers import to_diffusers_model
            to_diffusers_model  # noqa: B018 (imported to check that diffusers is there)
            impls.append(Impl("diffusers", lambda d: DiffusersAdapter(to_diffusers_model(base)).to(device, d), fp32,
                              cfg="wrap"))
        except ImportError as e:
            skipped["diffusers"] = f"diffusers not importable: {e}"
    if "official" in wanted or args.reference_repo:
        if not args.reference_repo:
            skipped["official"] = "no --reference-repo given"
        else:
            sys.path.insert(0, str(Path(args.reference_repo).resolve()))

            def official(dtype):
                from models import DiT as official_dit
                config = model_config(args)
                del config["block"]  # the official DiT has the adaLN-Zero block only
                model = official_dit(**config)
                model.load_state_dict(base.state_dict(), strict=True)
                return model.to(device, dtype)
            impls.append(Impl("official", official, fp32))
    if "dit_fast" in wanted:
        for backend, status in dit_fast.backends().items():
            if backend == "reference":
                continue
            if not status.available:
                skipped[f"dit_fast[{backend}]"] = status.reason
                continue
            if status.device_types is not None and device.type not in status.device_types:
                skipped[f"dit_fast[{backend}]"] = f"does not run on {device.type} tensors"
                continue
            for dname in args.dtype.split(","):
                impls.append(Impl(f"dit_fast[{backend}]", clone, DTYPES[dname], backend=backend, cfg="fused",
                                  modes=modes_for(dname), ours=True))
    if "dit_fast+compile" in wanted:
        for dname in args.dtype.split(","):
            impls.append(Impl("dit_fast+compile", lambda d: torch.compile(clone(d)), DTYPES[dname], cfg="fused",
                              modes=modes_for(dname, compile_modes), ours=True))
    if "dit_fast-blas" in wanted:  # the cpu backend with torch's GEMM instead of the packed one
        status = dit_fast.backends()["cpu"]
        if device.type != "cpu" or not status.available:
            skipped["dit_fast-blas"] = status.reason or f"the cpu backend does not run on {device.type} tensors"
        else:
            for dname in args.dtype.split(","):
                if emulated_bf16 and dname == "bf16":  # torch's bf16 GEMMs: ~10-30x slower here
                    continue
                impls.append(Impl("dit_fast-blas", clone, DTYPES[dname], backend="cpu", cfg="fused",
                                  env={"DIT_FAST_CPU_GEMM": "0"}, ours=True))
    return impls, skipped


# ----------------------------------------------------------------------------- modes

def make_step(mode, impl, inputs, diffusion, device):
    """A zero-argument callable that runs one iteration of `mode` for `impl`."""
    x, t, y = (v.to(device) for v in inputs)
    # Training keeps fp32 weights under autocast (mixed precision); inference casts the weights.
    train = mode == "train"
    autocast = train and impl.dtype != torch.float32
    model = impl.build(torch.float32 if train else impl.dtype).train(train)
    x = x.to(torch.float32 if train else impl.dtype)

    if mode == "forward":
        def step():
            with torch.inference_mode(), impl.context(device, autocast):
                return model(x, t, y)
    elif mode == "train":
        params = [p for p in model.parameters() if p.requires_grad]
        # each with its own training script's optimizer: the official torch.optim.AdamW, or
        # dit_fast.train's (the same AdamW, fused where torch has the kernel)
        opt = (make_optimizer(params, device) if impl.ours else
               torch.optim.AdamW(params, lr=1e-4, weight_decay=0))

        def step():
            with impl.context(device, autocast):
                loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
    else:
        ts = t % diffusion.num_timesteps
        z = torch.cat([x, x])
        tt = torch.cat([ts, ts])
        yy = torch.cat([y, torch.full_like(y, NUM_CLASSES)])
        if impl.cfg == "fused":
            def step():
                with torch.inference_mode(), impl.context(device, autocast):
                    out = model(z, tt, yy)
                    return diffusion.p_sample_step_cfg(out, x, ts, torch.randn_like(x), CFG_SCALE,
                                                       clip_denoised=False)["sample"]
        else:
            guided = model.forward_with_cfg if impl.cfg == "method" else _with_cfg(model)

            def step():
                with torch.inference_mode(), impl.context(device, autocast):
                    return diffusion.p_sample(guided, z, tt, clip_denoised=False,
                                              model_kwargs=dict(y=yy, cfg_scale=CFG_SCALE))["sample"]
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_in_turns(steps, device, warmup, iters):
    """Run every step `warmup` times, then `iters` rounds of one call each, in turn. Returns ms lists."""
    for step in steps.values():
        for _ in range(warmup):
            step()
        sync(device)
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


# ----------------------------------------------------------------------------- GEMMs alone

def gemm_shapes(model, image_size, batch, mode, **config_overrides):
    """The GEMMs of one iteration of `mode` for an adaLN-Zero DiT, as {(B, M, K, N, layout): count}:
    C (M x N, batch B) = A (M x K) @ B (K x N); layout "nt": B stored as (N, K) (a Linear's weight),
    "nn": both row-major, "tn": A stored as (K, M) (a weight gradient). The forward list is exactly
    the matmul/conv work of dit_fast.flops (its sum of 2*B*M*K*N is true_gflop_per_image x batch).
    train adds both gradients of each GEMM (none for the inputs that need no gradient: the latent and
    the sinusoidal timestep features); sample runs the forward on the doubled batch."""
    c = dit_config(model, image_size, **config_overrides)
    if c["block"] != "adaLN-Zero":
        raise ValueError(f"gemm_shapes: only the adaLN-Zero block is listed, got block {c['block']!r}")
    if mode not in MODES:
        raise ValueError(f"gemm_shapes: mode must be one of {MODES}, got {mode!r}")
    n = 2 * batch if mode == "sample" else batch
    D, L, p, C, H = c["hidden_size"], c["depth"], c["patch_size"], c["in_channels"], c["num_heads"]
    Mh = int(D * c["mlp_ratio"])
    C_out = 2 * C if c["learn_sigma"] else C
    T = (c["input_size"] // p) ** 2
    Dh = D // H
    # (B, M, K, N, count, input_needs_grad)
    linears = [
        (1, n * T, p * p * C, D, 1, False),      # patch embedding (conv as GEMM)
        (1, n, 256, D, 1, False),                # timestep MLP
        (1, n, D, D, 1, True),
        (1, n, D, 6 * D, L, True),               # adaLN modulation, per block
        (1, n * T, D, 3 * D, L, True),           # qkv
        (1, n * T, D, D, L, True),               # attention output projection
        (1, n * T, D, Mh, L, True),              # MLP fc1
        (1, n * T, Mh, D, L, True),              # MLP fc2
        (1, n, D, 2 * D, 1, True),               # final adaLN
        (1, n * T, D, p * p * C_out, 1, True),   # final linear
    ]
    attn = [(n * H, T, Dh, T, L), (n * H, T, T, Dh, L)]  # Q K^T, A V
    shapes = {}

    def add(key, count):
        shapes[key] = shapes.get(key, 0) + count

    for B, M, K, N, cnt, grad_in in linears:
        add((B, M, K, N, "nt"), cnt)
        if mode == "train":
            add((B, N, M, K, "tn"), cnt)         # dW = dY^T X
            if grad_in:
                add((B, M, N, K, "nn"), cnt)     # dX = dY W
    for B, M, K, N, cnt in attn:
        add((B, M, K, N, "nn"), cnt)
        if mode == "train":                      # both operands need gradients
            add((B, M, N, K, "nn"), cnt)
            add((B, K, M, N, "tn"), cnt)
    return shapes


def gemm_gflop(shapes):
    """Total GFLOP (2 per multiply-accumulate) of a gemm_shapes() dict."""
    return sum(2 * B * M * K * N * cnt for (B, M, K, N, _), cnt in shapes.items()) / 1e9


def time_gemms(shapes, device, dtype, reps=3):
    """Milliseconds that the GEMMs of `shapes` take, each shape timed alone (median of `reps` after one
    warm-up call) and multiplied by its count."""
    total = 0.0
    for (B, M, K, N, layout), count in shapes.items():
        def mat(r, c):
            return torch.randn(B, r, c, device=device, dtype=dtype) if B > 1 else torch.randn(r, c, device=device,
                                                                                                 dtype=dtype)
        if layout == "nt":
            a, w = mat(M, K), mat(N, K)
            fn = (lambda: F.linear(a, w)) if B == 1 else (lambda: torch.bmm(a, w.transpose(1, 2)))
        elif layout == "nn":
            a, b = mat(M, K), mat(K, N)
            fn = (lambda: a @ b)
        else:  # "tn"
            a, b = mat(K, M), mat(K, N)
            fn = (lambda: a.transpose(-1, -2) @ b)
        with torch.inference_mode():
            fn()
            sync(device)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                sync(device)
                ts.append(time.perf_counter() - t0)
        total += statistics.median(ts) * 1e3 * count
    return total


def peak_matmul_tflops(device, dtype, n=None, min_reps=5, min_time_s=1.0):
    """The device's matmul throughput in `dtype`, measured now: the best of at least `min_reps`
    n x n GEMMs and `min_time_s` seconds (the best, not the median: on a shared machine the fastest
    run is the one least disturbed). CPUs without native bf16/fp16 matmul run those dtypes far
    slower, so they get a smaller problem."""
    if n is None:
        n = 8192 if device.type == "cuda" else (2048 if dtype == torch.float32 else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2 * n ** 3 / best / 1e12


def peak_dtype(device, dname):
    """The dtype whose matmul peak bounds `dname`'s rows: on CPUs without bf16 dot products bf16
    models multiply in float32 (dit_fast widens bf16 inside its GEMM), so fp32's."""
    return "fp32" if device.type == "cpu" and dname == "bf16" and not _cpu_has_bf16() else dname


def measure_peaks(device, dnames, n, min_time_s):
    """{dtype name: peak matmul TFLOP/s bounding its rows (peak_dtype)}, each measured once."""
    measured = {}
    for d in dnames:
        p = peak_dtype(device, d)
        if p not in measured:
            measured[p] = peak_matmul_tflops(device, DTYPES[p], n=n, min_time_s=min_time_s)
    return {d: measured[peak_dtype(device, d)] for d in dnames}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{_cpu_model() or platform.processor() or platform.machine()} ({n} thread{'s' if n > 1 else ''})"


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_has_bf16():
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 / AMX)."""
    return cpu_isa_info()["native_bf16"]


def _load_avg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ----------------------------------------------------------------------------- main

def _positive_int(name):
    def parse(v):
        try:
            i = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}") from None
        if i < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {i}")
        return i
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="DiT_models name (default: DiT-S/2 on CPU, DiT-XL/2 on GPU)")
    p.add_argument("--depth", type=_positive_int("--depth"), default=None,
                   help="override the model's depth (number of blocks): small smoke configurations")
    p.add_argument("--image-size", type=_positive_int("--image-size"), default=256,
                   help="pixels (latent = image-size / 8); default 256")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None,
                   help="default: 8 on CPU, 32 on GPU")
    p.add_argument("--dtype", default=None, help="dit_fast dtypes, comma-separated (default GPU: bf16; CPU: fp32,bf16, "
                                                 "bf16 in inference modes only where the CPU has no bf16 matmul)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--impls", default=None,
                   help=f"comma-separated, from {', '.join(IMPLS)} (default GPU: all but official; CPU: "
                        f"reference,reference+compile,diffusers,dit_fast,dit_fast+compile,dit_fast-blas, the "
                        f"compiled rows in forward mode only)")
    p.add_argument("--reference-repo", default=None, help="a checkout of facebookresearch/DiT: also times its models.py")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=_positive_int("--iters"), default=None)
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMMs-alone efficiency column")
    p.add_argument("--peak-size", type=_positive_int("--peak-size"), default=None,
                   help="side of the square GEMM that measures the peak (default: 8192 GPU; CPU 2048 fp32, "
                        "512 otherwise)")
    p.add_argument("--threads", type=_positive_int("--threads"), default=None,
                   help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--quick", action="store_true", help="fewer turns (a smoke run, not a measurement)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text stored in the JSON and shown by bench/report.py")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<model>.json)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    args.model = args.model or ("DiT-XL/2" if gpu else "DiT-S/2")
    args.batch_size = args.batch_size or (32 if gpu else 8)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32,bf16")
    args.cpu_default_impls = not gpu and args.impls is None
    args.impls = args.impls or ("reference,reference+compile,diffusers,dit_fast" if gpu else
                                "reference,reference+compile,diffusers,dit_fast,dit_fast+compile,dit_fast-blas")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    args.warmup = args.warmup if args.warmup is not None else 1 if args.quick or not gpu else 3
    args.iters = args.iters if args.iters is not None else 2 if args.quick else 10 if gpu else 3
    if args.model not in DiT_models:
        p.error(f"--model must be one of {', '.join(DiT_models)}; got {args.model!r}")
    patch = dit_config(args.model)["patch_size"]
    if args.image_size % (8 * patch):
        p.error(f"--image-size must be a multiple of {8 * patch} for {args.model} (8 x patch size), "
                f"got {args.image_size}")
    for m in args.modes.split(","):
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r} (expected {', '.join(MODES)})")
    for d in args.dtype.split(","):
        if d not in DTYPES:
            p.error(f"--dtype: unknown dtype {d!r} (expected {', '.join(DTYPES)})")
    for i in args.impls.split(","):
        if i not in IMPLS:
            p.error(f"--impls: unknown implementation {i!r} (expected {', '.join(IMPLS)})")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    load_start = _load_avg()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    over = {"depth": args.depth} if args.depth else {}
    base = dit_fast.DiT(**model_config(args))
    with torch.no_grad():  # non-zero adaLN / output layers, as a trained model has
        for name, prm in base.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                prm.normal_(std=0.02)
    n = args.batch_size
    latent = args.image_size // 8
    inputs = (torch.randn(n, 4, latent, latent), torch.randint(0, 1000, (n,)), torch.randint(0, NUM_CLASSES, (n,)))
    impls, skipped = build_impls(args, base, device)
    if not impls:
        raise SystemExit(f"no implementation of --impls {args.impls!r} can run here: {skipped}")
    diffusion = create_diffusion("")
    sample_diffusion = create_diffusion(str(SAMPLE_STEPS))

    paper_gflops = dit_gflops(args.model, image_size=args.image_size, **over)
    fwd_gflop = true_gflop_per_image(args.model, image_size=args.image_size, **over)
    row_dtypes = sorted({_dname(i.dtype) for i in impls})
    peak_time = 0.2 if args.quick else 1.0
    peaks = measure_peaks(device, row_dtypes, args.peak_size, peak_time)
    dname = device_name(device)
    depth = f" (depth {args.depth})" if args.depth else ""
    print(f"device: {dname}; torch {torch.__version__}; model {args.model}{depth} @ {args.image_size}px, batch {n}")
    if device.type == "cpu":
        print(f"CPU ISA: {cpu_isa_info()['summary']}")
    print(f"Gflops (paper convention) {paper_gflops:.2f}; true GFLOP/image (forward) {fwd_gflop:.2f}")
    print("peak matmul TFLOP/s (measured): " + ", ".join(f"{k} {v:.3f}" for k, v in peaks.items()))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")

    rows, gemm_ms = [], {}
    for mode in args.modes.split(","):
        diff = sample_diffusion if mode == "sample" else diffusion
        steps = {}
        mode_impls = [impl for impl in impls if mode in impl.modes]
        for impl in mode_impls:
            steps[f"{impl.name} {_dname(impl.dtype)}"] = make_step(mode, impl, inputs, diff, device)
        t0 = time.perf_counter()
        times = time_in_turns(steps, device, args.warmup, args.iters)
        if not args.no_gemm:
            shapes = gemm_shapes(args.model, args.image_size, n, mode, **over)
            for d in row_dtypes:
                gemm_ms[(mode, d)] = time_gemms(shapes, device, DTYPES[peak_dtype(device, d)],
                                                reps=2 if args.quick else 3)
        per_img = MODE_FLOP_FACTOR[mode] * fwd_gflop
        ref_ms = ref_min = None
        mode_rows = []
        for impl, (label, ms_list) in zip(mode_impls, times.items()):
            ms = statistics.median(ms_list)
            dtype = _dname(impl.dtype)
            tflops = per_img * n / (ms / 1e3) / 1e3
            row = dict(impl=impl.name, mode=mode, model=args.model, image_size=args.image_size, batch=n,
                       dtype=dtype, ms=ms, ms_min=min(ms_list), ms_max=max(ms_list), iters=len(ms_list),
                       img_per_s=n / (ms / 1e3), gflops=paper_gflops, gflop_fwd=fwd_gflop, gflop=per_img,
                       tflops=tflops, mfu=tflops / peaks[dtype])
            g = gemm_ms.get((mode, dtype))
            row["gemm_ms"] = g
            row["gemm_eff"] = g / ms if g is not None else None
            if impl.name == "reference":
                ref_ms, ref_min = ms, row["ms_min"]
            mode_rows.append(row)
        for row in mode_rows:
            row["speedup"] = ref_ms / row["ms"] if ref_ms else None
            row["speedup_min"] = ref_min / row["ms_min"] if ref_ms else None
            row["full_sample_s"] = row["ms"] * SAMPLE_STEPS / 1e3 if mode == "sample" else None
        rows += mode_rows
        print_table(mode, mode_rows)
        print(f"  ({time.perf_counter() - t0:.0f} s)")
        del steps  # this mode's models (and optimizer states) before the next mode builds its own
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # The peak again after the run, keeping the higher value (a shared machine's load drifts).
    peaks_end = measure_peaks(device, row_dtypes, args.peak_size, peak_time)
    for d in row_dtypes:
        if peaks_end[d] > peaks[d]:
            for row in rows:
                if row["dtype"] == d:
                    row["mfu"] = row["tflops"] / peaks_end[d]
    peaks_measured = {"start": peaks, "end": peaks_end}
    peaks = {d: max(peaks[d], peaks_end[d]) for d in row_dtypes}
    print("peak matmul TFLOP/s (max of start and end): " + ", ".join(f"{k} {v:.3f}" for k, v in peaks.items()))
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{device.type}-{args.model.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(
        device=dname, device_type=device.type, cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
        torch=torch.__version__, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load_avg_start=load_start, load_avg_end=_load_avg(), note=args.note, quick=args.quick,
        model=args.model, image_size=args.image_size, batch=n, warmup=args.warmup, iters=args.iters,
        sample_steps=SAMPLE_STEPS, cfg_scale=CFG_SCALE, peak_tflops=peaks, peak_tflops_measured=peaks_measured,
        depth=args.depth or dit_config(args.model)["depth"], depth_override=args.depth,
        gemm_gflop={m: gemm_gflop(gemm_shapes(args.model, args.image_size, n, m, **over)) for m in args.modes.split(",")},
        skipped=skipped, backends=_backend_report(), rows=rows,
        cpu_isa=cpu_isa_info() if device.type == "cpu" else None,
        linear_paths=linear_paths() if device.type == "cpu" else None,
        # first-use kernel validation: a one-time cost per (op, backend, dtype, device), paid in the
        # warm-up calls, outside the timed loops
        validation=dict(one_time_s=round(sum(v["seconds"] for v in _backends.validation_stats()), 4),
                        runs=_backends.validation_stats()),
        wall_s=round(time.perf_counter() - started, 1),
        command=shlex.join(["python", "bench/throughput.py", *(argv if argv is not None else sys.argv[1:])]))
    return write_results(result, out, plot, f" ({result['wall_s']:.0f} s in all)")


def model_config(args):
    """The DiT(...) arguments of --model at --image-size, with --depth applied."""
    return dit_config(args.model, args.image_size, **({"depth": args.depth} if args.depth else {}))


def _dname(dtype):
    return {v: k for k, v in DTYPES.items()}[dtype]


def _backend_report():
    return {name: {"available": s.available, "reason": s.reason} for name, s in dit_fast.backends().items()}


def print_table(mode, rows):
    print(f"\n{mode}:")
    print(f"  {'impl':<22}{'dtype':>6}{'ms':>10}{'min-max':>18}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'GEMM eff':>9}{'speedup':>9}{'(min)':>7}")
    for r in rows:
        spread = f"{r['ms_min']:.1f}-{r['ms_max']:.1f}"
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        speed_min = f"{r['speedup_min']:.2f}x" if r["speedup_min"] else "-"
        eff = f"{r['gemm_eff']:.0%}" if r["gemm_eff"] is not None else "-"
        print(f"  {r['impl']:<22}{r['dtype']:>6}{r['ms']:>10.1f}{spread:>18}{r['img_per_s']:>9.1f}"
              f"{r['tflops']:>9.3f}{r['mfu']:>7.1%}{eff:>9}{speed:>9}{speed_min:>7}")
    if mode == "sample":
        for r in rows:
            print(f"  {r['impl']} {r['dtype']}: {SAMPLE_STEPS}-step guided sample of the batch ~ {r['full_sample_s']:.1f} s")


def write_results(result, out, plot_fn, note=""):
    """Writes `result` as JSON to `out` and its chart (plot_fn) beside it as PNG; returns result."""
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}{note}")
    chart = plot_fn(result, out.with_suffix(".png"))
    if chart:
        print(f"wrote {chart}")
    return result


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a line saying so) when it is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return None
    return plt


def save_figure(plt, fig, path):
    """Lays out, writes (100 dpi) and closes `fig`; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot(result, path):
    """A bar chart of img/s per implementation, one panel per mode (speedup over reference on top)."""
    plt = pyplot()
    if plt is None:
        return None
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        labels = [f"{r['impl']}\n{r['dtype']}" for r in rows]
        bars = ax.bar(range(len(rows)), [r["img_per_s"] for r in rows], color="tab:blue")
        for bar, r in zip(bars, rows):
            if r.get("speedup"):
                ax.annotate(f"{r['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{result['model']} {mode}, batch {result['batch']}")
        ax.set_ylabel("images / s")
    fig.suptitle(f"{result['device']} ({result['date']})", fontsize=9)
    return save_figure(plt, fig, path)


if __name__ == "__main__":
    main()
