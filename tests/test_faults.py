"""What happens when (README): each probe of a user's data or a fault, run as a command.

Every test states the command, its exit status (0 done, 2 refused up front, 3 stopped), its
one-line message and what the run folder holds afterwards.
"""

import contextlib
import json
import re
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from datafiles import write_cifar, write_images
from torchrun import run_two_ranks

from snclr.model import SNCLR
from snclr.training.checkpoint import read_checkpoint
from snclr.training.cli import main

# 64 Animal-MNIST images, batch 16: 4 steps an epoch, about a second.
MODEL = ["--queue-size", "32", "--num-neighbors", "2", "--projector-hidden", "32",
         "--projector-dim", "16", "--predictor-hidden", "32", "--num-workers", "0",
         "--knn-every", "0", "--log-every", "1"]
TINY = ["--limit-samples", "64", "--batch-size", "16", "--epochs", "1", *MODEL]
RGB_32 = {"in_chans": 3, "img_size": 32}


def run(argv, capsys):
    """``snclr ARGV`` in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single message line of stderr (progress bars aside), with no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("snclr")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict | None:
    if not folder.exists():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl, every line parsed as strict JSON (no NaN or Infinity)."""
    def strict(token):
        raise ValueError(f"not JSON: {token}")

    return [json.loads(line, parse_constant=strict)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One finished epoch with two non-default hyperparameters."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    argv = ["pretrain", *TINY, "--threshold", "--lr", "0.004", "--output-dir", str(run_dir)]
    assert main(argv) == 0
    return run_dir


@pytest.fixture
def run_copy(base_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


# ------------------------------------------------------------- 1. the data's native size


@pytest.fixture(scope="module")
def folder_32(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder32")
    for c in range(2):
        write_images(root / "train" / f"class{c}", [32] * 20, seed=c)
    return root


def test_a_folder_of_32px_images_pretrains_at_32px_by_default(folder_32, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, _ = run(["pretrain", "--data", folder_32, "--batch-size", "16", "--epochs", "1",
                        *MODEL, "--output-dir", run_dir], capsys)
    assert code == 0
    assert "image size 32 px (the data's native size 32 px, fitted to small_cnn)" in out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["img_size"] == 32
    assert read_checkpoint(run_dir / "checkpoint.pt")["data_shape"] == RGB_32
    assert "- image size: 32 px" in (run_dir / "report.md").read_text()
    code, out, _ = run(["knn", "--checkpoint", run_dir / "checkpoint.pt", "--json"], capsys)
    assert code == 0 and 0 <= json.loads(out)["top1"] <= 1


def test_a_folder_of_mixed_sizes_trains_and_evaluates(tmp_path, capsys):
    root = tmp_path / "mixed"
    for c in range(2):
        sizes = [40, 300, 40, 40, 300, (300, 200), 40, 40, 300, 40]
        write_images(root / "train" / f"class{c}", sizes, seed=c)
    run_dir = tmp_path / "run"
    code, out, _ = run(["pretrain", "--data", root, "--batch-size", "8", "--epochs", "1", *MODEL,
                        "--output-dir", run_dir], capsys)
    assert code == 0 and "image size 40 px" in out
    checkpoint = run_dir / "checkpoint.pt"
    code, out, _ = run(["knn", "--checkpoint", checkpoint, "--json"], capsys)
    assert code == 0 and 0 <= json.loads(out)["top1"] <= 1
    code, out, _ = run(["linear", "--checkpoint", checkpoint, "--epochs", "1", "--json"], capsys)
    assert code == 0 and 0 <= json.loads(out)["top1"] <= 1


def test_cifar10_by_name_from_its_binary_files(tmp_path, capsys):
    write_cifar(tmp_path / "cifar", "cifar10", "bin")  # 40 train, 8 test images
    run_dir = tmp_path / "run"
    code, out, _ = run(["pretrain", "--data", f"cifar10:{tmp_path / 'cifar'}", "--batch-size", "16",
                        *MODEL, "--epochs", "1", "--output-dir", run_dir], capsys)
    assert code == 0 and "image size 32 px" in out
    assert read_checkpoint(run_dir / "checkpoint.pt")["data_shape"] == RGB_32
    code, out, _ = run(["knn", "--checkpoint", run_dir / "checkpoint.pt", "--json"], capsys)
    assert code == 0 and 0 <= json.loads(out)["top1"] <= 1
    argv = ["pretrain", "--data", f"stl10:{tmp_path}", "--output-dir", tmp_path / "r2"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "no stl10_binary/ with train_X.bin" in one_line(err)
    assert not (tmp_path / "r2").exists()


# -------------------------------------------------------------- 2. no silent non-finite run


@pytest.mark.parametrize("flag, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--warmup-epochs", "nan"), ("--weight-decay", "nan"),
    ("--temperature", "nan"), ("--attention-temperature", "inf"),
])
def test_non_finite_options_exit_2_before_the_run_folder_exists(tmp_path, capsys, flag, value):
    code, _, err = run(["pretrain", *TINY, flag, value, "--output-dir", tmp_path / "run"], capsys)
    name = flag[2:].replace("-", "_")
    assert code == 2 and f"{name} must be a finite number, got {value}" in one_line(err)
    assert not (tmp_path / "run").exists()


def test_divergence_after_a_resume_stops_and_keeps_the_good_checkpoint(run_copy, capsys):
    before = (run_copy / "checkpoint.pt").read_bytes()
    code, _, err = run(["pretrain", "--output-dir", run_copy, "--epochs", "2", "--lr", "1e30",
                        "--allow-config-change"], capsys)
    assert code == 3
    assert re.fullmatch(r"snclr pretrain: stopped: training diverged: the loss is nan at step "
                        r"[5-8] \(epoch 2\); checkpoint.pt still holds the last good state "
                        r"\(step 4\)", one_line(err))
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    assert [p.name for p in run_copy.glob("checkpoint*")] == ["checkpoint.pt"]  # no .tmp left
    logged = rows(run_copy)  # strict JSON: the NaN loss is null
    assert logged[-1]["kind"] == "step" and logged[-1]["loss"] is None


def test_a_run_that_diverges_before_its_first_checkpoint_writes_none(tmp_path, capsys):
    code, _, err = run(["pretrain", *TINY, "--lr", "1e30", "--output-dir", tmp_path / "run"],
                       capsys)
    assert code == 3
    assert re.search(r"training diverged: .* no checkpoint was written$", one_line(err))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    rows(tmp_path / "run")


def test_non_finite_weights_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    original, calls = SNCLR.momentum_update, []

    def poisoned(self, momentum):
        original(self, momentum)
        calls.append(momentum)
        if len(calls) == 4:  # the epoch's last step: its loss was computed before this
            with torch.no_grad():
                next(self.momentum_encoder.parameters()).fill_(float("nan"))

    monkeypatch.setattr(SNCLR, "momentum_update", poisoned)
    code, _, err = run(["pretrain", *TINY, "--output-dir", tmp_path / "run"], capsys)
    assert code == 3
    assert re.search(r"training diverged: non-finite values in model\.momentum_encoder\.\S+ after "
                     r"step 4; no checkpoint was written$", one_line(err))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_two_ranks_stop_together_on_a_non_finite_loss(tmp_path):
    result = run_two_ranks(["pretrain", *TINY, "--lr", "1e30", "--output-dir", tmp_path / "ddp"])
    assert result.returncode != 0  # and it returned: no rank was left waiting in a collective
    stopped = [line for line in result.stderr.splitlines()
               if line.startswith("snclr pretrain: stopped")]
    assert len(stopped) == 1 and "training diverged" in stopped[0], result.stderr[-3000:]
    assert "exitcode  : 3" in result.stderr  # torchrun's report of the ranks' exit status
    assert not (tmp_path / "ddp" / "checkpoint.pt").exists()


# ------------------------------------------------------------- 3. resume with the saved config


def test_resume_with_the_run_folder_alone_continues_as_saved(run_copy, capsys):
    checkpoint = (run_copy / "checkpoint.pt").read_bytes()
    # The finished run, given nothing but its folder (or its own command again): no change.
    assert run(["pretrain", "--output-dir", run_copy], capsys)[0] == 0
    same = ["pretrain", "--preset", "demo", *TINY, "--threshold", "--lr", "0.004",
            "--output-dir", run_copy]
    assert run(same, capsys)[0] == 0
    assert (run_copy / "checkpoint.pt").read_bytes() == checkpoint
    # More epochs: allowed, recorded, the schedules stretch; every other saved value stays.
    code, _, _ = run(["pretrain", "--output-dir", run_copy, "--epochs", "2"], capsys)
    assert code == 0
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    kept = (config["threshold"], config["lr"], config["limit_samples"], config["epochs"])
    assert kept == (True, 0.004, 64, 2)
    payload = read_checkpoint(run_copy / "checkpoint.pt")
    assert (payload["epoch"], payload["step"], payload["config"]["lr"]) == (2, 8, 0.004)
    changes = [r for r in rows(run_copy) if r["kind"] == "config_change"]
    assert changes == [{"kind": "config_change", "epoch": 1, "step": 4,
                        "changes": {"epochs": [1, 2]}, "optimizer_state": "kept"}]
    assert "- at step 4 (epoch 1): epochs 1 -> 2" in (run_copy / "report.md").read_text()
    before = snapshot(run_copy)
    code, _, err = run(["pretrain", "--output-dir", run_copy, "--epochs", "1"], capsys)
    assert code == 2
    assert "epochs=1 is fewer than the 2 epochs this run folder has completed" in one_line(err)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize(
    "flags, listing",
    [
        (["--num-neighbors", "3"], "num_neighbors 2 -> 3"),
        (["--lr", "0.01"], "lr 0.004 -> 0.01"),
        (["--temperature", "0.3"], "temperature 0.2 -> 0.3"),
        (["--batch-size", "32"], "batch_size 16 -> 32"),
        (["--seed", "1"], "seed 0 -> 1"),
        (["--bank-mode", "global"], "bank_mode 'local' -> 'global'"),
        (["--no-threshold"], "threshold True -> False"),
        (["--optimizer", "lars", "--lr", "0.3"], "optimizer 'adamw' -> 'lars', lr 0.004 -> 0.3"),
    ],
    ids=["K", "lr", "T", "batch", "seed", "bank-mode", "threshold", "optimizer"],
)
def test_changed_hyperparameters_exit_2_listing_them_and_change_nothing(run_copy, capsys, flags,
                                                                        listing):
    before = snapshot(run_copy)
    code, _, err = run(["pretrain", "--output-dir", run_copy, *flags], capsys)
    assert code == 2
    assert f"trained with other settings ({listing}); omit those options to resume as saved, or " \
           "pass --allow-config-change" in one_line(err)
    assert snapshot(run_copy) == before


def test_allowed_changes_are_recorded_and_a_new_optimizer_starts_fresh(run_copy, capsys):
    code, _, _ = run(["pretrain", "--output-dir", run_copy, "--epochs", "2", "--optimizer", "lars",
                      "--lr", "0.3", "--allow-config-change"], capsys)
    assert code == 0
    (change,) = [r for r in rows(run_copy) if r["kind"] == "config_change"]
    assert change["changes"] == {"epochs": [1, 2], "optimizer": ["adamw", "lars"],
                                 "lr": [0.004, 0.3]}
    assert change["optimizer_state"] == "reset"
    report = (run_copy / "report.md").read_text()
    assert "optimizer adamw -> lars, lr 0.004 -> 0.3; optimiser state reset" in report
    assert read_checkpoint(run_copy / "checkpoint.pt")["config"]["optimizer"] == "lars"


def test_options_that_only_observe_or_place_the_run_may_change(run_copy, capsys):
    code, _, _ = run(["pretrain", "--output-dir", run_copy, "--epochs", "2", "--log-every", "2",
                      "--knn-k", "5", "--save-every", "2", "--device", "cpu", "--backend", "torch"],
                     capsys)
    assert code == 0
    (change,) = [r for r in rows(run_copy) if r["kind"] == "config_change"]
    assert change["changes"] == {"epochs": [1, 2]}
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["log_every"] == 2


# ----------------------------------------------- 4. one line, exit 2, before anything changes


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backend", "bogus"], "backend must be one of ('auto', 'torch', 'triton'), got 'bogus'"),
        (["--backend", "triton"], "backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1)"),
        (["--attention-temperature", "0"], "attention_temperature must be > 0, got 0.0"),
        (["--attention-temperature", "nan"],
         "attention_temperature must be a finite number, got nan"),
    ],
    ids=["backend", "triton-on-cpu", "attention-zero", "attention-nan"],
)
def test_bad_backend_or_attention_temperature_leaves_the_folder_alone(run_copy, capsys, monkeypatch,
                                                                      flags, message):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a plain CPU machine
    before = snapshot(run_copy)
    argv = ["pretrain", "--output-dir", run_copy, *flags, "--allow-config-change"]
    code, _, err = run(argv, capsys)
    assert code == 2 and message in one_line(err)
    assert snapshot(run_copy) == before
    fresh = run_copy.parent / "fresh"
    code, _, err = run(["pretrain", *TINY, *flags, "--output-dir", fresh], capsys)
    assert code == 2 and message in one_line(err) and not fresh.exists()


def test_device_cuda_without_cuda_exits_2_for_pretrain_knn_and_linear(base_run, tmp_path,
                                                                      capsys, monkeypatch):
    """Evaluation used to fall back to the CPU silently where training refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = "device 'cuda' requested but CUDA is not available"
    code, _, err = run(["pretrain", *TINY, "--device", "cuda", "--output-dir", tmp_path / "run"],
                       capsys)
    assert code == 2 and message in one_line(err) and not (tmp_path / "run").exists()
    for command in ("knn", "linear"):
        argv = [command, "--checkpoint", base_run / "checkpoint.pt", "--device", "cuda"]
        code, out, err = run(argv, capsys)
        assert code == 2 and message in one_line(err) and out == ""


@pytest.mark.parametrize(
    "where, message",
    [
        ("file", "output_dir '{path}' is a file, not a folder"),
        ("under-file", "output_dir '{path}' cannot be created: '{file}' is a file"),
        ("not-creatable", "output_dir '{path}' cannot be created"),
    ],
)
def test_an_output_dir_that_cannot_be_a_folder_exits_2(tmp_path, capsys, where, message):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    path = {"file": file, "under-file": file / "run",
            "not-creatable": Path("/proc/snclr-cannot-create/run")}[where]
    code, _, err = run(["pretrain", *TINY, "--output-dir", path], capsys)
    assert code == 2 and message.format(path=path, file=file) in one_line(err)
    assert file.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "damage, reason",
    [(lambda p: p.write_bytes(b""), "UnidentifiedImageError"),
     (lambda p: p.write_text("<html>not a picture</html>"), "UnidentifiedImageError")],
    ids=["zero-byte", "fake"],  # a truncated file with a sound header: tests/test_scan.py
)
def test_an_unreadable_image_stops_pretrain_and_knn_before_they_start(folder_32, base_run, tmp_path,
                                                                      capsys, damage, reason):
    root = tmp_path / "data"
    shutil.copytree(folder_32, root)
    damage(root / "train" / "class1" / "7.png")
    code, _, err = run(["pretrain", "--data", root, "--batch-size", "16", *MODEL,
                        "--output-dir", tmp_path / "run"], capsys)
    line = one_line(err)
    assert code == 2 and re.search(rf"1 of 40 image files in '{root}/train' cannot be read, e.g. "
                                   rf"'{root}/train/class1/7.png' \({reason}.*\); remove or "
                                   "replace them", line)
    assert not (tmp_path / "run").exists()
    code, _, err = run(["knn", "--checkpoint", base_run / "checkpoint.pt", "--data", root], capsys)
    assert code == 2 and "1 of 40 image files" in one_line(err)


@pytest.mark.parametrize(
    "flags, message",
    [(["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
     (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
     (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
     (["--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
     (["--num-workers", "-1"], "num_workers must be an integer >= 0, got -1")],
)
def test_linear_refuses_bad_epochs_and_lr(base_run, capsys, flags, message):
    code, out, err = run(["linear", "--checkpoint", base_run / "checkpoint.pt", *flags], capsys)
    assert code == 2 and message in one_line(err) and out == ""


def _crafted(path: Path, **entries):
    torch.save({"format": "snclr-checkpoint-v1", **entries}, path)


def test_knn_and_linear_refuse_a_checkpoint_with_nan_weights(base_run, tmp_path, capsys):
    payload = read_checkpoint(base_run / "checkpoint.pt")
    payload["model"]["encoder.features.0.weight"][0] = float("nan")
    _crafted(tmp_path / "nan.pt", **{k: v for k, v in payload.items() if k != "format"})
    for command in ("knn", "linear"):
        code, out, err = run([command, "--checkpoint", tmp_path / "nan.pt"], capsys)
        assert code == 2 and out == ""
        assert "holds non-finite weights (NaN or infinity in 1 tensors of the encoder, e.g. " \
               "features.0.weight)" in one_line(err)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _crafted(p, model={}), "is incomplete: it has no 'config', 'data_shape'"),
        (lambda p: _crafted(p, model=torch.nn.Linear(2, 2)),
         "was refused: it holds objects other than tensors and plain values (torch.nn"),
        (lambda p: p.mkdir(), "is a directory, not a checkpoint file"),
        (lambda p: p.write_bytes(bytes(range(256)) * 16), "is not a checkpoint file (Unsupported"),
    ],
    ids=["missing-keys", "objects", "directory", "random-bytes"],
)
def test_a_bad_checkpoint_is_named_for_what_it_is(tmp_path, capsys, make, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    make(run_dir / "checkpoint.pt")
    before = snapshot(run_dir)
    for argv in (["knn", "--checkpoint", run_dir / "checkpoint.pt", "--data", "animal-mnist"],
                 ["pretrain", *TINY, "--output-dir", run_dir]):
        code, _, err = run(argv, capsys)
        assert code == 2 and message in one_line(err)
        assert "weights_only" not in err and "Weights only" not in err
        assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    "name, text, message",
    [("c.yaml", "epochs: true\n", "epochs must be int, got True"),
     ("c.yaml", "threshold: 2\n", "threshold must be bool, got 2"),
     ("c.yaml", "epochs: 1\nlr: 0.01\nepochs: 2\n", "duplicate key 'epochs' (lines 1 and 3)"),
     ("c.json", '{"epochs": 1, "epochs": 2}', "duplicate key 'epochs'")],
    ids=["bool-for-int", "int-for-bool", "duplicate-yaml", "duplicate-json"],
)
def test_config_files_are_read_strictly(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    argv = ["pretrain", *TINY, "--config", tmp_path / name, "--output-dir", tmp_path / "r"]
    code, _, err = run(argv, capsys)
    assert code == 2 and message in one_line(err) and not (tmp_path / "r").exists()


# ------------------------------------------------------------------ 5. metrics after kills


def test_a_resume_after_a_kill_logs_each_step_once(run_copy, capsys):
    # A kill during epoch 2, after two rows were logged and in the middle of writing a third.
    with (run_copy / "metrics.jsonl").open("a") as f:
        for step in (5, 6):
            f.write(json.dumps({"kind": "step", "epoch": 2, "step": step, "loss": 1.0}) + "\n")
        f.write('{"kind": "step", "epoch": 2, "st')
    with (run_copy / "metrics.csv").open("a") as f:
        f.write("step,2,5,1.0\nstep,2,6,1.0\n")
    code, _, err = run(["pretrain", "--output-dir", run_copy, "--epochs", "2"], capsys)
    assert code == 0 and "warning: truncated 1 torn line(s)" in err
    logged = rows(run_copy)
    steps = [r["step"] for r in logged if r["kind"] == "step"]
    assert steps == list(range(1, 9))
    assert [r["epoch"] for r in logged if r["kind"] == "epoch"] == [1, 2]
    (resume,) = [r for r in logged if r["kind"] == "resume"]
    assert resume == {"kind": "resume", "epoch": 1, "step": 4, "dropped_rows": 2, "torn_lines": 1}
    csv_rows = (run_copy / "metrics.csv").read_text().splitlines()[1:]
    assert [tuple(r.split(",")[:3]) for r in csv_rows] == [
        (r["kind"], str(r["epoch"]), str(r["step"]))
        for r in logged if r["kind"] in ("step", "epoch")]
    report = (run_copy / "report.md").read_text()
    assert report.count("\n| 1 |") == report.count("\n| 2 |") == 1
    assert "- resumed at step 4 (epoch 1): dropped 2 logged rows past it, 1 torn lines" in report


# ------------------------------------------------- round two, 1. val/ indexed by train's classes


def test_a_val_folder_lacking_a_train_class_keeps_trains_labels(tmp_path, capsys):
    from snclr.training.data import load_splits

    for c in range(3):
        write_images(tmp_path / "train" / f"c{c}", [32] * 4, seed=c)
    for c in (1, 2):
        write_images(tmp_path / "val" / f"c{c}", [32] * 3, seed=c)
    splits = load_splits(str(tmp_path))
    assert sorted(set(splits["test"].labels.tolist())) == [1, 2]
    assert splits["test"].num_classes == 3
    assert "warning: val/ lacks 1 of train/'s classes, e.g. 'c0'" in capsys.readouterr().err


def test_a_val_class_that_train_lacks_exits_2_before_the_run_folder_exists(tmp_path, capsys):
    for c in range(2):
        write_images(tmp_path / "data" / "train" / f"c{c}", [32] * 4, seed=c)
    write_images(tmp_path / "data" / "val" / "c9", [32] * 3)
    code, _, err = run(["pretrain", "--data", tmp_path / "data", *TINY,
                        "--output-dir", tmp_path / "run"], capsys)
    assert code == 2
    assert "class folder(s) that train/ lacks, e.g. 'c9'" in one_line(err)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------- round two, 2. one process per run folder


def test_a_second_process_on_a_locked_run_folder_exits_2_and_changes_nothing(run_copy, capsys):
    from snclr.training import runlock

    before = snapshot(run_copy)
    runlock.acquire(run_copy)  # as another process would hold it (a fresh open file)
    fd = runlock._held.pop(str(run_copy.resolve()))
    try:
        code, _, err = run(["pretrain", "--epochs", "2", "--output-dir", run_copy], capsys)
    finally:
        import os
        os.close(fd)
    assert code == 2
    assert "another snclr process is using" in one_line(err)
    assert snapshot(run_copy) == before


# ------------------------------- round two, 3, 8 and 11. the folder walk: links, dot-names, FIFOs


def test_dot_folders_and_dot_files_are_not_classes_or_images(tmp_path):
    from snclr.training.datasets import scan_folder

    for c in range(2):
        write_images(tmp_path / "train" / f"c{c}", [32] * 3, seed=c)
    write_images(tmp_path / "train" / ".ipynb_checkpoints", [32] * 2)
    write_images(tmp_path / "train" / "c0" / ".cache", [32] * 2)
    shutil.copy(tmp_path / "train" / "c0" / "0.png", tmp_path / "train" / "c0" / ".hidden.png")
    scan = scan_folder(tmp_path / "train")
    assert scan.classes == ["c0", "c1"]
    assert [Path(f).name for f in scan.files] == ["0.png", "1.png", "2.png"] * 2
    assert scan.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_fifo_named_png_is_skipped_and_the_scan_ends(tmp_path):
    import os

    from snclr.training.datasets import scan_folder

    write_images(tmp_path / "train" / "c0", [32] * 3)
    os.mkfifo(tmp_path / "train" / "c0" / "x.png")
    scan = scan_folder(tmp_path / "train")  # opening the FIFO would block forever
    assert sorted(Path(f).name for f in scan.files) == ["0.png", "1.png", "2.png"]


def test_a_symlink_loop_neither_multiplies_a_class_nor_leaks_into_the_test_split(tmp_path, capsys):
    import os

    from snclr.training.data import load_splits
    from snclr.training.datasets import scan_folder

    for c in range(3):
        write_images(tmp_path / "train" / f"c{c}", [32] * 12, seed=c)
    os.symlink(".", tmp_path / "train" / "c0" / "loop")
    os.symlink("../c0", tmp_path / "train" / "c1" / "other")  # c0's files, reached again
    os.symlink("0.png", tmp_path / "train" / "c2" / "again.png")
    scan = scan_folder(tmp_path / "train")
    assert len(scan.files) == 36
    assert len({os.path.realpath(f) for f in scan.files}) == 36
    assert scan.labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    splits = load_splits(str(tmp_path))
    train = {os.path.realpath(f) for f in splits["train"].files}
    test = {os.path.realpath(f) for f in splits["test"].files}
    assert len(train) + len(test) == 36 and not train & test


# ----------------------------------------------- round two, 4. 16-bit and float images scaled


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_white(tmp_path):
    import numpy as np
    from PIL import Image

    from snclr.training.data import load_splits, to_rgb

    ramp = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 65535 // (64 * 64 - 1))
    folder = tmp_path / "train" / "c0"
    folder.mkdir(parents=True)
    Image.fromarray(ramp.astype(np.uint16)).save(folder / "wide.png")
    write_images(tmp_path / "train" / "c1", [64])
    splits = load_splits(str(tmp_path))
    files = list(splits["train"].files) + list(splits["test"].files)
    with Image.open(next(f for f in files if f.endswith("wide.png"))) as image:
        assert image.mode.startswith("I")  # what PIL opens a 16-bit PNG as
        pixels = np.asarray(to_rgb(image))
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) == 256
    for mode, values, top in [("I;16B", np.array([[0, 65535]], ">u2"), 255),
                              ("I", np.array([[0, 70000]], np.int32), 255),
                              ("I", np.array([[0, 200]], np.int32), 200),
                              ("F", np.array([[0.0, 0.5]], np.float32), 128),
                              ("F", np.array([[-1.0, np.nan, 3.0]], np.float32), 255)]:
        image = Image.frombytes(mode, (values.shape[1], 1), values.tobytes())
        assert np.asarray(to_rgb(image))[0, :, 0].max() == top, mode


# ----------- round two, 2 (rest), 5, 6, 7. temporary files, foreign folders, full disks, signals


_K = TINY.index("--num-neighbors")
COMPARE = TINY[:_K] + TINY[_K + 2:]  # mocov3 fixes K = 0: compare refuses a K flag


def _ours_left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_writes_use_a_temporary_name_unique_to_the_process(tmp_path):
    import os

    from snclr.training.runfiles import write_atomically

    seen = []
    write_atomically(tmp_path / "checkpoint.pt", lambda f: seen.append(_ours_left(tmp_path)))
    assert seen == [[f"checkpoint.pt.snclr-{os.getpid()}.tmp"]]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_start_removes_the_temporary_files_a_killed_write_left(run_copy, capsys):
    (run_copy / "checkpoint.pt.snclr-4242.tmp").write_bytes(b"PK\x03\x04 partial")
    (run_copy / "checkpoint.pt.tmp").write_bytes(b"partial, by an earlier version")
    (run_copy / "notes.tmp").write_text("the user's own")  # not one of ours: kept
    code, _, err = run(["pretrain", "--output-dir", run_copy, "--epochs", "2"], capsys)
    assert code == 0
    assert "warning: removed 2 temporary file(s) an interrupted write left: checkpoint.pt.snclr-" \
           "4242.tmp, checkpoint.pt.tmp" in err
    assert _ours_left(run_copy) == ["notes.tmp"]
    assert read_checkpoint(run_copy / "checkpoint.pt", keys=("step",))["step"] == 8


def test_a_second_compare_on_a_locked_folder_exits_2_and_writes_nothing(tmp_path, capsys):
    import os

    from snclr.training import runlock

    folder = tmp_path / "cmp"
    folder.mkdir()
    runlock.acquire(folder)  # as another snclr compare would hold it
    fd = runlock._held.pop(str(folder.resolve()))
    try:
        code, _, err = run(["compare", "--methods", "mocov3", "--seeds", "0", *COMPARE,
                            "--output-dir", folder], capsys)
    finally:
        os.close(fd)
    assert code == 2 and f"another snclr process is using '{folder}'" in one_line(err)
    assert list(folder.iterdir()) == []


def test_a_compare_rerun_accepts_its_folder_and_removes_a_cells_stale_files(tmp_path, capsys):
    folder = tmp_path / "cmp"
    argv = ["compare", "--methods", "mocov3", "--seeds", "0", *COMPARE, "--linear-epochs", "1",
            "--output-dir", folder]
    assert run(argv, capsys)[0] == 0
    cell = folder / "mocov3" / "0"
    (cell / "cell.json.snclr-4242.tmp").write_text('{"status": "tr')
    (folder / "compare.md").unlink()  # a comparison stopped before its table: still one
    record = (cell / "cell.json").read_bytes()
    assert run(argv, capsys)[0] == 0
    assert _ours_left(cell) == [] and (cell / "cell.json").read_bytes() == record


@pytest.mark.parametrize("command", ["pretrain", "compare"])
def test_a_foreign_non_empty_folder_or_an_empty_name_is_refused_as_output_dir(
        tmp_path, capsys, monkeypatch, command):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("project: my thesis\n")
    (folder / "metrics.jsonl").write_text('{"accuracy": 0.9}\n')
    (folder / "report.md").write_text("my report")
    before = snapshot(folder)
    argv = ["pretrain", *TINY] if command == "pretrain" else [
        "compare", "--methods", "mocov3", "--seeds", "0", *COMPARE]
    code, _, err = run([*argv, "--output-dir", folder], capsys)
    flag = "output_dir" if command == "pretrain" else "--output-dir"
    assert code == 2 and f"{flag} '{folder}' holds files but is not a snclr " in one_line(err)
    assert snapshot(folder) == before
    monkeypatch.chdir(folder)
    code, _, err = run([*argv, "--output-dir", ""], capsys)
    assert code == 2 and f"{flag} is empty" in one_line(err)
    assert snapshot(folder) == before


def test_what_marks_a_run_folder(base_run, tmp_path):
    from snclr.training.runfiles import is_run_folder

    assert is_run_folder(base_run)
    (tmp_path / "config.yaml").write_text((base_run / "config.yaml").read_text())
    assert is_run_folder(tmp_path)  # a run stopped before its first checkpoint
    (tmp_path / "config.yaml").write_text("epochs: 1\nproject: mine\n")
    assert not is_run_folder(tmp_path)
    (tmp_path / "config.yaml").write_text(": not yaml [")
    assert not is_run_folder(tmp_path)


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail with EFBIG, as writes to a full disk fail with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_full_disk_at_a_checkpoint_stops_with_exit_3_and_the_resume_is_exact(
        base_run, run_copy, tmp_path, capsys):
    before = (run_copy / "checkpoint.pt").read_bytes()
    with file_size_limit(1 << 20):  # the checkpoint is several MB, the logs a few KB
        code, _, err = run(["pretrain", "--output-dir", run_copy, "--epochs", "2"], capsys)
    assert code == 3
    assert one_line(err) == (f"snclr pretrain: stopped: cannot write '{run_copy}/checkpoint.pt' "
                             "(File too large); checkpoint.pt still holds the last good state "
                             "(step 4)")
    assert (run_copy / "checkpoint.pt").read_bytes() == before
    assert _ours_left(run_copy) == []
    rows(run_copy)
    # Space freed: the rerun resumes from step 4 and ends where an uninterrupted run ends.
    assert run(["pretrain", "--output-dir", run_copy, "--epochs", "2"], capsys)[0] == 0
    straight = tmp_path / "straight"
    shutil.copytree(base_run, straight)
    assert run(["pretrain", "--output-dir", straight, "--epochs", "2"], capsys)[0] == 0
    left, right = (read_checkpoint(p / "checkpoint.pt")["model"] for p in (run_copy, straight))
    assert all(torch.equal(left[name], right[name]) for name in left)


def test_a_full_disk_at_resume_exits_3_and_changes_nothing(run_copy, capsys):
    before = snapshot(run_copy)
    with file_size_limit(200):  # config.yaml, written first, is larger
        code, _, err = run(["pretrain", "--output-dir", run_copy, "--epochs", "2"], capsys)
    assert code == 3
    assert one_line(err) == (f"snclr pretrain: stopped: cannot write '{run_copy}/config.yaml' "
                             "(File too large); checkpoint.pt still holds the last good state "
                             "(step 4)")
    assert snapshot(run_copy) == before


def test_a_full_disk_writing_metrics_exits_3_and_the_torn_line_is_cut_at_resume(run_copy, capsys):
    with (run_copy / "metrics.jsonl").open("a") as f:
        f.write("\n" * 8192)  # blank lines (skipped by readers): the log is the largest file
    with file_size_limit((run_copy / "metrics.jsonl").stat().st_size + 20):
        code, _, err = run(["pretrain", "--output-dir", run_copy, "--epochs", "2"], capsys)
    assert code == 3
    assert one_line(err) == (f"snclr pretrain: stopped: cannot write '{run_copy}/metrics.jsonl' "
                             "(File too large); checkpoint.pt still holds the last good state "
                             "(step 4)")
    assert _ours_left(run_copy) == []
    code, _, err = run(["pretrain", "--output-dir", run_copy, "--epochs", "2"], capsys)
    assert code == 0 and "warning: truncated 1 torn line(s)" in err
    steps = [r["step"] for r in rows(run_copy) if r.get("kind") == "step"]
    assert steps == list(range(1, 9))


# Each step sleeps 0.2 s, so a signal sent after step 5 is logged lands in the run.
_SLOW = """
import sys, time
from snclr.model import SNCLR
from snclr.training.cli import main
update = SNCLR.momentum_update
SNCLR.momentum_update = lambda self, m: (time.sleep(0.2), update(self, m))[1]
sys.exit(main(sys.argv[1:]))
"""


def _signal_after_step(argv: list, metrics: Path, signum: int, *, step: int = 5):
    """Run ``snclr ARGV`` slowly in a subprocess; send ``signum`` once ``metrics`` logs
    ``step``; (exit status, stderr)."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _SLOW, *map(str, argv)], stdout=subprocess.DEVNULL,
            stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 300
            while not any(r.get("step", 0) >= step for r in _logged(metrics)):
                assert child.poll() is None and time.monotonic() < deadline, "no step logged"
                time.sleep(0.05)
            child.send_signal(signum)
            code = child.wait(timeout=120)
        finally:
            child.kill()
        stderr.seek(0)
        return code, stderr.read()


def _logged(metrics: Path) -> list[dict]:
    from snclr.training.metrics import read_rows

    return read_rows(metrics)[0]


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_an_interrupted_pretrain_says_what_it_kept_and_the_rerun_resumes(tmp_path, capsys,
                                                                          signum, status):
    run_dir = tmp_path / "run"
    argv = ["pretrain", *TINY, "--epochs", "3", "--output-dir", run_dir]
    code, err = _signal_after_step(argv, run_dir / "metrics.jsonl", signum)
    assert code == status, err
    line = one_line(err)
    match = re.fullmatch(r"snclr pretrain: interrupted at step (\d+); checkpoint of step (\d+) "
                         r"kept; rerun the same command to resume; report.md covers the steps "
                         r"so far", line)
    assert match, line
    at, kept = map(int, match.groups())
    assert at >= 5 and kept == read_checkpoint(run_dir / "checkpoint.pt", keys=("step",))["step"]
    assert f"interrupted at step {at}" in (run_dir / "report.md").read_text()
    assert _ours_left(run_dir) == []
    assert run(argv, capsys)[0] == 0
    assert [r["step"] for r in rows(run_dir) if r["kind"] == "step"] == list(range(1, 13))


def test_ctrl_c_before_the_first_checkpoint_or_before_training_says_so(tmp_path, capsys,
                                                                       monkeypatch):
    from snclr.training import train

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_one_epoch", interrupt)
    run_dir = tmp_path / "run"
    code, _, err = run(["pretrain", *TINY, "--output-dir", run_dir], capsys)
    assert code == 130
    assert one_line(err) == ("snclr pretrain: interrupted at step 0; no checkpoint was written; "
                             "rerun the same command to start again; report.md covers the steps "
                             "so far")
    assert not (run_dir / "checkpoint.pt").exists() and (run_dir / "report.md").is_file()
    monkeypatch.setattr(train, "load_splits", interrupt)
    code, _, err = run(["pretrain", *TINY, "--output-dir", tmp_path / "new"], capsys)
    assert code == 130
    assert one_line(err) == ("snclr pretrain: interrupted before training started; rerun the "
                             "same command")
    assert not (tmp_path / "new").exists()


def test_an_interrupted_compare_names_the_cell_and_what_it_kept(tmp_path):
    folder = tmp_path / "cmp"
    argv = ["compare", "--methods", "mocov3", "--seeds", "0,1", *COMPARE, "--epochs", "3",
            "--linear-epochs", "1", "--output-dir", folder]
    code, err = _signal_after_step(argv, folder / "mocov3" / "0" / "metrics.jsonl",
                                   signal.SIGTERM)
    assert code == 143, err
    assert re.fullmatch(r"snclr compare: cell mocov3/0: interrupted at step \d+; checkpoint of "
                        r"step \d+ kept; rerun the same command to resume; report.md covers the "
                        r"steps so far; compare.md not written \(2 of 2 cells unfinished\)",
                        one_line(err))
    assert json.loads((folder / "mocov3" / "0" / "cell.json").read_text())["status"] == \
        "interrupted"
    assert not (folder / "compare.md").exists() and not (folder / "mocov3" / "1").exists()


# ------------------------------------------ round two, 10. hostile values, files and streams


def _crafted_copy(run_dir: Path, change) -> dict:
    """Rewrite run_dir's checkpoint with ``change(payload)`` applied; the folder's snapshot."""
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    change(payload)
    torch.save(payload, run_dir / "checkpoint.pt")
    return snapshot(run_dir)


def _set(*path, value):
    def change(payload):
        entry = payload
        for key in path[:-1]:
            entry = entry[key]
        entry[path[-1]] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set("optimizer", value={}), "is malformed: optimizer must hold state and param_groups, "
                                  "got {} (dict)"),
    (lambda p: p["rng"].pop("numpy"), "is malformed: rng must hold the torch, numpy and python "
                                      "states"),
    (_set("epoch", value="1"), "is malformed: epoch must be an integer >= 0, got '1' (str)"),
    (_set("step", value=-3), "is malformed: step must be an integer >= 0, got -3 (int)"),
    (_set("data_shape", "img_size", value=-5), "is malformed: data_shape must hold in_chans "
                                               "(1 to 64) and img_size (1 to 4096)"),
    (_set("data_shape", "img_size", value=100_000), "img_size (1 to 4096), got {'img_size': "
                                                    "100000, 'in_chans': 1} (dict)"),
    (_set("model", "bank.pointer", value=torch.tensor(10**6)),
     "bank.pointer must be one integer from 0 to 31, got 1000000"),
    (_set("model", "bank.filled", value=torch.tensor(2.5)),
     "bank.filled must be one integer from 0 to 32, got 2.5"),
    (_set("optimizer", "param_groups", value=[{"params": [0]}]),
     "the checkpoint's optimizer state does not fit this model ("),
    (lambda p: p["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
     "optimizer state does not fit this model (exp_avg of shape (3,) for a parameter of shape"),
    (_set("rng", "python", "internal", value=[0] * 3), "rng.python must hold version, internal"),
], ids=["optimizer-empty", "rng-no-numpy", "epoch-str", "step-negative", "img-size-negative",
        "img-size-huge", "bank-pointer", "bank-filled-float", "optimizer-groups",
        "optimizer-moment-shape", "rng-python"])
