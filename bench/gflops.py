"""The paper's Gflops table (Peebles & Xie, Table 4: 12 DiT models at 256 px) beside measured forward
throughput: the paper's scaling view (Gflops vs speed).

    python bench/gflops.py                          # all 12 models (XL on a CPU takes a while)
    python bench/gflops.py --models DiT-S/8,DiT-S/4,DiT-S/2,DiT-B/8 --batch-size 2
    python bench/gflops.py --no-time                # the Gflops table only

Columns: params (millions), gflops (dit_fast.flops.dit_gflops: the paper's convention, 1e9
multiply-accumulates per image per forward), paper (Table 4, as dit_fast.flops.PAPER_GFLOPS reads it),
dev (relative deviation), then the measured forward: ms per batch (median of --iters after --warmup),
img/s and achieved TFLOP/s (true FLOPs, 2 per MAC, matmul/conv work: true_gflop_per_image).

DiT-L/8 is flagged: dit_fast.flops reads Table 4 as 5.01 (our count: 5.012, and every other /8 model
costs ~0.254x its /4 sibling), while the value 5.73 has also been quoted for it; both are printed.
Writes a JSON (--out, default bench/results/gflops-<device>.json) and a PNG scatter plot beside it.
"""
import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dit_fast  # noqa: E402
from dit_fast.flops import PAPER_GFLOPS, dit_config, dit_gflops, true_gflop_per_image  # noqa: E402
from throughput import DTYPES, _load_avg, device_name, pyplot, save_figure, sync, write_results  # noqa: E402

# Table 4's 12 models at 256 px, in the paper's order (size, then patch size).
MODELS = tuple(f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (8, 4, 2))
# Other readings of Table 4 entries, printed next to PAPER_GFLOPS and flagged.
ALT_PAPER_GFLOPS = {"DiT-L/8": 5.73}


def gflops_table(models=MODELS, image_size=256):
    """One row per model: params, our Gflops, the paper's, the deviation and a flag."""
    rows = []
    for name in models:
        ours = dit_gflops(name, image_size)
        paper = PAPER_GFLOPS.get((name, image_size))
        alt = ALT_PAPER_GFLOPS.get(name) if image_size == 256 else None
        flag = ""
        if alt is not None:
            flag = (f"Table 4 also quoted as {alt}; dit_fast.flops reads {paper} (count {ours:.3f}; "
                    f"{alt} would be {alt / ours - 1:+.0%} off the count)")
        elif paper is not None and abs(ours - paper) / paper > 0.01:
            flag = f"count deviates {ours / paper - 1:+.1%} from the paper"
        rows.append(dict(model=name, image_size=image_size, params_m=param_count(name, image_size) / 1e6,
                         gflops=ours, paper_gflops=paper, alt_paper_gflops=alt,
                         deviation=(ours / paper - 1) if paper else None, flag=flag,
                         gflop_true=true_gflop_per_image(name, image_size)))
    return rows


