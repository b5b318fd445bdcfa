"""Evaluation: FID (dit_fast.eval.fid) and the digits demo's classifier metrics (dit_fast.eval.digits).

    python -m dit_fast.eval.fid REF.npz SAMPLES.npz [--weights pt_inception-2015-12-05-6726825d.pth]
    python -m dit_fast.eval REF.npz SAMPLES.npz      # the same

Submodules are imported on first use (so `python -m dit_fast.eval.fid` runs the module once, and the
digits metrics' scikit-learn is only needed when they are used).
"""
import importlib

__all__ = ["FeatureStatistics", "FIDInceptionV3", "feature_statistics", "frechet_distance", "load_inception"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(".fid", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
