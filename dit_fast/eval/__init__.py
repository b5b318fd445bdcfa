"""Evaluation: FID (dit_fast.eval.fid) and the digits demo's classifier metrics (dit_fast.eval.digits).

    python -m dit_fast.eval.fid REF.npz SAMPLES.npz [--weights pt_inception-2015-12-05-6726825d.pth]
    python -m dit_fast.eval REF.npz SAMPLES.npz      # the same

Submodules are imported on use (the digits metrics need scikit-learn).
"""
from .fid import FeatureStatistics, FIDInceptionV3, feature_statistics, frechet_distance, load_inception

__all__ = ["FeatureStatistics", "FIDInceptionV3", "feature_statistics", "frechet_distance", "load_inception"]
