"""End to end: `python -m dit_fast.sample_ddp` uncached against `--cache taylor`, same seed.

    python bench/taylor_sample_ddp.py --ckpt RUN/checkpoints/0001500.pt [--sampler ddim --steps 50]

Runs the two commands as subprocesses in turns (A B B A ...: load drift on a shared machine hits both
alike), each into a fresh sample folder, and times each whole process (start-up, model loading and
writing the .npz included). Then scores every .npz with the digits classifier (dit_fast.eval.digits:
a CNN trained on the real digits, independent of the DiT): class accuracy and Fréchet distance to the
real digits. Writes JSON (--out, default bench/results/taylor-sample-ddp.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(ckpt: str, folder: str, args, cache: str) -> tuple:
    cmd = [sys.executable, "-m", "dit_fast.sample_ddp", "--ckpt", ckpt, "--sample-dir", folder,
           "--sampler", args.sampler, "--num-sampling-steps", str(args.steps), "--num-fid-samples", str(args.n),
           "--per-proc-batch-size", str(args.batch), "--global-seed", str(args.seed), "--cfg-scale",
           str(args.cfg_scale), "--cache", cache, "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    (npz,) = Path(folder).glob("*.npz")
    return seconds, str(npz), " ".join(cmd[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--n", type=int, default=500, help="samples per run")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=2, help="runs of each command (in turns A B B A ...)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "taylor-sample-ddp.json"))
    args = p.parse_args()

    from dit_fast.eval.digits import evaluate_samples, real_feature_stats, train_classifier
    from dit_fast.checkpoint import from_pretrained

    size = from_pretrained(args.ckpt).input_size
    order = []
    for k in range(args.reps):
        order += (["none", "taylor"] if k % 2 == 0 else ["taylor", "none"])
    times = {"none": [], "taylor": []}
    npz, cmds = {}, {}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for i, cache in enumerate(order):
            sec, path, cmd = run(args.ckpt, os.path.join(tmp, f"{i}-{cache}"), args, cache)
            times[cache].append(sec)
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
            if cache in npz:                                     # same seed: the same samples every run
                assert np.array_equal(arrays["arr_0"], npz[cache]["arr_0"])
            npz[cache], cmds[cache] = arrays, cmd
            print(f"{cache:7s} {sec:7.1f}s", flush=True)
        load.append(os.getloadavg()[0])
    with torch.enable_grad():
        clf = train_classifier(image_size=size, seed=0)
    stats = real_feature_stats(clf)
    scores = {}
    for cache, arrays in npz.items():
        s = evaluate_samples(clf, arrays["arr_0"], arrays["labels"], stats)
        scores[cache] = dict(accuracy=s["accuracy"], frechet_distance=s["frechet_distance"])
    med = {c: statistics.median(t) for c, t in times.items()}
    report = dict(ckpt=args.ckpt, sampler=args.sampler, steps=args.steps, num_samples=args.n, cfg_scale=args.cfg_scale,
                  seed=args.seed, commands=cmds, seconds=times, median_seconds=med,
                  speedup=med["none"] / med["taylor"], scores=scores,
                  accuracy_points=100 * (scores["taylor"]["accuracy"] - scores["none"]["accuracy"]),
                  fd_ratio=scores["taylor"]["frechet_distance"] / scores["none"]["frechet_distance"],
                  classifier_val_accuracy=clf.val_accuracy, cpu=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), load_average_start_end=load, torch=torch.__version__)
    print(json.dumps({k: report[k] for k in ("median_seconds", "speedup", "scores", "accuracy_points", "fd_ratio")},
                     indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
