"""Training data: ImageFolder trees, pre-extracted latents, the bundled digits, the choice among them
from the arguments (`build_data`), and the sampler.

Every random choice the data makes (order, horizontal flip, the latent sample drawn from a stored
VAE posterior) is a function of (seed, epoch, index), handed to the dataset by `TrainSampler` as a
`SampleKey`. Nothing depends on worker processes or on where a run was resumed, so a resumed run
reads exactly the batches the uninterrupted run would have read.
"""
import argparse
import bisect
import json
import os
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from .._extras import MissingDependency, require
from ..data import DIGITS_NUM_CLASSES, DIGITS_SIZES, load_digits_images

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LATENTS_FORMAT = "dit_fast.latents/1"
LATENTS_META = "meta.json"


class SampleKey(NamedTuple):
    """One sample request: dataset index, horizontal flip (0/1), seed for any other randomness."""
    index: int
    flip: int
    seed: int


def _mix(*words: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(w) & 0xFFFFFFFFFFFFFFFF for w in words]).generate_state(2, np.uint64)
    return int((int(state[0]) << 32 ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF)


# --------------------------------------------------------------------------- preprocessing

def center_crop_arr(pil_image, image_size: int):
    """Center cropping implementation from ADM (as in the official DiT train.py).
    https://github.com/openai/guided-diffusion/blob/8fb3ad9197f16bbc40620447b2742e13458d2831/guided_diffusion/image_datasets.py#L126
    """
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def pil_to_tensor(img) -> torch.Tensor:
    """ToTensor() then Normalize(mean=0.5, std=0.5): (3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    return x.sub_(0.5).div_(0.5)


def preprocess(img, image_size: int, flip: bool) -> torch.Tensor:
    """The official transform: ADM center crop, horizontal flip (here chosen by the caller), [-1, 1]."""
    from PIL import Image

    img = center_crop_arr(img.convert("RGB"), image_size)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(img)


# --------------------------------------------------------------------------- datasets

class BadImageError(ValueError):
    """An image file that cannot be read. Re-raised from a DataLoader worker, the message is cut back
    to the original one line (the worker's traceback is dropped)."""

    def __init__(self, message: str = ""):
        prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
        last = message.strip().splitlines()[-1] if message.strip() else ""
        super().__init__(last[len(prefix):] if "Original Traceback" in message and last.startswith(prefix)
                         else message)


class ImageFolder(Dataset):
    """root/<class>/**/<image>, as torchvision's ImageFolder reads it (classes sorted by name,
    files sorted, symlinks followed), with the official DiT preprocessing. Items: (image, label).

    An unreadable image raises BadImageError naming the file; with skip_bad=True it is replaced by
    the next readable image (in file order, so the data stays a function of the sample key) and items
    are (image, label, skipped), skipped being the unreadable files met (os.pathsep-joined, or "")."""

    accepts_sample_key = True

    def __init__(self, root, image_size: int, flip: bool = True, skip_bad: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"--data-path {str(root)!r} is not a directory")
        self.root, self.image_size, self.flip, self.skip_bad = root, int(image_size), flip, skip_bad
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise ValueError(f"--data-path {str(root)!r} has no class folders (expected root/<class>/<images>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[Tuple[str, int]] = []
        for c in self.classes:
            for dirpath, _, files in sorted(os.walk(root / c, followlinks=True)):
                for name in sorted(files):
                    if name.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, name), self.class_to_idx[c]))
        if not self.samples:
            raise ValueError(f"--data-path {str(root)!r} holds no images ({', '.join(IMG_EXTENSIONS)})")
        self.targets = [s[1] for s in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, flip: bool) -> Tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img.load()
                img = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadImageError(f"cannot read image {path}: {e} (pass --skip-bad-images to skip unreadable "
                                f"images)") from None
        return preprocess(img, self.image_size, flip and self.flip), label

    def __getitem__(self, key):
        key = _as_key(key)
        if not self.skip_bad:
            return self.load(key.index, bool(key.flip))
        bad = []
        for k in range(len(self.samples)):
            index = (key.index + k) % len(self.samples)
            try:
                x, label = self.load(index, bool(key.flip))
            except BadImageError:
                bad.append(self.samples[index][0])
                continue
            return x, label, os.pathsep.join(bad)
        raise BadImageError(f"--data-path {str(self.root)!r}: none of its {len(self.samples)} images can be read")


