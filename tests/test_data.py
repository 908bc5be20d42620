"""Datasets, the fixed split, two-view augmentations and the training loader."""

import importlib.resources
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from datafiles import cifar_images, write_cifar, write_images, write_stl10
from PIL import Image

from snclr.training.config import ConfigError
from snclr.training.data import (
    EvalDataset,
    TwoViewDataset,
    eval_transform,
    labelled_splits,
    limit,
    load_dataset,
    load_splits,
    make_loader,
    pretraining_images,
    stratified_split,
    two_view_transforms,
)


@pytest.fixture(scope="module")
def animal_train():
    return load_dataset("animal-mnist", split="train")


def test_animal_mnist_split_is_fixed_stratified_80_20(animal_train):
    test = load_dataset("animal-mnist", split="test")
    assert (len(animal_train), len(test)) == (8000, 2000)
    assert animal_train.images.shape == (8000, 1, 28, 28)
    assert animal_train.images.dtype == torch.uint8
    assert torch.bincount(animal_train.labels).tolist() == [800] * 10
    assert torch.bincount(test.labels).tolist() == [200] * 10
    again = load_dataset("animal-mnist", split="train")
    assert torch.equal(again.images, animal_train.images)
    # Train and test images are different rows of the 10,000.
    train_rows, test_rows = stratified_split(np.repeat(np.arange(10), 1000))
    assert not set(train_rows) & set(test_rows) and len(train_rows) + len(test_rows) == 10000


def test_limit_is_balanced_and_fixed(animal_train):
    small = limit(animal_train, 50)
    assert len(small) == 50 and torch.bincount(small.labels).tolist() == [5] * 10
    assert torch.equal(limit(animal_train, 50).images, small.images)
    assert limit(animal_train, 0) is animal_train


def test_missing_builtin_dataset_says_how_to_install(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(ConfigError, match=r"pip install --no-deps animal-mnist==0\.4"):
        load_dataset("animal-mnist", split="train")


def test_unknown_dataset_or_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_dataset(str(tmp_path / "nope"), split="train")
    with pytest.raises(ConfigError, match="no train/"):
        load_dataset(str(tmp_path), split="train")


def _image_folder(root, classes=2, per_class=5, size=12):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / "train" / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / f"class{c}" / f"{i}.png")
    return root


def test_image_folder_without_val_is_split_80_20(tmp_path):
    root = _image_folder(tmp_path)
    train, test = load_dataset(str(root), split="train"), load_dataset(str(root), split="test")
    assert (len(train), len(test), train.in_chans, train.num_classes) == (8, 2, 3, 2)
    view1, view2 = two_view_transforms("byol", img_size=16, crop_scale_min=0.5, in_chans=3)
    x1, x2, label, index, _ = TwoViewDataset(train, view1, view2, seed=0)[0]
    assert index == 0
    assert x1.shape == x2.shape == (3, 16, 16) and label.item() == 0
    x, _ = EvalDataset(test, eval_transform(img_size=16, native_size=224, in_chans=3))[0]
    assert x.shape == (3, 16, 16)


def test_byol_views_are_asymmetric():
    view1, view2 = two_view_transforms("byol", img_size=32, crop_scale_min=0.08, in_chans=3)

    def probability(view, name):
        for t in view.transforms:
            inner = getattr(t, "transforms", [t])
            if type(inner[0]).__name__ == name:
                return t.p
        raise AssertionError(name)

    for name, expected in (("GaussianBlur", (1.0, 0.1)), ("RandomSolarize", (0.0, 0.2))):
        assert (probability(view1, name), probability(view2, name)) == expected


def test_augmentation_is_a_function_of_seed_epoch_and_index(animal_train):
    views = two_view_transforms("greyscale", img_size=28, crop_scale_min=0.4, in_chans=1)
    dataset = TwoViewDataset(limit(animal_train, 20), *views, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    first = dataset[5]
    torch.manual_seed(456)
    second = dataset[5]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])  # two different views
    dataset.set_epoch(1)
    assert not torch.equal(dataset[5][0], first[0])


def test_train_loader_order_depends_on_seed_and_epoch_only(animal_train):
    small = limit(animal_train, 40)
    dataset = EvalDataset(small, lambda image: image)

    def order(seed, epoch):
        loader = make_loader(dataset, batch_size=8, train=True, seed=seed)
        loader.sampler.set_epoch(epoch)
        return torch.cat([images.flatten(1).sum(1) for images, _ in loader])

    assert torch.equal(order(0, 1), order(0, 1))
    assert not torch.equal(order(0, 1), order(0, 2))
    assert len(order(0, 0)) == 40
    two_ranks = [make_loader(dataset, batch_size=8, train=True, world_size=2, rank=r)
                 for r in (0, 1)]
    assert [len(loader) for loader in two_ranks] == [2, 2]  # 20 per rank, drop_last



