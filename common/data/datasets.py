"""Data sources named by a spec string, loaded into memory as uint8 image tensors.

Specs (``KIND[:PATH][:SPLIT]``):

* ``synthetic`` / ``synthetic:train|val|test`` - the generated data set of ``common.data.synthetic`` (embedded default);
* ``cifar10:DIR`` / ``cifar100:DIR`` - torchvision's CIFAR folder under ``DIR``; never downloaded unless asked;
* ``mnist:DIR`` - MNIST's four IDX files (optionally gzipped) in ``DIR`` or ``DIR/MNIST/raw``; never downloaded;
* ``imagefolder:DIR`` - one sub-folder per class. If ``DIR`` has ``train/`` plus ``val/`` and/or ``test/``, those
  are the splits (with only one of them, it is the test split and validation is held out of ``train/``);
  otherwise the images are partitioned into train / val / test (80 / 10 / 10), the test part with a fixed seed;
* ``imagenette:DIR`` - an image folder shaped like ImageNette (``train/`` + ``val/``) read the ImageNet way: shorter
  side resized to 256/224 of the target size, centre crop of 224 x 224 (``image_size``), ImageNet normalisation.

``normalization(spec)`` gives the per-channel mean and std a model trained on the data should use; they travel in
the model spec (and so in every bundle manifest), so the device tier normalises exactly as training did.

Validation is always held out of the training data (a seeded 10% of CIFAR's train split), so thresholds are
calibrated on data the model was not fitted to and results are reported on a split calibration never saw.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import ConfigError
from common.data import synthetic

SPLITS = ("train", "val", "test")
SYNTHETIC_SIZES = {"train": 20000, "val": 2000, "test": 2000}
TEST_FRACTION = 0.1
TEST_PARTITION_SEED = 0
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}
KINDS = ("synthetic", "cifar10", "cifar100", "mnist", "imagefolder", "imagenette")
# Per-channel (mean, std) of [0, 1]-scaled pixels. Synthetic data and plain image folders keep CIFAR-10's figures,
# which the project has always used for them.
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
NORMALIZATION = {
    "synthetic": _CIFAR10_STATS, "cifar10": _CIFAR10_STATS, "imagefolder": _CIFAR10_STATS,
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "imagenette": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}
DEFAULT_IMAGE_SIZE = {"imagenette": 224}
IMAGENET_CROP = 224 / 256  # the share of the resized image the usual ImageNet evaluation crop keeps


@dataclass
class ImageSet:
    """A split in memory: uint8 images ``(N, C, H, W)``, int64 labels, class names (and difficulty if known)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    difficulty: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        diff = self.difficulty[index] if self.difficulty is not None else None
        return ImageSet(self.images[index], self.labels[index], self.class_names, diff)


@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: Path | None
    split: str | None


def parse_spec(spec: str) -> DataSpec:
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    split = None
    if parts and parts[-1] in SPLITS:
        split = parts.pop()
    path = ":".join(parts) or None
    if kind == "synthetic":
        if path:
            raise ConfigError(f"bad data spec {spec!r}: synthetic takes only a split, e.g. synthetic:test")
        return DataSpec(kind, None, split)
    if kind in KINDS:
        if not path:
            raise ConfigError(f"bad data spec {spec!r}: {kind} needs a folder, e.g. {kind}:data/{kind}")
        return DataSpec(kind, Path(path), split)
    raise ConfigError(f"unknown data kind {kind!r} in {spec!r}; use synthetic or "
                      + ", ".join(f"{k}:DIR" for k in KINDS[1:]))


def normalization(spec: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of the data named by ``spec``, to normalise [0, 1]-scaled pixels with."""
    return NORMALIZATION[parse_spec(spec).kind]


def _holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded permutation split of ``range(n)`` into (kept, held out)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * fraction))
    return perm[k:], perm[:k]


def _load_cifar(kind: str, root: Path, split: str, download: bool, val_fraction: float, seed: int) -> ImageSet:
    from torchvision import datasets

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(root), train=split != "test", download=download)
    except RuntimeError as e:
        raise ConfigError(f"{kind} not found under {root} ({e}); pass --download to fetch it") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    full = ImageSet(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes))
    if split == "test":
        return full
    train_idx, val_idx = _holdout(len(full), val_fraction, seed)
    return full.subset(train_idx if split == "train" else val_idx)


def _read_image(path: Path, size: int, crop: float = 1.0) -> torch.Tensor:
    """Decode one image to uint8 ``(3, size, size)``: shorter side resized to ``size / crop``, then centre-cropped."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            scale = round(size / crop) / min(im.size)
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                           Image.Resampling.BILINEAR)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _read_folder(folder: Path, class_names: list[str], size: int, crop: float = 1.0) -> ImageSet:
    return _read_folder_cached(folder.resolve(), tuple(class_names), size, crop)


