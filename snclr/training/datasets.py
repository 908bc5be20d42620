"""Readers of image data on disk: the data sets snclr knows by name, and image folders.

Nothing here downloads, and no file can run code. Binary distributions are read as raw
bytes; the pickled ones (the CIFAR "python version", Animal-MNIST) go through an unpickler
that rebuilds numpy arrays and plain containers only, and refuses anything else.

- ``animal-mnist``: the ``animal_mnist`` package's pickled arrays (one set, no split).
- ``cifar10:DIR`` / ``cifar100:DIR``: the extracted official archives, binary
  (``cifar-10-batches-bin/``, ``cifar-100-binary/``) or python (``cifar-10-batches-py/``,
  ``cifar-100-python/``) version, in DIR or DIR itself being that folder. CIFAR-100 uses
  the 100 fine labels.
- ``stl10:DIR``: ``stl10_binary/`` (``train_X.bin``, ``train_y.bin``, ``test_X.bin``,
  ``test_y.bin``); the 100,000 unlabelled images are not read.
- an image folder: every file with an image extension is opened and decoded once (JPEGs at
  1/8 scale, which still reads every byte) in threads before anything runs, so a zero-byte,
  truncated or fake image is a one-line error naming it, not a crash mid-epoch.
"""

from __future__ import annotations

import gzip
import importlib.resources
import io
import os
import pickle
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from snclr.training.errors import ConfigError

__all__ = ["NAMED_DATASETS", "ArraySplits", "FolderScan", "read_named", "scan_folder"]

NAMED_DATASETS = ("animal-mnist", "cifar10:DIR", "cifar100:DIR", "stl10:DIR")
INSTALL_HINT = "pip install --no-deps animal-mnist==0.4"
CHECK_CHUNK = 4096  # files handed to the thread pool at a time


@dataclass(frozen=True)
class ArraySplits:
    """uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)`` per split.

    ``splits`` has ``"train"`` and ``"test"``, or only ``"all"`` when the data set ships no
    split (the caller splits it).
    """

    splits: dict[str, tuple[Tensor, Tensor]]
    num_classes: int


class _ArraysOnlyUnpickler(pickle.Unpickler):
    # What pickled numpy arrays need (protocol 2 from Python 3 encodes bytes with
    # _codecs.encode, protocol 5 rebuilds arrays with _frombuffer); dicts, lists, strings and
    # numbers are built by pickle opcodes and need nothing. Anything else could run code.
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it holds a {module}.{name} object, not only arrays")
        return super().find_class(module, name)


def _unpickle(data: bytes, source: str):
    """Unpickle arrays and containers only (latin1 reads the Python 2 pickles of CIFAR)."""
    try:
        return _ArraysOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise ConfigError(f"refused to read {source}: {reason}") from None


# ---------------------------------------------------------------------------- named sets


def read_named(name: str, root: str | None) -> ArraySplits:
    """The arrays of a named data set (``root``: the DIR of ``name:DIR``; None for built-ins).

    Raises:
        ConfigError: unknown name, missing package or files, files of the wrong size or
            content (one line).
    """
    if name == "animal-mnist":
        return _animal_mnist()
    if root is None or not root:
        raise ConfigError(f"data set {name!r} needs its folder: --data {name}:DIR")
    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError(f"data set {name}:{root}: {root!r} is not a directory")
    if name in _CIFAR:
        return _cifar(name, folder)
    if name == "stl10":
        return _stl10(folder)
    raise ConfigError(f"unknown data set {name!r}; choose one of {', '.join(NAMED_DATASETS)}")


def _animal_mnist() -> ArraySplits:
    try:
        root = importlib.resources.files("animal_mnist") / "data" / "Animal_MNIST"
    except ModuleNotFoundError:
        raise ConfigError(
            f"dataset 'animal-mnist' is not installed; install it with: {INSTALL_HINT}") from None
    images_file = root / "animal_data_version_3.gz"
    labels_file = root / "animal_label_version_3.gz"
    if not (images_file.is_file() and labels_file.is_file()):
        raise ConfigError(
            f"dataset files of 'animal-mnist' are missing; reinstall with: {INSTALL_HINT}")

    def read(resource) -> np.ndarray:
        with resource.open("rb") as raw, gzip.open(raw) as f:
            return np.asarray(_unpickle(f.read(), f"animal-mnist file {resource.name}"))

    images = read(images_file)  # (10000, 28, 28) uint8
    labels = read(labels_file)  # (10000,) int64
    images_t = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    return ArraySplits({"all": (images_t, labels_t)}, num_classes=10)


