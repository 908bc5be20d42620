"""``snclr compare`` end to end on a few dozen Animal-MNIST images with a tiny model."""

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snclr.training import compare, train
from snclr.training.checkpoint import read_checkpoint
from snclr.training.cli import main

# 48 images, batch 16, one epoch: 3 steps per cell; the probe trains 5 epochs.
TINY = [
    "--limit-samples", "48", "--batch-size", "16", "--epochs", "1", "--queue-size", "32",
    "--projector-hidden", "32", "--projector-dim", "16", "--predictor-hidden", "32",
    "--num-workers", "0", "--knn-every", "0", "--log-every", "1", "--linear-epochs", "5",
]
METHODS = "mocov3,snclr:num_neighbors=2"
CELLS = ["mocov3/0", "mocov3/1", "snclr+num_neighbors=2/0", "snclr+num_neighbors=2/1"]


def run(folder, *extra, methods=METHODS, seeds="0,1"):
    return main(["compare", "--methods", methods, "--seeds", seeds, "--output-dir", str(folder),
                 *TINY, *extra])


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare") / "cmp"
    assert run(folder) == 0
    return folder


def _forbid_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compare did work it should have skipped")

    monkeypatch.setattr(compare, "pretrain", refuse)
    monkeypatch.setattr(compare, "run_evaluation", refuse)


def _same_weights(a: Path, b: Path) -> None:
    left, right = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert torch.equal(tensor, right[name]), name


def _results(cell: Path) -> dict:
    return json.loads((cell / "cell.json").read_text())["evaluations"][-1]["results"]


def test_tiny_compare_writes_table_csv_and_plot_of_the_right_shape(compared):
    for cell in CELLS:
        for name in ("checkpoint.pt", "report.md", "cell.json", "config.yaml"):
            assert (compared / cell / name).is_file(), (cell, name)
    with open(compared / "compare.csv") as f:
        summary = list(csv.DictReader(f))
    assert [row["variant"] for row in summary] == ["mocov3", "snclr:num_neighbors=2"]
    assert summary[0]["knn_k20_diff"] == "" and summary[0]["verdict"] == ""
    assert summary[1]["verdict"] in ("better", "worse", "within noise")
    assert float(summary[1]["knn_k20_diff_low"]) <= float(summary[1]["knn_k20_diff"]) <= float(
        summary[1]["knn_k20_diff_high"])
    assert {row["seeds"] for row in summary} == {"2"} and summary[1]["linear_protocol"] == "cached"
    with open(compared / "cells.csv") as f:
        cells = list(csv.DictReader(f))
    assert [row["run_dir"] for row in cells] == CELLS
    for row in cells:
        assert row["status"] == "done" and float(row["pretrain_s"]) > 0
        for metric in ("knn_k20", "knn_k200", "linear"):
            assert 0 <= float(row[metric]) <= 1
        assert float(row["knn_k20"]) == _results(compared / row["run_dir"])["top1_k20"]
    means = np.mean([float(row["knn_k20"]) for row in cells[2:]])
    assert float(summary[1]["knn_k20_mean"]) == pytest.approx(means)
    text = (compared / "compare.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| mocov3 |")
             or line.startswith("| snclr:num_neighbors=2 |")]
    assert len(table) == 2 + 1 + 4  # summary rows, other-metric Δ rows (not the baseline), cells
    assert "**1 comparison**" in text and " ± " in text and "linear (cached)" in text
    for cell in CELLS:
        assert f"[report]({cell}/report.md)" in text and (compared / cell / "report.md").is_file()
    with Image.open(compared / "compare.png") as image:
        assert image.format == "PNG" and image.size == (1600, 400)