@functools.lru_cache(maxsize=2)
def _read_folder_cached(folder: Path, class_names: tuple[str, ...], size: int, crop: float) -> ImageSet:
    # Cached: training loads the train and validation splits of one folder, which would otherwise decode every image
    # twice (about 9 s for CIFAR's 50,000 JPEGs). Callers only index into the result, never modify it.
    images, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images += [_read_image(path, size, crop) for path in files]
        labels += [label] * len(files)
    if not images:
        raise ConfigError(f"no images found under {folder}")
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(class_names))


def _load_imagefolder(root: Path, split: str, size: int, val_fraction: float, seed: int, crop: float = 1.0
                      ) -> ImageSet:
    """Splits of an image folder; ``seed`` moves only the validation hold-out, never the test partition."""
    read = functools.partial(_read_folder, size=size, crop=crop)
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist")
    train_dir, val_dir, test_dir = root / "train", root / "val", root / "test"
    if train_dir.is_dir():
        names = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        if not (val_dir.is_dir() or test_dir.is_dir()):
            raise ConfigError(f"{root} has train/ but neither val/ nor test/")
        if split == "test":  # test/ if there is one, else val/ (ImageNette ships train/ and val/ only)
            return read(test_dir if test_dir.is_dir() else val_dir, names)
        if split == "val" and val_dir.is_dir() and test_dir.is_dir():
            return read(val_dir, names)
        full = read(train_dir, names)
        if split == "train" and val_dir.is_dir() and test_dir.is_dir():
            return full
        kept, held = _holdout(len(full), val_fraction, seed)
        return full.subset(kept if split == "train" else held)
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise ConfigError(f"{root} has no class sub-folders")
    full = read(root, names)
    # The test partition is fixed (TEST_PARTITION_SEED) so that no training seed can move test images into training.
    rest, test_idx = _holdout(len(full), TEST_FRACTION, TEST_PARTITION_SEED)
    if split == "test":
        return full.subset(test_idx)
    k = int(round(len(full) * val_fraction))
    order = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))]
    return full.subset(order[k:] if split == "train" else order[:k])



_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format): magic 0x0000 08 ndim, ndim big-endian sizes, then the data."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise ConfigError(f"{path} is not an IDX file of {ndim}-dimensional unsigned bytes")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path} holds {data.size} bytes of data, its header promises {dims}")
    return data.reshape(dims)


def _find_idx(root: Path, name: str) -> Path:
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"MNIST file {name}[.gz] not found in {root} or {root / 'MNIST' / 'raw'} (nothing is "
                      "downloaded: place the four IDX files there)")


def _load_mnist(root: Path, split: str, val_fraction: float, seed: int) -> ImageSet:
    images_name, labels_name = _IDX_FILES["test" if split == "test" else "train"]
    images = _read_idx(_find_idx(root, images_name), 3)
    labels = _read_idx(_find_idx(root, labels_name), 1)
    if len(images) != len(labels):
        raise ConfigError(f"MNIST under {root}: {len(images)} images but {len(labels)} labels")
    full = ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                    [str(d) for d in range(10)])
    if split == "test":
        return full
    train_idx, val_idx = _holdout(len(full), val_fraction, seed)
    return full.subset(train_idx if split == "train" else val_idx)


def load(
    spec: str,
    split: str,
    *,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> ImageSet:
    """Load ``split`` of the data named by ``spec`` (a split inside the spec wins over ``split``).

    ``image_size`` is the side image folders are read at (default 32; 224 for imagenette)."""
    ds = parse_spec(spec)
    split = ds.split or split
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if ds.kind == "synthetic":
        n = SYNTHETIC_SIZES[split] if limit is None else min(limit, SYNTHETIC_SIZES[split])
        images, labels, diff = synthetic.generate(n, seed=synthetic.SPLIT_SEEDS[split])
        out = ImageSet(torch.from_numpy(images), torch.from_numpy(labels), list(synthetic.CLASS_NAMES),
                       torch.from_numpy(diff))
    elif ds.kind in ("cifar10", "cifar100"):
        out = _load_cifar(ds.kind, ds.path, split, download, val_fraction, seed)
    elif ds.kind == "mnist":
        out = _load_mnist(ds.path, split, val_fraction, seed)
    else:
        size = image_size or DEFAULT_IMAGE_SIZE.get(ds.kind, 32)
        crop = IMAGENET_CROP if ds.kind == "imagenette" else 1.0
        out = _load_imagefolder(ds.path, split, size, val_fraction, seed, crop)
    if limit is not None and len(out) > limit:
        out = out.subset(torch.arange(limit))
    return out
