"""Datasets and two-view augmentations (offline only: nothing is ever downloaded).

``--data`` is a data set name or an image folder (the readers are in
:mod:`snclr.training.datasets`):

- ``animal-mnist`` (built-in): 10,000 28x28 greyscale animal silhouettes in 10 balanced
  classes, read from the ``animal_mnist`` package (``pip install --no-deps
  animal-mnist==0.4``). No split ships with it, so we use a fixed stratified 80/20 split:
  within each class, the images are permuted with ``numpy.random.default_rng(0)`` and the
  first 80% (800 per class) form the train split, the rest (200 per class) the test split.
  The split never depends on the run's seed, so every command sees the same one.
- ``cifar10:DIR``, ``cifar100:DIR``, ``stl10:DIR``: the official archives extracted in DIR,
  with their own train/test splits.
- a directory with ``train/`` (and optionally ``val/``) class sub-folders; without
  ``val/`` the same stratified 80/20 rule splits ``train/``. Every file is checked first.

Each split knows its native image size: the arrays' size, or for folders the median shorter
side of the images (:func:`snclr.encoders.fit_img_size` turns it into the input size).

Augmentation is a pure function of ``(seed, epoch, index)``: each sample is transformed
under its own seeded RNG, so data order and crops are reproducible regardless of the number
of workers and a resumed run sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from snclr.training.datasets import NAMED_DATASETS, read_named, scan_folder
from snclr.training.errors import ConfigError, DataFileVanished, check_path

__all__ = [
    "BUILTIN_DATASETS", "ImageSet", "TwoViewDataset", "EvalDataset", "AugmentedDataset",
    "eval_transform", "linear_train_transform", "load_dataset", "load_splits", "make_loader",
    "stratified_split", "to_rgb", "two_view_transforms",
]

BUILTIN_DATASETS = NAMED_DATASETS
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, wide greyscale modes scaled by their range, not clipped.

    ``convert("RGB")`` clips 16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``)
    values at 255, which turns most such images white. Here 16-bit values are scaled by
    255/65535; ``I`` values by the smallest of the 8- and 16-bit ranges that holds them;
    ``F`` values in 0..1 by 255, in 0..255 as they are. Anything else (negative values,
    a larger range) is stretched from the image's minimum to its maximum; NaN becomes 0.
    Every other mode goes through ``convert("RGB")``.
    """
    if image.mode not in _WIDE_MODES:
        return image.convert("RGB")
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif low >= 0 and high <= (1.0 if image.mode == "F" else 255.0):
        scale = 255.0 if image.mode == "F" else 1.0
    elif image.mode == "I" and low >= 0 and high <= 65535:
        scale = 255.0 / 65535.0
    elif image.mode == "F" and low >= 0 and high <= 255:
        scale = 1.0
    else:
        values = values - low
        scale = 255.0 / (high - low) if high > low else 0.0
    grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
SPLIT_SEED = 0
TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class ImageSet:
    """Labelled images of one split: uint8 arrays, or image files read on demand.

    Attributes:
        labels: ``(N,)`` int64 class indices.
        in_chans, num_classes: what the model needs to know.
        img_size: the native size: the arrays' side, or the median shorter side of the files.
        same_size: every image is ``img_size`` square (arrays); files may differ.
        images: ``(N, C, H, W)`` uint8 tensor, or None for files.
        files: ``(N,)`` image paths (files only), opened as RGB.
    """

    labels: Tensor
    in_chans: int
    img_size: int
    num_classes: int
    same_size: bool = True
    images: Tensor | None = None
    files: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int):
        if self.images is not None:
            return self.images[i]
        try:
            opened = Image.open(self.files[i])
        except FileNotFoundError:  # every file was checked at the start: it vanished since
            raise DataFileVanished(f"image file {self.files[i]!r} disappeared during the run; "
                                   "restore it (or remove it and start a new run)") from None
        with opened as image:
            return to_rgb(image)

    def subset(self, rows: np.ndarray) -> ImageSet:
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        return ImageSet(
            labels=self.labels[rows_t], in_chans=self.in_chans, img_size=self.img_size,
            num_classes=self.num_classes, same_size=self.same_size,
            images=None if self.images is None else self.images[rows_t],
            files=None if self.files is None else self.files[rows],
        )


