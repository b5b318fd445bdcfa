"""Fréchet Inception Distance (FID) between two sets of images: `python -m dit_fast.eval.fid A.npz B.npz`.

- `frechet_distance(mu1, sigma1, mu2, sigma2)`: the closed form
  |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), with the trace of the
  square root computed exactly from the eigenvalues of the symmetric PSD matrix
  sigma1^(1/2) sigma2 sigma1^(1/2) (no complex sqrtm, no diagonal offset).
- `FeatureStatistics` / `feature_statistics(...)`: mean and covariance (ddof=1, as np.cov)
  accumulated batch by batch in float64 (Chan et al.'s pairwise update), so any number of images
  fits in memory.
- `FIDInceptionV3`: the Inception-v3 network of the standard FID (TF's 2015-12-05 graph, as ported
  by pytorch-fid: FIDInceptionA/C/E_1/E_2 blocks, count_include_pad=False average pools, max pool in
  the last block), written in plain torch; returns the 2048-d pool3 features. Its weights
  (`pt_inception-2015-12-05-6726825d.pth`, pytorch-fid's FID weights; torchvision key names) are
  read from a local file only: `--weights`, else $DIT_FAST_FID_WEIGHTS, else
  ~/.cache/dit_fast/pt_inception-2015-12-05-6726825d.pth.
- `--features digits`: the digits demo's classifier features (dit_fast.eval.digits) instead of
  Inception, for the 8x8-digits demo.

Inputs: `.npz` files with `arr_0` (uint8 N x H x W x 3, as sample_ddp and the ADM evaluator use);
a file that also holds `mu` and `sigma` (an ADM / pytorch-fid reference batch) contributes those
statistics directly. Optional: --precision-recall (improved precision and recall, Kynkäänniemi et
al. 2019, k=3) on the features.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._extras import require

__all__ = [
    "frechet_distance", "FeatureStatistics", "feature_statistics", "FIDInceptionV3", "load_inception",
    "inception_features", "default_weights_path", "precision_recall", "main",
]

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


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


# ----------------------------------------------------------------------------- Inception-v3 (FID)

class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool ignores the zero padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """InceptionE; pool="avg" (FIDInceptionE_1, count_include_pad=False) or "max" (FIDInceptionE_2:
    the FID graph's last block max-pools)."""

    def __init__(self, in_channels: int, pool: str = "avg") -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3: uint8-range or [0, 1] images -> (N, 2048) pool3 features.

    Parameter names follow torchvision's Inception3 (as in the FID weights file); `fc` (1008 classes)
    is kept so the weights load strictly, but the features are taken before it.
    """

    def __init__(self, num_classes: int = 1008) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float in [0, 1]. Resized to 299x299 (bilinear), scaled to [-1, 1]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be (N, 3, H, W), got {tuple(x.shape)}")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)        # (N, 2048)


def default_weights_path() -> Path:
    env = os.environ.get("DIT_FAST_FID_WEIGHTS")
    if env:
        return Path(env)
    return Path(os.environ.get("DIT_FAST_CACHE", Path.home() / ".cache" / "dit_fast")) / FID_WEIGHTS_NAME


def load_inception(path=None, device="cpu") -> FIDInceptionV3:
    """FIDInceptionV3 with the weights at `path` (default: default_weights_path()), strictly loaded.

    Accepts pytorch-fid's FID weights (a plain state dict) and torchvision-layout state dicts; extra
    AuxLogits.* entries are dropped, missing BatchNorm num_batches_tracked counters are allowed.
    """
    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"no Inception weights at {str(path)!r}: FID needs {FID_WEIGHTS_NAME} (pytorch-fid's "
                                "port of the TF FID Inception) as a local file; pass its path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read Inception weights from {str(path)!r}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1008
    model = FIDInceptionV3(num_classes=num_classes)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{str(path)!r} is not an FID Inception-v3 state dict: "
                         f"{len(missing)} missing keys (e.g. {missing[:2]}), "
                         f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})")
    return model.to(device).eval()


def _images_to_tensor(batch: np.ndarray, device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {batch.dtype} {batch.shape}")
    return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def inception_features(model: FIDInceptionV3, device="cpu") -> Callable[[np.ndarray], torch.Tensor]:
    """A feature_fn for feature_statistics: uint8 (N, H, W, 3) -> (N, 2048) float64 pool3 features."""
    @torch.no_grad()
    def fn(batch: np.ndarray) -> torch.Tensor:
        return model(_images_to_tensor(batch, device)).double().cpu()
    return fn


def digits_features(image_size: int, seed: int = 0) -> Callable[[np.ndarray], torch.Tensor]:
    """A feature_fn from the digits demo's classifier (trained on the fly, deterministic in `seed`)."""
    from .digits import from_uint8, train_classifier

    clf = train_classifier(image_size=image_size, seed=seed)

    def fn(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(clf.features(from_uint8(np.asarray(batch))))
    return fn


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


# ----------------------------------------------------------------------------- CLI

class _Error(Exception):
    pass


def _load_npz(path: str, what: str) -> Dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise _Error(f"{what}: no such file {path!r}")
    try:
        with np.load(p) as f:
            return {k: f[k] for k in f.files if k in ("arr_0", "mu", "sigma")}
    except Exception as e:
        raise _Error(f"{what}: cannot read {path!r} as .npz: {str(e).splitlines()[0] if str(e) else e!r}") from None


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
        a = _load_npz(args.npz[0], "first .npz")
        b = _load_npz(args.npz[1], "second .npz")
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
