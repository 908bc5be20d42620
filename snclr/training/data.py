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
  ``val/`` the same stratified 80/20 rule splits ``train/``. Every file's image header is
  checked first, once: rank 0 scans, the other ranks receive the scan, and it is cached
  (:func:`snclr.training.datasets.scan_folder`). A file that fails to decode later is
  skipped: training takes the next readable image in its place and counts the file
  (:class:`UnreadableFiles`, which stops the run past ``max_bad_images``); evaluation leaves
  the row out.

Each split knows its native image size: the arrays' size, or for folders the median shorter
side of the images (:func:`snclr.encoders.fit_img_size` turns it into the input size).

Augmentation is a pure function of ``(seed, epoch, index)``: each sample is transformed
under its own seeded RNG, so data order and crops are reproducible regardless of the number
of workers and a resumed run sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from snclr import distributed
from snclr.training import launch
from snclr.training.datasets import (
    DECODE_ERRORS,
    NAMED_DATASETS,
    bad_budget,
    error_reason,
    has_images,
    read_named,
    scan_folder,
    scan_unlabelled,
)
from snclr.training.errors import ConfigError, DataFileVanished, UnreadableImages, check_path

__all__ = [
    "BUILTIN_DATASETS", "ImageSet", "TwoViewDataset", "EvalDataset", "AugmentedDataset",
    "EpochSampler", "MAX_BAD_IMAGES", "UnreadableFile", "UnreadableFiles", "on_rank_zero",
    "eval_transform", "labelled_splits", "linear_train_transform", "load_dataset",
    "load_splits", "make_loader", "pretraining_images",
    "stratified_split", "to_rgb", "two_view_transforms",
]

BUILTIN_DATASETS = NAMED_DATASETS
MAX_BAD_IMAGES = 0.001  # Config.max_bad_images: the share of unreadable files a run skips
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
        left_out: ``(file, reason)`` of the folder's files whose header could not be read.
    """

    labels: Tensor
    in_chans: int
    img_size: int
    num_classes: int
    same_size: bool = True
    images: Tensor | None = None
    files: np.ndarray | None = None
    left_out: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int):
        """Image ``i``: a uint8 tensor, or a file opened as RGB.

        Raises:
            UnreadableFile: the file does not decode (it changed, or only its header is sound).
        """
        if self.images is not None:
            return self.images[i]
        try:
            opened = Image.open(self.files[i])
        except FileNotFoundError:  # every file was checked at the start: it vanished since
            raise DataFileVanished(f"image file {self.files[i]!r} disappeared during the run; "
                                   "restore it (or remove it and start a new run)") from None
        except DECODE_ERRORS as err:
            raise UnreadableFile(i, error_reason(err)) from None
        try:
            with opened as image:
                return to_rgb(image)
        except DECODE_ERRORS as err:
            raise UnreadableFile(i, error_reason(err)) from None

    def subset(self, rows: np.ndarray) -> ImageSet:
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        return ImageSet(
            labels=self.labels[rows_t], in_chans=self.in_chans, img_size=self.img_size,
            num_classes=self.num_classes, same_size=self.same_size,
            images=None if self.images is None else self.images[rows_t],
            files=None if self.files is None else self.files[rows], left_out=self.left_out,
        )


class UnreadableFile(Exception):
    """Image ``index`` of a set failed to decode (``reason``: one line)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(index, reason)
        self.index, self.reason = index, reason


class UnreadableFiles:
    """The training files that failed to decode, over every rank; the run stops past the budget.

    The budget is ``bad_budget(N, max_fraction)`` files of the N in the set, counting those
    the scan left out. :meth:`add` takes a batch's ``bad`` column (-1: none); :meth:`sync`
    (collective) gathers what every rank found and raises :class:`UnreadableImages`, on
    every rank alike, once the count passes the budget.
    """

    def __init__(self, images: ImageSet, max_fraction: float, device: torch.device) -> None:
        self.images, self.device, self.max_fraction = images, device, max_fraction
        self.total = len(images) + len(images.left_out)
        self.budget = bad_budget(self.total, max_fraction)
        self.found: set[int] = set()  # every rank's, after sync
        self.new: set[int] = set()  # this rank's since the last sync

    def add(self, bad: Tensor) -> None:
        self.new.update(i for i in bad.tolist() if i >= 0 and i not in self.found)

    @property
    def count(self) -> int:
        return len(self.found) + len(self.images.left_out)

    def sync(self) -> None:
        for found in distributed.gather_objects(sorted(self.new), device=self.device):
            self.found.update(found)
        self.new.clear()
        if self.count > self.budget:
            raise UnreadableImages(
                f"{self.count} of {self.total} image files cannot be decoded, more than the "
                f"{self.budget} that max_bad_images={self.max_fraction:g} allows; first: "
                f"{', '.join(repr(f) for f in self.first())}; remove or replace them")

    def first(self, count: int = 3) -> list[str]:
        """The first files found unreadable, by name (then those the scan left out)."""
        names = sorted(str(self.images.files[i]) for i in self.found)
        return (names + [file for file, _ in self.images.left_out])[:count]

    def summary(self) -> str | None:
        """The report's line, or None when every file decoded."""
        if not self.count:
            return None
        return (f"{self.count} of {self.total} image files could not be decoded and were "
                f"skipped (e.g. {', '.join(repr(f) for f in self.first())})")


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


