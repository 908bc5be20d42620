"""The training configuration: one frozen dataclass, named presets, files, validation.

A run is fully described by a :class:`Config`. The command line starts from a preset,
applies a ``--config`` file (YAML or JSON) and then explicit flags, each step through
``dataclasses.replace`` so no config is ever mutated. The effective config is saved as
``DIR/config.yaml`` and inside every checkpoint (as a plain dict).

Learning rates follow the MoCo v3 convention: ``lr`` is the base rate for a batch of 256 and
the rate used is ``lr * batch_size / 256`` (``batch_size`` is the global batch, summed over
processes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from snclr.encoders import MAX_IMG_SIZE
from snclr.functional import ATTENTION_TEMPERATURE, TEMPERATURE
from snclr.training.datasets import CHECKS
from snclr.training.errors import ConfigError, check_path, clip, short_repr, shown
from snclr.training.launch import DEVICES

__all__ = ["PRESETS", "RESUME_FREE", "RESUME_RECORDED", "Config", "ConfigError", "apply_overrides",
           "check_resume_changes", "config_changes", "load_config_file", "preset",
           "resumed_config"]


@dataclass(frozen=True)
class Config:
    """Everything a pretraining run needs. Defaults are the ``demo`` preset.

    Model options are passed by name to :func:`snclr.model.create_model`; ``None`` means the
    model's own default (e.g. the projector depth of the encoder family).
    """

    # data
    data: str = "animal-mnist"
    img_size: int = 0  # 0: the data's native size (measured; snclr.training.data.native_img_size)
    augmentation: str = "auto"  # auto | byol | greyscale
    crop_scale_min: float = 0.4
    num_workers: int = 2
    limit_samples: int = 0  # 0: all; >0: a fixed stratified subset of the train split (tests)
    check_images: str = "header"  # header (cheap, cached) | decode (every file, up front)
    max_bad_images: float = 0.001  # share of unreadable image files skipped before a run stops
    # model
    encoder: str = "small_cnn"
    method: str = "snclr"
    num_neighbors: int = 5
    queue_size: int = 4096
    temperature: float = TEMPERATURE
    attention_temperature: float = ATTENTION_TEMPERATURE
    threshold: bool = False
    detach_positiveness: bool = False
    exclude_self_neighbors: bool = False  # skip each image's own past keys in the search
    projector_layers: int | None = None  # None: the encoder family's (3 for ViT, 2 otherwise)
    projector_hidden: int = 512
    projector_dim: int = 128
    predictor_hidden: int = 512
    bank_mode: str = "local"
    # The queue's storage dtype is the search precision; auto: the GPU autocast dtype, else fp32.
    bank_dtype: str = "auto"
    backend: str = "auto"
    # optimisation
    epochs: int = 8
    batch_size: int = 128  # 128 beat 256 at equal time in the demo (more steps: kNN 0.880 vs 0.869)
    optimizer: str = "adamw"  # adamw | lars
    lr: float = 6e-3  # base rate per 256 images (3e-3 at the demo batch of 128)
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    momentum_base: float = 0.96
    momentum_final: float = 1.0
    grad_clip: float = 0.0  # 0: off
    accumulate: int = 1  # micro-batches per optimiser step (batch_size is split into them)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    # run
    output_dir: str = "runs/demo"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    save_every: int = 1  # epochs between checkpoints (and always at the end)
    save_every_steps: int = 0  # also every N optimiser steps, mid-epoch included (0: off)
    keep_last: int = 0  # also keep the N newest as checkpoint-stepSTEP.pt (0: checkpoint.pt only)
    channels_last: bool = False  # NHWC weights and inputs (faster convolutions on tensor cores)
    compile: bool = False  # torch.compile the model's forward
    knn_every: int = 1  # epochs between kNN evaluations (0: off)
    knn_k: int = 20
    log_every: int = 10  # steps between metric rows
    stop_after: int = 0  # hidden: stop after this many epochs (simulates an interruption)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> Config:
        return apply_overrides(cls(), values, source=source)


# Presets leave projector_layers unset: the depth comes with the encoder
# (snclr.encoders.projector_depth: 3 layers for ViT, 2 for ResNet, as MoCo v3).
PRESETS: dict[str, dict] = {
    # CPU-sized: Animal-MNIST, small CNN, a few minutes on 2 cores.
    "demo": {},
    # SNCLR paper recipe for ViT-S (DESIGN section 8): 300 epochs, batch 4096, AdamW wd 0.1,
    # 40 warm-up epochs, momentum 0.99 -> 1, T = 0.2, K = 30, queue 128,000 per GPU, MoCo v3
    # heads (3-layer 4096 -> 256 projector, 2-layer predictor), BYOL augmentations at 224 px.
    # Base lr 1.5e-4 per 256 is MoCo v3's ViT-S value (lr = 2.4e-3 at batch 4096).
    "vit-small": {
        "data": "imagenet", "img_size": 224, "augmentation": "byol", "crop_scale_min": 0.08,
        "num_workers": 10, "encoder": "vit_small", "num_neighbors": 30, "queue_size": 128000,
        "projector_hidden": 4096, "projector_dim": 256, "predictor_hidden": 4096,
        "epochs": 300, "batch_size": 4096, "optimizer": "adamw", "lr": 1.5e-4,
        "weight_decay": 0.1, "warmup_epochs": 40, "momentum_base": 0.99,
        "output_dir": "runs/vit-small", "knn_every": 0, "log_every": 50, "save_every": 5,
    },
    # MoCo v3 ResNet-50 recipe (its CONFIG.md, 100 epochs): LARS, base lr 0.6 per 256,
    # wd 1e-6, 10 warm-up epochs, momentum 0.99 -> 1, T = 1.0, 2-layer projector (4096 ->
    # 256), 2-layer predictor, batch 4096, BYOL augmentations; SNCLR adds K = 30 and a queue.
    # Its 300-epoch recipe is lr 0.3, wd 1.5e-6 (override with --lr/--weight-decay).
    "resnet50": {
        "data": "imagenet", "img_size": 224, "augmentation": "byol", "crop_scale_min": 0.08,
        "num_workers": 10, "encoder": "resnet50", "num_neighbors": 30, "queue_size": 128000,
        "temperature": 1.0, "projector_hidden": 4096, "projector_dim": 256,
        "predictor_hidden": 4096, "epochs": 100, "batch_size": 4096, "optimizer": "lars",
        "lr": 0.6, "weight_decay": 1e-6, "warmup_epochs": 10, "momentum_base": 0.99,
        "output_dir": "runs/resnet50", "knn_every": 0, "log_every": 50, "save_every": 5,
    },
}

_FIELD_TYPES = {f.name: f.type for f in fields(Config)}

# Every int option's range. The upper bounds keep memory and arithmetic sane (a float of the
# value, a queue or batch that can be allocated); counters get 2**31 - 1.
MAX_COUNT = 2**31 - 1
MAX_QUEUE_ELEMENTS = 2**32  # queue_size x projector_dim (16 GiB in fp32)
MAX_INT_DIGITS = 40  # longer digit strings are refused as text, before int() reads them
INT_RANGES: dict[str, tuple[int, int]] = {
    "img_size": (0, MAX_IMG_SIZE), "num_workers": (0, 1024), "limit_samples": (0, MAX_COUNT),
    "num_neighbors": (0, 4096), "queue_size": (1, 2**26), "projector_layers": (1, 16),
    "projector_hidden": (1, 2**16), "projector_dim": (1, 2**16), "predictor_hidden": (1, 2**16),
    "epochs": (1, 10**6), "batch_size": (1, 2**24),
    # NumPy seeds from 0 to 2**32 - 1 (torch would take up to 2**64 - 1).
    "seed": (0, 2**32 - 1),
    "save_every": (1, MAX_COUNT), "knn_every": (0, MAX_COUNT), "knn_k": (1, 2**20),
    "log_every": (1, MAX_COUNT), "stop_after": (0, 10**6), "accumulate": (1, 2**24),
    "save_every_steps": (0, MAX_COUNT), "keep_last": (0, MAX_COUNT),
}


def _coerce(name: str, value, source: str):
    """``value`` as the field's type, strictly: no bool for a number, no number for a bool.

    Strings are parsed (command-line flags arrive as strings, and PyYAML reads ``1e-3``, which
    has no dot, as a string); a float field takes an int, an int field never takes a float.
    """
    kind = _FIELD_TYPES[name].split(" ")[0]  # bool | int | float | str ("int | None": int)
    optional = "None" in _FIELD_TYPES[name]
    if optional and (value is None or str(value).strip().lower() in ("none", "null")):
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            # Past 4300 digits int() raises; validate bounds every int far below this.
            if len(value.strip().lstrip("+-")) > MAX_INT_DIGITS:
                raise ConfigError(f"{source}: {name} has {len(value.strip())} digits, more "
                                  f"than any valid value ({MAX_INT_DIGITS} at most)")
            return int(value)
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(value, str):
        return value
    raise ConfigError(f"{source}: {name} must be {kind}, got {shown(value)}")


def apply_overrides(config: Config, values: dict, *, source: str = "config") -> Config:
    """A copy of ``config`` with ``values`` (field name -> value, types coerced) applied."""
    unknown = sorted(map(str, set(values) - set(_FIELD_TYPES)))
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(map(clip, unknown[:3]))}"
                          + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""))
    return dataclasses.replace(config, **{k: _coerce(k, v, source) for k, v in values.items()})


def preset(name: str) -> Config:
    """The named preset (``demo``, ``vit-small``, ``resnet50``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {shown(name)}; choose one of {sorted(PRESETS)}")
    return apply_overrides(Config(), PRESETS[name], source=f"preset {name}")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in a config file names one key twice (YAML would silently keep the last)."""


class AliasBombError(yaml.YAMLError):
    """A document whose aliases expand past :data:`MAX_YAML_NODES` nodes, or loop."""


# A config is about 60 options (some 120 nodes); aliases that expand past this are an attack
# ("billion laughs": 400 bytes that expand to gigabytes and hang any repr of them).
MAX_YAML_NODES = 1000


def _expanded_size(root: yaml.Node) -> int:
    """The number of nodes ``root`` stands for with every alias expanded (memoised, so a
    bomb is measured in time linear in its text); raises :class:`AliasBombError` past
    :data:`MAX_YAML_NODES` or on a node that contains itself."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise AliasBombError(f"aliases expand to more than {MAX_YAML_NODES} values; "
                                     "a config file needs far fewer")
            continue
        if id(node) in open_nodes:
            raise AliasBombError("an alias refers to a value that contains it")
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise AliasBombError("an alias refers to a value that contains it")
            stack.append((child, False))
    return sizes[id(root)]


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding one key twice, and aliases that
    expand past :data:`MAX_YAML_NODES` nodes (checked on the composed graph, before any
    value is built)."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=False)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the base class names it
                    continue
                if first != key_node.start_mark.line + 1:
                    raise DuplicateKeyError(f"duplicate key {short_repr(key)} (lines {first} and "
                                            f"{key_node.start_mark.line + 1})")
        return super().construct_mapping(node, deep=deep)