def test_a_crafted_checkpoint_exits_2_before_the_run_folder_changes(run_copy, capsys, change,
                                                                    message):
    before = _crafted_copy(run_copy, change)
    code, _, err = run(["pretrain", "--output-dir", run_copy, "--epochs", "2"], capsys)
    assert code == 2 and message in one_line(err)
    assert snapshot(run_copy) == before


def test_knn_refuses_a_checkpoint_with_a_huge_img_size(run_copy, capsys):
    _crafted_copy(run_copy, _set("data_shape", "img_size", value=100_000))
    code, out, err = run(["knn", "--checkpoint", run_copy / "checkpoint.pt"], capsys)
    assert code == 2 and out == "" and "is malformed: data_shape must hold" in one_line(err)


@pytest.mark.parametrize("argv, message", [
    (["--queue-size", "100000000000"], "queue_size must be <= 67108864, got 100000000000 (int)"),
    (["--queue-size", "1e30"], "queue_size must be int, got '1e30' (str)"),
    (["--seed", "99999999999999999999999"], "seed must be <= 4294967295"),
    (["--epochs", "9" * 5000], "epochs has 5000 digits, more than any valid value"),
    (["--device", "x" * 5000], "device must be one of"),
])
def test_huge_option_values_exit_2_with_a_short_line(tmp_path, capsys, argv, message):
    code, _, err = run(["pretrain", *TINY, *argv, "--output-dir", tmp_path / "run"], capsys)
    line = one_line(err)
    assert code == 2 and message in line and len(line) < 250
    assert not (tmp_path / "run").exists()


