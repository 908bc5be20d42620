"""``snclr compare``: methods x seeds on one budget, one table with error bars.

A *variant* is a method and flags: ``snclr``, ``snclr:attention_temperature=0.1``,
``snclr:num_neighbors=10:threshold=true``. A *cell* is one variant pretrained with one seed:
the run folder ``DIR/<variant>/<seed>/`` that ``snclr pretrain`` writes (checkpoint, config,
metrics, ``report.md``), plus ``cell.json``, which holds the cell's wall time and its cached
evaluations (kNN k = 20 and 200, the linear probe). The variant's folder is its name with
``+`` for ``:`` (``snclr+attention_temperature=0.1``).

- Every cell gets the same budget and data: ``data``, ``epochs``, ``batch_size``,
  ``img_size`` and ``limit_samples`` are set for all variants, never per variant; so are
  the fields that only observe or place a run (``RESUME_FREE``: ``device``,
  ``num_workers``, ``backend``, ``knn_k``, ``log_every``, ...), which would train
  identical cells under two names; a flag that a method fixes or never reads
  (:func:`snclr.training.methods.fixed_options`, e.g. K for ``mocov3``) is refused, per
  variant and as an explicit command-line flag alike.
- Everything is checked before any cell runs (variants, seeds, every variant's model,
  the folders of existing cells against the settings now, a folder that is neither new,
  empty nor a comparison); a refusal is one :class:`~snclr.training.errors.ConfigError` line.
  One ``snclr compare`` at a time uses a folder (a lock, as ``pretrain`` holds on a run).
- A rerun skips finished cells and reuses their cached evaluation (cached per evaluation
  setting and checkpoint step); an interrupted cell resumes through
  :func:`snclr.training.train.pretrain`'s own resume (exact on a CPU); a diverged cell is recorded
  as such, left out of the statistics, and not retried until its settings change.
- Each cell seeds Python's, NumPy's and torch's RNGs from its seed before training and
  again before evaluating, so a cell run alone equals the same cell run in a sequence.

The statistics and the files ``compare.md``, ``compare.csv``, ``cells.csv`` and
``compare.png`` are :mod:`snclr.training.compare_report`'s.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from snclr.model import METHODS
from snclr.training import launch, runlock
from snclr.training.checkpoint import RESUME_KEYS, build_model, config_of, read_checkpoint
from snclr.training.compare_report import CellResult, write_comparison
from snclr.training.config import (
    RESUME_FREE,
    Config,
    apply_overrides,
    check_resume_changes,
    config_changes,
    resumed_config,
    validate,
)
from snclr.training.data import labelled_splits, limit, pretraining_images
from snclr.training.errors import (
    ConfigError,
    Interrupted,
    TrainingDiverged,
    WriteFailed,
    check_path,
    short_repr,
    shown,
)
from snclr.training.evaluate import LINEAR_PROTOCOLS, run_evaluation
from snclr.training.methods import fixed_options
from snclr.training.runfiles import is_run_folder, remove_stale, write_text_atomically
from snclr.training.train import pretrain

__all__ = ["KNN_KS", "Comparison", "Evaluation", "Variant", "parse_seeds", "parse_variants",
           "plan_comparison", "run_comparison", "seed_everything"]

KNN_KS = (20, 200)
# Set by compare itself (--methods, --seeds, --output-dir), never per variant or by flag.
SET_BY_COMPARE = ("method", "seed", "output_dir")
# The budget and data every cell shares: set for all variants with the ordinary flags.
SHARED = ("data", "limit_samples", "img_size", "epochs", "batch_size", "stop_after")
_VALUE = re.compile(r"[A-Za-z0-9._+-]+")  # flag values become folder names
RECORD = "cell.json"


@dataclass(frozen=True)
class Variant:
    """A method and the config fields it sets (``flags``: field -> typed value)."""

    label: str  # "snclr:attention_temperature=0.1"
    method: str
    flags: tuple[tuple[str, object], ...]
    folder: str  # "snclr+attention_temperature=0.1"


@dataclass(frozen=True)
class Evaluation:
    """How every cell is evaluated (kNN always at k = 20 and 200)."""

    protocol: str = "cached"  # the linear probe's: cached | augmented
    linear_epochs: int = 100
    linear_lr: float = 0.1

    def settings(self, config: Config, step: int) -> dict:
        """What a cached evaluation must match to be reused (JSON-comparable)."""
        return {"ks": list(KNN_KS), "protocol": self.protocol,
                "linear_epochs": self.linear_epochs, "linear_lr": self.linear_lr,
                "seed": config.seed, "data": config.data,
                "limit_samples": config.limit_samples, "step": step}


@dataclass(frozen=True)
class Comparison:
    """A checked comparison: the base config, variants x seeds, and how to evaluate."""

    base: Config
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    output_dir: Path
    baseline: str
    evaluation: Evaluation
    allow_config_change: bool = False

    def cell_config(self, variant: Variant, seed: int) -> Config:
        run_dir = self.output_dir / variant.folder / str(seed)
        return replace(self.base, **dict(variant.flags), method=variant.method, seed=seed,
                       output_dir=str(run_dir))

    def cells(self) -> list[tuple[Variant, int]]:
        return [(variant, seed) for variant in self.variants for seed in self.seeds]


def parse_variants(spec: str, base: Config, *,
                   explicit: Iterable[str] = ()) -> tuple[Variant, ...]:
    """Variants from ``--methods`` (comma-separated ``METHOD[:FIELD=VALUE]...``).

    Args:
        spec: e.g. ``"mocov3,snclr,snclr:attention_temperature=0.1"``.
        base: the config every variant starts from (values are typed against it).
        explicit: config fields given as command-line flags: refused when a listed method
            fixes them (the flag would be silently ignored for that method).

    Raises:
        ConfigError: an empty list, an unknown method or field, a malformed, mistyped or
            duplicated flag, a flag a method fixes, budget or data fields, the same variant
            twice.

    Example:
        >>> [(v.folder, v.flags) for v in parse_variants("mocov3,snclr:attention_temperature=0.1",
        ...                                               Config())]
        [('mocov3', ()), ('snclr+attention_temperature=0.1', (('attention_temperature', 0.1),))]
    """
    variants, seen = [], {}
    parts = [part.strip() for part in spec.split(",")]
    if not any(parts):
        raise ConfigError("--methods lists no method")
    for part in parts:
        if not part:
            raise ConfigError(f"--methods {short_repr(spec)} has an empty entry")
        method, *flags = part.split(":")
        if method not in METHODS:
            raise ConfigError(f"unknown method {short_repr(method)} in --methods; choose one of "
                              f"{', '.join(sorted(METHODS))}")
        names, texts = [], []
        for flag in flags:
            name, equals, text = flag.partition("=")
            name = name.strip().replace("-", "_")
            names.append(name)
            texts.append(text.strip())
            _check_variant_flag(part, method, name, equals, text.strip())
        if len(set(names)) != len(names):
            raise ConfigError(f"variant {short_repr(part)} sets a field twice")
        typed = apply_overrides(base, dict(zip(names, texts)),
                                source=f"variant {short_repr(part)}")
        values = tuple((name, getattr(typed, name)) for name in names)
        key = replace(typed, method=method)  # the same config is the same variant
        label = method + "".join(f":{name}={text}" for name, text in zip(names, texts))
        if key in seen:
            raise ConfigError("--methods lists the same variant twice: "
                              f"{short_repr(seen[key])} and {short_repr(label)}")
        seen[key] = label
        variants.append(Variant(label, method, values, label.replace(":", "+")))
    for name in sorted(set(explicit) & {n for v in variants for n in fixed_options(v.method)}):
        method = next(v.method for v in variants if name in fixed_options(v.method))
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} would be ignored by {method} ({fixed_options(method)[name]}); "
                          f"set it per variant instead, e.g. snclr:{name}=VALUE")
    return tuple(variants)


def _check_variant_flag(part: str, method: str, name: str, equals: str, text: str) -> None:
    variant = f"variant {short_repr(part)}"
    if not equals or not name or not text:
        raise ConfigError(f"{variant}: a flag must read FIELD=VALUE, e.g. "
                          "snclr:attention_temperature=0.1")
    if name in SET_BY_COMPARE:
        raise ConfigError(f"{variant}: {name} is set by compare itself (--methods, "
                          "--seeds, --output-dir)")
    if name in SHARED:
        raise ConfigError(f"{variant}: {name} is part of the budget and data every "
                          f"variant shares; give --{name.replace('_', '-')} for all")
    if name in RESUME_FREE:
        raise ConfigError(f"{variant}: {name} does not change what a cell trains (it only "
                          "observes or places the run), so the variant would repeat another; "
                          f"give --{name.replace('_', '-')} for all")
    fixed = fixed_options(method)
    if name in fixed:
        raise ConfigError(f"{variant}: {fixed[name]}")
    if not _VALUE.fullmatch(text):
        raise ConfigError(f"{variant}: the value {short_repr(text)} may hold only letters, "
                          "digits and . _ + -")


def parse_seeds(spec: str) -> tuple[int, ...]:
    """Seeds from ``--seeds`` (comma-separated integers >= 0, each once)."""
    seeds = []
    for part in spec.split(","):
        if not re.fullmatch(r"\s*\d{1,20}\s*", part):  # the range is validate's
            raise ConfigError("--seeds must be comma-separated integers >= 0, got "
                              f"{short_repr(spec)}")
        seeds.append(int(part))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds lists a seed twice: {short_repr(spec)}")
    return tuple(seeds)


def plan_comparison(base: Config, *, methods: str, seeds: str, output_dir: str,
                    baseline: str | None = None, evaluation: Evaluation = Evaluation(),
                    explicit: Iterable[str] = (),
                    allow_config_change: bool = False) -> Comparison:
    """Parse and check a comparison; nothing is written and nothing trains.

    Raises:
        ConfigError: a process group (torchrun), anything :func:`parse_variants` /
            :func:`parse_seeds` refuse, an unknown baseline, a bad evaluation setting,
            missing or unreadable data, a batch larger than the training split, a variant
            whose config or model is invalid, an output folder that is a file, or an
            existing cell trained with other settings (one line).
    """
    if launch.launch_world_size() > 1:
        raise ConfigError("snclr compare runs in one process (its cells one after another); "
                          "start it without torchrun")
    variants = parse_variants(methods, base, explicit=explicit)
    labels = [v.label for v in variants]
    if baseline is None:
        baseline = "mocov3" if "mocov3" in labels else labels[0]
    elif baseline not in labels:
        raise ConfigError(f"--baseline {short_repr(baseline)} is not one of the variants "
                          f"({', '.join(labels)})")
    _check_evaluation(evaluation)
    check_path("--output-dir", output_dir)
    comparison = Comparison(base, variants, parse_seeds(seeds), Path(output_dir), baseline,
                            evaluation, allow_config_change)
    _check_output_dir(comparison, output_dir)
    # The data and the budget every cell shares, once, before the progress bars start.
    train_size = len(limit(pretraining_images(labelled_splits(base.data)),
                           base.limit_samples))
    if base.batch_size > train_size:
        raise ConfigError(f"batch_size={base.batch_size} is larger than the {train_size} "
                          "training images")
    for variant in variants:
        config = comparison.cell_config(variant, comparison.seeds[0])
        validate(config)
        with torch.device("meta"):  # the model's own checks, without allocating it
            build_model(config, in_chans=3, img_size=config.img_size or 224)
    for variant, seed in comparison.cells():
        config = comparison.cell_config(variant, seed)
        _existing_cell(comparison, config)
        _read_record(Path(config.output_dir))  # refuses a record of the wrong shape
    return comparison


def _check_output_dir(comparison: Comparison, text: str) -> None:
    """A comparison's folder is new, empty, or a comparison: it holds ``compare.md`` or a
    cell that is a snclr run (``DIR/VARIANT/SEED/``); anything else would be overwritten."""
    folder = comparison.output_dir
    if not str(text).strip():
        raise ConfigError("--output-dir is empty; name the comparison's folder")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output-dir {text!r} is a file, not a folder")
    if not folder.is_dir() or not any(folder.iterdir()) or (folder / "compare.md").is_file():
        return
    if not any(is_run_folder(cell) for cell in folder.glob("*/*") if cell.is_dir()):
        raise ConfigError(f"--output-dir {text!r} holds files but is not a snclr comparison "
                          "(no compare.md or cell run folder); choose a new or empty folder")


def _check_evaluation(evaluation: Evaluation) -> None:
    if evaluation.protocol not in LINEAR_PROTOCOLS:
        raise ConfigError(f"--linear-protocol must be one of {', '.join(LINEAR_PROTOCOLS)}, "
                          f"got {short_repr(evaluation.protocol)}")
    epochs, lr = evaluation.linear_epochs, evaluation.linear_lr
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"--linear-epochs must be an integer >= 1, got {epochs!r}")
    if not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr <= 0:
        raise ConfigError(f"--linear-lr must be a finite number > 0, got {lr!r}")


def _existing_cell(comparison: Comparison, config: Config) -> dict | None:
    """The saved epoch and step of a cell's checkpoint, after checking its settings.

    The check is the one :func:`snclr.training.train.pretrain` makes on resume, made for every cell
    before any runs; an image size of 0 (native) counts as the one the cell resolved.
    """
    path = Path(config.output_dir) / "checkpoint.pt"
    if not path.exists():
        return None
    payload = read_checkpoint(path, keys=RESUME_KEYS)
    saved = config_of(payload)
    size = saved.img_size or payload["data_shape"]["img_size"]
    saved = replace(saved, img_size=size)
    wanted = resumed_config(saved, replace(config, img_size=config.img_size or size), None)
    try:
        check_resume_changes(config_changes(saved, wanted),
                             allow=comparison.allow_config_change)
    except ConfigError as err:
        raise ConfigError(f"cell {config.output_dir}: {err}") from None
    if config.epochs < payload["epoch"]:
        raise ConfigError(f"cell {config.output_dir} has completed {payload['epoch']} epochs, "
                          f"more than --epochs {config.epochs}")
    return {"epoch": payload["epoch"], "step": payload["step"]}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (torch's on every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _read_record(run_dir: Path) -> dict:
    """The cell's ``cell.json`` ({} when absent or torn); ConfigError when of the wrong shape."""
    path = run_dir / RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a torn record only costs a re-evaluation; the checkpoint decides training
    problem = _record_problem(record)
    if problem:
        raise ConfigError(f"{str(path)!r} is not a cell record of snclr compare: {problem}; "
                          "remove it to re-evaluate the cell")
    return record