class LatentDataset(Dataset):
    """Latents written by `python -m dit_fast.extract_latents`.

    Each shard holds, for every image, the VAE latents of the image and of its horizontal flip;
    the flip is chosen at random per epoch as the on-the-fly pipeline would. Shards stored as
    posterior moments (`--store moments`) are sampled afresh each time (mean + std * noise), so the
    training data is distributed exactly like on-the-fly VAE encoding. Shards are memory-mapped.
    """

    accepts_sample_key = True

    def __init__(self, root):
        root = Path(root)
        meta_path = root / LATENTS_META
        if not meta_path.is_file():
            raise ValueError(f"--data-path {str(root)!r} has no {LATENTS_META} (not an extract_latents output)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != LATENTS_FORMAT:
            raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {LATENTS_FORMAT!r})")
        self.root, self.meta = root, meta
        self.store = meta["store"]
        self.shard_files = [root / s["file"] for s in meta["shards"]]
        for f in self.shard_files:
            if not f.is_file():
                raise ValueError(f"latents shard missing: {f}")
        self.sizes = [int(s["num"]) for s in meta["shards"]]
        self.offsets = np.cumsum([0] + self.sizes).tolist()
        self._shards: Optional[List[dict]] = None
        for f, n in zip(self.shard_files, self.sizes):  # before training starts: memory-mapping reads no data
            self._check_shard(self._open(f), f, n)

    @staticmethod
    def _open(f: Path) -> dict:
        from ..checkpoint import torch_load

        try:
            return torch_load(f, "latents shard", mmap=True)
        except ValueError as e:
            raise ValueError(f"{e} (re-run dit_fast.extract_latents)") from None

    def _check_shard(self, shard, f: Path, n: int) -> None:
        lat = shard.get("latents") if isinstance(shard, dict) else None
        labels = shard.get("labels") if isinstance(shard, dict) else None
        if not isinstance(lat, torch.Tensor) or not isinstance(labels, torch.Tensor) or lat.shape[0] != n \
                or labels.shape != (n,):
            raise ValueError(f"latents shard {f}: expected {n} latents and labels (as meta.json says), got "
                             f"{tuple(lat.shape) if isinstance(lat, torch.Tensor) else type(lat).__name__}; "
                             f"re-run dit_fast.extract_latents")

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return tuple(self.meta["latent_shape"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def __len__(self) -> int:
        return self.offsets[-1]

    def _load(self) -> List[dict]:
        if self._shards is None:  # lazily, in each worker: the mmap is shared, never pickled
            self._shards = [self._open(f) for f in self.shard_files]
        return self._shards

    def __getitem__(self, key) -> Tuple[torch.Tensor, int]:
        key = _as_key(key)
        if not 0 <= key.index < len(self):
            raise IndexError(f"latent index {key.index} out of range [0, {len(self)})")
        s = bisect.bisect_right(self.offsets, key.index) - 1
        shard = self._load()[s]
        i = key.index - self.offsets[s]
        lat = shard["latents"][i, int(key.flip)]
        label = int(shard["labels"][i])
        if self.store == "moments":
            mean, std = lat[0].float(), lat[1].float()
            noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(key.seed))
            return mean + std * noise, label
        return lat.float().clone(), label


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits upscaled to image_size, one grey channel in [-1, 1].
    No horizontal flip: a mirrored digit is not the same digit."""

    accepts_sample_key = True

    num_classes = DIGITS_NUM_CLASSES

    def __init__(self, image_size: int = 16):
        self.images, self.labels = load_digits_images(image_size)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key) -> Tuple[torch.Tensor, int]:
        key = _as_key(key)
        return self.images[key.index], int(self.labels[key.index])


class KeyedDataset(Dataset):
    """Adapts a user dataset (indexed by int, returning (x, label) or x) to SampleKey requests."""

    accepts_sample_key = True

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        item = self.dataset[_as_key(key).index]
        if isinstance(item, (tuple, list)):
            if len(item) < 2:
                raise ValueError("a custom dataset must return (x, label) or x")
            return item[0], int(item[1])
        return item, 0


def _as_key(key) -> SampleKey:
    if isinstance(key, SampleKey):
        return key
    if isinstance(key, (tuple, list)) and len(key) == 3:
        return SampleKey(int(key[0]), int(key[1]), int(key[2]))
    return SampleKey(int(key), 0, 0)


def keyed(dataset) -> Dataset:
    return dataset if getattr(dataset, "accepts_sample_key", False) else KeyedDataset(dataset)


def is_latents_dir(path) -> bool:
    return (Path(path) / LATENTS_META).is_file()


# --------------------------------------------------------------------------- from the arguments

class TrainData:
    """The training data: a dataset of model inputs, the VAE that encodes it on the fly (ImageFolder
    data; None otherwise) with its latent scale, and the model's input channels and size."""

    def __init__(self, dataset, vae=None, scale: float = 1.0, in_channels: int = 3, input_size: int = 32):
        self.dataset, self.vae, self.scale = dataset, vae, scale
        self.in_channels, self.input_size = in_channels, input_size


def build_data(args: argparse.Namespace, device: torch.device, dataset=None) -> TrainData:
    """Dataset + (optional) VAE + model input geometry; fills args.image_size / args.dataset."""
    if dataset is not None:  # a user dataset of model inputs (pixels or latents), (x, label) items
        ds = keyed(dataset)
        if len(ds) == 0:
            raise ValueError("dataset: the custom dataset is empty")
        x0 = ds[0][0]
        if not isinstance(x0, torch.Tensor) or x0.dim() != 3 or x0.shape[1] != x0.shape[2]:
            raise ValueError("dataset: items must be (x, label) with x a (C, S, S) tensor, got "
                             f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
        args.dataset = "custom"
        args.image_size = args.image_size or int(x0.shape[-1])
        return TrainData(ds, None, 1.0, int(x0.shape[0]), int(x0.shape[-1]))

    kind = args.dataset
    if kind == "auto":
        if args.data_path is None:
            raise ValueError("--data-path is required (an ImageFolder root or extracted latents), unless --dataset digits")
        if not Path(args.data_path).exists():
            raise ValueError(f"--data-path {args.data_path!r} does not exist")
        kind = "latents" if is_latents_dir(args.data_path) else "imagefolder"
        args.dataset = kind
    if kind == "digits":
        size = args.image_size or 16
        if size not in DIGITS_SIZES:
            raise ValueError(f"--image-size must be 8, 16 or 32 with --dataset digits, got {size}")
        args.image_size = size
        try:
            require(["sklearn"], "demo", "--dataset digits")
        except MissingDependency as e:
            raise ValueError(str(e)) from None
        return TrainData(DigitsDataset(size), None, 1.0, 1, size)
    if args.data_path is None:
        raise ValueError(f"--data-path is required with --dataset {kind}")
    if not Path(args.data_path).exists():
        raise ValueError(f"--data-path {args.data_path!r} does not exist")
    if kind == "latents":
        ds = LatentDataset(args.data_path)
        if args.image_size is not None and args.image_size != ds.image_size:
            raise ValueError(f"--image-size {args.image_size} differs from the latents' image size {ds.image_size}")
        args.image_size = ds.image_size
        c, h, w = ds.latent_shape
        return TrainData(ds, None, 1.0, c, h)
    # ImageFolder, encoded on the fly
    from .vae import load_vae, vae_geometry, vae_scale

    args.image_size = args.image_size or 256
    ds = ImageFolder(args.data_path, args.image_size, skip_bad=bool(getattr(args, "skip_bad_images", False)))
    vae = load_vae(args.vae, device)
    channels, size = vae_geometry(vae, args.image_size)
    return TrainData(ds, vae, vae_scale(vae), channels, size)


# --------------------------------------------------------------------------- sampler

class TrainSampler(DistributedSampler):
    """DistributedSampler (shuffled, seeded per run: the official order) that yields SampleKeys and
    can start mid-epoch.

    Each epoch permutes the dataset with seed + epoch exactly as DistributedSampler does; the flip
    bit and item seed of every index come from a second stream derived from (seed, epoch), the same
    on every rank. `steps_per_epoch` full per-rank batches are yielded (the DataLoader drops the
    last partial batch, as the official loader does).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.start_batch = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select `epoch`; the next iteration starts at batch `start_batch` of it."""
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.steps_per_epoch}], got {start_batch}")
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[SampleKey]:
        indices = list(super().__iter__())
        indices = indices[self.start_batch * self.batch_size: self.steps_per_epoch * self.batch_size]
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0xF11B))
        aug = torch.randint(0, 2 ** 62, (len(self.dataset),), generator=gen).tolist()
        for i in indices:
            yield SampleKey(i, aug[i] & 1, aug[i] >> 1)


def label_count(dataset) -> Optional[int]:
    n = getattr(dataset, "num_classes", None)
    return int(n) if n is not None else None


def split_batch(global_batch_size: int, world_size: int) -> int:
    if global_batch_size < 1:
        raise ValueError(f"--global-batch-size must be >= 1, got {global_batch_size}")
    if global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {global_batch_size} must be divisible by the world size "
                         f"{world_size} (one equal share per process)")
    return global_batch_size // world_size
