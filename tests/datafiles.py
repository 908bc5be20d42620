"""Small data files in real formats, written by the tests: image folders, CIFAR, STL-10."""

import pickle

import numpy as np
from PIL import Image


def write_images(folder, sizes, seed=0):
    """One random RGB image per entry of ``sizes`` ((width, height) or a square side)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        width, height = (size, size) if isinstance(size, int) else size
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def cifar_images(count, offset=0):
    """``(count, 3, 32, 32)`` uint8 whose pixels tell image, channel and position apart."""
    index = np.arange(count)[:, None, None, None] + offset
    channel = np.arange(3)[None, :, None, None]
    row = np.arange(32)[None, None, :, None]
    values = ((index * 7 + channel * 50 + row) % 256).astype(np.uint8)
    return values + np.zeros((1, 1, 1, 32), np.uint8)


def write_cifar(root, name="cifar10", version="bin", per_file=8):
    """Tiny files in the official layouts; image i of a file has label i % 10 (fine labels).

    The python version is pickled with protocol 2 for CIFAR-10 (as the official files) and
    with the newest protocol for CIFAR-100 (as a re-pickled copy would be).
    """
    files = {"cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
             "cifar100": (["train"], ["test"])}[name]
    folder = root / {
        ("cifar10", "bin"): "cifar-10-batches-bin", ("cifar10", "py"): "cifar-10-batches-py",
        ("cifar100", "bin"): "cifar-100-binary", ("cifar100", "py"): "cifar-100-python",
    }[name, version]
    folder.mkdir(parents=True)
    for n, stem in enumerate(files[0] + files[1]):
        images, fine = cifar_images(per_file, offset=n * per_file), np.arange(per_file) % 10
        if version == "bin":
            labels = [fine[:, None]] if name == "cifar10" else [fine[:, None] // 5, fine[:, None]]
            columns = [*[label.astype(np.uint8) for label in labels], images.reshape(per_file, -1)]
            records = np.concatenate(columns, axis=1)
            (folder / f"{stem}.bin").write_bytes(records.tobytes())
        else:
            key = "labels" if name == "cifar10" else "fine_labels"
            batch = {"data": images.reshape(per_file, -1), key: fine.tolist(), "batch_label": stem}
            protocol = 2 if name == "cifar10" else pickle.HIGHEST_PROTOCOL
            (folder / stem).write_bytes(pickle.dumps(batch, protocol=protocol))
    return root


def write_stl10(root, counts, unlabelled=0, seed=0):
    """Tiny STL-10 binary files; returns the (C, H, W) images written per split."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in {**counts, "unlabeled": unlabelled}.items():
        if not count:
            continue
        images = rng.integers(0, 255, (count, 3, 96, 96), dtype=np.uint8)
        # The official files store each channel column by column.
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        if split != "unlabeled":
            labels = np.arange(count, dtype=np.uint8) % 10 + 1
            (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        written[split] = images
    return written

