"""Datasets, the fixed split, two-view augmentations and the training loader."""

import importlib.resources

import numpy as np
import pytest
import torch
from PIL import Image

from snclr.config import ConfigError
from snclr.data import (
    EvalDataset, TwoViewDataset, eval_transform, limit, load_dataset, make_loader, stratified_split,
    two_view_transforms,
)


@pytest.fixture(scope="module")
def animal_train():
    return load_dataset("animal-mnist", split="train")


def test_animal_mnist_split_is_fixed_stratified_80_20(animal_train):
    test = load_dataset("animal-mnist", split="test")
    assert (len(animal_train), len(test)) == (8000, 2000)
    assert animal_train.images.shape == (8000, 1, 28, 28) and animal_train.images.dtype == torch.uint8
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
    x1, x2, label = TwoViewDataset(train, view1, view2, seed=0)[0]
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

    assert (probability(view1, "GaussianBlur"), probability(view2, "GaussianBlur")) == (1.0, 0.1)
    assert (probability(view1, "RandomSolarize"), probability(view2, "RandomSolarize")) == (0.0, 0.2)


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
    two_ranks = [make_loader(dataset, batch_size=8, train=True, world_size=2, rank=r) for r in (0, 1)]
    assert [len(loader) for loader in two_ranks] == [2, 2]  # 20 per rank, drop_last