def param_count(name, image_size=256):
    """Parameters of the model (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = dit_fast.DiT(**dit_config(name, image_size))
    return sum(p.numel() for p in model.parameters())


def time_forward(name, image_size, batch, device, dtype, warmup, iters, backend="auto"):
    """Median / min / max ms of one forward of `batch` images."""
    torch.manual_seed(0)
    model = dit_fast.DiT(**dit_config(name, image_size)).to(device=device, dtype=dtype).eval()
    latent = image_size // 8
    x = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    with torch.inference_mode(), dit_fast.use_backend(backend):
        for i in range(warmup + iters):
            sync(device)
            t0 = time.perf_counter()
            model(x, t, y)
            sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    del model
    return statistics.median(times), min(times), max(times)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="all", help="comma-separated DiT names (default: all 12 of Table 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--backend", default="auto", help="dit_fast backend for the timed forwards (default auto)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 1 on CPU, 32 on GPU")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-time", action="store_true", help="the table only, no timing")
    p.add_argument("--note", default="", help="free text stored in the JSON")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gflops-<device>.json)")
    args = p.parse_args(argv)
    models = MODELS if args.models == "all" else tuple(m.strip() for m in args.models.split(","))
    for m in models:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r} (expected {', '.join(MODELS)} or all)")
    args.models = models
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.batch_size = args.batch_size if args.batch_size is not None else (32 if gpu else 1)
    for name in ("batch_size", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    choices = ("auto",) + dit_fast._backends.BACKENDS
    if args.backend not in choices:
        p.error(f"--backend must be one of {', '.join(choices)}, got {args.backend!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    load_start = _load_avg()
    rows = gflops_table(args.models)
    dname = device_name(device)
    print(f"device: {dname}; torch {torch.__version__}; forward of batch {args.batch_size}, {args.dtype}, "
          f"backend {args.backend}" if not args.no_time else "Gflops table (no timing)")
    print(f"  {'model':<10}{'params M':>9}{'Gflops':>9}{'paper':>8}{'dev':>8}{'ms':>10}{'img/s':>9}{'TFLOP/s':>9}")
    for r in rows:
        if not args.no_time:
            ms, lo, hi = time_forward(r["model"], 256, args.batch_size, device, DTYPES[args.dtype],
                                      args.warmup, args.iters, args.backend)
            r.update(ms=ms, ms_min=lo, ms_max=hi, batch=args.batch_size, dtype=args.dtype,
                     img_per_s=args.batch_size / (ms / 1e3),
                     tflops=r["gflop_true"] * args.batch_size / (ms / 1e3) / 1e3)
        paper = f"{r['paper_gflops']:.2f}" if r["paper_gflops"] is not None else "-"
        dev = f"{r['deviation']:+.2%}" if r["deviation"] is not None else "-"
        timed = (f"{r['ms']:>10.1f}{r['img_per_s']:>9.2f}{r['tflops']:>9.3f}" if "ms" in r else "")
        print(f"  {r['model']:<10}{r['params_m']:>9.1f}{r['gflops']:>9.2f}{paper:>8}{dev:>8}{timed}"
              + ("  (!)" if r["flag"] else ""))
    for r in rows:
        if r["flag"]:
            print(f"  (!) {r['model']}: {r['flag']}")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gflops-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(kind="gflops", device=dname, device_type=device.type, cpu_count=os.cpu_count(),
                  threads=torch.get_num_threads(), torch=torch.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  load_avg_start=load_start, load_avg_end=_load_avg(), note=args.note,
                  timed=not args.no_time, batch=args.batch_size, dtype=args.dtype, backend=args.backend,
                  warmup=args.warmup, iters=args.iters, rows=rows,
                  command=shlex.join(["python", "bench/gflops.py", *(argv if argv is not None else sys.argv[1:])]))
    return write_results(result, out, plot)


def plot(result, path):
    """Gflops (x, log) against measured img/s (y, log) per model; the table alone plots Gflops per model."""
    plt = pyplot()
    if plt is None:
        return None
    rows = result["rows"]
    colors = {"S": "tab:blue", "B": "tab:orange", "L": "tab:green", "XL": "tab:red"}
    markers = {"8": "o", "4": "s", "2": "^"}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        size, patch = r["model"][4:].split("/")
        y = r["img_per_s"] if result["timed"] else r["params_m"]
        ax.scatter(r["gflops"], y, color=colors.get(size, "k"), marker=markers.get(patch, "o"), s=40)
        ax.annotate(r["model"][4:], (r["gflops"], y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Gflops per image (paper convention)")
    if result["timed"]:
        ax.set_ylabel(f"forward images / s (batch {result['batch']}, {result['dtype']})")
    else:
        ax.set_ylabel("parameters (M)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{result['device']} ({result['date']})", fontsize=8)
    return save_figure(plt, fig, path)


if __name__ == "__main__":
    main()
