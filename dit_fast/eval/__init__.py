"""Evaluation: FID and the digits demo's classifier metrics.

    python -m dit_fast.eval.fid REF.npz SAMPLES.npz [--weights pt_inception-2015-12-05-6726825d.pth]
    python -m dit_fast.eval REF.npz SAMPLES.npz      # the same

- `fid`: the FID command line and public API;
- `stats`: the Fréchet distance, batched feature statistics, precision/recall, `.npz` reading;
- `inception`: the FID Inception-v3 and its weights;
- `digits`: the digits classifier, its features and sample scores (the data: dit_fast.data).

Submodules are imported on first use (so `python -m dit_fast.eval.fid` runs the module once, and the
digits metrics' scikit-learn is only needed when they are used).
"""
import importlib

_HOME = {"FeatureStatistics": "stats", "feature_statistics": "stats", "frechet_distance": "stats",
         "FIDInceptionV3": "inception", "load_inception": "inception"}
__all__ = sorted(_HOME)


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module("." + _HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