def _refuse_duplicate_json_keys(pairs: list) -> dict:
    values: dict = {}
    for key, value in pairs:
        if key in values:
            raise DuplicateKeyError(f"duplicate key {short_repr(key)}")
        values[key] = value
    return values


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON mapping of option -> value (YAML's safe loader reads both).

    A key given twice is refused (YAML and JSON would silently keep the last), and so are
    YAML aliases that expand past :data:`MAX_YAML_NODES` values.
    """
    check_path("config file", path)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text()
        if path.suffix == ".json":
            values = json.loads(text, object_pairs_hook=_refuse_duplicate_json_keys)
        else:
            values = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    # ValueError: an integer past Python's 4300-digit limit for int(text) (YAML and JSON).
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as err:
        reason = str(err).splitlines()[0]
        if "integer string conversion" in reason:
            reason = "it holds an integer of more than 4300 digits"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML/JSON: {reason}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option: value")
    return values


def validate(config: Config) -> None:
    """Checks that need no data or model; raises :class:`ConfigError` with one line."""
    from snclr.bank import BANK_MODES
    from snclr.encoders import check_img_size, encoder_spec
    from snclr.model import METHODS
    from snclr.training.methods import num_neighbors_used

    # First: the messages below print these numbers, and a 5000-digit one has no str().
    for name, (low, high) in INT_RANGES.items():
        value = getattr(config, name)
        if value is not None and not low <= value <= high:
            bound = f">= {low}" if value < low else f"<= {high}"
            raise ConfigError(f"{name} must be {bound}, got {shown(value)}")
    if config.queue_size * config.projector_dim > MAX_QUEUE_ELEMENTS:
        raise ConfigError(f"queue_size={config.queue_size} x projector_dim={config.projector_dim} "
                          f"is more than the {MAX_QUEUE_ELEMENTS} queue elements allowed")
    try:  # a registered name, or any timm model name
        encoder_spec(config.encoder)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {shown(config.method)}; choose one of "
                          f"{sorted(METHODS)}")
    k = num_neighbors_used(config.method, config.num_neighbors)
    if config.queue_size < k:
        raise ConfigError(f"queue_size={config.queue_size} is smaller than K={k} neighbours")
    choices = {
        "optimizer": ("adamw", "lars"), "precision": ("auto", "fp32", "bf16", "fp16"),
        "augmentation": ("auto", "byol", "greyscale"), "bank_mode": BANK_MODES,
        "bank_dtype": ("auto", "fp32", "bf16", "fp16"),
        "device": DEVICES, "backend": ("auto", "torch", "triton"), "check_images": CHECKS,
    }
    for name, allowed in choices.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {allowed}, got {shown(value)}")
    # nan passes every comparison below (nan <= 0 is False): reject non-finite floats first.
    for name, kind in _FIELD_TYPES.items():
        if kind.startswith("float") and not math.isfinite(getattr(config, name)):
            raise ConfigError(f"{name} must be a finite number, got {getattr(config, name)}")
    for name in ("warmup_epochs", "weight_decay", "grad_clip"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(config, name)}")
    for name in ("lr", "temperature", "attention_temperature"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(config, name)}")
    if not 0 <= config.max_bad_images <= 1:
        raise ConfigError(f"max_bad_images must be in [0, 1], got {config.max_bad_images}")
    if not 0 < config.crop_scale_min <= 1:
        raise ConfigError(f"crop_scale_min must be in (0, 1], got {config.crop_scale_min}")
    if not 0 <= config.momentum_base <= config.momentum_final <= 1:
        raise ConfigError("need 0 <= momentum_base <= momentum_final <= 1")
    if config.img_size:  # 0: the data's native size, fitted to the encoder later
        try:
            check_img_size(config.encoder, config.img_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None


# Resuming. A run continues from the config saved in its checkpoint; only the fields given
# now (flags, --config file, an explicit --preset) can differ, and each difference has a class:
# - RESUME_FREE fields only observe or place the run: they may change, unrecorded;
# - RESUME_RECORDED fields may change and the change is recorded (metrics row, report); the
#   LR and momentum schedules are functions of the fraction of ``epochs`` done: they stretch;
# - any other field is refused (ConfigError listing them) unless the change is explicitly
#   allowed (``--allow-config-change``), and then it is recorded.
# INVOCATION_ONLY fields describe this invocation and never come from the checkpoint.
RESUME_FREE = ("output_dir", "num_workers", "device", "backend", "log_every", "knn_every",
               "knn_k", "save_every", "stop_after", "save_every_steps", "keep_last",
               "channels_last", "compile", "check_images", "max_bad_images")
RESUME_RECORDED = ("epochs",)
INVOCATION_ONLY = ("output_dir", "stop_after")


def resumed_config(saved: Config, config: Config, given: Iterable[str] | None) -> Config:
    """``saved`` with the ``given`` fields of ``config`` (all fields when ``given`` is None)."""
    names = set(_FIELD_TYPES) if given is None else set(given) | set(INVOCATION_ONLY)
    return dataclasses.replace(saved, **{name: getattr(config, name) for name in names})


def config_changes(saved: Config, config: Config) -> dict[str, tuple]:
    """``{field: (saved value, new value)}`` for every field that differs."""
    return {name: (getattr(saved, name), getattr(config, name)) for name in _FIELD_TYPES
            if getattr(saved, name) != getattr(config, name)}


def check_resume_changes(changes: dict[str, tuple], *, allow: bool) -> dict[str, tuple]:
    """The changes to record; raises :class:`ConfigError` on a refused one unless ``allow``."""
    refused = {name: change for name, change in changes.items()
               if name not in RESUME_FREE + RESUME_RECORDED}
    if refused and not allow:
        listing = ", ".join(f"{name} {short_repr(old)} -> {short_repr(new)}"
                            for name, (old, new) in refused.items())
        raise ConfigError(f"this run folder was trained with other settings ({listing}); omit "
                          "those options to resume as saved, or pass --allow-config-change")
    return {name: change for name, change in changes.items() if name not in RESUME_FREE}
