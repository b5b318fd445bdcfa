"""Throughput of DiT implementations: dit_fast's backends against the reference, torch.compile and diffusers.

    python bench/throughput.py                       # CPU: DiT-S/2, 256 px, batch 8; GPU: DiT-XL/2, bf16, batch 32
    python bench/throughput.py --quick --modes forward --impls reference,dit_fast

Every implementation runs in this one process, on the same weights and inputs. After warm-up they are
timed in turns (A B C A B C ...), so that a machine's drift hits all of them alike; the table gives the
median and the min-max of the turns. Columns:
- gflops: the paper's Gflops (multiply-accumulates per image, forward); gflop: true GFLOP per image of
  the mode (2 x MACs; x3 for a training step's forward + backward; x2 images per guided sample);
- ms: median time per iteration; img/s; tflops: achieved TFLOP/s from `gflop`;
- mfu: tflops over the peak matmul throughput of the device in that dtype, measured in this run;
- speedup: time of `reference` in the same mode over this row's time.
Writes a JSON (--out, default bench/results/<device>-<model>.json) and a PNG bar chart beside it.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dit_fast  # noqa: E402
from dit_fast import DiT_models  # noqa: E402
from dit_fast.diffusion import create_diffusion  # noqa: E402
from dit_fast.flops import dit_gflops, true_gflop_per_image  # noqa: E402

MODES = ("forward", "train", "sample")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CFG_SCALE = 4.0
SAMPLE_STEPS = 250
NUM_CLASSES = 1000  # DiT_models default; label NUM_CLASSES is the null class


# ----------------------------------------------------------------------------- implementations

class Impl:
    """One implementation to time: builds its model (x, t, y) -> out in a dtype, runs under its backend."""

    def __init__(self, name, build, dtype, backend=None):
        self.name, self.build, self.dtype, self.backend = name, build, dtype, backend

    def context(self, device, autocast):
        stack = contextlib.ExitStack()
        if self.backend is not None:
            stack.enter_context(dit_fast.use_backend(self.backend))
        if autocast:
            stack.enter_context(torch.autocast(device.type, dtype=self.dtype))
        return stack


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

    def clone(dtype):
        return copy.deepcopy(base).to(device=device, dtype=dtype)

    if "reference" in wanted:
        impls.append(Impl("reference", clone, fp32, backend="reference"))
    if "reference+compile" in wanted:
        impls.append(Impl("reference+compile", lambda d: torch.compile(clone(d)), fp32, backend="reference"))
    if "diffusers" in wanted:
        try:
            from dit_fast.interop.diffusers import to_diffusers_model
            impls.append(Impl("diffusers", lambda d: DiffusersAdapter(to_diffusers_model(base)).to(device, d), fp32))
        except ImportError as e:
            skipped["diffusers"] = f"diffusers not importable: {e}"
    if "official" in wanted or args.reference_repo:
        if not args.reference_repo:
            skipped["official"] = "no --reference-repo given"
        else:
            sys.path.insert(0, str(Path(args.reference_repo).resolve()))
            from models import DiT_models as official_models  # the official checkout's models.py

            def official(dtype):
                model = official_models[args.model](input_size=args.image_size // 8)
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
                impls.append(Impl(f"dit_fast[{backend}]", clone, DTYPES[dname], backend=backend))
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
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)

        def step():
            with impl.context(device, autocast):
                loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
    else:
        guided = getattr(model, "forward_with_cfg", None) or _with_cfg(model)
        z = torch.cat([x, x])
        tt = torch.cat([t, t]) % diffusion.num_timesteps
        yy = torch.cat([y, torch.full_like(y, NUM_CLASSES)])

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


def peak_matmul_tflops(device, dtype, n=None, reps=3):
    """The device's matmul throughput in `dtype`, measured now (best of `reps`). CPUs without native
    bf16/fp16 matmul run those dtypes far slower, so they get a smaller problem."""
    if n is None:
        n = 8192 if device.type == "cuda" else (1024 if dtype == torch.float32 else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="DiT_models name (default: DiT-S/2 on CPU, DiT-XL/2 on GPU)")
    p.add_argument("--image-size", type=int, default=256, choices=[256, 512])
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 32 on GPU")
    p.add_argument("--dtype", default=None, help="dit_fast dtypes, comma-separated (default CPU: fp32,bf16; GPU: bf16)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--impls", default="reference,reference+compile,diffusers,dit_fast")
    p.add_argument("--reference-repo", default=None, help="a checkout of facebookresearch/DiT: also times its models.py")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="fewer turns (a smoke run, not a measurement)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<device>-<model>.json)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.model = args.model or ("DiT-XL/2" if gpu else "DiT-S/2")
    args.batch_size = args.batch_size or (32 if gpu else 8)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32,bf16")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.iters = args.iters if args.iters is not None else (2 if args.quick else 5)
    if args.model not in DiT_models:
        p.error(f"--model must be one of {', '.join(DiT_models)}; got {args.model!r}")
    for m in args.modes.split(","):
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r} (expected {', '.join(MODES)})")
    for d in args.dtype.split(","):
        if d not in DTYPES:
            p.error(f"--dtype: unknown dtype {d!r} (expected {', '.join(DTYPES)})")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    base = DiT_models[args.model](input_size=args.image_size // 8)
    with torch.no_grad():  # non-zero adaLN / output layers, as a trained model has
        for name, prm in base.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                prm.normal_(std=0.02)
    n = args.batch_size
    latent = args.image_size // 8
    inputs = (torch.randn(n, 4, latent, latent), torch.randint(0, 1000, (n,)), torch.randint(0, NUM_CLASSES, (n,)))
    impls, skipped = build_impls(args, base, device)
    diffusion = create_diffusion("")
    sample_diffusion = create_diffusion(str(SAMPLE_STEPS))

    paper_gflops = dit_gflops(args.model, image_size=args.image_size)
    fwd_gflop = true_gflop_per_image(args.model, image_size=args.image_size)
    peaks = {d: peak_matmul_tflops(device, DTYPES[d]) for d in sorted({"fp32", *args.dtype.split(",")})}
    dname = device_name(device)
    print(f"device: {dname}; torch {torch.__version__}; model {args.model} @ {args.image_size}px, batch {n}")
    print("peak matmul TFLOP/s (measured): " + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items()))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")

    rows = []
    for mode in args.modes.split(","):
        diff = sample_diffusion if mode == "sample" else diffusion
        steps = {}
        for impl in impls:
            label = f"{impl.name} {_dname(impl.dtype)}"
            steps[label] = make_step(mode, impl, inputs, diff, device)
        t0 = time.perf_counter()
        times = time_in_turns(steps, device, args.warmup, args.iters)
        per_img = {"forward": fwd_gflop, "train": 3 * fwd_gflop, "sample": 2 * fwd_gflop}[mode]
        ref_ms = None
        mode_rows = []
        for impl, (label, ms_list) in zip(impls, times.items()):
            ms = statistics.median(ms_list)
            dtype = _dname(impl.dtype)
            tflops = per_img * n / (ms / 1e3) / 1e3
            row = dict(impl=impl.name, mode=mode, model=args.model, batch=n, dtype=dtype, ms=ms,
                       ms_min=min(ms_list), ms_max=max(ms_list), img_per_s=n / (ms / 1e3),
                       gflops=paper_gflops, gflop=per_img, tflops=tflops,
                       mfu=tflops / peaks[dtype])
            if impl.name == "reference":
                ref_ms = ms
            mode_rows.append(row)
        for row in mode_rows:
            row["speedup"] = ref_ms / row["ms"] if ref_ms else None
            if mode == "sample":
                row["full_sample_s"] = row["ms"] * SAMPLE_STEPS / 1e3
        rows += mode_rows
        print_table(mode, mode_rows)
        print(f"  ({time.perf_counter() - t0:.0f} s)")

    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{device.type}-{args.model.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(device=dname, torch=torch.__version__, model=args.model, image_size=args.image_size,
                  batch=n, peak_tflops=peaks, skipped=skipped, backends=_backend_report(), rows=rows,
                  command=" ".join(["python bench/throughput.py", *(argv if argv is not None else sys.argv[1:])]))
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    chart = plot(result, out.with_suffix(".png"))
    if chart:
        print(f"wrote {chart}")
    return result


def _dname(dtype):
    return {v: k for k, v in DTYPES.items()}[dtype]


def _backend_report():
    return {name: {"available": s.available, "reason": s.reason} for name, s in dit_fast.backends().items()}


def print_table(mode, rows):
    print(f"\n{mode}:")
    print(f"  {'impl':<22}{'dtype':>6}{'ms':>10}{'min-max':>18}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'speedup':>9}")
    for r in rows:
        spread = f"{r['ms_min']:.1f}-{r['ms_max']:.1f}"
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"  {r['impl']:<22}{r['dtype']:>6}{r['ms']:>10.1f}{spread:>18}{r['img_per_s']:>9.1f}"
              f"{r['tflops']:>9.3f}{r['mfu']:>7.1%}{speed:>9}")
    if mode == "sample":
        for r in rows:
            print(f"  {r['impl']} {r['dtype']}: {SAMPLE_STEPS}-step guided sample of the batch ~ {r['full_sample_s']:.1f} s")


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return None
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        labels = [f"{r['impl']}\n{r['dtype']}" for r in rows]
        ax.bar(range(len(rows)), [r["img_per_s"] for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{result['model']} {mode}")
        ax.set_ylabel("images / s")
    fig.suptitle(result["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