def test_rerun_does_no_work(compared, monkeypatch, capsys):
    stamps = {cell: (compared / cell / "checkpoint.pt").stat().st_mtime_ns for cell in CELLS}
    records = {cell: (compared / cell / "cell.json").read_text() for cell in CELLS}
    table = (compared / "compare.md").read_text()
    _forbid_work(monkeypatch)
    assert run(compared) == 0
    assert {c: (compared / c / "checkpoint.pt").stat().st_mtime_ns for c in CELLS} == stamps
    assert {c: (compared / c / "cell.json").read_text() for c in CELLS} == records
    assert (compared / "compare.md").read_text() == table
    assert "snclr:num_neighbors=2" in capsys.readouterr().out


def test_a_cell_alone_equals_the_same_cell_in_a_sequence(compared, tmp_path):
    # Disturb every global RNG: the cell must not depend on what ran before it.
    random.random(), np.random.rand(), torch.rand(3)
    assert run(tmp_path / "alone", methods="snclr:num_neighbors=2", seeds="1") == 0
    _same_weights(compared / CELLS[3] / "checkpoint.pt",
                  tmp_path / "alone" / CELLS[3] / "checkpoint.pt")
    assert _results(tmp_path / "alone" / CELLS[3]) == _results(compared / CELLS[3])


