"""The run's metric logs: ``metrics.jsonl`` (the record), ``metrics.csv`` and TensorBoard.

Only rank 0 writes. Every line of ``metrics.jsonl`` is valid JSON: a missing or non-finite
number is written as ``null``. When a run (re)starts, the logs are cut back to the step of the
checkpoint it resumes (0 without one): rows past it describe steps that will be redone, and
a torn last line is what a kill in the middle of a write leaves. Both are removed and their
counts returned, for the ``resume`` row the training loop writes. Rewrites are atomic
(:mod:`snclr.training.runfiles`); a failed write (a full disk) is one
:class:`~snclr.training.errors.WriteFailed`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from snclr.training.runfiles import write_failed, write_text_atomically

__all__ = ["CSV_COLUMNS", "MetricsLog", "clean", "read_rows"]

CSV_COLUMNS = ("kind", "epoch", "step", "loss", "lr", "momentum", "images_per_s", "knn_top1",
               "neighbor_purity", "neighbor_purity_without_self", "self_neighbor_fraction",
               "positiveness_entropy", "neighbor_similarity")
CSV_KINDS = ("step", "epoch")  # the other kinds (resume, config_change) are events, JSONL only


def clean(value):
    """``value`` with every non-finite float replaced by None (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(item) for item in value]
    return value


def read_rows(path: Path) -> tuple[list[dict], int]:
    """The rows of a JSONL file and the number of lines that are not a JSON object."""
    if not path.is_file():
        return [], 0
    rows, unreadable = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            unreadable += 1
    return rows, unreadable


class MetricsLog:
    """Rank 0's metric rows; the logs are cut back to ``resume_step`` on creation.

    Attributes:
        dropped_rows: rows removed because their step was past ``resume_step``.
        torn_lines: unreadable lines removed (a kill mid-write leaves one, the last).
    """

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.jsonl, self.csv = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
        self.dropped_rows = self.torn_lines = 0
        self.tensorboard = None
        if not enabled:
            return
        self._cut_back(resume_step)
        try:  # optional: tensorboard is not a dependency
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        # purge_step: TensorBoard hides the events of the redone steps written before.
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def _cut_back(self, step: int) -> None:
        rows, self.torn_lines = read_rows(self.jsonl)
        kept = [row for row in rows if not _number(row.get("step")) > step]
        self.dropped_rows = len(rows) - len(kept)
        if self.dropped_rows or self.torn_lines:
            write_text_atomically(self.jsonl, "".join(json.dumps(row) + "\n" for row in kept))
        # The CSV is a view of the same rows: rewrite it from them.
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(_csv_row(row) for row in kept if row.get("kind") in CSV_KINDS)
        write_text_atomically(self.csv, text.getvalue())

    def write(self, row: dict) -> None:
        """Append ``row`` (a full disk: :class:`~snclr.training.errors.WriteFailed`; a torn
        last line at worst, which the next start truncates)."""
        if not self.enabled:
            return
        row = clean(row)
        _append(self.jsonl, json.dumps(row, allow_nan=False) + "\n")
        if row.get("kind") not in CSV_KINDS:
            return
        text = io.StringIO(newline="")
        csv.writer(text).writerow(_csv_row(row))
        _append(self.csv, text.getvalue())
        if self.tensorboard is not None:
            for name, value in row.items():
                if isinstance(value, float):
                    self.tensorboard.add_scalar(f"{row['kind']}/{name}", value, row["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _append(path: Path, text: str) -> None:
    try:
        with path.open("a", newline="") as f:
            f.write(text)  # one write
    except OSError as err:
        raise write_failed(path, err) from None


def _number(value) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _csv_row(row: dict) -> list:
    return ["" if row.get(column) is None else row[column] for column in CSV_COLUMNS]
