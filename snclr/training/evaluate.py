"""Evaluation of a backbone: weighted kNN and a linear probe on frozen features.

- kNN (InstDisc, Wu et al. 2018): L2-normalised backbone features, the train split as memory,
  the test split as queries; each of the k most cosine-similar memory rows votes for its
  class with weight ``exp(sim / 0.07)``; top-1 accuracy for k = 20 and 200.
- linear probe: a BN-free linear classifier on standardised features of the frozen backbone
  (eval mode, no gradient), trained with SGD and a cosine schedule, under one of two
  protocols: ``cached`` (the default, fast) encodes every image once without augmentation;
  ``augmented`` (MoCo v3's linear evaluation) encodes a fresh random-resized crop + flip of
  every training image at every epoch. Both standardise with the mean and std of the
  unaugmented train features and test on centre-cropped images. A parameter checksum
  proves the backbone did not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from snclr.training import launch
from snclr.training.checkpoint import (
    build_model,
    config_of,
    load_model_state,
    non_finite,
    read_checkpoint,
)
from snclr.training.config import INT_RANGES
from snclr.training.data import (
    AugmentedDataset,
    EvalDataset,
    ImageSet,
    eval_transform,
    limit,
    linear_train_transform,
    load_splits,
    make_loader,
)
from snclr.training.errors import ConfigError, short_repr
from snclr.training.optim import cosine_lr

__all__ = ["LINEAR_PROTOCOLS", "extract_features", "knn_accuracy", "linear_probe",
           "linear_probe_augmented", "load_backbone", "parameter_checksum", "run_evaluation",
           "weighted_knn_predict"]

# cached: features computed once, without augmentation (fast); augmented: MoCo v3's protocol.
LINEAR_PROTOCOLS = ("cached", "augmented")


@torch.no_grad()
def extract_features(encoder: nn.Module, images: ImageSet, *, img_size: int, device: torch.device,
                     batch_size: int = 256, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """Backbone features of a split in eval mode.

    Returns:
        ``(N, F)`` float32 features and ``(N,)`` labels, on ``device``.
    """
    loader = make_loader(
        EvalDataset(images, eval_transform(
            img_size=img_size, in_chans=images.in_chans,
            native_size=images.img_size if images.same_size else None)),
        batch_size=batch_size, train=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(encoder(x.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def weighted_knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *,
                         k: int, num_classes: int, temperature: float = 0.07,
                         chunk: int = 1024) -> Tensor:
    """InstDisc weighted kNN class scores.

    Args:
        train_features: ``(N, F)`` memory features (normalised here).
        train_labels: ``(N,)`` int64.
        test_features: ``(Q, F)`` query features.
        k: neighbours per query (clipped to N).
        num_classes: C.
        temperature: the vote weight is ``exp(cos / temperature)``.

    Returns:
        ``(Q, C)`` vote totals; ``argmax(1)`` is the prediction.
    """
    memory = F.normalize(train_features.float(), dim=1)
    k = min(k, memory.shape[0])
    scores = []
    for queries in F.normalize(test_features.float(), dim=1).split(chunk):
        sim, idx = (queries @ memory.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, *, ks: tuple[int, ...] = (20, 200),
                 num_classes: int | None = None, temperature: float = 0.07) -> dict[str, float]:
    """Top-1 accuracy of :func:`weighted_knn_predict` for each k: ``{"top1_k20": ..., ...}``."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    result = {}
    for k in ks:
        scores = weighted_knn_predict(train_features, train_labels, test_features, k=k,
                                      num_classes=num_classes, temperature=temperature)
        pred = scores.argmax(1)
        result[f"top1_k{k}"] = (pred == test_labels).float().mean().item()
    return result


