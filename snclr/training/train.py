"""Pretraining: setup, the epoch loop and ``train_one_epoch`` (MoCo v3 style).

One process on a CPU is the first-class path; under ``torchrun`` (``WORLD_SIZE`` > 1) the
same code adds a process group (NCCL on GPU, gloo on CPU), a sharded sampler, DDP and, on
CUDA, SyncBatchNorm. Only rank 0 writes files or prints.

The step: ``out = model(x1, x2)``; ``out.loss.backward()``; optimiser step;
``momentum_update(m)``; ``enqueue(out.keys, labels)``. Learning rate and EMA momentum are
pure functions of the fractional epoch, data order and augmentation pure functions of
``(seed, epoch)``, and every piece of state lives in the checkpoint, so an interrupted and
resumed run reproduces an uninterrupted one (bit for bit on a CPU).

Faults: everything a run needs (config, data files, checkpoint, run folder) is checked before
the run folder changes. A resumed run continues from its saved config (changes are classed in
:mod:`snclr.training.config`). A non-finite loss at a log step or in an epoch's mean, or non-finite
weights when a checkpoint is due, stop every rank with :class:`TrainingDiverged`; the last
good checkpoint stays. A file that cannot be written (a full disk) stops the run with
:class:`WriteFailed`, Ctrl-C with :class:`Interrupted`; both name the kept checkpoint's step.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

from snclr import distributed
from snclr.encoders import fit_img_size
from snclr.kernels._common import interpreted as triton_interpreted
from snclr.model import SNCLR, SNCLROutput, cosine_momentum
from snclr.training import launch, runlock
from snclr.training.checkpoint import (
    RESUME_KEYS,
    build_model,
    config_of,
    get_rng_state,
    load_model_state,
    non_finite,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from snclr.training.config import (
    Config,
    check_resume_changes,
    config_changes,
    resumed_config,
    validate,
)
from snclr.training.data import (
    TwoViewDataset,
    UnreadableFiles,
    limit,
    load_splits,
    make_loader,
    pretraining_images,
    two_view_transforms,
)
from snclr.training.errors import (
    ConfigError,
    Interrupted,
    TrainingDiverged,
    WriteFailed,
    check_path,
)
from snclr.training.evaluate import extract_features, knn_accuracy
from snclr.training.metrics import MetricsLog, clean
from snclr.training.optim import cosine_lr, create_optimizer
from snclr.training.report import write_report
from snclr.training.runfiles import (
    check_run_folder,
    remove_stale,
    write_failed,
    write_text_atomically,
)

__all__ = ["Plan", "TrainingDiverged", "forward_backward", "pretrain", "self_neighbor_warning",
           "train_one_epoch"]

HISTOGRAM_BINS = 50  # weights cluster near 1/K (tau_a = 1): fine bins show the spread


@dataclass(frozen=True)
class Plan:
    """Values derived once from the config, the data and the process group."""

    device: torch.device
    world_size: int
    rank: int
    local_batch: int
    lr: float  # base lr * batch_size / 256
    steps_per_epoch: int
    amp_dtype: torch.dtype | None  # None: fp32
    bank_dtype: torch.dtype  # the queue's storage dtype, which is also the search precision
    in_chans: int
    img_size: int
    labelled: bool = True  # False: no labels (no kNN monitor, no neighbour purity)


@dataclass
class State:
    """The mutable training state (everything a checkpoint holds)."""

    model: SNCLR
    wrapped: nn.Module  # DDP(model) or model itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    saved_step: int | None = None  # step of the checkpoint on disk (None: no checkpoint yet)
    # The running epoch's batches done and metric sums: a mid-epoch checkpoint holds them.
    epoch_batches: int = 0
    epoch_sums: torch.Tensor | None = None
    epoch_histogram: torch.Tensor | None = None
    unreadable: UnreadableFiles | None = None  # training files that failed to decode

    def kept(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"checkpoint.pt still holds the last good state (step {self.saved_step})"


def _set_threads(device: torch.device) -> None:
    # Without OMP_NUM_THREADS, share the cores among the ranks on this machine.
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = launch.local_world_size()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _plan(config: Config, device: torch.device, train_size: int, in_chans: int, *,
          labelled: bool = True) -> Plan:
    world = distributed.world_size()
    if config.backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ConfigError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1); "
                          f"this run is on {device.type}")
    if config.batch_size % world:
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {world} "
                          "processes")
    if (config.batch_size // world) % config.accumulate:
        raise ConfigError(f"accumulate={config.accumulate} does not divide the batch of "
                          f"{config.batch_size // world} images per process")
    if config.batch_size > train_size:
        raise ConfigError(f"batch_size={config.batch_size} is larger than the {train_size} "
                          "training images")
    precision = config.precision if device.type == "cuda" else "fp32"  # autocast on GPU only
    amp = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp32": None}[precision]
    # auto: search in the 16-bit dtype the GPU trains in (tensor cores), fp32 elsewhere.
    bank_dtype = {"auto": amp or torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
                  "fp16": torch.float16}[config.bank_dtype]
    return Plan(
        device=device, world_size=world, rank=distributed.rank(),
        local_batch=config.batch_size // world,
        lr=config.lr * config.batch_size / 256, steps_per_epoch=train_size // config.batch_size,
        amp_dtype=amp, bank_dtype=bank_dtype, in_chans=in_chans, img_size=config.img_size,
        labelled=labelled,
    )


def _checkpoint_payload(config: Config, plan: Plan, state: State) -> dict:
    """The checkpoint contents. Collective under torch.distributed: every rank must call it."""
    return {
        "config": config.to_dict(), "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(), "scaler": state.scaler.state_dict(),
        "epoch": state.epoch, "step": state.step, "rng": get_rng_state(),
        "data_shape": {"in_chans": plan.in_chans, "img_size": plan.img_size},
        "rank_banks": state.model.bank.gather_rank_queues(),
        "epoch_progress": _epoch_progress(state),
    }


def _epoch_progress(state: State) -> dict | None:
    """The running epoch's batches and metric sums (None at an epoch's end). Collective.

    The sums are averaged and the histogram summed over ranks here, as the epoch's end
    would; a resumed epoch continues from them (:func:`_resume_epoch`).
    """
    if not state.epoch_batches:
        return None
    return {"batches": state.epoch_batches,
            "sums": distributed.all_reduce_mean(state.epoch_sums).cpu(),
            "histogram": distributed.all_reduce_sum(state.epoch_histogram).cpu()}


def self_neighbor_warning(queue_size: int, period: int, *, world_size: int = 1,
                          bank_mode: str = "local", excluded: bool = False) -> str | None:
    """One line when the queue holds at least the images one queue receives per epoch (None
    otherwise): then images meet their own past keys in the search.

    ``period`` is P, the keys one queue receives per epoch (images per rank and epoch; the
    data set size in a global queue). The expected share is that of samples with an own past
    key in a full queue: all of them on one rank or in a global queue; in a local queue
    over W ranks that reshuffle every epoch, ``1 - (1 - 1/W) ** (N / P)``. ``excluded``:
    the run has ``exclude_self_neighbors`` on, and the line says so.

    Example:
        >>> self_neighbor_warning(16384, 8192).split(": ")[1]
        'queue_size 16384 >= 8192 images per rank and epoch'
    """
    if queue_size < period:
        return None
    ranks = world_size if bank_mode == "local" else 1
    share = 1.0 if ranks == 1 else 1 - (1 - 1 / ranks) ** (queue_size / period)
    return (f"warning: queue_size {queue_size} >= {period} images per rank and epoch: about "
            f"{share:.0%} of the samples have their own past keys in the queue (expected "
            f"self-neighbours, {queue_size / period:.1f} epochs of keys); "
            "--exclude-self-neighbors removes them"
            + (" (on in this run: they are excluded)" if excluded else ""))


def forward_backward(state: State, x1: torch.Tensor, x2: torch.Tensor, indices: torch.Tensor, *,
                     micro_batches: int = 1,
                     amp_dtype: torch.dtype | None = None) -> list[SNCLROutput]:
    """Forward and backward of one optimiser step's batch, in ``micro_batches`` equal parts.

    Each part's loss is divided by the number of parts, so the gradients are the mean of the
    parts' gradients. Nothing is enqueued or EMA-updated here (the caller does both once per
    optimiser step): every part searches the same queue snapshot. Each part contrasts its own
    images (its keys are its in-batch targets) and BatchNorm normalises over the part, so
    parts of B / n differ from one batch of B there. Under DDP the gradients are all-reduced
    once, after the last part.

    Shape:
        ``x1``, ``x2``: ``(B, C, H, W)``; ``indices``: ``(B,)`` int64, B divisible by
        ``micro_batches``.

    Returns:
        One output per part, in batch order.
    """
    outs = []
    parts = list(zip(x1.chunk(micro_batches), x2.chunk(micro_batches),
                     indices.chunk(micro_batches)))
    for j, (a, b, part_indices) in enumerate(parts):
        deferred = j + 1 < len(parts) and hasattr(state.wrapped, "no_sync")
        with state.wrapped.no_sync() if deferred else contextlib.nullcontext():
            with torch.autocast(x1.device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                out = state.wrapped(a, b, part_indices)
            state.scaler.scale(out.loss / len(parts)).backward()
        outs.append(out)
    return outs


def train_one_epoch(config: Config, plan: Plan, state: State, loader, log: MetricsLog,
                    checkpoint: Path | None = None) -> dict:
    """One pass over the loader (from batch ``state.epoch_batches`` of a resumed epoch);
    returns the epoch's statistics (synchronised over ranks). With ``save_every_steps``,
    checkpoints due mid-epoch are written to ``checkpoint``."""
    model, device, n = state.model, plan.device, config.accumulate
    start = state.epoch_batches
    if not start:
        # loss, purity, entropy, similarity, purity-steps, self-neighbour fraction, purity
        # without self-neighbours
        state.epoch_sums = torch.zeros(7, device=device)
        state.epoch_histogram = torch.zeros(HISTOGRAM_BINS, device=device)
    sums, histogram = state.epoch_sums, state.epoch_histogram
    bar = tqdm(loader, total=plan.steps_per_epoch, initial=start,
               desc=f"epoch {state.epoch + 1}/{config.epochs}",
               disable=not distributed.is_main(), dynamic_ncols=True, leave=False)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    tic, seen = time.perf_counter(), 0
    for i, (x1, x2, labels, indices, bad) in enumerate(bar, start=start):
        if state.unreadable is not None:
            state.unreadable.add(bad)
        x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
        x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        indices = indices.to(device, non_blocking=True)
        fraction = state.epoch + i / plan.steps_per_epoch
        lr = cosine_lr(fraction, lr=plan.lr, warmup_epochs=config.warmup_epochs,
                       epochs=config.epochs)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        state.optimizer.zero_grad(set_to_none=True)
        outs = forward_backward(state, x1, x2, indices, micro_batches=n, amp_dtype=plan.amp_dtype)
        if config.grad_clip > 0:
            state.scaler.unscale_(state.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        momentum = cosine_momentum(fraction / config.epochs, base=config.momentum_base,
                                   final=config.momentum_final)
        model.momentum_update(momentum)
        step_loss = sum(out.loss.detach().float() for out in outs) / n
        sums[0] += step_loss
        for out, part_labels, part_indices in zip(outs, labels.chunk(n), indices.chunk(n)):
            if out.neighbor_indices is None:
                continue
            # Purity before enqueue: the indices refer to this step's queue snapshot, over
            # the pairs whose labels are known (-1: unlabelled). A self-neighbour is one of
            # the sample's own past keys: it counts as correct in purity, which is also
            # reported without them.
            found = model.bank.labels[out.neighbor_indices]
            known = (found >= 0) & (part_labels[:, None] >= 0)
            correct = (found == part_labels[:, None]) & known
            own = model.bank.sources[out.neighbor_indices] == part_indices[:, None]
            sums[1] += correct.sum() / known.sum().clamp(min=1) / n
            sums[5] += own.float().mean() / n
            sums[6] += (correct & ~own).sum() / (known & ~own).sum().clamp(min=1) / n
            sums[3] += out.neighbor_similarity.float() / n
            sums[4] += 1 / n
            if out.positiveness is not None:
                sums[2] += out.positiveness_entropy.float() / n
                histogram += torch.histc(out.positiveness.float(), bins=HISTOGRAM_BINS,
                                         min=0, max=1)
        # Once per optimiser step, after it: the parts' keys in batch order.
        model.enqueue(torch.cat([out.keys for out in outs]), labels, sources=indices)
        state.step += 1
        state.epoch_batches = i + 1
        seen += config.batch_size
        if state.step % config.log_every == 0 or i + 1 == plan.steps_per_epoch:
            # Periodic sync only. The mean over ranks is the same number on every rank, so
            # all ranks stop together on a non-finite one (none waits in a collective).
            loss = distributed.all_reduce_mean(step_loss).item()
            rate = seen / max(time.perf_counter() - tic, 1e-9)
            tic, seen = time.perf_counter(), 0
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
            log.write({"kind": "step", "epoch": state.epoch + 1, "step": state.step, "loss": loss,
                       "lr": lr, "momentum": momentum, "images_per_s": rate})
            if not math.isfinite(loss):
                bar.close()
                raise TrainingDiverged(f"training diverged: the loss is {loss} at step "
                                       f"{state.step} (epoch {state.epoch + 1}); {state.kept()}")
            if state.unreadable is not None:
                state.unreadable.sync()  # collective, like the loss: every rank stops together
        if (checkpoint is not None and config.save_every_steps and i + 1 < plan.steps_per_epoch
                and state.step % config.save_every_steps == 0):
            _save(config, plan, state, checkpoint)  # collective: all ranks
    bar.close()
    state.epoch_batches = 0
    sums = distributed.all_reduce_mean(sums).tolist()
    if not math.isfinite(sums[0]):  # a step between two log steps
        raise TrainingDiverged(f"training diverged: a loss of epoch {state.epoch + 1} (steps up to "
                               f"{state.step}) is not finite; {state.kept()}")
    steps, nbr_steps = plan.steps_per_epoch, sums[4]
    purity = bool(nbr_steps) and plan.labelled
    histogram = distributed.all_reduce_sum(histogram)
    return {
        "loss": sums[0] / steps,
        "neighbor_purity": sums[1] / nbr_steps if purity else None,
        "positiveness_entropy": sums[2] / nbr_steps if nbr_steps and sums[2] else None,
        "neighbor_similarity": sums[3] / nbr_steps if nbr_steps else None,
        "self_neighbor_fraction": sums[5] / nbr_steps if nbr_steps else None,
        "neighbor_purity_without_self": sums[6] / nbr_steps if purity else None,
        "histogram": histogram.tolist(),
    }


def _knn(config: Config, plan: Plan, model: SNCLR, train_set, test_set) -> float:
    train = extract_features(model.encoder, train_set, img_size=plan.img_size, device=plan.device)
    test = extract_features(model.encoder, test_set, img_size=plan.img_size, device=plan.device)
    accuracy = knn_accuracy(*train, *test, ks=(config.knn_k,), num_classes=train_set.num_classes)
    return accuracy[f"top1_k{config.knn_k}"]


def pretrain(config: Config, *, resume: bool = False, given: Iterable[str] | None = None,
             allow_config_change: bool = False) -> dict:
    """Run (or resume) pretraining into ``config.output_dir``; returns the last epoch's row.

    Resumes automatically when ``DIR/checkpoint.pt`` exists, from the config saved in it:
    the fields named in ``given`` take their values from ``config`` (None: every field, the
    Python API passes a whole config), and a change outside the free classes of
    :mod:`snclr.training.config` needs ``allow_config_change``. Nothing in the run folder is written
    before the config, data, checkpoint and folder have been checked.

    Raises:
        ConfigError: bad configuration, data, checkpoint or run folder, or a refused change
            (the run folder is left as it was).
        TrainingDiverged: a non-finite loss or weights (the last good checkpoint is kept).
        WriteFailed: a file of the run folder could not be written, e.g. on a full disk (the
            temporary file is removed; the message names the kept checkpoint's step).
        Interrupted: Ctrl-C (or SIGTERM under the command line); the message names the step,
            the kept checkpoint's step and whether the report was written.
    """
    started_group = launch.init_from_env()
    try:
        return _pretrain(config, resume=resume, given=given,
                         allow_config_change=allow_config_change)
    finally:
        runlock.release(Path(config.output_dir))
        if started_group:
            distributed.destroy()


def _check_run_dir(run_dir: Path) -> None:
    """Refuse an output folder that is a file, lies under a file or cannot be created."""
    check_path("output_dir", run_dir)
    name = repr(str(run_dir))
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {name} is a file, not a folder")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir {name} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {name} cannot be created or written: no write permission "
                          f"in {str(existing)!r}")


def _make_run_dir(run_dir: Path, device: torch.device) -> None:
    """Rank 0 creates the folder; every rank learns whether it could (collective)."""
    error = busy = ""
    if distributed.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            runlock.acquire(run_dir)
            stale = remove_stale(run_dir)
            if stale:
                print(f"warning: removed {len(stale)} temporary file(s) an interrupted write "
                      f"left: {', '.join(stale)}", file=sys.stderr)
        except ConfigError as err:
            busy = str(err)
        except OSError as err:
            error = err.strerror or type(err).__name__
    if _any_rank(bool(busy), device):
        raise ConfigError(busy or f"another snclr process is using {str(run_dir)!r}")
    if _any_rank(bool(error), device):
        raise ConfigError(f"output_dir {str(run_dir)!r} cannot be created ({error or 'on rank 0'})")


def _any_rank(flag: bool, device: torch.device) -> bool:
    return distributed.all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    # load_state_dict also restores the saved hyperparameters: keep the configured decay.
    configured = [group["weight_decay"] for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ConfigError("the checkpoint's optimizer state does not fit this model "
                          f"({(str(err).splitlines() or [type(err).__name__])[0][:120]})") from None
    # Per-parameter buffers (moments, momenta) are not checked by torch; a wrong shape would
    # fail at the first step, after the run folder changed.
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise ConfigError(f"the checkpoint's optimizer state does not fit this model "
                                      f"({key} of shape {tuple(value.shape)} for a parameter of "
                                      f"shape {tuple(param.shape)})")
    for group, weight_decay in zip(optimizer.param_groups, configured):
        group["weight_decay"] = weight_decay


def _restore_training_state(state: State, payload: dict, saved: Config, config: Config) -> bool:
    """Optimiser, scaler, counters and RNGs from a checkpoint; True if the optimiser restarts.

    Another optimiser's state does not apply (AdamW moments are not LARS momenta): a changed
    optimiser (an allowed change) starts from its initial state.
    """
    reset = saved.optimizer != config.optimizer
    if not reset:
        _load_optimizer_state(state.optimizer, payload["optimizer"])
    if payload["scaler"] or not state.scaler.is_enabled():  # fp16 now, not before: fresh
        state.scaler.load_state_dict(payload["scaler"])
    state.epoch, state.step = payload["epoch"], payload["step"]
    state.saved_step = state.step
    set_rng_state(payload["rng"])
    return reset


def _resume_epoch(state: State, progress: dict | None, plan: Plan, source: str) -> None:
    """Continue an epoch a checkpoint was written in (``save_every_steps``) where it stopped.

    Every rank starts from the mean sums over ranks and rank 0 from the summed histogram:
    the epoch's end then averages and sums to what an uninterrupted epoch gives.
    """
    if progress is None:
        return
    if progress["batches"] >= plan.steps_per_epoch:
        raise ConfigError(f"{source} was written after {progress['batches']} batches of epoch "
                          f"{state.epoch + 1}, which now has {plan.steps_per_epoch}")
    state.epoch_batches = progress["batches"]
    state.epoch_sums = progress["sums"].to(plan.device)
    state.epoch_histogram = progress["histogram"].to(plan.device)
    if plan.rank:
        state.epoch_histogram.zero_()


def _save(config: Config, plan: Plan, state: State, path: Path) -> None:
    """Write the checkpoint unless any rank's state holds NaN or infinity (collective); a
    failed write stops every rank."""
    payload = _checkpoint_payload(config, plan, state)
    bad = non_finite({key: payload[key] for key in ("model", "optimizer", "rank_banks")})
    if _any_rank(bool(bad), plan.device):
        where = bad[0] if bad else "another rank's state"
        raise TrainingDiverged(f"training diverged: non-finite values in {where} after step "
                               f"{state.step}; {state.kept()}")
    failed = None
    if distributed.is_main():
        try:
            save_checkpoint(path, payload, keep_last=config.keep_last)
        except WriteFailed as err:
            failed = err
    if _any_rank(failed is not None, plan.device):  # every rank stops, none waits at a barrier
        raise WriteFailed(str(failed or f"rank 0 could not write {str(path)!r}"))
    state.saved_step = state.step


def _pretrain(config: Config, *, resume: bool, given: Iterable[str] | None,
              allow_config_change: bool) -> dict:
    wall = time.perf_counter()
    run_dir = Path(config.output_dir)
    _check_run_dir(run_dir)
    check_run_folder(config.output_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    payload = saved = None
    if ckpt_path.exists():
        payload = read_checkpoint(ckpt_path, keys=RESUME_KEYS)
        saved = config_of(payload)
        if not saved.img_size:  # a checkpoint from before img_size 0 was resolved
            saved = replace(saved, img_size=payload["data_shape"]["img_size"])
        config = resumed_config(saved, config, given)
    elif resume:
        raise ConfigError(f"--resume given but {ckpt_path} does not exist")
    validate(config)
    device = launch.resolve_device(config.device)
    _set_threads(device)
    splits = load_splits(config.data, check=config.check_images,
                         max_bad_fraction=config.max_bad_images)
    # The kNN monitor needs labels: off for unlabelled data (the run says so).
    labelled = "test" in splits
    knn_train = limit(splits["train"], config.limit_samples) if labelled else None
    test_set = splits["test"] if config.knn_every and labelled else None
    train_set = limit(pretraining_images(splits), config.limit_samples)
    size_source = "set in the config"
    if not config.img_size:
        config = replace(config, img_size=fit_img_size(config.encoder, train_set.img_size))
        size_source = f"the data's native size {train_set.img_size} px, fitted to {config.encoder}"
    changes: dict[str, tuple] = {}
    if payload is not None:
        changes = check_resume_changes(config_changes(saved, config), allow=allow_config_change)
        if config.epochs < payload["epoch"]:
            raise ConfigError(f"epochs={config.epochs} is fewer than the {payload['epoch']} "
                              "epochs this run folder has completed")
    plan = _plan(config, device, len(train_set), train_set.in_chans, labelled=labelled)
    unlabelled_note = None if labelled else (
        f"{config.data}: {len(train_set)} images without labels; the kNN monitor and neighbour "
        "purity are off")
    data_shape = {"in_chans": plan.in_chans, "img_size": plan.img_size}
    if payload is not None and payload["data_shape"] != data_shape:
        raise ConfigError(f"{ckpt_path} was trained on {payload['data_shape']}, this run feeds "
                          f"{plan.in_chans} channels at {plan.img_size} px")

    torch.manual_seed(config.seed)
    model = build_model(config, in_chans=plan.in_chans, img_size=plan.img_size,
                        bank_dtype=plan.bank_dtype)
    # Keys one queue receives per epoch: each image at most once, which bounds its self rows.
    model.visit_period = plan.steps_per_epoch * (
        config.batch_size if config.bank_mode == "global" else plan.local_batch)
    warning = None
    if model.num_neighbors:
        warning = self_neighbor_warning(config.queue_size, model.visit_period,
                                        world_size=plan.world_size, bank_mode=config.bank_mode,
                                        excluded=config.exclude_self_neighbors)
    if payload is not None:
        if saved.method != config.method or saved.encoder != config.encoder:
            raise ConfigError(f"{ckpt_path} is a {saved.method}/{saved.encoder} run, not "
                              f"{config.method}/{config.encoder}")
        load_model_state(model, payload["model"], source=f"checkpoint {str(ckpt_path)!r}")
        model.bank.load_rank_queue(payload.get("rank_banks"), plan.rank)
    model.to(device)
    if config.channels_last:  # the 4-D weights in NHWC, as the inputs (train_one_epoch)
        model.to(memory_format=torch.channels_last)
    wrapped: nn.Module = model
    if plan.world_size > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Only the learned-attention head can sit out a step (until the queue holds K rows),
        # and the unused-parameter search costs a graph walk per step: enable it only then.
        # broadcast_buffers=False: each rank keeps its own queue ("local").
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.attention_head is not None, broadcast_buffers=False)
    if config.compile:
        # The encoders hold the bulk of the compute and have no data-dependent branches; the
        # rest (queue search, loss) changes with the queue's fill and stays eager. In place:
        # the state dict (and so the checkpoint) keeps its names.
        model.encoder.compile()
        model.momentum_encoder.compile()
    optimizer = create_optimizer(model, config.optimizer, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=plan.amp_dtype == torch.float16)
    state = State(model=model, wrapped=wrapped, optimizer=optimizer, scaler=scaler,
                  unreadable=UnreadableFiles(train_set, config.max_bad_images, device))
    optimizer_reset = payload is not None and _restore_training_state(state, payload, saved, config)
    if payload is not None:
        _resume_epoch(state, payload.get("epoch_progress"), plan, str(ckpt_path))

    # Everything is checked: from here on the run folder changes.
    main = distributed.is_main()
    _make_run_dir(run_dir, device)
    log = MetricsLog(run_dir, enabled=False)  # replaced below, once the folder is written
    histogram: list[float] = []

    def report(*notes: str) -> None:
        try:
            write_report(run_dir, config.to_dict(), histogram=histogram,
                         wall_s=time.perf_counter() - wall,
                         warnings=[line for line in (warning, unlabelled_note, *notes) if line])
        except OSError as err:
            raise write_failed(Path(err.filename or run_dir / "report.md"), err) from None

    try:
        if main:
            write_text_atomically(run_dir / "config.yaml",
                                  yaml.safe_dump(config.to_dict(), sort_keys=False))
            print(f"image size {plan.img_size} px ({size_source})", flush=True)
            if unlabelled_note:
                print(unlabelled_note, flush=True)
            if warning:
                print(warning, file=sys.stderr, flush=True)
        log = MetricsLog(run_dir, enabled=main, resume_step=state.step)
        if payload is not None or log.dropped_rows or log.torn_lines:
            log.write({"kind": "resume", "epoch": state.epoch, "step": state.step,
                       "dropped_rows": log.dropped_rows, "torn_lines": log.torn_lines})
            if main and log.torn_lines:
                print(f"warning: truncated {log.torn_lines} torn line(s) of {log.jsonl}",
                      file=sys.stderr)
        if changes:
            log.write({"kind": "config_change", "epoch": state.epoch, "step": state.step,
                       "changes": {name: list(change) for name, change in changes.items()},
                       "optimizer_state": "reset" if optimizer_reset else "kept"})
        transforms = two_view_transforms(_augmentation(config, plan), img_size=plan.img_size,
                                         crop_scale_min=config.crop_scale_min,
                                         in_chans=plan.in_chans)
        dataset = TwoViewDataset(train_set, *transforms, seed=config.seed)
        loader = make_loader(dataset, batch_size=plan.local_batch, train=True, seed=config.seed,
                             num_workers=config.num_workers, pin_memory=device.type == "cuda",
                             world_size=plan.world_size, rank=plan.rank)
        last: dict = {"kind": "epoch", "epoch": state.epoch, "step": state.step}
        stop = config.epochs if not config.stop_after else min(config.epochs, config.stop_after)
        while state.epoch < stop:
            loader.sampler.set_epoch(state.epoch, start_batch=state.epoch_batches)
            dataset.set_epoch(state.epoch)
            stats = train_one_epoch(config, plan, state, loader, log, checkpoint=ckpt_path)
            state.epoch += 1
            histogram = stats.pop("histogram")
            knn = None
            due = test_set is not None and (state.epoch % config.knn_every == 0
                                            or state.epoch == config.epochs)
            if due:
                knn = _knn(config, plan, model, knn_train, test_set) if main else None
            last = {"kind": "epoch", "epoch": state.epoch, "step": state.step, "knn_top1": knn,
                    "unreadable_images": state.unreadable.count, **stats}
            log.write(last)
            steps_due = bool(config.save_every_steps) and state.step % config.save_every_steps == 0
            if state.epoch % config.save_every == 0 or state.epoch == stop or steps_due:
                _save(config, plan, state, ckpt_path)  # collective: all ranks
            distributed.barrier()  # ranks wait for rank 0's evaluation and checkpoint
        if main:
            unreadable = state.unreadable.summary()
            if unreadable:
                print(f"warning: {unreadable}", file=sys.stderr, flush=True)
            report(unreadable)
    except WriteFailed as err:
        raise WriteFailed(f"{err}; {state.kept()}") from None
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM through the command line's handler
        raise Interrupted.of(err, _interrupted(state, report if main else None)) from None
    finally:
        log.close()
    return clean(last)


def _interrupted(state: State, report) -> str:
    """The line an interrupted run ends with; the report is written first when ``report``."""
    kept = ("no checkpoint was written; rerun the same command to start again"
            if state.saved_step is None else
            f"checkpoint of step {state.saved_step} kept; rerun the same command to resume")
    line = f"interrupted at step {state.step}; {kept}"
    if report is None:
        return line
    try:
        report(line)
    except KeyboardInterrupt:
        return f"{line}; report.md not written (interrupted again)"
    except WriteFailed as err:
        return f"{line}; report.md not written ({err})"
    return f"{line}; report.md covers the steps so far"


def _augmentation(config: Config, plan: Plan) -> str:
    if config.augmentation != "auto":
        return config.augmentation
    return "greyscale" if plan.in_chans == 1 else "byol"
