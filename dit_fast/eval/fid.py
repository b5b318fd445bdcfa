"""Fréchet Inception Distance (FID) between two sets of images: `python -m dit_fast.eval.fid A.npz B.npz`.

The public FID API and its command line. The pieces live in dit_fast.eval.stats (the Fréchet
distance, batched feature statistics, precision/recall, reading `.npz` files) and
dit_fast.eval.inception (the FID Inception-v3 and its weights); `--features digits` uses the digits
demo's classifier (dit_fast.eval.digits) instead of Inception, for the 8x8-digits demo.

Inputs: `.npz` files with `arr_0` (uint8 N x H x W x 3, as sample_ddp and the ADM evaluator use);
a file that also holds `mu` and `sigma` (an ADM / pytorch-fid reference batch) contributes those
statistics directly. Optional: --precision-recall (improved precision and recall, Kynkäänniemi et
al. 2019, k=3) on the features.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .._extras import require
from .digits import digits_features
from .inception import FID_WEIGHTS_NAME, FIDInceptionV3, default_weights_path, inception_features, load_inception
from .stats import FeatureStatistics, feature_statistics, frechet_distance, load_npz, precision_recall

__all__ = [
    "frechet_distance", "FeatureStatistics", "feature_statistics", "FIDInceptionV3", "load_inception",
    "inception_features", "default_weights_path", "precision_recall", "main",
]


# ----------------------------------------------------------------------------- CLI

class _Error(Exception):
    pass


def _stats_for(data: Dict[str, np.ndarray], what: str, feature_fn, batch_size: int, want_features: bool,
               num_samples: Optional[int], use_stored: bool):
    if use_stored and "mu" in data and "sigma" in data and not want_features:
        return data["mu"], data["sigma"], None
    if "arr_0" not in data:
        raise _Error(f"{what}: holds neither 'arr_0' (images) nor 'mu'/'sigma' (statistics)")
    images = data["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise _Error(f"{what}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if num_samples is not None:
        images = images[:num_samples]
    if len(images) < 2:
        raise _Error(f"{what}: needs at least 2 images, has {len(images)}")
    out = feature_statistics(images, feature_fn, batch_size=batch_size, progress=True, keep_features=want_features)
    return out if want_features else (*out, None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dit_fast.eval.fid", description=__doc__.splitlines()[0])
    p.add_argument("npz", nargs=2, help="two .npz files with arr_0 (uint8 N x H x W x 3) or mu/sigma: the "
                                        "reference batch first, the samples second (as the ADM evaluator)")
    p.add_argument("--features", choices=("inception", "digits"), default="inception",
                   help="inception (FID) or digits (the digits demo's classifier)")
    p.add_argument("--weights", default=None,
                   help=f"FID Inception weights file ({FID_WEIGHTS_NAME}); default: $DIT_FAST_FID_WEIGHTS or "
                        f"~/.cache/dit_fast/{FID_WEIGHTS_NAME}")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=None, help="use only the first N images of each file")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--recompute", action="store_true", help="ignore stored mu/sigma and compute from arr_0")
    p.add_argument("--precision-recall", action="store_true", help="also report improved precision/recall (k=3)")
    args = p.parse_args(argv)
    prog = "dit_fast.eval.fid"
    try:
        if args.batch_size < 1:
            raise _Error(f"--batch-size must be positive, got {args.batch_size}")
        if args.num_samples is not None and args.num_samples < 2:
            raise _Error(f"--num-samples must be at least 2, got {args.num_samples}")
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise _Error(f"--device: unknown device {args.device!r}") from None
        try:
            a = load_npz(args.npz[0], "first .npz")
            b = load_npz(args.npz[1], "second .npz")
        except ValueError as e:
            raise _Error(str(e)) from None
        use_stored = not args.recompute
        stored = [use_stored and "mu" in d and "sigma" in d and not args.precision_recall for d in (a, b)]
        if all(stored):  # both are statistics: no network, no weights
            feature_fn = None
        elif args.features == "inception":
            try:
                net = load_inception(args.weights, device)
            except (FileNotFoundError, ValueError) as e:
                raise _Error(f"--weights: {e}") from None
            feature_fn = inception_features(net, device)
        else:
            if "arr_0" not in a:
                raise _Error("--features digits: the first .npz has no arr_0 images")
            try:
                require(["sklearn"], "demo", "the digits classifier")
                feature_fn = digits_features(a["arr_0"].shape[1])
            except ImportError as e:
                raise _Error(f"--features digits: {e}") from None
            except ValueError as e:
                raise _Error(f"--features digits: {e}") from None
        mu1, s1, f1 = _stats_for(a, "first .npz", feature_fn, args.batch_size, args.precision_recall,
                                 args.num_samples, use_stored)
        mu2, s2, f2 = _stats_for(b, "second .npz", feature_fn, args.batch_size, args.precision_recall,
                                 args.num_samples, use_stored)
        try:
            fid = frechet_distance(mu1, s1, mu2, s2)
        except ValueError as e:
            raise _Error(f"the two files' statistics cannot be compared: {e}") from None
    except _Error as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    name = "FID" if args.features == "inception" else "Frechet distance (digits features)"
    print(f"{name}: {fid:.6f}")
    if args.precision_recall:
        prec, rec = precision_recall(f1, f2)
        print(f"Precision: {prec:.4f}")
        print(f"Recall: {rec:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
