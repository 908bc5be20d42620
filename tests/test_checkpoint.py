"""Checkpoint files: durable atomic writes and one-line refusals of anything else."""

import os

import pytest
import torch

from snclr.training import checkpoint, runfiles
from snclr.training.checkpoint import RESUME_KEYS, non_finite, read_checkpoint, write_checkpoint
from snclr.training.config import ConfigError

COMPLETE = {"config": {}, "model": {"w": torch.ones(2)},
            "optimizer": {"state": {}, "param_groups": [{"params": [0]}]}, "scaler": {},
            "data_shape": {"in_chans": 1, "img_size": 28}, "epoch": 1, "step": 4,
            "rng": checkpoint.get_rng_state()}


def test_checkpoint_is_fsynced_before_the_rename_and_its_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(runfiles.os, "fsync", fsync)
    monkeypatch.setattr(runfiles.os, "replace", replace)
    target = tmp_path / "checkpoint.pt"
    write_checkpoint(target, COMPLETE)
    tmp = tmp_path / f"checkpoint.pt.snclr-{os.getpid()}.tmp"  # unique to the process
    assert events == [
        ("fsync", str(tmp)),
        ("replace", str(tmp), str(target)),
        ("fsync", str(tmp_path)),
    ]
    assert read_checkpoint(target, keys=RESUME_KEYS)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p.mkdir(), "is a directory, not a checkpoint file"),
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b""), "truncated or corrupt"),
        # Not a zip: the weights-only unpickler fails on it too, but names no refused GLOBAL.
        (lambda p: p.write_bytes(b"not a checkpoint"), r"is not a checkpoint file \(Unsupported"),
        (lambda p: torch.save({"format": "snclr-checkpoint-v1", "x": _RunsCode()}, p),
         r"was refused: it holds objects other than tensors and plain values \(posix.system\)"),
        (lambda p: torch.save({"format": "snclr-checkpoint-v1", "m": torch.nn.Linear(1, 1)}, p),
         "was refused: it holds objects other than tensors"),
        (lambda p: torch.save({"format": "snclr-checkpoint-v1", "model": {}}, p),
         "is incomplete: it has no 'config', 'data_shape'"),
        (lambda p: torch.save({**COMPLETE, "format": "snclr-checkpoint-v1", "model": {"w": 1}}, p),
         "is malformed"),
    ],
    ids=["directory", "missing", "empty", "garbage", "code", "module", "missing-keys", "malformed"],
)
def test_bad_checkpoint_files_are_one_line_errors(tmp_path, monkeypatch, make, match):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    make(path)
    with pytest.raises(ConfigError, match=match) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_resume_needs_the_training_state(tmp_path):
    path = tmp_path / "checkpoint.pt"
    evaluation_only = {k: COMPLETE[k] for k in ("config", "model", "data_shape")}
    torch.save({"format": "snclr-checkpoint-v1", **evaluation_only}, path)
    assert read_checkpoint(path)["model"]["w"].sum() == 2
    with pytest.raises(ConfigError, match="has no 'optimizer', 'scaler', 'epoch', 'step', 'rng'"):
        read_checkpoint(path, keys=RESUME_KEYS)


def test_non_finite_names_every_bad_tensor():
    tree = {"model": {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])},
            "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}},
            "rng": torch.zeros(3, dtype=torch.uint8), "step": 3}
    assert non_finite(tree) == ["model.b", "optimizer.state.0.exp_avg"]
    assert non_finite({"a": torch.ones(1)}) == []


def test_the_model_takes_its_options_from_the_config_by_field_name():
    from snclr.training.config import Config

    assert checkpoint.model_fields() == (
        "num_neighbors", "queue_size", "temperature", "attention_temperature", "threshold",
        "detach_positiveness", "exclude_self_neighbors", "projector_layers", "projector_hidden",
        "projector_dim", "predictor_hidden", "bank_mode", "backend")
    config = Config(encoder="small_cnn", num_neighbors=3, queue_size=24, temperature=0.5,
                    attention_temperature=0.3, threshold=True, detach_positiveness=True,
                    projector_layers=3, projector_hidden=16, projector_dim=8,
                    predictor_hidden=12, bank_mode="global", backend="torch")
    model = checkpoint.build_model(config, in_chans=1, img_size=28, bank_dtype=torch.bfloat16)
    assert (model.num_neighbors, model.bank.size, model.temperature) == (3, 24, 0.5)
    assert (model.attention_temperature, model.threshold, model.detach_positiveness) == (
        0.3, True, True)
    widths = [m.out_features for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert widths == [16, 16, 8]
    assert model.predictor[0].out_features == 12
    assert (model.bank.mode, model.backend, model.bank.queue.dtype) == (
        "global", "torch", torch.bfloat16)
    mocov3 = checkpoint.build_model(Config(method="mocov3"), in_chans=1, img_size=28)
    assert mocov3.num_neighbors == 0  # the method's own options win


def _payload(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}}


def test_keep_last_keeps_the_newest_step_files_and_checkpoint_pt_is_the_newest(tmp_path):
    path = tmp_path / "checkpoint.pt"
    foreign = checkpoint.step_checkpoint_path(path, 90)  # another history's: left alone
    foreign.write_bytes(b"x")
    for step in (3, 4, 6, 8):
        checkpoint.save_checkpoint(path, _payload(step), keep_last=2)
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-step*.pt"))
    assert kept == ["checkpoint-step00000006.pt", "checkpoint-step00000008.pt",
                    "checkpoint-step00000090.pt"]
    # checkpoint.pt is a hard link to the newest: no second copy on disk.
    assert os.path.samefile(path, checkpoint.step_checkpoint_path(path, 8))
    assert torch.load(path, weights_only=True)["step"] == 8
    assert not list(tmp_path.glob(".*link"))
    checkpoint.save_checkpoint(path, _payload(9))  # keep_last 0: checkpoint.pt alone
    assert torch.load(path, weights_only=True)["step"] == 9
    assert torch.load(checkpoint.step_checkpoint_path(path, 8), weights_only=True)["step"] == 8


def test_keep_last_writes_twice_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint(path, _payload(5), keep_last=1)
    named = checkpoint.step_checkpoint_path(path, 5)
    assert not os.path.samefile(path, named)
    assert torch.load(path, weights_only=True)["step"] == torch.load(named)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-step00000005.pt",
                                                         "checkpoint.pt"]


def test_old_step_files_are_deleted_only_after_the_new_one_is_written(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint(path, _payload(1), keep_last=1)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_checkpoint", disk_full)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(path, _payload(2), keep_last=1)
    assert checkpoint.step_checkpoint_path(path, 1).is_file()
    assert torch.load(path, weights_only=True)["step"] == 1