_NUMBER = (int, float)
# What each entry of a record must be, when present (the record is JSON written by _train).
_RECORD_FIELDS = {"variant": str, "seed": int, "status": str, "settings": dict,
                  "pretrain_s": _NUMBER, "sessions": int, "message": str, "evaluations": list}
_RESULT_KEYS = tuple(f"top1_k{k}" for k in KNN_KS) + ("linear_top1",)


def _record_problem(record) -> str | None:
    """What is wrong with a parsed ``cell.json`` (None: nothing)."""
    if not isinstance(record, dict):
        return f"it holds {shown(record)}, not an object"
    for key, kind in _RECORD_FIELDS.items():
        if key in record and (isinstance(record[key], bool) or not isinstance(record[key], kind)):
            return f"{key} is {shown(record[key])}"
    for entry in record.get("evaluations", []):
        results = entry.get("results") if isinstance(entry, dict) else None
        if not (isinstance(results, dict) and isinstance(entry.get("settings"), dict)
                and all(type(results.get(k)) in _NUMBER for k in _RESULT_KEYS)
                and type(entry.get("wall_s")) in _NUMBER):
            return f"an evaluation is {shown(entry)}, not settings, results and wall_s"
    return None


def _write_record(run_dir: Path, record: dict) -> None:
    write_text_atomically(run_dir / RECORD, json.dumps(record, indent=1) + "\n")