# name -> (binary folder, python folder, train files, test files, label bytes, label key, classes)
_CIFAR = {
    "cifar10": ("cifar-10-batches-bin", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], 1, "labels", 10),
    "cifar100": ("cifar-100-binary", "cifar-100-python",
                 ["train"], ["test"], 2, "fine_labels", 100),
}
_CIFAR_PIXELS = 3 * 32 * 32


def _cifar(name: str, root: Path) -> ArraySplits:
    bin_dir, py_dir, train, test, label_bytes, label_key, classes = _CIFAR[name]
    # The archive's folder inside DIR, or DIR itself; the binary version first.
    candidates = ((root / bin_dir, True), (root / py_dir, False), (root, True), (root, False))
    for folder, binary in candidates:
        if all((folder / (f + ".bin" if binary else f)).is_file() for f in train + test):
            break
    else:
        raise ConfigError(
            f"data set {name}:{root}: no {bin_dir}/ or {py_dir}/ with {', '.join(train + test)} "
            "in it (extract the official archive there; nothing is downloaded)"
        )
    read = _cifar_binary if binary else _cifar_python
    splits = {}
    for split, names in (("train", train), ("test", test)):
        parts = [read(folder / (f + ".bin" if binary else f), label_bytes, label_key)
                 for f in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise ConfigError(f"data set {name}:{root}: labels outside 0..{classes - 1} in the "
                              f"{split} files")
        splits[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    return ArraySplits(splits, num_classes=classes)


def _cifar_binary(path: Path, label_bytes: int, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    # Each record: label byte(s) (CIFAR-100: coarse, fine), then 1024 R, 1024 G, 1024 B.
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + _CIFAR_PIXELS
    if raw.size == 0 or raw.size % record:
        raise ConfigError(f"{str(path)!r} is not a CIFAR binary file: {raw.size} bytes is not "
                          f"a multiple of the {record}-byte record")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), rows[:, label_bytes - 1].copy()


def _cifar_python(path: Path, label_bytes: int, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path.read_bytes(), repr(str(path)))
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get(label_key) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _CIFAR_PIXELS or labels is None or len(labels) != len(data):
        raise ConfigError(f"{str(path)!r} is not a CIFAR python batch: expected 'data' (N, 3072) "
                          f"uint8 and N '{label_key}'")
    return data.reshape(-1, 3, 32, 32).copy(), _integer_labels(labels, path, label_key)


def _integer_labels(labels, path: Path, label_key: str) -> np.ndarray:
    """``labels`` as int64 if they are one integer per image; floats are refused, not
    truncated, and so are strings, booleans and nested lists."""
    try:
        array = np.asarray(labels)
    except (ValueError, TypeError):  # ragged nesting
        array = None
    if array is None or array.ndim != 1 or array.dtype.kind not in "iu":
        kind = "nested" if array is None or array.ndim != 1 else array.dtype.name
        raise ConfigError(f"{str(path)!r} is not a CIFAR python batch: '{label_key}' must be "
                          f"one integer per image, got {kind} values")
    return array.astype(np.int64)


def _stl10(root: Path) -> ArraySplits:
    folder = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    pixels = 3 * 96 * 96
    splits = {}
    for split in ("train", "test"):
        x_file, y_file = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        if not (x_file.is_file() and y_file.is_file()):
            raise ConfigError(f"data set stl10:{root}: no stl10_binary/ with {x_file.name} and "
                              f"{y_file.name} (extract the official archive; nothing is "
                              "downloaded)")
        raw, labels = np.fromfile(x_file, dtype=np.uint8), np.fromfile(y_file, dtype=np.uint8)
        if raw.size == 0 or raw.size != labels.size * pixels:
            raise ConfigError(f"{str(x_file)!r} holds {raw.size} bytes, not {labels.size} 96x96 "
                              f"colour images (one per label in {y_file.name})")
        if labels.min() < 1 or labels.max() > 10:
            raise ConfigError(f"{str(y_file)!r} holds labels outside 1..10")
        # Each image is stored column-major per channel: transpose to (C, H, W).
        images = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy()
        splits[split] = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64) - 1))
    return ArraySplits(splits, num_classes=10)