def test_an_interrupted_cell_resumes_through_pretrain(tmp_path, monkeypatch):
    assert run(tmp_path / "straight", "--epochs", "2", methods="mocov3", seeds="0") == 0
    real, calls = train.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second epoch, after the first checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    assert run(tmp_path / "cut", "--epochs", "2", methods="mocov3", seeds="0") == 130
    cell = tmp_path / "cut" / "mocov3" / "0"
    assert read_checkpoint(cell / "checkpoint.pt", keys=("epoch",))["epoch"] == 1
    assert json.loads((cell / "cell.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "cut" / "compare.md").exists()
    monkeypatch.setattr(train, "train_one_epoch", real)
    assert run(tmp_path / "cut", "--epochs", "2", methods="mocov3", seeds="0") == 0
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "resume"] == [1]
    record = json.loads((cell / "cell.json").read_text())
    assert (record["status"], record["sessions"]) == ("trained", 2)
    straight = tmp_path / "straight" / "mocov3" / "0"
    _same_weights(straight / "checkpoint.pt", cell / "checkpoint.pt")
    assert _results(cell) == _results(straight)
    assert "(2 sessions)" in (tmp_path / "cut" / "compare.md").read_text()


BAD = [
    (["--methods", "mocov3,byol"], "unknown method 'byol' in --methods"),
    (["--methods", "mocov3:num_neighbors=3,snclr"], "mocov3 fixes num_neighbors=0"),
    (["--methods", "snclr-uniform:attention_temperature=0.1"], "uniform attention does not use"),
    (["--methods", "snclr:no_such_field=1"], "unknown option(s) no_such_field"),
    (["--methods", "snclr:attention_temperature=warm"], "attention_temperature must be float"),
    (["--methods", "snclr:attention_temperature"], "a flag must read FIELD=VALUE"),
    (["--methods", "snclr:epochs=3"], "budget and data every variant shares"),
    (["--methods", "snclr:seed=3"], "set by compare itself"),
    (["--methods", "snclr,snclr:attention_temperature=1.0"], "the same variant twice"),
    (["--methods", "snclr:num_neighbors=-1"], "num_neighbors must be >= 0"),
    (["--methods", "mocov3,snclr", "--num-neighbors", "3"], "--num-neighbors would be ignored"),
    (["--methods", "mocov3,snclr", "--seeds", "0,x"], "--seeds must be comma-separated"),
    (["--methods", "mocov3,snclr", "--baseline", "nnclr"], "--baseline 'nnclr' is not one"),
    (["--methods", "snclr", "--linear-protocol", "fancy"], "--linear-protocol must be one of"),
    (["--methods", "snclr", "--batch-size", "64"], "larger than the 48 training images"),
    (["--methods", "snclr", "--data", "no-such-data"], "neither a built-in"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[
    "method", "fixed", "unread", "field", "type", "syntax", "budget", "seed", "duplicate",
    "model", "global-fixed", "seeds", "baseline", "protocol", "batch", "data"])
def test_bad_method_or_flag_exits_2_with_one_line_before_anything_runs(
        argv, message, tmp_path, monkeypatch, capsys):
    _forbid_work(monkeypatch)
    argv = ["compare", "--output-dir", str(tmp_path / "cmp"), *TINY, *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("snclr compare: error: ")
    assert not (tmp_path / "cmp").exists()


def test_compare_under_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    _forbid_work(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run(tmp_path / "cmp") == 2
    assert "start it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_a_cell_trained_with_other_settings_is_refused_before_anything_runs(
        compared, monkeypatch, capsys):
    _forbid_work(monkeypatch)
    before = (compared / "compare.md").read_text()
    assert run(compared, "--lr", "0.01") == 2
    err = capsys.readouterr().err.strip()
    assert "cell " in err and "mocov3/0" in err and "lr 0.006 -> 0.01" in err and "\n" not in err
    assert (compared / "compare.md").read_text() == before


def test_a_diverged_cell_is_left_out_exits_3_and_is_not_retried(tmp_path, monkeypatch, capsys):
    assert run(tmp_path / "cmp", methods="mocov3,mocov3:lr=1e30", seeds="0") == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err == ("snclr compare: stopped: 1 of 2 cells diverged (mocov3:lr=1e30 seed 0); "
                   "the table leaves them out")
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Diverged cells, left out of the statistics: mocov3:lr=1e30 seed 0" in text
    _forbid_work(monkeypatch)
    assert run(tmp_path / "cmp", methods="mocov3,mocov3:lr=1e30", seeds="0") == 3


# ------------------------------------------------------ hostile inputs (issue 18, cases 10, 13)


@pytest.mark.parametrize("field, value", [
    ("device", "cpu"), ("num_workers", "1"), ("knn_k", "5"), ("log_every", "2"),
    ("backend", "torch"), ("knn_every", "2"), ("save_every", "2")])
def test_a_variant_differing_only_in_a_free_field_is_refused(field, value, tmp_path, monkeypatch,
                                                             capsys):
    _forbid_work(monkeypatch)
    argv = ["compare", "--output-dir", str(tmp_path / "cmp"), *TINY,
            "--methods", f"snclr,snclr:{field}={value}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"snclr compare: error: variant 'snclr:{field}={value}': {field} does not "
                   "change what a cell trains (it only observes or places the run), so the "
                   "variant would repeat another; give "
                   f"--{field.replace('_', '-')} for all")
    assert not (tmp_path / "cmp").exists()


def test_a_huge_seed_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    _forbid_work(monkeypatch)
    for seeds, message in (("9" * 5000, "--seeds must be comma-separated integers >= 0"),
                           ("99999999999999999999", "seed must be <= 4294967295")):
        assert run(tmp_path / "cmp", methods="mocov3", seeds=seeds) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and len(err) < 200
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("record, problem", [
    ({"evaluations": "x"}, "evaluations is 'x' (str)"),
    ({"evaluations": ["x"]}, "an evaluation is 'x' (str), not settings, results and wall_s"),
    ({"evaluations": [{"settings": {}, "results": {"top1_k20": "1"}, "wall_s": 1}]},
     "an evaluation is {"),
    ({"sessions": "2"}, "sessions is '2' (str)"),
    ([1, 2], "it holds [1, 2] (list), not an object"),
])
def test_a_cell_record_of_the_wrong_shape_exits_2_naming_it(compared, tmp_path, monkeypatch,
                                                            capsys, record, problem):
    import shutil

    copy = tmp_path / "cmp"
    shutil.copytree(compared, copy)
    (copy / "mocov3" / "1" / "cell.json").write_text(json.dumps(record))
    _forbid_work(monkeypatch)
    before = (copy / "compare.md").read_text()
    assert run(copy) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"mocov3/1/cell.json' is not a cell record of snclr compare: " \
        f"{problem}" in err and err.endswith("; remove it to re-evaluate the cell")
    assert (copy / "compare.md").read_text() == before