def test_a_yaml_alias_bomb_exits_2_with_a_short_line_and_no_run_folder(tmp_path, capsys):
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join([*levels, "epochs: *a8"]) + "\n")  # 9**9
    code, _, err = run(["pretrain", *TINY, "--config", tmp_path / "bomb.yaml",
                        "--output-dir", tmp_path / "run"], capsys)
    line = one_line(err)
    assert code == 2 and "aliases expand to more than 1000 values" in line and len(line) < 250
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("labels, kind", [
    (["3"] * 8, "str32"), ([[1, 2]] * 8, "nested"), ([[1], [2, 3]] * 4, "nested"),
    ([1.0, 2.7] * 4, "float64"), ([True, False] * 4, "bool")],
    ids=["strings", "nested", "ragged", "floats", "bools"])
def test_cifar_labels_that_are_not_integers_exit_2_naming_the_file(tmp_path, capsys, labels,
                                                                   kind):
    import pickle

    write_cifar(tmp_path / "cifar", "cifar10", "py")
    batch_file = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3"
    batch = pickle.loads(batch_file.read_bytes())
    batch_file.write_bytes(pickle.dumps({**batch, "labels": labels}, protocol=2))
    code, _, err = run(["pretrain", "--data", f"cifar10:{tmp_path / 'cifar'}", *TINY,
                        "--output-dir", tmp_path / "run"], capsys)
    assert code == 2
    assert (f"data_batch_3' is not a CIFAR python batch: 'labels' must be one integer per "
            f"image, got {kind} values") in one_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [
    ["pretrain", *TINY, "--output-dir", "{long}"], ["pretrain", *TINY, "--output-dir", "{long}/x"],
    ["pretrain", *TINY, "--data", "{long}", "--output-dir", "{tmp}/run"],
    ["pretrain", *TINY, "--config", "{long}", "--output-dir", "{tmp}/run"],
    ["knn", "--checkpoint", "{long}"], ["linear", "--checkpoint", "{tmp}/c.pt", "--data", "{long}"],
    ["compare", "--methods", "snclr", "--output-dir", "{long}"],
], ids=["output-dir", "under-output-dir", "data", "config", "checkpoint", "eval-data", "compare"])
def test_a_path_name_too_long_for_the_file_system_exits_2_in_one_line(base_run, tmp_path, capsys,
                                                                     command):
    shutil.copy(base_run / "checkpoint.pt", tmp_path / "c.pt")
    long = str(tmp_path / ("a" * 300))
    argv = [str(a).format(long=long, tmp=tmp_path) for a in command]
    code, _, err = run(argv, capsys)
    line = one_line(err)
    assert code == 2 and "is too long: a name of 300 bytes (at most 255)" in line
    assert len(line) < 250
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_a_non_utf8_data_path_trains_and_writes_its_report(folder_32, tmp_path, capsys):
    import os

    data = Path(os.fsdecode(os.fsencode(tmp_path) + b"/data\xff"))  # as argv decodes it
    shutil.copytree(folder_32, data)
    run_dir = tmp_path / "run"
    code, _, _ = run(["pretrain", "--data", data, "--batch-size", "16", "--epochs", "1", *MODEL,
                      "--output-dir", run_dir], capsys)
    assert code == 0
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "data: " + str(tmp_path) + "/data\\udcff" in report
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"] == str(data)