# ---------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class FolderScan:
    """A checked image folder: ``files[i]`` of class ``labels[i]`` has shorter side ``sides[i]``."""

    files: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int64
    sides: np.ndarray  # (N,) int64
    classes: list[str]


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)


def _probe(path: str) -> tuple[int, str | None]:
    """``(shorter side, None)`` for a decodable image, ``(0, reason)`` otherwise."""
    try:
        with Image.open(path) as image:
            side = min(image.size)
            image.draft(None, (1, 1))  # JPEG: decode at 1/8 scale (every byte is still read)
            image.load()
        return side, None
    except _DECODE_ERRORS as err:
        return 0, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:100]}"


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_folders(path: Path) -> list[str]:
    """Sorted names of ``path``'s sub-folders, dot-folders (``.ipynb_checkpoints``) skipped."""
    with os.scandir(path) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    if not names:
        raise FileNotFoundError(f"Couldn't find any class folder in {str(path)}.")
    return names


def _walk_images(top: str, seen_dirs: set[str], seen_files: set[str]) -> list[str]:
    """Image files under ``top`` in ``sorted(os.walk(top))`` order, each real file once.

    Dot-folders and dot-files are skipped, and so is anything that is not a regular file (a
    FIFO named ``x.png`` would block the scan). Directory links are followed unless they lead
    to a folder already walked (a loop such as ``loop -> .``), and a file reached twice
    through links is listed once, so it cannot land in both splits.
    """
    folders: list[tuple[str, list[str]]] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        images, subfolders = [], []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir():
                        subfolders.append(entry.path)
                    elif entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS):
                        images.append(entry.path)
                except OSError:  # a dangling or unreadable link: not an image of the folder
                    continue
        folders.append((folder, sorted(images)))
        stack.extend(sorted(subfolders, reverse=True))
    files = []
    for _, images in sorted(folders):
        for file in images:
            real = os.path.realpath(file)
            if real not in seen_files:
                seen_files.add(real)
                files.append(file)
    return files


def scan_folder(path: Path, classes: list[str] | None = None) -> FolderScan:
    """Class sub-folders of ``path`` (torchvision ``ImageFolder`` order), every file checked.

    Dot-folders, dot-files and non-regular files are skipped, looping directory links are
    not followed, and no real file is counted twice (see :func:`_walk_images`).
    With ``classes`` (train's list), ``path`` is indexed by those classes, so a ``val/``
    lacking one of them keeps train's labels; its sub-folders must be among them.

    Raises:
        ConfigError: no class folders or images, a class not in ``classes``, or any file
            that cannot be decoded (the count and the first such file, one line).
    """
    try:
        own = _class_folders(path)
        if classes is not None:
            unknown = [name for name in own if name not in classes]
            if unknown:
                raise ConfigError(
                    f"{str(path)!r} has {len(unknown)} class folder(s) that train/ lacks, "
                    f"e.g. {unknown[0]!r}; val/ classes must be train/ classes")
            class_to_idx = {name: classes.index(name) for name in own}
        else:
            classes = own
            class_to_idx = {name: i for i, name in enumerate(own)}
        samples, seen_dirs, seen_files, empty = [], set(), set(), []
        for name in own:
            found = _walk_images(os.path.join(str(path), name), seen_dirs, seen_files)
            if not found:
                empty.append(name)
            samples.extend((file, class_to_idx[name]) for file in found)
        if empty:
            raise FileNotFoundError(
                f"Found no valid file for the classes {', '.join(empty)}. "
                f"Supported extensions are: {', '.join(IMG_EXTENSIONS)}")
    except (FileNotFoundError, NotADirectoryError, PermissionError) as err:
        raise ConfigError(f"cannot read image folder {str(path)!r}: {err}") from None
    files = [file for file, _ in samples]
    threads = max(1, min(32, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        probes = [result for i in range(0, len(files), CHECK_CHUNK)
                  for result in pool.map(_probe, files[i : i + CHECK_CHUNK])]
    bad = [(file, reason) for file, (_, reason) in zip(files, probes) if reason is not None]
    if bad:
        file, reason = bad[0]
        raise ConfigError(
            f"{len(bad)} of {len(files)} image files in {str(path)!r} cannot be read, e.g. "
            f"{file!r} ({reason}); remove or replace them"
        )
    return FolderScan(
        files=np.array(files, dtype=object),
        labels=np.array([label for _, label in samples], dtype=np.int64),
        sides=np.array([side for side, _ in probes], dtype=np.int64), classes=classes,
    )
