"""Evaluation of a backbone: weighted kNN and a linear probe on frozen features.

- kNN (InstDisc, Wu et al. 2018): L2-normalised backbone features, the train split as memory,
  the test split as queries; each of the k most cosine-similar memory rows votes for its
  class with weight ``exp(sim / temperature)`` (0.07); top-1 accuracy for each k (20 and
  200 by default). The search is :func:`snclr.ops.knn_topk`, once with the largest k: its
  ordering (most similar first, ties to the smaller row) makes every smaller k a prefix.
  Queries go in chunks whose gathered rows stay within ``KNN_CHUNK_BYTES``, whatever the
  bank size. The Triton kernels hold k <= ``KNN_TRITON_MAX_K``; a larger k runs the op's
  exact reference search (``backend="torch"``, chunked matmul and top-k) on the same device.
- Under ``torchrun`` every rank extracts the features of its shard of each split and they
  are gathered, so every rank holds all of them and computes the same result; the augmented
  probe encodes each rank's share of every batch and gathers the features before each step.
- linear probe: a BN-free linear classifier on standardised features of the frozen backbone
  (eval mode, no gradient), trained with SGD and a cosine schedule, under one of two
  protocols: ``cached`` (the default, fast) encodes every image once without augmentation;
  ``augmented`` (MoCo v3's linear evaluation) encodes a fresh random-resized crop + flip of
  every training image at every epoch. Both standardise with the mean and std of the
  unaugmented train features and test on centre-cropped images. A parameter checksum
  proves the backbone did not change.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from snclr import distributed
from snclr.ops import knn_topk
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
    labelled_splits,
    limit,
    linear_train_transform,
    make_loader,
)
from snclr.training.errors import ConfigError, short_repr
from snclr.training.optim import cosine_lr

__all__ = ["KNN_CHUNK_BYTES", "KNN_TRITON_MAX_K", "LINEAR_PROTOCOLS", "extract_features",
           "knn_accuracy", "knn_chunk_rows", "knn_search_backend", "linear_probe",
           "linear_probe_augmented", "load_backbone", "parameter_checksum", "run_evaluation",
           "weighted_knn_predict"]

# cached: features computed once, without augmentation (fast); augmented: MoCo v3's protocol.
LINEAR_PROTOCOLS = ("cached", "augmented")
# The largest k the Triton search kernels take: their list of K_PAD slots must fit one tile
# of the bank (64 rows under the interpreter), and tests/sm90.py checks their configs up to 64.
KNN_TRITON_MAX_K = 64
# Per query chunk, the search's transient rows: k gathered bank rows of D floats per query
# (the reference's values; the kernels keep fewer bytes a query).
KNN_CHUNK_BYTES = 256 << 20


@torch.no_grad()
def extract_features(encoder: nn.Module, images: ImageSet, *, img_size: int, device: torch.device,
                     batch_size: int = 256, num_workers: int = 0,
                     shard: bool = False) -> tuple[Tensor, Tensor]:
    """Backbone features of a split in eval mode; rows whose file does not decode are dropped.

    ``shard``: under torch.distributed each rank encodes one contiguous share of the rows
    and the shares are gathered (collective: every rank must call it); every rank returns
    the whole split, in order.

    Returns:
        ``(N', F)`` float32 features and ``(N',)`` labels, on ``device`` (N' <= N: without
        the unreadable rows).
    """
    world = distributed.world_size() if shard else 1
    per_rank = -(-len(images) // world)
    empty = False
    if world > 1:
        start = distributed.rank() * per_rank
        rows = np.arange(start, min(start + per_rank, len(images)))
        empty = not len(rows)  # a tiny split: this share still encodes a row, then drops it
        images = images.subset(rows if not empty else np.arange(1))
    feats, labels = _encode_rows(encoder, images, img_size=img_size, device=device,
                                 batch_size=batch_size, num_workers=num_workers)
    if empty:
        labels = labels.new_full((0,), -1)
        feats = feats[:0]
    if world > 1:  # equal shapes for the gather: pad the last share with label -1
        pad = per_rank - len(labels)
        feats = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])]) if pad else feats
        labels = torch.cat([labels, labels.new_full((pad,), -1)]) if pad else labels
        feats, labels = distributed.gather_no_grad(feats), distributed.gather_no_grad(labels)
    keep = labels >= 0
    return feats[keep], labels[keep]


def _encode_rows(encoder: nn.Module, images: ImageSet, *, img_size: int, device: torch.device,
                 batch_size: int, num_workers: int) -> tuple[Tensor, Tensor]:
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


def knn_chunk_rows(k: int, dim: int) -> int:
    """Query rows per search call: their ``k`` gathered rows of ``dim`` floats fit
    ``KNN_CHUNK_BYTES``."""
    return max(1, KNN_CHUNK_BYTES // (4 * k * dim))


def knn_search_backend(k: int, backend: str = "auto") -> str:
    """The ``knn_topk`` backend for ``k`` neighbours: ``backend`` up to ``KNN_TRITON_MAX_K``;
    beyond it the exact reference (``"torch"``) on the inputs' device."""
    return "torch" if k > KNN_TRITON_MAX_K else backend