def _settings_of(config: Config) -> dict:
    """The config as recorded with a diverged cell (fields free to change left out)."""
    return {k: v for k, v in config.to_dict().items() if k not in RESUME_FREE}


def run_comparison(comparison: Comparison, *, progress: bool = True) -> list[CellResult]:
    """Run every unfinished cell, evaluate every unevaluated one, write the table files.

    The folder is locked for the whole comparison (:mod:`snclr.training.runlock`); each
    cell's stale temporary files are removed under the cell's lock before it runs.

    Returns:
        One :class:`~snclr.training.compare_report.CellResult` per cell, in variant-then-seed order.

    Raises:
        ConfigError: a refusal found while running (e.g. unreadable data, another process
            using the folder; one line).
        WriteFailed: a file could not be written (a full disk).
        Interrupted: Ctrl-C or SIGTERM; the message names the cell, the kept checkpoint and
            the unfinished cells (``compare.md`` is written only when every cell is done).
    """
    cells = comparison.cells()
    results: list[CellResult] = []
    folder = comparison.output_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--output-dir {str(folder)!r} cannot be created "
                          f"({err.strerror or type(err).__name__})") from None
    runlock.acquire(folder)  # one snclr compare per folder, for the whole comparison
    bar = tqdm(total=len(cells), desc="compare", unit="cell", disable=not progress,
               dynamic_ncols=True)
    try:
        for variant, seed in cells:
            bar.set_postfix_str(f"{variant.label} seed {seed}")
            try:
                results.append(_run_cell(comparison, variant, seed, progress=progress))
            except KeyboardInterrupt as err:
                where = getattr(err, "message", "") or ("interrupted; the cell's last checkpoint "
                                                        "is kept; rerun the same command to resume")
                raise Interrupted.of(err, f"cell {variant.folder}/{seed}: {where}; compare.md not "
                                          f"written ({len(cells) - len(results)} of {len(cells)} "
                                          "cells unfinished)") from None
            bar.update()
        write_comparison(folder, results, variants=[v.label for v in comparison.variants],
                         baseline=comparison.baseline, setup=_setup(comparison))
    finally:
        bar.close()
        runlock.release(folder)
    return results