def stratified_split(labels: np.ndarray, *,
                     train_fraction: float = TRAIN_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Fixed per-class split: ``(train_rows, test_rows)``, each sorted ascending."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round(len(rows) * train_fraction))
        train.append(rows[:cut])
        test.append(rows[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def limit(dataset: ImageSet, count: int) -> ImageSet:
    """A fixed, class-balanced subset of ``count`` rows (first ``count`` of a seeded order)."""
    if count <= 0 or count >= len(dataset):
        return dataset
    labels = dataset.labels.numpy()
    rng = np.random.default_rng(SPLIT_SEED)
    # Interleave the classes so any prefix is as balanced as possible.
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [rows[i] for i in range(max(map(len, per_class)))
             for rows in per_class if i < len(rows)]
    return dataset.subset(np.sort(np.array(order[:count])))


def _array_set(images: Tensor, labels: Tensor, num_classes: int) -> ImageSet:
    return ImageSet(labels=labels, images=images, in_chans=images.shape[1],
                    img_size=images.shape[-1], num_classes=num_classes)


def _folder_set(path: Path, classes: list[str] | None = None) -> tuple[ImageSet, list[str]]:
    scan = scan_folder(path, classes)
    num_classes = len(classes) if classes is not None else len(scan.classes)
    return ImageSet(labels=torch.from_numpy(scan.labels), in_chans=3,
                    img_size=int(np.median(scan.sides)), num_classes=num_classes,
                    same_size=False, files=scan.files), scan.classes


def _split(full: ImageSet) -> dict[str, ImageSet]:
    train_rows, test_rows = stratified_split(full.labels.numpy())
    return {"train": full.subset(train_rows), "test": full.subset(test_rows)}


def load_splits(name_or_dir: str) -> dict[str, ImageSet]:
    """``{"train": ..., "test": ...}`` of a named data set or an image folder.

    Raises:
        ConfigError: unknown name, missing folder or files, unreadable images, or the
            built-in package not installed (one line).
    """
    check_path("data", name_or_dir)
    name, colon, root = name_or_dir.partition(":")
    named = name in ("cifar10", "cifar100", "stl10") and (colon or not Path(name_or_dir).exists())
    if name_or_dir == "animal-mnist" or named:
        arrays = read_named(name, root or None)
        sets = {split: _array_set(*xy, arrays.num_classes) for split, xy in arrays.splits.items()}
        return _split(sets["all"]) if "all" in sets else sets
    root_dir = Path(name_or_dir)
    if not root_dir.exists():
        raise ConfigError(
            f"dataset {name_or_dir!r} is neither a built-in ({', '.join(BUILTIN_DATASETS)}) "
            "nor an existing directory"
        )
    if not (root_dir / "train").is_dir():
        raise ConfigError(f"dataset directory {name_or_dir!r} has no train/ sub-folder of class "
                          "folders")
    if (root_dir / "val").is_dir():
        train, classes = _folder_set(root_dir / "train")
        missing = [name for name in classes if not (root_dir / "val" / name).is_dir()]
        if missing:
            print(f"warning: val/ lacks {len(missing)} of train/'s classes, e.g. {missing[0]!r}; "
                  "kNN is measured on the others", file=sys.stderr)
        return {"train": train, "test": _folder_set(root_dir / "val", classes)[0]}
    return _split(_folder_set(root_dir / "train")[0])


def load_dataset(name_or_dir: str, *, split: str) -> ImageSet:
    """The ``"train"`` or ``"test"`` split of :func:`load_splits` (reads both; use that)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return load_splits(name_or_dir)[split]


def _normalize(in_chans: int) -> v2.Normalize:
    if in_chans == 1:
        return v2.Normalize([0.5], [0.5])
    return v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # ImageNet statistics


def two_view_transforms(kind: str, *, img_size: int, crop_scale_min: float,
                        in_chans: int) -> tuple[v2.Compose, v2.Compose]:
    """The two view transforms (view 1, view 2).

    ``byol`` (MoCo v3 / BYOL, colour images): random resized crop, flip, colour jitter
    (p 0.8), greyscale (p 0.2), Gaussian blur (p 1.0 / 0.1), solarise (p 0 / 0.2): the
    asymmetric pair. ``greyscale`` (small greyscale images such as 28x28): random resized
    crop, flip and random erasing, the same for both views (no colour ops).
    """
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    crop = v2.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), antialias=True)
    if kind == "greyscale":
        ops = v2.Compose([
            # No RandomAffine: on 28x28 tensors it costs ~10 ms a sample (grid_sample),
            # 100x the rest; the resized crop already shifts and scales.
            *to_float, crop, v2.RandomHorizontalFlip(),
            _normalize(in_chans), v2.RandomErasing(p=0.25, scale=(0.02, 0.1)),
        ])
        return ops, ops
    if kind != "byol":
        raise ConfigError(f"augmentation must be 'byol' or 'greyscale', got {kind!r}")

    def view(blur_p: float, solarize_p: float) -> v2.Compose:
        blur_kernel = 2 * (img_size // 20) + 1  # ~10% of the image, odd (23 px at 224)
        return v2.Compose([
            *to_float, crop,
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=blur_p),
            v2.RandomSolarize(threshold=0.5, p=solarize_p),
            v2.RandomHorizontalFlip(),
            _normalize(in_chans),
        ])

    return view(1.0, 0.0), view(0.1, 0.2)


def eval_transform(*, img_size: int, native_size: int | None, in_chans: int) -> v2.Compose:
    """Deterministic evaluation transform: resize the shorter side, centre crop, normalise.

    ``native_size`` is the side of every image when they are all that size (arrays), None
    when sizes may differ (files): then every image is resized, whatever the median.
    From 64 px up the resize keeps the 256/224 margin of the ImageNet protocol.
    """
    resize = []
    if img_size != native_size:
        short_side = int(img_size * 256 / 224) if img_size >= 64 else img_size
        resize = [v2.Resize(short_side, antialias=True), v2.CenterCrop(img_size)]
    return v2.Compose([v2.ToImage(), *resize, v2.ToDtype(torch.float32, scale=True),
                       _normalize(in_chans)])


def linear_train_transform(*, img_size: int, in_chans: int) -> v2.Compose:
    """The linear probe's training augmentation in MoCo v3's linear evaluation.

    Random resized crop (scale 0.08 to 1, torchvision's default) and horizontal flip, then
    the same normalisation as every other transform.
    """
    return v2.Compose([
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.RandomResizedCrop(img_size, antialias=True), v2.RandomHorizontalFlip(),
        _normalize(in_chans),
    ])


def _sample_seed(seed: int, epoch: int, i: int) -> int:
    return (seed * 1_000_003 + epoch) * 10_000_019 + i


class _SeededViews(Dataset):
    """``(*views, label)``: sample i of epoch e through each transform under seed (seed, e, i)."""

    def __init__(self, images: ImageSet, *transforms, seed: int) -> None:
        self.images, self.transforms, self.seed = images, transforms, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images.image(i)
        # A private RNG stream per (seed, epoch, sample): reproducible across workers/resume.
        with torch.random.fork_rng(devices=[]):
            # default_generator only: torch.manual_seed would also seed CUDA (slow, and
            # must not touch the training RNG).
            torch.default_generator.manual_seed(_sample_seed(self.seed, self.epoch, i))
            views = tuple(transform(image) for transform in self.transforms)
        return (*views, self.images.labels[i])


class TwoViewDataset(_SeededViews):
    """``(view1, view2, label, index)`` for pretraining.

    ``index`` is the sample's position in ``images`` (the same on every rank): the model
    records it as the source of the sample's key in the queue.
    """

    def __init__(self, images: ImageSet, transform1, transform2, *, seed: int) -> None:
        super().__init__(images, transform1, transform2, seed=seed)

    def __getitem__(self, i: int):
        return (*super().__getitem__(i), i)


class AugmentedDataset(_SeededViews):
    """``(image, label)`` pairs under a random transform (the augmented linear probe)."""

    def __init__(self, images: ImageSet, transform, *, seed: int) -> None:
        super().__init__(images, transform, seed=seed)


class EvalDataset(Dataset):
    """``(image, label)`` pairs under a deterministic transform."""

    def __init__(self, images: ImageSet, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images.image(i)), self.images.labels[i]


def make_loader(
    dataset: Dataset, *, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
    pin_memory: bool = False, world_size: int = 1, rank: int = 0,
) -> DataLoader:
    """A loader; for training a sharded, shuffled, drop-last sampler (call ``set_epoch``).

    The distributed sampler is used on one process too, so the data order is a function of
    ``(seed, epoch)`` only (``sampler.set_epoch``); drop_last keeps batches equal across
    ranks, which the gathered loss needs.
    """
    sampler = None
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=seed, drop_last=True)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=train,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
    )