@torch.no_grad()
def weighted_knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *,
                         ks: tuple[int, ...], num_classes: int, temperature: float = 0.07,
                         backend: str = "auto") -> dict[int, Tensor]:
    """InstDisc weighted kNN class scores for each k, from one search with the largest k.

    Peak memory beyond the inputs: per chunk of :func:`knn_chunk_rows` queries, at most
    ``KNN_CHUNK_BYTES`` of gathered rows plus the search's score block (at most 64 MiB in
    the reference, ``snclr.reference.SEARCH_CHUNK_SCORES``), and the ``(Q, C)`` votes.

    Args:
        train_features: ``(N, F)`` memory features (normalised here).
        train_labels: ``(N,)`` int64.
        test_features: ``(Q, F)`` query features.
        ks: neighbours per query (each clipped to N).
        num_classes: C.
        temperature: the vote weight is ``exp(cos / temperature)``.
        backend: the search's (:func:`knn_search_backend`).

    Returns:
        ``{k: (Q, C) vote totals}``; ``argmax(1)`` is the prediction.
    """
    memory = F.normalize(train_features.float(), dim=1)
    largest = min(max(ks), memory.shape[0])
    search = knn_search_backend(largest, backend)
    votes: dict[int, list[Tensor]] = {k: [] for k in ks}
    queries = F.normalize(test_features.float(), dim=1)
    for chunk in queries.split(knn_chunk_rows(largest, memory.shape[1])):
        sim, idx = knn_topk(chunk, memory, largest, backend=search)  # (q, largest), sorted
        weight, label = (sim / temperature).exp(), train_labels[idx]
        for k in ks:
            top = min(k, largest)  # the prefix of the sorted list is the top-k
            scores = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
            votes[k].append(scores.scatter_add_(1, label[:, :top], weight[:, :top]))
    return {k: torch.cat(parts) for k, parts in votes.items()}


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, *, ks: tuple[int, ...] = (20, 200),
                 num_classes: int | None = None, temperature: float = 0.07,
                 backend: str = "auto") -> dict[str, float]:
    """Top-1 accuracy of :func:`weighted_knn_predict` for each k: ``{"top1_k20": ..., ...}``."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    scores = weighted_knn_predict(train_features, train_labels, test_features, ks=ks,
                                  num_classes=num_classes, temperature=temperature,
                                  backend=backend)
    return {f"top1_k{k}": (votes.argmax(1) == test_labels).float().mean().item()
            for k, votes in scores.items()}


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
        # The batches are the epoch's order (no drop_last, so a small set still trains);
        # each rank encodes its share of every batch and the shares are gathered.
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        shares = [_share(batch) for batch in batches]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[rows for rows, _ in shares],
                                             num_workers=num_workers,
                                             pin_memory=device.type == "cuda")
        for batch, (_, real), (x, y) in zip(batches, shares, loader):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=device.type == "cuda"):
                features = encoder(x.to(device, non_blocking=True)).float()
            features, labels = _gather_share(features, y.to(device), real,
                                             -(-len(batch) // distributed.world_size()))
            _sgd_step(head, optimizer, (features - mean) / std, labels, base_lr=lr,
                      step=step, total=total)
            step += 1
    encoder.train(was_training)
    return _head_accuracy(head, (test_features - mean) / std, test_labels)


def _share(batch: list[int]) -> tuple[list[int], int]:
    """This rank's contiguous share of ``batch`` and how many of its rows are real: a rank
    whose share is empty encodes the batch's first row, then drops it."""
    world = distributed.world_size()
    per_rank = -(-len(batch) // world)
    rows = batch[distributed.rank() * per_rank:][:per_rank]
    return (rows, len(rows)) if rows else (batch[:1], 0)


def _gather_share(features: Tensor, labels: Tensor, real: int,
                  per_rank: int) -> tuple[Tensor, Tensor]:
    """Every rank's share of a batch, in batch order (padded to ``per_rank`` for the gather)."""
    if distributed.world_size() == 1:
        return features, labels
    features, labels = features[:real], labels[:real]
    pad = per_rank - real
    features = torch.cat([features, features.new_zeros(pad, features.shape[1])])
    labels = torch.cat([labels, labels.new_full((pad,), -1)])
    features, labels = distributed.gather_no_grad(features), distributed.gather_no_grad(labels)
    keep = labels >= 0
    return features[keep], labels[keep]


def load_backbone(checkpoint: str, *, random_init: bool = False, seed: int = 0,
                  momentum: bool = False) -> tuple[nn.Module, dict]:
    """The online encoder of a checkpoint (``momentum``: the momentum encoder), or the same
    architecture untrained, and its config."""
    payload = read_checkpoint(checkpoint)
    config = config_of(payload)
    shape = payload["data_shape"]
    torch.manual_seed(seed)
    model = build_model(config, in_chans=shape["in_chans"], img_size=shape["img_size"])
    encoder = model.momentum_encoder if momentum else model.encoder
    if not random_init:
        load_model_state(model, payload["model"], source=f"checkpoint {checkpoint!r}")
        bad = non_finite(encoder.state_dict())
        if bad:
            which = "momentum encoder" if momentum else "encoder"
            raise ConfigError(f"checkpoint {checkpoint!r} holds non-finite weights (NaN or "
                              f"infinity in {len(bad)} tensors of the {which}, e.g. {bad[0]})")
    return encoder, {"config": config, **shape}


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
    splits = labelled_splits(data)
    train, test = (limit(splits[split], limit_samples) for split in ("train", "test"))
    if distributed.world_size() > 1 and device.type == "cpu":  # share the cores among ranks
        torch.set_num_threads(max(1, torch.get_num_threads() // launch.local_world_size()))
    if train.in_chans != info["in_chans"]:
        raise ConfigError(f"the checkpoint expects {info['in_chans']}-channel images, {data!r} "
                          f"has {train.in_chans}")
    encoder.to(device)
    checksum = parameter_checksum(encoder)
    feats = [extract_features(encoder, split, img_size=info["img_size"], device=device,
                              num_workers=num_workers, shard=True)
             for split in (train, test)]
    dropped = len(train) + len(test) - len(feats[0][1]) - len(feats[1][1])
    if dropped and distributed.is_main():
        print(f"warning: {dropped} image files could not be decoded; their rows are left out",
              file=sys.stderr)
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


def _check_knn(ks, temperature) -> None:
    if not isinstance(ks, tuple) or not ks or any(
            isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigError(f"k must be one or more integers >= 1, got {ks!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")


def _in_process_group(run):
    """``run`` inside torchrun's process group when launched by torchrun (joined and left
    here unless the caller already joined it)."""
    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        started = launch.init_from_env()
        try:
            return run(*args, **kwargs)
        finally:
            if started:
                distributed.destroy()
    return wrapper


@_in_process_group
def run_knn(checkpoint: str, data: str, *, random_init: bool = False,
            ks: tuple[int, ...] = (20, 200), temperature: float = 0.07, num_workers: int = 0,
            device: str = "auto", limit_samples: int = 0) -> dict[str, float]:
    """``snclr knn``: weighted kNN top-1 of a checkpoint's backbone on a dataset.

    ``top1`` is the first k's. Under ``torchrun`` every rank returns the same result.
    ``limit_samples`` > 0 evaluates on fixed class-balanced subsets of both splits (tests).
    """
    _check_knn(ks, temperature)
    e = _encode(checkpoint, data, random_init=random_init, num_workers=num_workers,
                device=launch.resolve_device(device), limit_samples=limit_samples)
    result = knn_accuracy(e.train_features, e.train_labels, e.test_features, e.test_labels,
                          ks=ks, num_classes=e.train.num_classes, temperature=temperature)
    return {"top1": result[f"top1_k{ks[0]}"], **result}


@_in_process_group
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


@_in_process_group
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
