"""Feature statistics and the distances between them: what FID computes once features are extracted.

- `frechet_distance(mu1, sigma1, mu2, sigma2)`: the closed form
  |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), with the trace of the
  square root computed exactly from the eigenvalues of the symmetric PSD matrix
  sigma1^(1/2) sigma2 sigma1^(1/2) (no complex sqrtm, no diagonal offset).
- `FeatureStatistics` / `feature_statistics(...)`: mean and covariance (ddof=1, as np.cov)
  accumulated batch by batch in float64 (Chan et al.'s pairwise update), so any number of images
  fits in memory; `feature_stats(features)`: the same for one in-memory (N, D) array.
- `precision_recall(real, fake)`: improved precision and recall (Kynkäänniemi et al. 2019, k=3).
- `load_npz(path)`: the arrays of an FID `.npz` (`arr_0` images and/or a reference batch's `mu`, `sigma`).
"""
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import torch

__all__ = ["frechet_distance", "FeatureStatistics", "feature_statistics", "feature_stats", "precision_recall",
           "load_npz"]


# ----------------------------------------------------------------------------- the distance

def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    Exact to the closed form for symmetric positive semi-definite covariances (tiny negative
    eigenvalues from rounding are clipped to 0). Raises ValueError on mismatched shapes, non-finite
    values or a covariance that is clearly not PSD.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be {d}x{d} (the length of mu), got {s1.shape} and {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite values")
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    _check_psd(w, "sigma1")
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    _check_psd(np.linalg.eigvalsh(s2), "sigma2")
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _check_psd(eigenvalues: np.ndarray, name: str) -> None:
    scale = max(float(np.abs(eigenvalues).max(initial=0.0)), 1e-300)
    if eigenvalues.min(initial=0.0) < -1e-6 * scale:
        raise ValueError(f"{name} is not positive semi-definite (eigenvalue {eigenvalues.min():.3g}); "
                         "is it a covariance matrix?")

# ----------------------------------------------------------------------------- statistics in batches

class FeatureStatistics:
    """Running mean and covariance of feature vectors, updated batch by batch in float64."""

    def __init__(self, dim: Optional[int] = None) -> None:
        self.dim = dim
        self.n = 0
        self._mean: Optional[np.ndarray] = None
        self._m2: Optional[np.ndarray] = None      # sum of outer products of deviations

    def update(self, features) -> "FeatureStatistics":
        x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {x.shape}")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"features must have dimension {self.dim}, got {x.shape[1]}")
        nb = x.shape[0]
        if nb == 0:
            return self
        mean_b = x.mean(axis=0)
        dev = x - mean_b
        m2_b = dev.T @ dev
        if self.n == 0:
            self._mean, self._m2 = mean_b, m2_b
        else:
            n = self.n + nb
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (nb / n)
            self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * nb / n)
        self.n += nb
        return self

    @property
    def mu(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no features seen")
        return self._mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        return self._m2 / (self.n - 1)


def _batches(images: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def feature_statistics(images: np.ndarray, feature_fn: Callable[[np.ndarray], torch.Tensor],
                       batch_size: int = 50, progress: bool = False, keep_features: bool = False):
    """(mu, sigma) of feature_fn over `images` (uint8 N x H x W x 3), `batch_size` images at a time.
    With keep_features, also returns the (N, D) feature array (for precision/recall)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    stats = FeatureStatistics()
    kept = []
    it: Iterable = _batches(images, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=(len(images) + batch_size - 1) // batch_size, desc="features")
    for batch in it:
        feats = feature_fn(batch)
        stats.update(feats)
        if keep_features:
            kept.append(np.asarray(feats.detach().cpu() if isinstance(feats, torch.Tensor) else feats, np.float32))
    if keep_features:
        return stats.mu, stats.sigma, np.concatenate(kept) if kept else np.zeros((0, stats.dim or 0), np.float32)
    return stats.mu, stats.sigma


def feature_stats(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of an (N, D) feature set (N >= 2)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


# ----------------------------------------------------------------------------- precision / recall

def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1024) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the fraction of fake
    features inside the union of real k-NN balls, recall the fraction of real inside the fake ones."""
    real = torch.as_tensor(np.asarray(real, np.float32))
    fake = torch.as_tensor(np.asarray(fake, np.float32))
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")

    def radii(x):
        out = []
        for i in range(0, len(x), batch):
            d = torch.cdist(x[i:i + batch], x)
            out.append(d.kthvalue(k + 1, dim=1).values)       # k-th neighbour besides itself
        return torch.cat(out)

    def covered(x, ref, r):
        hits = []
        for i in range(0, len(x), batch):
            d = torch.cdist(x[i:i + batch], ref)
            hits.append((d <= r[None]).any(dim=1))
        return float(torch.cat(hits).float().mean())

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


# ----------------------------------------------------------------------------- stats files

def load_npz(path, what: str = "npz") -> Dict[str, np.ndarray]:
    """The FID arrays of a .npz file: `arr_0` (uint8 N x H x W x 3 images, as sample_ddp and the ADM
    evaluator write them) and/or `mu`, `sigma` (an ADM / pytorch-fid reference batch's statistics).
    Raises ValueError naming `what` for a missing or unreadable file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: no such file {str(path)!r}")
    try:
        with np.load(p) as f:
            return {k: f[k] for k in f.files if k in ("arr_0", "mu", "sigma")}
    except Exception as e:
        raise ValueError(f"{what}: cannot read {str(path)!r} as .npz: "
                         f"{str(e).splitlines()[0] if str(e) else e!r}") from None