def parameter_checksum(module: nn.Module) -> float:
    """Sum of |p| over parameters and buffers (float64): any change to the backbone shows."""
    with torch.no_grad():
        tensors = [*module.parameters(), *module.buffers()]
        return sum(t.detach().double().abs().sum().item() for t in tensors
                   if t.is_floating_point())


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, *, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 batch_size: int = 256, weight_decay: float = 0.0,
                 seed: int = 0) -> dict[str, float]:
    """Train a linear classifier on frozen features (SGD momentum 0.9, cosine lr); top-1 on test.

    Features are standardised with the train mean and std (a fixed affine map, so the
    classifier stays linear in the backbone features).
    """
    generator = torch.Generator().manual_seed(seed)
    mean, std = standardization(train_features)
    train_x, test_x = (train_features - mean) / std, (test_features - mean) / std
    head, optimizer = _linear_head(train_x.shape[1], num_classes, generator, train_x.device,
                                   lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(len(train_x) / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
        for rows in order.split(batch_size):
            _sgd_step(head, optimizer, train_x[rows], train_labels[rows], base_lr=lr, step=step,
                      total=total)
            step += 1
    return _head_accuracy(head, test_x, test_labels)


def standardization(train_features: Tensor) -> tuple[Tensor, Tensor]:
    """The probe's fixed affine map: train mean and std per feature (``(F,)`` each)."""
    return train_features.mean(0), train_features.std(0) + 1e-6


def _linear_head(dim: int, num_classes: int, generator: torch.Generator, device: torch.device,
                 *, lr: float, weight_decay: float) -> tuple[nn.Linear, torch.optim.SGD]:
    head = nn.Linear(dim, num_classes).to(device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    return head, optimizer


def _sgd_step(head: nn.Linear, optimizer: torch.optim.SGD, x: Tensor, y: Tensor, *,
              base_lr: float, step: int, total: int) -> None:
    # The pretraining schedule, counted in steps, without warm-up (MoCo v3's linear probe).
    lr = cosine_lr(step, lr=base_lr, warmup_epochs=0, epochs=total)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = F.cross_entropy(head(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def _head_accuracy(head: nn.Linear, test_x: Tensor, test_labels: Tensor) -> dict[str, float]:
    return {"top1": (head(test_x).argmax(1) == test_labels).float().mean().item()}


def linear_probe_augmented(encoder: nn.Module, train_set: ImageSet, test_features: Tensor,
                           test_labels: Tensor, *, img_size: int, num_classes: int,
                           standardize: tuple[Tensor, Tensor], device: torch.device,
                           epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                           weight_decay: float = 0.0, seed: int = 0, num_workers: int = 0,
                           progress: bool = False) -> dict[str, float]:
    """MoCo v3's linear evaluation: the head trains on augmented images of a frozen backbone.

    Every epoch each training image is random-resized-cropped and flipped under its own seed
    ``(seed, epoch, index)`` (:func:`snclr.training.data.linear_train_transform`), encoded by the
    backbone in eval mode without gradient, standardised with ``standardize`` (the mean and
    std of the unaugmented train features) and fed to the head; the order of each epoch is
    drawn from a generator seeded with ``seed``. Same head, optimiser and schedule as
    :func:`linear_probe`.

    Args:
        encoder: the backbone; its parameters are not changed.
        train_set: the training images.
        test_features: ``(Q, F)`` features of the centre-cropped test images.
        test_labels: ``(Q,)`` int64.
        standardize: ``(F,)`` mean and ``(F,)`` std, from :func:`standardization`.

    Returns:
        ``{"top1": accuracy on the test features}``.
    """
    generator = torch.Generator().manual_seed(seed)
    mean, std = (t.to(device) for t in standardize)
    head, optimizer = _linear_head(mean.shape[0], num_classes, generator, device, lr=lr,
                                   weight_decay=weight_decay)
    dataset = AugmentedDataset(
        train_set, linear_train_transform(img_size=img_size, in_chans=train_set.in_chans),
        seed=seed)
    total = epochs * math.ceil(len(dataset) / batch_size)
    was_training = encoder.training
    encoder.eval()
    step = 0
    for epoch in tqdm(range(epochs), desc="linear probe (augmented)", disable=not progress,
                      leave=False, dynamic_ncols=True):
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        # The sampler is the epoch's order: no drop_last, so a small set still trains.
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order,
                                             num_workers=num_workers,
                                             pin_memory=device.type == "cuda")
        for x, y in loader:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=device.type == "cuda"):
                features = encoder(x.to(device, non_blocking=True)).float()
            _sgd_step(head, optimizer, (features - mean) / std, y.to(device), base_lr=lr,
                      step=step, total=total)
            step += 1
    encoder.train(was_training)
    return _head_accuracy(head, (test_features - mean) / std, test_labels)


def load_backbone(checkpoint: str, *, random_init: bool = False,
                  seed: int = 0) -> tuple[nn.Module, dict]:
    """The online encoder of a checkpoint (or the same architecture untrained) and its config."""
    payload = read_checkpoint(checkpoint)
    config = config_of(payload)
    shape = payload["data_shape"]
    torch.manual_seed(seed)
    model = build_model(config, in_chans=shape["in_chans"], img_size=shape["img_size"])
    if not random_init:
        load_model_state(model, payload["model"], source=f"checkpoint {checkpoint!r}")
        bad = non_finite(model.encoder.state_dict())
        if bad:
            raise ConfigError(f"checkpoint {checkpoint!r} holds non-finite weights (NaN or "
                              f"infinity in {len(bad)} tensors of the encoder, e.g. {bad[0]})")
    return model.encoder, {"config": config, **shape}


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {short_repr(value)}")
        if value > INT_RANGES[name][1]:  # the bound pretrain's option has
            raise ConfigError(f"{name} must be <= {INT_RANGES[name][1]}, got {short_repr(value)}")


@dataclass
class _Encoded:
    """A checkpoint's backbone, the two splits and their features (eval transform)."""

    encoder: nn.Module
    img_size: int
    train: ImageSet
    test: ImageSet
    train_features: Tensor
    train_labels: Tensor
    test_features: Tensor
    test_labels: Tensor
    checksum: float

    def check_unchanged(self) -> None:
        if parameter_checksum(self.encoder) != self.checksum:
            raise RuntimeError("the backbone changed during evaluation")


def _encode(checkpoint: str, data: str, *, random_init: bool, num_workers: int,
            device: torch.device, limit_samples: int = 0) -> _Encoded:
    _check_counts(num_workers=num_workers, limit_samples=limit_samples)
    encoder, info = load_backbone(checkpoint, random_init=random_init)
    splits = load_splits(data)
    train, test = (limit(splits[split], limit_samples) for split in ("train", "test"))
    if train.in_chans != info["in_chans"]:
        raise ConfigError(f"the checkpoint expects {info['in_chans']}-channel images, {data!r} "
                          f"has {train.in_chans}")
    encoder.to(device)
    checksum = parameter_checksum(encoder)
    feats = [extract_features(encoder, split, img_size=info["img_size"], device=device,
                              num_workers=num_workers)
             for split in (train, test)]
    encoded = _Encoded(encoder, info["img_size"], train, test, *feats[0], *feats[1], checksum)
    encoded.check_unchanged()
    return encoded


def _probe(encoded: _Encoded, *, protocol: str, epochs: int, lr: float, seed: int,
           num_workers: int, progress: bool) -> dict[str, float]:
    e = encoded
    num_classes = e.train.num_classes
    if protocol == "cached":
        return linear_probe(e.train_features, e.train_labels, e.test_features, e.test_labels,
                            num_classes=num_classes, epochs=epochs, lr=lr, seed=seed)
    result = linear_probe_augmented(
        e.encoder, e.train, e.test_features, e.test_labels, img_size=e.img_size,
        num_classes=num_classes, standardize=standardization(e.train_features),
        device=e.test_features.device, epochs=epochs, lr=lr, seed=seed,
        num_workers=num_workers, progress=progress)
    e.check_unchanged()
    return result


def _check_linear(epochs, lr, protocol) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {short_repr(epochs)}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a finite number > 0, got {short_repr(lr)}")
    if protocol not in LINEAR_PROTOCOLS:
        raise ConfigError(f"the linear protocol must be one of {LINEAR_PROTOCOLS}, got "
                          f"{short_repr(protocol)}")


def run_knn(checkpoint: str, data: str, *, random_init: bool = False,
            ks: tuple[int, ...] = (20, 200), num_workers: int = 0, device: str = "auto",
            limit_samples: int = 0) -> dict[str, float]:
    """``snclr knn``: weighted kNN top-1 of a checkpoint's backbone on a dataset.

    ``limit_samples`` > 0 evaluates on fixed class-balanced subsets of both splits (tests).
    """
    e = _encode(checkpoint, data, random_init=random_init, num_workers=num_workers,
                device=launch.resolve_device(device), limit_samples=limit_samples)
    result = knn_accuracy(e.train_features, e.train_labels, e.test_features, e.test_labels,
                          ks=ks, num_classes=e.train.num_classes)
    return {"top1": result[f"top1_k{ks[0]}"], **result}


def run_linear(checkpoint: str, data: str, *, epochs: int = 100, lr: float = 0.1,
               protocol: str = "cached", seed: int = 0, random_init: bool = False,
               num_workers: int = 0, device: str = "auto", limit_samples: int = 0,
               progress: bool = False) -> dict[str, float]:
    """``snclr linear``: linear-probe top-1 of a checkpoint's frozen backbone on a dataset.

    ``protocol`` is ``"cached"`` (features once, no augmentation) or ``"augmented"``
    (MoCo v3's: random-resized crop + flip every epoch, see
    :func:`linear_probe_augmented`).

    Raises:
        ConfigError: ``epochs`` < 1, ``lr`` not a finite number > 0, an unknown protocol,
            or what ``snclr knn`` refuses (checked before any feature is computed).
    """
    _check_linear(epochs, lr, protocol)
    e = _encode(checkpoint, data, random_init=random_init, num_workers=num_workers,
                device=launch.resolve_device(device), limit_samples=limit_samples)
    return _probe(e, protocol=protocol, epochs=epochs, lr=lr, seed=seed,
                  num_workers=num_workers, progress=progress)


def run_evaluation(checkpoint: str, data: str, *, ks: tuple[int, ...] = (20, 200),
                   linear_epochs: int = 100, linear_lr: float = 0.1, protocol: str = "cached",
                   seed: int = 0, num_workers: int = 0, device: str = "auto",
                   limit_samples: int = 0, progress: bool = False) -> dict[str, float]:
    """kNN top-1 for each k and the linear probe's top-1, from one feature extraction.

    Returns:
        ``{"top1_k20": ..., "top1_k200": ..., "linear_top1": ...}`` (one ``top1_k<k>`` per
        k); the probe is :func:`run_linear`'s with ``protocol`` and ``seed``.
    """
    _check_linear(linear_epochs, linear_lr, protocol)
    e = _encode(checkpoint, data, random_init=False, num_workers=num_workers,
                device=launch.resolve_device(device), limit_samples=limit_samples)
    result = knn_accuracy(e.train_features, e.train_labels, e.test_features, e.test_labels,
                          ks=ks, num_classes=e.train.num_classes)
    probe = _probe(e, protocol=protocol, epochs=linear_epochs, lr=linear_lr, seed=seed,
                   num_workers=num_workers, progress=progress)
    return {**result, "linear_top1": probe["top1"]}
