"""scikit-learn's bundled 8x8 digits (dit_fast.data) as a tiny image benchmark for class-conditional DiTs.

- `DigitsClassifier` / `train_classifier(...)`: a small deterministic CNN trained on the real digits;
  its 128-d penultimate layer is the feature space for `frechet_distance` (the digits' stand-in for
  Inception features in FID); `digits_features(...)` is that space as an FID feature function.
- `to_uint8` / `from_uint8`: the official FID dump's encoding (N x H x W x 3 uint8).
- `evaluate_samples(...)`: accuracy (sample recognised as its conditioning class) and the Fréchet
  distance between real and generated features.

Everything is computed on the fly from the bundled data; nothing is cached on disk.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DIGITS_NUM_CLASSES, load_digits_images
from .stats import feature_stats, frechet_distance


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] -> (N, H, W, 3) uint8, as the official sample_ddp.py dumps them
    (a one-channel image is repeated over RGB)."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x must be (N, 1|3, H, W), got {tuple(x.shape)}")
    x = torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 1, H, W) float32 grey levels in [-1, 1] (the mean over RGB)."""
    arr = np.asarray(arr)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array (N, H, W, 3), got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(arr).float().mean(dim=-1, keepdim=True).permute(0, 3, 1, 2)
    return (x - 127.5) / 127.5


class DigitsClassifier(nn.Module):
    """A small CNN for grey digits in [-1, 1]: three 3x3 convs, a 128-d feature layer, 10 logits."""

    feature_dim = 128

    def __init__(self, num_classes: int = DIGITS_NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) -> (N, 128) penultimate activations."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return F.relu(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _split(labels: torch.Tensor, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified train/validation index split, deterministic in `seed`."""
    rng = np.random.RandomState(seed)
    train_idx, val_idx = [], []
    y = labels.numpy()
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation by up to max_shift pixels (background-padded), one offset per image."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            sel = ((offs[:, 0] == dy) & (offs[:, 1] == dx)).nonzero().flatten()
            if len(sel):
                out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


@dataclass
class TrainedClassifier:
    model: DigitsClassifier
    image_size: int
    val_accuracy: float
    num_val: int

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        self.model.eval()
        return torch.cat([self.model(x[i:i + batch_size].float()) for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        self.model.eval()
        feats = [self.model.features(x[i:i + batch_size].float()) for i in range(0, len(x), batch_size)]
        return torch.cat(feats).double().numpy()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)


def train_classifier(image_size: int = 16, epochs: int = 12, batch_size: int = 64, lr: float = 2e-3,
                     val_fraction: float = 0.15, seed: int = 0) -> TrainedClassifier:
    """Train a DigitsClassifier on the real digits (a stratified 85% split); deterministic in `seed`.

    Returns it with its accuracy on the held-out 15%, which tells how far its verdict on
    generated digits can be trusted.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    x, y = load_digits_images(image_size)
    train_idx, val_idx = _split(y, val_fraction, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = x[train_idx], y[train_idx]
    steps_per_epoch = max(1, len(xt) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    max_shift = max(1, image_size // 16)
    model.train()
    with torch.enable_grad():  # callers may be sampling under no_grad / inference_mode
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=gen)
            for b in range(steps_per_epoch):
                idx = perm[b * batch_size:(b + 1) * batch_size]
                loss = F.cross_entropy(model(_shift(xt[idx], gen, max_shift)), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    clf = TrainedClassifier(model, image_size, 0.0, len(val_idx))
    if len(val_idx):
        clf.val_accuracy = float((clf.predict(x[val_idx]) == y[val_idx]).float().mean())
    return clf


def digits_features(image_size: int, seed: int = 0) -> Callable[[np.ndarray], torch.Tensor]:
    """A feature_fn for feature_statistics from a classifier trained on the fly (deterministic in `seed`):
    uint8 (N, H, W, 3) -> (N, 128) float64 features."""
    clf = train_classifier(image_size=image_size, seed=seed)

    def fn(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(clf.features(from_uint8(np.asarray(batch))))
    return fn


def evaluate_samples(clf: TrainedClassifier, samples: np.ndarray, labels: Sequence[int],
                     real_stats: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Dict[str, object]:
    """Score generated digits: `samples` is the uint8 (N, H, W, 3) dump, `labels` the conditioning classes.

    Returns accuracy (fraction classified as their conditioning class), per-class accuracy, and the
    Fréchet distance to the real digits in the classifier's feature space.
    """
    labels = torch.as_tensor(np.asarray(labels)).long()
    x = from_uint8(samples)
    if x.shape[-1] != clf.image_size:
        raise ValueError(f"samples are {x.shape[-1]}x{x.shape[-1]}, the classifier expects "
                         f"{clf.image_size}x{clf.image_size}")
    if len(labels) != len(x):
        raise ValueError(f"{len(x)} samples but {len(labels)} labels")
    pred = clf.predict(x)
    correct = (pred == labels).float()
    per_class = {int(c): float(correct[labels == c].mean()) for c in labels.unique()}
    if real_stats is None:
        real_stats = real_feature_stats(clf)
    mu, sigma = feature_stats(clf.features(x))
    return {
        "accuracy": float(correct.mean()),
        "per_class_accuracy": per_class,
        "frechet_distance": frechet_distance(real_stats[0], real_stats[1], mu, sigma),
        "num_samples": int(len(x)),
    }


def real_feature_stats(clf: TrainedClassifier) -> Tuple[np.ndarray, np.ndarray]:
    """Feature statistics of all real digits, passed through the same uint8 encoding as samples."""
    x, _ = load_digits_images(clf.image_size)
    return feature_stats(clf.features(from_uint8(to_uint8(x))))
