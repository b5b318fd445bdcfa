"""scikit-learn's bundled 8x8 digits as (N, 1, S, S) images: the data of `--dataset digits`, the demo
and the sampling quality harness (the digits classifier in dit_fast.eval.digits is trained on it too).

Everything is computed on the fly from the bundled data; nothing is cached on disk.
"""
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_NUM_CLASSES = 10
DIGITS_SIZES = (8, 16, 32)


def load_digits_images(image_size: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits upscaled (bilinear) to image_size: (N, 1, S, S) float32 in [-1, 1] and (N,)
    int64 labels."""
    if image_size not in DIGITS_SIZES:
        raise ValueError(f"image_size must be one of {DIGITS_SIZES} for the digits, got {image_size!r}")
    images, targets = _bundled_digits()
    x = torch.from_numpy(images).float().div_(16.0).unsqueeze(1)             # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
    return x.contiguous(), torch.from_numpy(targets).long()


def _bundled_digits() -> Tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) grey levels 0..16 and (1797,) labels: scikit-learn's digits.csv.gz, read directly
    (what sklearn.datasets.load_digits reads, without importing scikit-learn's estimators)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits data ships with scikit-learn: pip install scikit-learn")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    if not os.path.isfile(path):  # a future layout: ask scikit-learn itself
        from sklearn.datasets import load_digits

        data = load_digits()
        return data.images, data.target
    arr = np.loadtxt(path, delimiter=",")
    return arr[:, :-1].reshape(-1, 8, 8), arr[:, -1].astype(np.int64)
