"""The ``snclr`` command: parse arguments into a frozen config, then train or evaluate.

Subcommands: ``pretrain``, ``knn``, ``linear``, ``export`` (a checkpoint's backbone as a state
dict, :mod:`snclr.training.export`), ``demo`` (pretrain the demo preset, then
kNN of the trained and of a random encoder, side by side) and ``compare`` (methods x seeds,
one table with error bars; :mod:`snclr.training.compare`).

Exit status: 0 done; 2 bad configuration, data, checkpoint or run folder (one line on stderr,
found before the run folder changes); 3 training diverged, met more unreadable image files
than ``--max-bad-images`` allows, a data file disappeared mid-run, or a file could not be
written (one line; the last good checkpoint is kept); 130 Ctrl-C, 143 SIGTERM (one line
saying what was kept); 141 stdout was closed by its reader (``| head``), quietly, as a
SIGPIPE would. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from snclr.model import METHODS
from snclr.training import launch
from snclr.training.config import PRESETS, Config, apply_overrides, load_config_file, preset
from snclr.training.errors import (
    ConfigError,
    DataFileVanished,
    Interrupted,
    TrainingDiverged,
    UnreadableImages,
    WriteFailed,
)

__all__ = ["build_parser", "config_from_args", "given_fields", "main"]

# Options shown in --help with a short description; every other Config field still has a
# flag (--field-name), listed under "all options".
_DOCUMENTED = {
    "data": "built-in dataset name (animal-mnist) or ImageFolder directory with train/ [val/]",
    "output_dir": "run folder: checkpoint.pt, config.yaml, metrics.jsonl/csv, report.md, plots",
    "method": f"one of {', '.join(sorted(METHODS))}",
    "epochs": "training epochs",
    "batch_size": "global batch size (summed over processes)",
}
_HIDDEN = {"limit_samples", "stop_after"}  # for tests: a data subset, a simulated interruption


def _add_config_flags(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = ()) -> None:
    documented = parser.add_argument_group("main options")
    others = parser.add_argument_group("all options (override the preset and --config)")
    for field in fields(Config):
        if field.name in exclude:
            continue
        flag = "--" + field.name.replace("_", "-")
        group = documented if field.name in _DOCUMENTED else others
        help_text = _DOCUMENTED.get(field.name, f"(default {field.default})")
        if field.name in _HIDDEN:
            help_text = argparse.SUPPRESS
        if field.type.startswith("bool"):
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(flag, dest=field.name, default=None, metavar=field.name.upper(),
                               help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snclr", description="SNCLR self-supervised pretraining and evaluation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain an encoder",
                       description="Pretrain an encoder with SNCLR (or a variant).")
    p.add_argument("--preset",
                   help=f"starting values of a new run: {', '.join(PRESETS)} (default demo)")
    p.add_argument("--config", help="YAML or JSON file of option: value, applied over the preset")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/checkpoint.pt (automatic when it exists) with "
                        "the saved config; options given now are the only changes")
    p.add_argument("--allow-config-change", action="store_true",
                   help="on resume, accept changed hyperparameters (recorded in the metrics and "
                        "report) instead of refusing them")
    _add_config_flags(p)

    for name, text in (("knn", "weighted kNN top-1 (default k=20, 200) of a checkpoint's backbone"),
                       ("linear", "linear-probe accuracy of a checkpoint's frozen backbone")):
        e = sub.add_parser(name, help=text, description=text)
        e.add_argument("--checkpoint", required=True, help="checkpoint.pt written by pretrain")
        e.add_argument("--data", help="dataset name or folder (default: the one the checkpoint "
                                      "trained on)")
        e.add_argument("--json", action="store_true", help="print one JSON object")
        e.add_argument("--device", default="auto", choices=launch.DEVICES)
        e.add_argument("--num-workers", type=int, default=0)
        e.add_argument("--random-init", action="store_true",
                       help="evaluate the same architecture untrained")
        e.add_argument("--limit-samples", type=int, default=0, help=argparse.SUPPRESS)  # tests
        if name == "knn":
            e.add_argument("--k", default="20,200",
                           help="comma-separated neighbour counts (default 20,200); top1 is the "
                                "first's")
            e.add_argument("--temperature", type=float, default=0.07,
                           help="vote weight exp(cos / temperature) (default 0.07)")
        if name == "linear":
            e.add_argument("--epochs", type=int, default=100,
                           help="classifier epochs (default 100)")
            e.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
            e.add_argument("--protocol", default="cached",
                           help="cached (default: features once, no augmentation) or augmented "
                                "(MoCo v3: random-resized crop + flip every epoch)")

    x = sub.add_parser(
        "export", help="write a checkpoint's backbone as a state dict (timm / torchvision names)",
        description="Write the encoder of a checkpoint as a plain state dict under its source "
                    "library's parameter names, and print the code that builds the module it "
                    "loads into.")
    x.add_argument("--checkpoint", required=True, help="checkpoint.pt written by pretrain")
    x.add_argument("--output", required=True,
                   help="backbone.pt, or backbone.safetensors (needs the safetensors package)")
    x.add_argument("--momentum", action="store_true",
                   help="export the momentum encoder instead of the online one")
    x.add_argument("--json", action="store_true", help="print one JSON object")

    d = sub.add_parser(
        "demo", help="pretrain the demo preset, then kNN of trained vs random encoder",
        description="Pretrain the demo preset, then compare kNN accuracy of the trained and a "
                    "random encoder.")
    d.add_argument("--data", default="animal-mnist")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--json", action="store_true")

    c = sub.add_parser(
        "compare", help="pretrain and evaluate methods x seeds; one table with error bars",
        description="Pretrain every variant with every seed on the same budget, evaluate each "
                    "cell (kNN k=20, 200 and the linear probe) and write DIR/compare.md, "
                    "compare.csv, cells.csv and compare.png. Finished cells are skipped, "
                    "interrupted ones resume.")
    c.add_argument("--methods", required=True,
                   help="comma-separated variants METHOD[:FIELD=VALUE]..., e.g. "
                        "mocov3,nnclr,snclr,snclr:attention_temperature=0.1 (methods: "
                        f"{', '.join(sorted(METHODS))})")
    c.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    c.add_argument("--output-dir", required=True,
                   help="the comparison's folder: one run folder per cell, DIR/VARIANT/SEED/")
    c.add_argument("--baseline", help="the variant the others are compared with (default "
                                      "mocov3 when listed, else the first)")
    c.add_argument("--preset", help=f"starting values of every cell: {', '.join(PRESETS)} "
                                    "(default demo)")
    c.add_argument("--config", help="YAML or JSON file of option: value, applied over the preset")
    c.add_argument("--linear-protocol", default="cached",
                   help="cached (default) or augmented (MoCo v3's linear evaluation)")
    c.add_argument("--linear-epochs", type=int, default=100,
                   help="linear probe epochs (default 100)")
    c.add_argument("--linear-lr", type=float, default=0.1, help="linear probe lr (default 0.1)")
    c.add_argument("--allow-config-change", action="store_true",
                   help="resume existing cells even if their saved settings differ")
    _add_config_flags(c, exclude=("method", "seed", "output_dir"))
    return parser


def _flags(args: argparse.Namespace) -> dict:
    values = {f.name: getattr(args, f.name, None) for f in fields(Config)}
    return {name: value for name, value in values.items() if value is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    """Preset, then the --config file, then explicit flags; each a new frozen config."""
    config = preset(args.preset or "demo")
    if args.config:
        config = apply_overrides(config, load_config_file(args.config),
                                 source=f"config file {args.config!r}")
    return apply_overrides(config, _flags(args), source="command line")


def given_fields(args: argparse.Namespace) -> set[str]:
    """The fields this command line sets: flags, --config keys, an explicit --preset's keys.

    A resumed run takes only these from the command line; the rest comes from its checkpoint.
    """
    given = set(PRESETS[args.preset]) if args.preset in PRESETS else set()
    if args.config:
        given |= set(load_config_file(args.config))
    return given | set(_flags(args))


def _print_result(result: dict, *, as_json: bool, label: str) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        print(f"{label}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in result.items()))


def _run(args: argparse.Namespace) -> int:
    from snclr.training import evaluate, train

    if args.command == "pretrain":
        config = config_from_args(args)
        try:
            last = train.pretrain(config, resume=args.resume, given=given_fields(args),
                                  allow_config_change=args.allow_config_change)
        except (TrainingDiverged, WriteFailed) as err:
            return _stopped(args.command, err)
        # The process group is gone by now: ask which rank torchrun started.
        if launch.launch_rank() == 0:
            knn = last.get("knn_top1")
            print(f"finished {last.get('epoch', 0)} epochs; run folder {config.output_dir}" +
                  (f"; kNN top-1 {knn:.4f}" if knn is not None else ""))
        return 0
    if args.command in ("knn", "linear"):
        data = args.data or _checkpoint_data(args.checkpoint)
        common = dict(random_init=args.random_init, num_workers=args.num_workers,
                      device=args.device, limit_samples=args.limit_samples)
        if args.command == "knn":
            result = evaluate.run_knn(args.checkpoint, data, ks=_neighbour_counts(args.k),
                                      temperature=args.temperature, **common)
        else:
            result = evaluate.run_linear(args.checkpoint, data, epochs=args.epochs, lr=args.lr,
                                         protocol=args.protocol, **common)
            result["protocol"] = args.protocol
        label = f"{args.command} ({'random init' if args.random_init else 'trained'})"
        if launch.launch_rank() == 0:  # every rank holds the same result
            _print_result(result, as_json=args.json, label=label)
        return 0
    if args.command == "compare":
        return _compare(args)
    if args.command == "export":
        return _export(args)
    # demo
    config = apply_overrides(preset("demo"), {"data": args.data, "output_dir": args.output_dir})
    try:
        train.pretrain(config)
    except (TrainingDiverged, WriteFailed) as err:
        return _stopped(args.command, err)
    checkpoint = str(Path(args.output_dir) / "checkpoint.pt")
    trained = evaluate.run_knn(checkpoint, args.data)
    random = evaluate.run_knn(checkpoint, args.data, random_init=True)
    if args.json:
        print(json.dumps({"trained": trained, "random_init": random}))
    else:
        print(f"{'kNN top-1':<12}{'trained':>10}{'random':>10}")
        for key in trained:
            if key != "top1":
                print(f"{key:<12}{trained[key]:>10.4f}{random[key]:>10.4f}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from snclr.training import compare

    evaluation = compare.Evaluation(protocol=args.linear_protocol,
                                    linear_epochs=args.linear_epochs, linear_lr=args.linear_lr)
    comparison = compare.plan_comparison(
        config_from_args(args), methods=args.methods, seeds=args.seeds,
        output_dir=args.output_dir, baseline=args.baseline, evaluation=evaluation,
        explicit=_flags(args), allow_config_change=args.allow_config_change)
    try:
        cells = compare.run_comparison(comparison)
    except (TrainingDiverged, WriteFailed) as err:
        return _stopped(args.command, err)
    folder = Path(args.output_dir)
    print((folder / "compare.md").read_text().split("\n\n## ")[0])
    print(f"\nwrote {folder / 'compare.md'}, compare.csv, cells.csv, compare.png")
    diverged = [f"{c.variant} seed {c.seed}" for c in cells if c.status != "done"]
    if diverged:
        print(f"snclr compare: stopped: {len(diverged)} of {len(cells)} cells diverged "
              f"({', '.join(diverged)}); the table leaves them out", file=sys.stderr)
        return 3
    return 0


def _export(args: argparse.Namespace) -> int:
    from snclr.training.export import export_backbone

    result = export_backbone(args.checkpoint, args.output, momentum=args.momentum)
    if args.json:
        print(json.dumps(result))
    else:
        branch = "momentum encoder" if args.momentum else "encoder"
        print(f"wrote {result['output']}: the {branch} {result['encoder']}, {result['tensors']} "
              f"tensors, {result['parameters']:,} parameters; it loads strictly into:")
        print(result["recipe"])
        print(result["load"])
    return 0


def _neighbour_counts(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise ConfigError(f"--k must be comma-separated integers >= 1, got {text!r}")
    return ks


def _stopped(command: str, err: Exception) -> int:
    # Every rank stops at the same step; one line is enough.
    if launch.launch_rank() == 0:
        print(f"snclr {command}: stopped: {err}", file=sys.stderr)
    return 3


def _checkpoint_data(checkpoint: str) -> str:
    from snclr.training.checkpoint import read_checkpoint

    return read_checkpoint(checkpoint)["config"]["data"]


def _terminate(signum: int, frame) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``snclr`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    # SIGTERM (a scheduler's preemption) stops the command as Ctrl-C does: with one line.
    handles = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handles else None
    try:
        return _run(args)
    except UnreadableImages as err:
        return _stopped(args.command, err)
    except ConfigError as err:
        print(f"snclr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except DataFileVanished as err:
        return _stopped(args.command, err)
    except BrokenPipeError:
        # The reader of stdout has gone (`snclr ... | head`): stop quietly with the status a
        # SIGPIPE gives, and point stdout at /dev/null so the flush at exit cannot fail again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (captured)
            pass
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        # Once training has started, pretrain and compare say where and what was kept.
        message = getattr(err, "message", "") or (
            "interrupted before training started" if args.command == "pretrain"
            else "interrupted") + "; rerun the same command"
        if launch.launch_rank() == 0:
            print(f"snclr {args.command}: {message}", file=sys.stderr)
        return 128 + signum
    finally:
        if handles:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
