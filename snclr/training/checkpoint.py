"""Checkpoint files: atomic writes, safe reads, and the model a checkpoint describes.

A checkpoint is a dict of tensors and plain Python values only (the config as a dict, RNG
states as tensors and lists), so it loads with ``torch.load(..., weights_only=True)``:
nothing in the file can run code.
"""

from __future__ import annotations

import inspect
import os
import pickle
import random
import re
import zipfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from snclr.encoders import MAX_IMG_SIZE
from snclr.model import SNCLR, create_model
from snclr.training.config import Config
from snclr.training.errors import ConfigError, check_path, shown
from snclr.training.runfiles import sync_folder, write_atomically

__all__ = ["EVAL_KEYS", "RESUME_KEYS", "build_model", "checkpoint_problem", "get_rng_state",
           "model_fields", "non_finite", "read_checkpoint", "save_checkpoint", "set_rng_state",
           "step_checkpoint_path", "write_checkpoint"]

FORMAT = "snclr-checkpoint-v1"


# Config fields resolved per run before they reach the model (bank_dtype: a name -> a dtype).
_RESOLVED_PER_RUN = ("bank_dtype",)


def model_fields() -> tuple[str, ...]:
    """The Config fields that are keyword options of :class:`SNCLR`, in Config order.

    They travel to the model by name; a new field named like an SNCLR option joins them.
    """
    options = inspect.signature(SNCLR).parameters
    return tuple(f.name for f in fields(Config)
                 if f.name in options and options[f.name].kind is inspect.Parameter.KEYWORD_ONLY
                 and f.name not in _RESOLVED_PER_RUN)


def build_model(config: Config, *, in_chans: int, img_size: int,
                bank_dtype: torch.dtype = torch.float32) -> SNCLR:
    """The SNCLR model a config describes (random weights), its queue stored in bank_dtype.

    The options are the config's :func:`model_fields`; the method fixes its own on top
    (:func:`snclr.model.create_model`).
    """
    options = {name: getattr(config, name) for name in model_fields()}
    try:
        return create_model(config.encoder, method=config.method, in_chans=in_chans,
                            img_size=img_size, bank_dtype=bank_dtype, **options)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def get_rng_state() -> dict:
    """Every RNG the run uses, as tensors and lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (:func:`snclr.training.runfiles.write_atomically`).

    After a power loss the path holds the previous checkpoint or the new one, never an empty
    or partial file.

    Raises:
        WriteFailed: the disk is full or the file cannot be written (the previous file stays).
    """
    write_atomically(Path(path), lambda f: torch.save({"format": FORMAT, **payload}, f))


def step_checkpoint_path(path: Path, step: int) -> Path:
    """The step-named file beside ``path``: ``checkpoint.pt`` -> ``checkpoint-step00000120.pt``."""
    return path.with_name(f"{path.stem}-step{step:08d}{path.suffix}")


def save_checkpoint(path: Path, payload: dict, *, keep_last: int = 0) -> None:
    """Write ``path``, the newest checkpoint (what a resume reads), and with ``keep_last`` N > 0
    keep the N newest states also as step-named files (:func:`step_checkpoint_path`).

    With N > 0 the step-named file is written first (:func:`write_checkpoint`), then ``path``
    is atomically replaced by a hard link to it (no second copy on disk; a second write where
    the file system has no hard links), and only then are the older step-named files beyond
    the N newest deleted. A kill at any point leaves ``path`` whole (the old or the new state)
    and never fewer than the N newest step-named files. Step-named files above ``payload``'s
    step (from another history of the folder) are left alone.
    """
    path = Path(path)
    if keep_last <= 0:
        write_checkpoint(path, payload)
        return
    step = payload["step"]
    named = step_checkpoint_path(path, step)
    write_checkpoint(named, payload)
    link = path.with_name(f".{path.name}.{os.getpid()}.link")
    try:
        link.unlink(missing_ok=True)
        os.link(named, link)
        os.replace(link, path)
        sync_folder(path.parent)
    except OSError:  # no hard links here: write the state a second time
        link.unlink(missing_ok=True)
        write_checkpoint(path, payload)
    pattern = re.compile(rf"{re.escape(path.stem)}-step(\d+){re.escape(path.suffix)}")
    older = sorted((int(m.group(1)), f) for f in path.parent.iterdir()
                   if (m := pattern.fullmatch(f.name)) and int(m.group(1)) <= step)
    for _, stale in older[:-keep_last]:
        stale.unlink(missing_ok=True)