def _remove_stale(run_dir: Path) -> None:
    """A cell's stale temporary files, removed under the cell's own lock."""
    if not run_dir.is_dir():
        return
    runlock.acquire(run_dir)
    try:
        remove_stale(run_dir)
    finally:
        runlock.release(run_dir)


def _run_cell(comparison: Comparison, variant: Variant, seed: int, *,
              progress: bool) -> CellResult:
    config = comparison.cell_config(variant, seed)
    run_dir = Path(config.output_dir)
    _remove_stale(run_dir)
    existing = _existing_cell(comparison, config)
    record = _read_record(run_dir)
    if existing is None or existing["epoch"] < config.epochs:
        if record.get("status") == "diverged" and record.get("settings") == _settings_of(config):
            return _result(comparison, variant, seed, record, None)
        record, step = _train(comparison, config, record)
        if step is None:
            return _result(comparison, variant, seed, record, None)
    else:
        step = existing["step"]
    settings = comparison.evaluation.settings(config, step)
    entry = next((e for e in record.get("evaluations", []) if e["settings"] == settings), None)
    if entry is None:
        entry = _evaluate(comparison, config, settings, progress=progress)
        record["evaluations"] = [*record.get("evaluations", []), entry]
        _write_record(run_dir, record)
    return _result(comparison, variant, seed, record, entry)