def test_stdout_closed_by_its_reader_exits_quietly_and_the_run_resumes(tmp_path, capsys):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "snclr", "pretrain", *TINY, "--output-dir", str(run_dir)]
    # `snclr pretrain ... | true`: the reader is gone before the first line is printed.
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait() == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception" not in err
    code, out, _ = run(["pretrain", *TINY, "--output-dir", run_dir], capsys)
    assert code == 0 and "finished 1 epochs" in out
    assert read_checkpoint(run_dir / "checkpoint.pt")["data_shape"]["img_size"] == 28


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_image_deleted_mid_run_stops_with_exit_3_naming_it(folder_32, tmp_path, capsys,
                                                              monkeypatch, workers):
    from snclr.training import train

    data = tmp_path / "data"
    shutil.copytree(folder_32, data)
    real = train.train_one_epoch

    def then_delete(config, plan, state, *args, **kwargs):
        stats = real(config, plan, state, *args, **kwargs)
        for image in (data / "train" / "class1").iterdir():  # after epoch 1
            image.unlink()
        return stats

    monkeypatch.setattr(train, "train_one_epoch", then_delete)
    run_dir = tmp_path / "run"
    code, _, err = run(["pretrain", "--data", data, "--batch-size", "16", "--epochs", "2",
                        *MODEL, "--num-workers", workers, "--output-dir", run_dir], capsys)
    assert code == 3
    assert re.fullmatch(r"snclr pretrain: stopped: image file '.*/class1/\d+\.png' disappeared "
                        r"during the run; restore it \(or remove it and start a new run\)",
                        one_line(err))
    assert read_checkpoint(run_dir / "checkpoint.pt", keys=("epoch",))["epoch"] == 1


def test_knn_bounds_num_workers_as_pretrain_does(base_run, capsys):
    code, out, err = run(["knn", "--checkpoint", base_run / "checkpoint.pt", "--num-workers",
                          "99999"], capsys)
    assert code == 2 and out == "" and "num_workers must be <= 1024, got 99999" in one_line(err)


def test_crafted_rank_queues_of_another_shape_exit_2(run_copy, capsys):
    queue = torch.zeros(2, 32, 16)
    banks = {"queue": queue, "labels": torch.zeros(2, 31, dtype=torch.long),
             "sources": torch.zeros(2, 32, dtype=torch.long)}
    before = _crafted_copy(run_copy, _set("rank_banks", value=banks))
    code, _, err = run(["pretrain", "--output-dir", run_copy, "--epochs", "2"], capsys)
    assert code == 2 and "is malformed: rank_banks must hold a (W, N, D) queue" in one_line(err)
    assert snapshot(run_copy) == before
