"""Checkpoint files: atomic writes, safe reads, and the model a checkpoint describes.

A checkpoint is a dict of tensors and plain Python values only (the config as a dict, RNG
states as tensors and lists), so it loads with ``torch.load(..., weights_only=True)``:
nothing in the file can run code.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from snclr.config import Config, ConfigError
from snclr.model import SNCLR, create_model

__all__ = ["build_model", "get_rng_state", "read_checkpoint", "set_rng_state", "write_checkpoint"]

FORMAT = "snclr-checkpoint-v1"


def build_model(config: Config, *, in_chans: int, img_size: int) -> SNCLR:
    """The SNCLR model a config describes (random weights)."""
    options = dict(
        num_neighbors=config.num_neighbors, queue_size=config.queue_size,
        temperature=config.temperature, attention_temperature=config.attention_temperature,
        threshold=config.threshold, detach_positiveness=config.detach_positiveness,
        projector_hidden=config.projector_hidden, projector_dim=config.projector_dim,
        predictor_hidden=config.predictor_hidden, bank_mode=config.bank_mode, backend=config.backend,
    )
    if config.projector_layers is not None:
        options["projector_layers"] = config.projector_layers
    try:
        return create_model(config.encoder, method=config.method, in_chans=in_chans, img_size=img_size, **options)
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
    """Write ``payload`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict:
    """Load and sanity-check a checkpoint on the CPU.

    Raises:
        ConfigError: missing, truncated, corrupt or foreign file (one line, no traceback).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(f"checkpoint {str(path)!r} is truncated or corrupt ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {str(path)!r} is not an snclr checkpoint")
    return payload


def config_of(payload: dict) -> Config:
    return Config.from_dict(payload["config"], source="checkpoint config")


def load_model_state(model: SNCLR, state: dict, *, source: str) -> None:
    """Load weights after checking every name and shape (a different model is a ConfigError)."""
    own = model.state_dict()
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ConfigError(f"{source} holds a different model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in own.items():
        if tensor.shape != state[name].shape:
            raise ConfigError(
                f"{source} holds a different model shape: {name} is {tuple(state[name].shape)}, "
                f"this config builds {tuple(tensor.shape)}"
            )
    model.load_state_dict(state)