def _train(comparison: Comparison, config: Config, record: dict) -> tuple[dict, int | None]:
    """Pretrain (or resume) a cell; the updated record and the final step (None: diverged)."""
    run_dir = Path(config.output_dir)
    seed_everything(config.seed)
    tic = time.perf_counter()

    def note(status: str, **extra) -> dict:
        updated = {**record, "variant": run_dir.parent.name, "seed": config.seed,
                   "status": status, "settings": _settings_of(config),
                   "pretrain_s": record.get("pretrain_s", 0.0) + time.perf_counter() - tic,
                   "sessions": record.get("sessions", 0) + 1, **extra}
        if run_dir.is_dir():
            _write_record(run_dir, updated)
        return updated

    try:
        last = pretrain(config, allow_config_change=comparison.allow_config_change)
    except TrainingDiverged as err:
        return note("diverged", message=str(err)), None
    except ConfigError:
        raise  # refused before the cell changed
    except BaseException:
        with contextlib.suppress(WriteFailed):  # a full disk: the record is not worth a 2nd error
            note("interrupted")  # the time spent still counts; the checkpoint resumes it
        raise
    return note("trained"), last["step"]


def _evaluate(comparison: Comparison, config: Config, settings: dict, *,
              progress: bool) -> dict:
    evaluation = comparison.evaluation
    seed_everything(config.seed)
    tic = time.perf_counter()
    results = run_evaluation(
        str(Path(config.output_dir) / "checkpoint.pt"), config.data, ks=KNN_KS,
        linear_epochs=evaluation.linear_epochs, linear_lr=evaluation.linear_lr,
        protocol=evaluation.protocol, seed=config.seed, num_workers=config.num_workers,
        device=config.device, limit_samples=config.limit_samples, progress=progress)
    return {"settings": settings, "results": results, "wall_s": time.perf_counter() - tic}