def on_rank_zero(compute):
    """``compute()`` on rank 0, its result (or its ConfigError) shared with every rank."""
    if distributed.world_size() == 1:
        return compute()
    outcome = None
    if distributed.is_main():
        try:
            outcome = (True, compute())
        except ConfigError as err:
            outcome = (False, str(err))
    ok, value = distributed.broadcast_object(outcome, device=launch.resolve_device())
    if not ok:
        raise ConfigError(value)
    return value


def _folder_set(path: Path, classes: list[str] | None = None, *, check: str,
                max_bad_fraction: float) -> tuple[ImageSet, list[str]]:
    scan = on_rank_zero(lambda: scan_folder(path, classes, check=check,
                                            max_bad_fraction=max_bad_fraction))
    num_classes = len(classes) if classes is not None else len(scan.classes)
    return _scanned_set(path, scan, num_classes), scan.classes


def _unlabelled_folder_set(path: Path, *, check: str, max_bad_fraction: float) -> ImageSet:
    scan = on_rank_zero(lambda: scan_unlabelled(path, check=check,
                                                max_bad_fraction=max_bad_fraction))
    return _scanned_set(path, scan, 0)


def _scanned_set(path: Path, scan, num_classes: int) -> ImageSet:
    if scan.left_out and distributed.is_main():
        file, reason = scan.left_out[0]
        print(f"warning: left out {len(scan.left_out)} image files of {str(path)!r} whose "
              f"header cannot be read, e.g. {file!r} ({reason})", file=sys.stderr)
    return ImageSet(labels=torch.from_numpy(scan.labels), in_chans=3,
                    img_size=int(np.median(scan.sides)), num_classes=num_classes,
                    same_size=False, files=scan.files, left_out=scan.left_out)


def _split(full: ImageSet) -> dict[str, ImageSet]:
    train_rows, test_rows = stratified_split(full.labels.numpy())
    return {"train": full.subset(train_rows), "test": full.subset(test_rows)}