def test_persistent_workers_see_each_epoch_and_match_the_main_process(animal_train):
    views = two_view_transforms("greyscale", img_size=28, crop_scale_min=0.4, in_chans=1)
    dataset = TwoViewDataset(limit(animal_train, 16), *views, seed=3)
    loader = make_loader(dataset, batch_size=8, train=True, num_workers=1)
    assert loader.persistent_workers
    assert not make_loader(dataset, batch_size=8, train=True).persistent_workers  # no workers
    assert not make_loader(dataset, batch_size=8, train=False, num_workers=1).persistent_workers

    def epoch_views(loader, epoch):
        loader.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        return torch.cat([x1 for x1, *_ in loader])

    in_workers = [epoch_views(loader, epoch) for epoch in (0, 1)]
    in_main = [epoch_views(make_loader(dataset, batch_size=8, train=True), e) for e in (0, 1)]
    # The same worker process served both epochs, with each epoch's augmentation.
    assert all(torch.equal(a, b) for a, b in zip(in_workers, in_main))
    assert not torch.equal(in_workers[0], in_workers[1])


def test_an_epoch_can_start_at_a_batch(animal_train):
    dataset = EvalDataset(limit(animal_train, 40), lambda image: image)
    loader = make_loader(dataset, batch_size=8, train=True)
    loader.sampler.set_epoch(2)
    full = [labels for _, labels in loader]
    loader.sampler.set_epoch(2, start_batch=3)
    assert len(loader) == 2
    assert [labels.tolist() for _, labels in loader] == [b.tolist() for b in full[3:]]
    loader.sampler.set_epoch(3)  # the next epoch starts at its beginning
    assert len(loader) == 5


# ----------------------------------------------------------------- native size, mixed sizes


def test_folder_native_size_is_the_median_shorter_side(tmp_path):
    write_images(tmp_path / "train" / "a", [32] * 6 + [(64, 40)])
    write_images(tmp_path / "train" / "b", [32] * 5 + [300, 300])
    splits = load_splits(str(tmp_path))
    assert splits["train"].img_size == splits["test"].img_size == 32
    assert not splits["train"].same_size and splits["train"].in_chans == 3
    assert len(splits["train"]) + len(splits["test"]) == 14


def test_mixed_size_folder_is_resized_for_evaluation_at_the_native_size(tmp_path):
    # Median side 40: without the resize the 300 px images would reach the encoder as they are.
    write_images(tmp_path / "train" / "a", [40, 40, 300, 40, 300])
    write_images(tmp_path / "train" / "b", [300, 40, 40, 300, 40])
    images = load_splits(str(tmp_path))["train"]
    assert images.img_size == 40
    transform = eval_transform(img_size=images.img_size, native_size=None, in_chans=3)
    shapes = {EvalDataset(images, transform)[i][0].shape for i in range(len(images))}
    assert shapes == {(3, 40, 40)}
    loader = make_loader(EvalDataset(images, transform), batch_size=8, train=False)
    assert next(iter(loader))[0].shape == (8, 3, 40, 40)  # one batch of mixed sources
    views = two_view_transforms("byol", img_size=40, crop_scale_min=0.4, in_chans=3)
    x1, x2, _, index, bad = TwoViewDataset(images, *views, seed=0)[2]
    assert (index, bad) == (2, -1)
    assert x1.shape == x2.shape == (3, 40, 40)


@pytest.mark.parametrize(
    "damage, reason, check",
    [
        (lambda p: p.write_bytes(b""), "UnidentifiedImageError", "header"),
        # A sound header over truncated pixels: only the full decode check sees it up front.
        (lambda p: p.write_bytes(p.read_bytes()[:200]), "OSError: image file is truncated",
         "decode"),
        (lambda p: p.write_text("not an image at all"), "UnidentifiedImageError", "header"),
    ],
    ids=["zero-byte", "truncated", "fake"],
)
def test_unreadable_image_files_are_one_error_naming_them(tmp_path, damage, reason, check):
    write_images(tmp_path / "train" / "a", [32] * 4)
    write_images(tmp_path / "train" / "b", [32] * 4)
    damage(tmp_path / "train" / "b" / "2.png")
    with pytest.raises(ConfigError, match=f"1 of 8 image files in .* cannot be read, e.g. "
                                          f".*b/2.png' \\({reason}") as err:
        load_splits(str(tmp_path), check=check)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------- CIFAR and STL-10 files


@pytest.mark.parametrize("name, version", [("cifar10", "bin"), ("cifar10", "py"),
                                           ("cifar100", "bin"), ("cifar100", "py")])
def test_cifar_files_are_read_without_running_code(tmp_path, name, version):
    write_cifar(tmp_path, name, version)
    splits = load_splits(f"{name}:{tmp_path}")
    train, test = splits["train"], splits["test"]
    files = 5 if name == "cifar10" else 1
    assert (len(train), len(test)) == (8 * files, 8)
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert (train.img_size, train.in_chans, train.same_size) == (32, 3, True)
    assert train.num_classes == (10 if name == "cifar10" else 100)
    assert torch.equal(train.images, torch.from_numpy(cifar_images(8 * files)))
    assert torch.equal(test.images, torch.from_numpy(cifar_images(8, offset=8 * files)))
    assert train.labels[:8].tolist() == list(range(8))  # the fine label, not the coarse one


