"""Metric logs: valid JSON, cut back to the resumed checkpoint, torn lines truncated."""

import csv
import json
import sys
import types

from snclr.training.metrics import CSV_COLUMNS, MetricsLog, clean, read_rows


def _lines(path):
    return path.read_text().splitlines()


def test_non_finite_values_are_written_as_null(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    log.write({"kind": "step", "epoch": 1, "step": 1, "loss": float("nan"), "lr": float("inf"),
               "nested": [1.0, float("-inf")]})
    (line,) = _lines(tmp_path / "metrics.jsonl")
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"kind": "step", "epoch": 1, "step": 1, "loss": None, "lr": None,
                                "nested": [1.0, None]}
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert rows[0]["loss"] == "" and rows[0]["step"] == "1"
    assert clean({"a": 2.0, "b": float("nan")}) == {"a": 2.0, "b": None}


def _history(run, steps, *, torn=""):
    rows = [{"kind": "step", "epoch": 1 + (s - 1) // 4, "step": s, "loss": 1.0 / s} for s in steps]
    rows += [{"kind": "epoch", "epoch": e, "step": 4 * e, "loss": 0.5}
             for e in (1, 2, 3) if 4 * e in steps]
    rows.sort(key=lambda r: (r["step"], r["kind"] == "epoch"))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    with (run / "metrics.csv").open("w") as f:
        f.write(",".join(CSV_COLUMNS) + "\n" + "stale,row\n" * 3)
    return rows


def test_rows_past_the_resumed_step_are_dropped_from_every_log(tmp_path):
    written = _history(tmp_path, range(1, 11))  # a kill during epoch 3; checkpoint at step 8
    log = MetricsLog(tmp_path, enabled=True, resume_step=8)
    assert (log.dropped_rows, log.torn_lines) == (2, 0)
    kept, _ = read_rows(tmp_path / "metrics.jsonl")
    assert kept == [r for r in written if r["step"] <= 8]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], str(r["step"])) for r in kept]
    log.write({"kind": "step", "epoch": 3, "step": 9, "loss": 0.1})
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")[0]][-2:] == [8, 9]


def test_a_torn_last_line_is_truncated_and_counted(tmp_path):
    _history(tmp_path, range(1, 5), torn='{"kind": "step", "epoch": 2, "st')
    log = MetricsLog(tmp_path, enabled=True, resume_step=4)
    assert (log.dropped_rows, log.torn_lines) == (0, 1)
    for line in _lines(tmp_path / "metrics.jsonl"):
        json.loads(line)
    log.write({"kind": "resume", "step": 4})
    assert json.loads(_lines(tmp_path / "metrics.jsonl")[-1]) == {"kind": "resume", "step": 4}


def test_a_fresh_start_clears_rows_of_a_run_that_never_saved(tmp_path):
    _history(tmp_path, range(1, 4))
    log = MetricsLog(tmp_path, enabled=True, resume_step=0)
    assert log.dropped_rows == 3 and _lines(tmp_path / "metrics.jsonl") == []
    assert _lines(tmp_path / "metrics.csv") == [",".join(CSV_COLUMNS)]


def test_tensorboard_purges_the_redone_steps(tmp_path, monkeypatch):
    made = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            made.append((log_dir, purge_step))
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    fake = types.SimpleNamespace(SummaryWriter=Writer)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = MetricsLog(tmp_path, enabled=True, resume_step=8)
    assert made == [(str(tmp_path / "tensorboard"), 9)]
    log.write({"kind": "step", "epoch": 3, "step": 9, "loss": 0.5, "lr": float("nan")})
    log.write({"kind": "resume", "epoch": 2, "step": 8, "dropped_rows": 0})
    assert log.tensorboard.scalars == [("step/loss", 0.5, 9)]  # NaN and event rows stay out


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLog(tmp_path, enabled=False, resume_step=3)
    log.write({"kind": "step", "step": 1, "loss": 1.0})
    assert list(tmp_path.iterdir()) == []
