"""The ``snclr`` command: help, config precedence, JSON output, exit status 2 on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snclr.training.cli import build_parser, config_from_args, main

REPO = Path(__file__).resolve().parents[1]
TINY_FLAGS = [
    "--limit-samples", "64", "--batch-size", "32", "--epochs", "1", "--queue-size", "64",
    "--projector-hidden", "32", "--projector-dim", "16", "--predictor-hidden", "32",
    "--num-workers", "0", "--knn-every", "0",
]


@pytest.mark.parametrize("command", ["pretrain", "knn", "linear", "demo", "compare"])
def test_help_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: snclr {command}" in capsys.readouterr().out


def test_python_dash_m_snclr_runs():
    result = subprocess.run([sys.executable, "-m", "snclr", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "pretrain" in result.stdout


def test_preset_then_config_file_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nlr: 0.5\noptimizer: lars\n")
    args = build_parser().parse_args(["pretrain", "--preset", "resnet50", "--config",
                                      str(tmp_path / "c.yaml"), "--lr", "0.25", "--threshold"])
    config = config_from_args(args)
    assert (config.encoder, config.epochs, config.lr, config.optimizer, config.threshold) == (
        "resnet50", 7, 0.25, "lars", True)
    assert config.queue_size == 128000 and config.temperature == 1.0
    (tmp_path / "c.json").write_text(json.dumps({"method": "nnclr"}))
    args = build_parser().parse_args(["pretrain", "--preset", "vit-small", "--config",
                                      str(tmp_path / "c.json")])
    vit = config_from_args(args)
    assert (vit.method, vit.encoder, vit.batch_size, vit.weight_decay, vit.warmup_epochs) == (
        "nnclr", "vit_small", 4096, 0.1, 40)



def test_trainer_option_flags():
    args = build_parser().parse_args([
        "pretrain", "--save-every-steps", "500", "--keep-last", "3", "--accumulate", "4",
        "--channels-last", "--compile"])
    config = config_from_args(args)
    assert (config.save_every_steps, config.keep_last, config.accumulate) == (500, 3, 4)
    assert config.channels_last and config.compile
    defaults = config_from_args(build_parser().parse_args(["pretrain"]))
    assert (defaults.save_every_steps, defaults.keep_last, defaults.accumulate) == (0, 0, 1)
    assert not defaults.channels_last and not defaults.compile


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "--encoder", "nope"], "unknown encoder"),
        (["pretrain", "--data", "missing-folder"], "neither a built-in"),
        (["pretrain", "--batch-size", "999"], "larger than the 64 training images"),
        (["pretrain", "--queue-size", "2", "--num-neighbors", "5"], "smaller than K=5"),
        (["pretrain", "--preset", "nope"], "unknown preset"),
        (["pretrain", "--epochs", "two"], "epochs must be int"),
        (["pretrain", "--num-workers", "-1"], "num_workers must be >= 0"),
        (["pretrain", "--config", "missing.yaml"], "does not exist"),
        (["knn", "--checkpoint", "missing.pt", "--data", "animal-mnist"], "does not exist"),
    ],
    ids=["encoder", "dataset", "batch", "queue", "preset", "type", "workers", "config-file",
         "checkpoint"],
)
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = TINY_FLAGS + ["--output-dir", str(tmp_path / "run")] if argv[0] == "pretrain" else []
    # Later flags win, so the case's own flag follows the tiny defaults.
    argv = [argv[0], *extra, *argv[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_config_file_with_unknown_option_exits_2(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("epochs: 1\nlearning_rate: 3\n")
    argv = ["pretrain", "--config", tmp_path / "bad.yaml", "--output-dir", tmp_path / "run"]
    assert main([str(a) for a in argv]) == 2
    assert "unknown option(s) learning_rate" in capsys.readouterr().err


def test_pretrain_then_knn_and_linear_json(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", *TINY_FLAGS, "--method", "mocov3", "--output-dir", str(run)]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "mocov3"
    capsys.readouterr()
    checkpoint = str(run / "checkpoint.pt")
    assert main(["knn", "--checkpoint", checkpoint, "--data", "animal-mnist", "--json",
                 "--limit-samples", "300"]) == 0
    knn = json.loads(capsys.readouterr().out)
    assert set(knn) == {"top1", "top1_k20", "top1_k200"}
    assert main(["knn", "--checkpoint", checkpoint, "--json", "--random-init",
                 "--limit-samples", "300"]) == 0
    random = json.loads(capsys.readouterr().out)
    assert 0 < random["top1"] <= 1
    assert main(["linear", "--checkpoint", checkpoint, "--data", "animal-mnist", "--epochs", "1",
                 "--json", "--limit-samples", "300"]) == 0
    linear = json.loads(capsys.readouterr().out)
    assert 0 < linear["top1"] <= 1 and linear["protocol"] == "cached"
    assert main(["linear", "--checkpoint", checkpoint, "--protocol", "augmented", "--epochs", "1",
                 "--json", "--limit-samples", "100"]) == 0
    augmented = json.loads(capsys.readouterr().out)
    assert 0 < augmented["top1"] <= 1 and augmented["protocol"] == "augmented"
    assert main(["linear", "--checkpoint", checkpoint, "--protocol", "fancy"]) == 2
    assert "protocol must be one of ('cached', 'augmented')" in capsys.readouterr().err


def test_corrupt_checkpoint_exits_2_without_traceback(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "snclr", "knn", "--checkpoint", str(tmp_path / "checkpoint.pt"),
         "--data", "animal-mnist"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "is not a checkpoint file (" in result.stderr and "Traceback" not in result.stderr
    assert "weights_only" not in result.stderr


@pytest.mark.parametrize("name", ["demo", "vit-small", "resnet50"])
def test_presets_are_valid(name):
    from snclr.training.config import preset, validate

    config = preset(name)
    validate(config)
    assert config.lr * config.batch_size / 256 > 0