def test_stl10_binary_is_read_column_major(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for split, count in (("train", 3), ("test", 2)):
        images = rng.integers(0, 255, (count, 3, 96, 96), dtype=np.uint8)
        # The official files store each channel column by column.
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        (folder / f"{split}_y.bin").write_bytes(np.arange(1, count + 1, dtype=np.uint8).tobytes())
        expected[split] = images
    splits = load_splits(f"stl10:{tmp_path}")
    assert torch.equal(splits["train"].images, torch.from_numpy(expected["train"]))
    assert torch.equal(splits["test"].images, torch.from_numpy(expected["test"]))
    assert splits["train"].labels.tolist() == [0, 1, 2] and splits["train"].img_size == 96



def test_stl10_unlabelled_images_are_read_and_pretraining_adds_them(tmp_path):
    written = write_stl10(tmp_path, {"train": 3, "test": 2}, unlabelled=4)
    splits = load_splits(f"stl10:{tmp_path}")
    extra = splits["unlabelled"]
    assert torch.equal(extra.images, torch.from_numpy(written["unlabeled"]))
    assert extra.labels.tolist() == [-1] * 4
    images = pretraining_images(splits)
    assert len(images) == 7 and images.labels.tolist() == [0, 1, 2, -1, -1, -1, -1]
    assert torch.equal(images.images[3:], extra.images) and images.num_classes == 10
    assert len(labelled_splits(f"stl10:{tmp_path}")["train"]) == 3  # evaluation: labelled only
    (tmp_path / "stl10_binary" / "unlabeled_X.bin").write_bytes(b"x" * 100)
    with pytest.raises(ConfigError, match="100 bytes, not a whole number of 96x96"):
        load_splits(f"stl10:{tmp_path}")


def test_a_flat_folder_is_unlabelled_and_evaluation_refuses_it(tmp_path):
    write_images(tmp_path / "flat", [20] * 3)
    write_images(tmp_path / "flat" / "more", [24] * 2, seed=1)  # sub-folders are read too
    splits = load_splits(str(tmp_path / "flat"))
    assert list(splits) == ["unlabelled"]
    images = splits["unlabelled"]
    assert len(images) == 5 and images.labels.tolist() == [-1] * 5 and images.num_classes == 0
    assert images.img_size == 20 and not images.same_size
    assert pretraining_images(splits) is images
    with pytest.raises(ConfigError, match="has no labels .* kNN and linear evaluation need"):
        labelled_splits(str(tmp_path / "flat"))
    (tmp_path / "classes" / "a").mkdir(parents=True)  # class folders without train/: refused
    with pytest.raises(ConfigError, match="has no train/ sub-folder"):
        load_splits(str(tmp_path / "classes"))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path, "cifar10", "py")
    evil = pickle.dumps({"data": _RunsCode()})
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(evil)
    with pytest.raises(ConfigError, match=r"refused to read .*data_batch_3': it holds a posix"):
        load_splits(f"cifar10:{tmp_path}")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "prepare, data, match",
    [
        (lambda root: None, "cifar10:{root}", r"no cifar-10-batches-bin/ or cifar-10-batches-py/"),
        (lambda root: None, "stl10:{root}", r"no stl10_binary/ with train_X.bin"),
        (lambda root: None, "cifar100:{root}/missing", r"is not a directory"),
        (lambda root: None, "cifar10:", r"needs its folder: --data cifar10:DIR"),
        (lambda root: (write_cifar(root), (root / "cifar-10-batches-bin" / "test_batch.bin")
                       .write_bytes(b"x" * 10)),
         "cifar10:{root}", r"test_batch.bin' is not a CIFAR binary file: 10 bytes"),
    ],
    ids=["cifar-empty", "stl-empty", "missing-dir", "no-dir", "wrong-size"],
)
def test_named_data_set_problems_are_one_line_errors(tmp_path, prepare, data, match):
    prepare(tmp_path)
    with pytest.raises(ConfigError, match=match) as err:
        load_splits(data.format(root=tmp_path))
    assert "\n" not in str(err.value)


def test_data_does_not_import_the_config():
    """The error class lives below both (snclr.training.errors): reading data never loads the
    config."""
    script = ("import sys, snclr.training.data; "
              "print(sorted(m for m in sys.modules if m == 'snclr.training.config'))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, check=True)
    assert done.stdout.strip() == "[]"
    from snclr.training import config, errors, train

    assert config.ConfigError is errors.ConfigError and ConfigError is errors.ConfigError
    assert train.TrainingDiverged is errors.TrainingDiverged