# What each use of a checkpoint reads (a crafted file missing one is refused up front).
EVAL_KEYS = ("config", "model", "data_shape")
RESUME_KEYS = (*EVAL_KEYS, "optimizer", "scaler", "epoch", "step", "rng")


def read_checkpoint(path: str | Path, *, keys: tuple[str, ...] = EVAL_KEYS) -> dict:
    """Load and sanity-check a checkpoint on the CPU.

    Args:
        path: the file.
        keys: the entries the caller needs (``EVAL_KEYS``, or ``RESUME_KEYS`` to resume).

    Raises:
        ConfigError: missing path, a directory, a truncated or corrupt file, a file holding
            objects other than tensors and plain values, a foreign or incomplete checkpoint
            (one line, no traceback).
    """
    check_path("checkpoint", path)
    path = Path(path)
    name = repr(str(path))
    if path.is_dir():
        raise ConfigError(f"checkpoint {name} is a directory, not a checkpoint file")
    if not path.is_file():
        raise ConfigError(f"checkpoint {name} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The weights-only loader names the class or function it refused ("GLOBAL x.y");
        # any other unpickling error is damage.
        refused = re.search(r"\bGLOBAL ([\w.]+)", str(err))
        if refused:
            raise ConfigError(
                f"checkpoint {name} was refused: it holds objects other than tensors and plain "
                f"values ({refused.group(1)}), which could run code when loaded"
            ) from None
        raise _corrupt(name, path, err) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise _corrupt(name, path, err) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {name} is not an snclr checkpoint")
    missing = [key for key in keys if key not in payload]
    if missing:
        listing = ", ".join(map(repr, missing))
        raise ConfigError(f"checkpoint {name} is incomplete: it has no {listing}")
    problem = checkpoint_problem(payload, keys)
    if problem:
        raise ConfigError(f"checkpoint {name} is malformed: {problem}")
    return payload


MAX_COUNTER = 2**62  # epochs and steps: any real run is far below, and int64 holds it
MAX_CHANNELS = 64


def _is_int(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_tensor(value, dtype: torch.dtype | None = None, numel: int | None = None) -> bool:
    return (isinstance(value, torch.Tensor) and (dtype is None or value.dtype == dtype)
            and (numel is None or value.numel() == numel))


def _rng_problem(rng) -> str | None:
    """What :func:`set_rng_state` would trip on in a crafted ``rng`` entry (None: nothing)."""
    if not isinstance(rng, dict) or not all(key in rng for key in ("torch", "numpy", "python")):
        return "rng must hold the torch, numpy and python states"
    numpy_state, python = rng["numpy"], rng["python"]
    if not _is_tensor(rng["torch"], torch.uint8):
        return "rng.torch must be a uint8 tensor"
    if not (isinstance(numpy_state, dict) and _is_tensor(numpy_state.get("key"), torch.int64, 624)
            and _is_int(numpy_state.get("pos"), 0, 624)
            and _is_int(numpy_state.get("has_gauss"), 0, 1)
            and type(numpy_state.get("gauss")) is float):
        return "rng.numpy must hold key (624 int64), pos, has_gauss and gauss"
    internal = python.get("internal") if isinstance(python, dict) else None
    if not (isinstance(internal, (list, tuple)) and len(internal) == 625
            and all(_is_int(v, 0, 2**32) for v in internal)
            and _is_int(python.get("version"), 1, 3)
            and (python.get("gauss") is None or type(python.get("gauss")) is float)):
        return "rng.python must hold version, internal (625 ints) and gauss"
    cuda = rng.get("cuda", [])
    if not (isinstance(cuda, (list, tuple)) and all(_is_tensor(t, torch.uint8) for t in cuda)):
        return "rng.cuda must be a list of uint8 tensors"
    return None


def checkpoint_problem(payload: dict, keys: tuple[str, ...] = EVAL_KEYS) -> str | None:
    """The first entry of ``payload`` among ``keys`` with a wrong type or value (None: none).

    Every entry is checked before anything uses it, so a crafted checkpoint is refused before
    the run folder changes (the model's own names and shapes are checked when it is loaded,
    :func:`load_model_state`, and the queue's positions by :class:`snclr.bank.MemoryBank`).
    """
    config, model, shape = payload["config"], payload["model"], payload["data_shape"]
    if not isinstance(config, dict):
        return f"config is {shown(config)}, not a mapping"
    if not (isinstance(model, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                            for k, t in model.items())):
        return "model must map names to tensors"
    if not (isinstance(shape, dict) and _is_int(shape.get("in_chans"), 1, MAX_CHANNELS)
            and _is_int(shape.get("img_size"), 1, MAX_IMG_SIZE)):
        return (f"data_shape must hold in_chans (1 to {MAX_CHANNELS}) and img_size (1 to "
                f"{MAX_IMG_SIZE}), got {shown(shape)}")
    if "optimizer" in keys:
        optimizer = payload["optimizer"]
        entries = optimizer if isinstance(optimizer, dict) else {}
        groups = entries.get("param_groups")
        if not (isinstance(entries.get("state"), dict) and isinstance(groups, list) and groups
                and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
            return f"optimizer must hold state and param_groups, got {shown(optimizer)}"
    if "scaler" in keys and not isinstance(payload["scaler"], dict):
        return f"scaler is {shown(payload['scaler'])}, not a mapping"
    for counter in ("epoch", "step"):
        if counter in keys and not _is_int(payload[counter], 0, MAX_COUNTER):
            return f"{counter} must be an integer >= 0, got {shown(payload[counter])}"
    if "rng" in keys:
        problem = _rng_problem(payload["rng"])
        if problem:
            return problem
    banks = payload.get("rank_banks")
    if banks is not None:
        # Each rank's rows must fit the model's own queue (the model's shapes are checked
        # against the config when it is loaded).
        rows = {name: model.get(f"bank.{name}") for name in ("queue", "labels", "sources")}
        fits = (isinstance(banks, dict) and "labels" in banks
                and _is_tensor(banks.get("queue")) and banks["queue"].dim() == 3
                and all(_is_tensor(tensor) and tensor.dim() >= 2
                        and tensor.shape[0] == banks["queue"].shape[0]
                        and (rows.get(name) is None or tensor.shape[1:] == rows[name].shape)
                        and (name == "queue" or tensor.dtype == torch.int64)
                        for name, tensor in banks.items()))
        if not fits:
            return ("rank_banks must hold a (W, N, D) queue and (W, N) int64 labels and "
                    "sources of the model's queue shape")
    return None


def _corrupt(name: str, path: Path, err: BaseException) -> ConfigError:
    """A file that is not a zip archive (what ``torch.save`` writes) is not a checkpoint
    file; an empty file, or a zip that does not load, is truncated or corrupt. Either way
    the reason is torch's own last line, never its ``weights_only`` preamble (which
    suggests the unsafe ``weights_only=False``)."""
    reason = _torch_reason(err)
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) in (b"PK\x03\x04", b"")
    except OSError:
        is_zip = True
    if not is_zip:
        return ConfigError(f"checkpoint {name} is not a checkpoint file ({reason})")
    return ConfigError(f"checkpoint {name} is truncated or corrupt ({reason})")


def _torch_reason(err: BaseException) -> str:
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and "weights_only" not in line and not line.startswith("Check the documentation")]
    return (lines[0] if lines else type(err).__name__)[:160]


def non_finite(tree, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict/list that hold NaN or infinity."""
    if isinstance(tree, torch.Tensor):
        bad = tree.is_floating_point() and not bool(tree.isfinite().all())
        return [prefix or "tensor"] if bad else []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    names = []
    for key, value in items:
        names += non_finite(value, f"{prefix}.{key}" if prefix else str(key))
    return names


def config_of(payload: dict) -> Config:
    return Config.from_dict(payload["config"], source="checkpoint config")


def load_model_state(model: SNCLR, state: dict, *, source: str) -> None:
    """Load weights after checking every name and shape (a different model is a ConfigError)."""
    own = model.state_dict()
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ConfigError(f"{source} holds a different model (missing {missing[:3]}, "
                          f"unexpected {extra[:3]})")
    for name, tensor in own.items():
        if tensor.shape != state[name].shape:
            raise ConfigError(
                f"{source} holds a different model shape: {name} is {tuple(state[name].shape)}, "
                f"this config builds {tuple(tensor.shape)}"
            )
    try:
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as err:  # e.g. the queue's write pointer out of range
        raise ConfigError(f"{source}: {str(err).splitlines()[0]}") from None