def load_splits(name_or_dir: str, *, check: str = "header",
                max_bad_fraction: float = MAX_BAD_IMAGES) -> dict[str, ImageSet]:
    """``{"train": ..., "test": ...}`` of a named data set or an image folder, and
    ``"unlabelled"`` images (labels -1) where there are some: STL-10's ``unlabeled_X.bin``,
    or a folder holding images directly (no ``train/``), which has only those.

    ``check`` and ``max_bad_fraction`` are the folder scan's (``Config.check_images`` and
    ``max_bad_images``, :func:`snclr.training.datasets.scan_folder`).

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
    checks = dict(check=check, max_bad_fraction=max_bad_fraction)
    if not (root_dir / "train").is_dir() and has_images(root_dir):
        return {"unlabelled": _unlabelled_folder_set(root_dir, **checks)}
    if not (root_dir / "train").is_dir():
        raise ConfigError(f"dataset directory {name_or_dir!r} has no train/ sub-folder of class "
                          "folders")
    if (root_dir / "val").is_dir():
        train, classes = _folder_set(root_dir / "train", **checks)
        missing = [name for name in classes if not (root_dir / "val" / name).is_dir()]
        if missing and distributed.is_main():
            print(f"warning: val/ lacks {len(missing)} of train/'s classes, e.g. {missing[0]!r}; "
                  "kNN is measured on the others", file=sys.stderr)
        return {"train": train, "test": _folder_set(root_dir / "val", classes, **checks)[0]}
    return _split(_folder_set(root_dir / "train", **checks)[0])


def labelled_splits(name_or_dir: str, **checks) -> dict[str, ImageSet]:
    """:func:`load_splits` (``checks``: its scan options), refusing a data set without a
    labelled train and test split."""
    splits = load_splits(name_or_dir, **checks)
    if "test" not in splits:
        raise ConfigError(f"dataset {name_or_dir!r} has no labels (a folder of images without "
                          "train/<class>/): kNN and linear evaluation need labelled data")
    return splits


def pretraining_images(splits: dict[str, ImageSet]) -> ImageSet:
    """The images pretraining reads: the train split and the unlabelled images, in order."""
    parts = [splits[name] for name in ("train", "unlabelled") if name in splits]
    if len(parts) == 1:
        return parts[0]
    train, extra = parts
    if train.images is None or extra.images is None:
        raise ValueError("only array data sets have a train split and unlabelled images")
    return ImageSet(labels=torch.cat([train.labels, extra.labels]), in_chans=train.in_chans,
                    img_size=train.img_size, num_classes=train.num_classes,
                    images=torch.cat([train.images, extra.images]))


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
        # In shared memory: persistent workers keep the copy of the dataset they started
        # with, and must still see the epoch the main process sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def _readable(self, i: int):
        """``(image, index, bad)``: image ``i``, or when its file does not decode the next
        readable one (``index``) in its place, and ``bad`` the index skipped (-1: none)."""
        for step in range(len(self.images)):
            j = (i + step) % len(self.images)
            try:
                return self.images.image(j), j, (i if step else -1)
            except UnreadableFile:
                continue
        raise RuntimeError("not one image of the data set decodes")

    def __getitem__(self, i: int):
        image, j, bad = self._readable(i)
        # A private RNG stream per (seed, epoch, sample): reproducible across workers/resume.
        with torch.random.fork_rng(devices=[]):
            # default_generator only: torch.manual_seed would also seed CUDA (slow, and
            # must not touch the training RNG).
            torch.default_generator.manual_seed(_sample_seed(self.seed, self.epoch, i))
            views = tuple(transform(image) for transform in self.transforms)
        return (*views, self.images.labels[j], j, bad)


class TwoViewDataset(_SeededViews):
    """``(view1, view2, label, index, bad)`` for pretraining.

    ``index`` is the image's position in ``images`` (the same on every rank): the model
    records it as the source of the sample's key in the queue. It is the sample's own unless
    that file failed to decode: then ``bad`` is the sample's index (for
    :class:`UnreadableFiles`) and the image is the next readable one; otherwise ``bad`` is -1.
    """

    def __init__(self, images: ImageSet, transform1, transform2, *, seed: int) -> None:
        super().__init__(images, transform1, transform2, seed=seed)


class AugmentedDataset(_SeededViews):
    """``(image, label)`` pairs under a random transform (the augmented linear probe); a file
    that does not decode is replaced by the next readable one."""

    def __init__(self, images: ImageSet, transform, *, seed: int) -> None:
        super().__init__(images, transform, seed=seed)

    def __getitem__(self, i: int):
        image, label, _, _ = super().__getitem__(i)
        return image, label


class EvalDataset(Dataset):
    """``(image, label)`` pairs under a deterministic transform; a file that does not decode
    gives a black image and the label -1 (the caller drops the row)."""

    def __init__(self, images: ImageSet, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return self.transform(self.images.image(i)), self.images.labels[i]
        except UnreadableFile:
            side = self.images.img_size
            return self.transform(Image.new("RGB", (side, side))), torch.tensor(-1)


def make_loader(
    dataset: Dataset, *, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
    pin_memory: bool = False, world_size: int = 1, rank: int = 0,
) -> DataLoader:
    """A loader; for training a sharded, shuffled, drop-last sampler (call ``set_epoch``).

    The distributed sampler is used on one process too, so the data order is a function of
    ``(seed, epoch)`` only (``sampler.set_epoch``); drop_last keeps batches equal across
    ranks, which the gathered loss needs.
    """
    sampler, generator = None, None
    if train:
        sampler = EpochSampler(dataset, batch_size=batch_size, num_replicas=world_size,
                               rank=rank, seed=seed)
        # The loader draws its workers' base seed at every epoch; from its own generator,
        # not the training RNG, which then does not depend on when the workers started.
        generator = torch.Generator().manual_seed(seed)
    # Training workers persist across epochs (no restart per epoch); evaluation loaders are
    # iterated once.
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=train,
        num_workers=num_workers, pin_memory=pin_memory, generator=generator,
        persistent_workers=train and num_workers > 0,
    )


class EpochSampler(DistributedSampler):
    """The shuffled, sharded, drop-last order of an epoch, which can start at a batch.

    ``set_epoch(epoch, start_batch=i)`` skips the epoch's first ``i`` batches of this rank
    (a run resumed from a checkpoint written mid-epoch); the order itself is the epoch's.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, num_replicas: int, rank: int,
                 seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.batch_size, self.start = batch_size, 0

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start_batch * self.batch_size

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return super().__len__() - self.start