def _result(comparison: Comparison, variant: Variant, seed: int, record: dict,
            entry: dict | None) -> CellResult:
    metrics = {}
    if entry is not None:
        results = entry["results"]
        metrics = {"knn_k20": results["top1_k20"], "knn_k200": results["top1_k200"],
                   "linear": results["linear_top1"]}
    return CellResult(
        variant=variant.label, method=variant.method, seed=seed,
        folder=f"{variant.folder}/{seed}", status="done" if entry else "diverged",
        metrics=metrics, linear_protocol=comparison.evaluation.protocol,
        pretrain_s=record.get("pretrain_s", 0.0), eval_s=entry["wall_s"] if entry else 0.0,
        sessions=record.get("sessions", 0), note=record.get("message", ""))


def _setup(comparison: Comparison) -> dict:
    """What the table's header states about the shared settings."""
    base, evaluation = comparison.base, comparison.evaluation
    img_size = base.img_size
    for variant, seed in comparison.cells():  # 0 (native) resolves in each cell's config.yaml
        saved = Path(comparison.cell_config(variant, seed).output_dir) / "config.yaml"
        if not img_size and saved.is_file():
            img_size = yaml.safe_load(saved.read_text()).get("img_size", 0)
    return {"data": base.data, "epochs": base.epochs, "batch_size": base.batch_size,
            "encoder": base.encoder, "img_size": img_size,
            "limit_samples": base.limit_samples, "seeds": list(comparison.seeds),
            "protocol": evaluation.protocol, "linear_epochs": evaluation.linear_epochs,
            "linear_lr": evaluation.linear_lr}
