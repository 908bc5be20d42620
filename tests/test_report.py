"""The run report: what it says about the run."""

import json

import pytest

from snclr.training.config import Config
from snclr.training.report import write_report


@pytest.mark.parametrize("method, line", [
    ("snclr", "- K = 5, queue 4096, T = 0.2"),
    ("mocov3", "- K = 0 (mocov3 fixes num_neighbors=0), queue 4096, T = 0.2"),
    ("nnclr", "- K = 1 (nnclr fixes num_neighbors=1), queue 4096, T = 0.2"),
])
def test_the_report_gives_the_k_the_method_trained_with(tmp_path, method, line):
    rows = [{"kind": "step", "epoch": 1, "step": 1, "loss": 2.0, "lr": 0.1},
            {"kind": "epoch", "epoch": 1, "step": 1, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = Config(method=method, num_neighbors=5).to_dict()
    text = write_report(tmp_path, config, histogram=[], wall_s=1.0).read_text()
    assert line in text.splitlines()
