"""Pretraining end to end on a slice of Animal-MNIST: files, exact resume, two processes, errors."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torchrun import run_two_ranks

from snclr.training.checkpoint import read_checkpoint
from snclr.training.config import Config, ConfigError, preset
from snclr.training.optim import LARS, cosine_lr, create_optimizer
from snclr.training.train import pretrain

# A few steps on 64 images with a tiny model: seconds on a CPU.
TINY = dict(
    limit_samples=64, batch_size=16, epochs=2, queue_size=32, num_neighbors=2, projector_hidden=32,
    projector_dim=16, predictor_hidden=32, num_workers=0, log_every=1, warmup_epochs=0.5,
)


def tiny(tmp_path, **overrides) -> Config:
    return replace(preset("demo"), output_dir=str(tmp_path / "run"), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    config = tiny(tmp_path_factory.mktemp("finished"))
    last = pretrain(config)
    return config, last


def test_pretrain_writes_checkpoint_config_logs_report_and_plots(finished_run):
    config, last = finished_run
    run = Path(config.output_dir)
    for name in ("checkpoint.pt", "config.yaml", "metrics.jsonl", "metrics.csv", "report.md",
                 "loss.png", "lr.png", "knn.png", "purity.png", "positiveness.png"):
        assert (run / name).is_file(), name
    # img_size 0 (the data's native size) is recorded as the size used.
    assert yaml.safe_load((run / "config.yaml").read_text()) == {**config.to_dict(), "img_size": 28}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(steps) == 8 and [r["epoch"] for r in epochs] == [1, 2]
    assert 0 <= epochs[-1]["knn_top1"] <= 1 and 0 <= epochs[-1]["neighbor_purity"] <= 1
    assert epochs[-1]["positiveness_entropy"] > 0
    assert last == epochs[-1]
    payload = read_checkpoint(run / "checkpoint.pt")
    assert payload["epoch"] == 2 and payload["step"] == 8
    assert payload["model"]["bank.filled"].item() == 32  # the queue is saved
    assert "momentum_encoder.features.0.weight" in payload["model"]
    assert "| 2 |" in (run / "report.md").read_text()


def test_interrupted_and_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path):
    straight = tiny(tmp_path / "a")
    pretrain(straight)
    interrupted = tiny(tmp_path / "b", stop_after=1)
    pretrain(interrupted)
    assert read_checkpoint(Path(interrupted.output_dir) / "checkpoint.pt")["epoch"] == 1
    pretrain(replace(interrupted, stop_after=0), resume=True)
    a = read_checkpoint(Path(straight.output_dir) / "checkpoint.pt")
    b = read_checkpoint(Path(interrupted.output_dir) / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 8)
    sources = a["model"]["bank.sources"]  # the keys' dataset indices, resumed bit-exactly
    filled = int(a["model"]["bank.filled"])
    assert ((sources[:filled] >= 0) & (sources[:filled] < 64)).all()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(encoder="nope"), "unknown encoder"),
        (dict(data="no-such-dataset"), "neither a built-in"),
        (dict(batch_size=128), "larger than the 64 training images"),
        (dict(queue_size=1, num_neighbors=2), "smaller than K=2"),
        (dict(method="byol"), "unknown method"),
        (dict(bank_dtype="int8"), "bank_dtype must be one of"),
    ],
    ids=["encoder", "dataset", "batch", "queue", "method", "bank-dtype"],
)
def test_bad_configuration_fails_before_writing(tmp_path, overrides, match):
    config = tiny(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=match):
        pretrain(config)
    assert not Path(config.output_dir).exists()


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_corrupt_checkpoint_is_one_clear_error_and_the_folder_is_untouched(tmp_path, damage):
    run = tmp_path / "run"
    run.mkdir()
    if damage == "truncated":
        torch.save({"format": "snclr-checkpoint-v1", "model": {"w": torch.randn(1000)}},
                   run / "checkpoint.pt")
        data = (run / "checkpoint.pt").read_bytes()
        (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
        match = "truncated or corrupt"
    else:
        torch.save({"weights": torch.randn(3)}, run / "checkpoint.pt")
        match = "not an snclr checkpoint"
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=match):
        pretrain(tiny(tmp_path))
    assert _snapshot(run) == before


def test_resume_with_a_different_model_shape_fails(finished_run, tmp_path):
    config, _ = finished_run
    run = Path(config.output_dir)
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=r"other settings \(projector_dim 16 -> 8\)"):
        pretrain(replace(config, projector_dim=8))
    with pytest.raises(ConfigError, match="different model shape"):
        pretrain(replace(config, projector_dim=8), allow_config_change=True)
    assert _snapshot(run) == before
    with pytest.raises(ConfigError, match="does not exist"):
        pretrain(tiny(tmp_path / "fresh"), resume=True)


def test_mocov3_and_learned_attention_train(tmp_path):
    for method in ("mocov3", "snclr-learned"):
        last = pretrain(tiny(tmp_path / method, method=method, epochs=1, knn_every=0,
                             optimizer="lars", lr=0.3))
        assert torch.isfinite(torch.tensor(last["loss"]))


@pytest.mark.parametrize("bank_dtype,stored", [("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_bank_dtype_sets_the_stored_queue(tmp_path, bank_dtype, stored):
    # auto is fp32 on a CPU (no autocast there); bf16 halves the queue and is searched in bf16.
    config = tiny(tmp_path, epochs=1, knn_every=0, bank_dtype=bank_dtype)
    last = pretrain(config)
    assert torch.isfinite(torch.tensor(last["loss"]))
    saved = read_checkpoint(Path(config.output_dir) / "checkpoint.pt")
    assert saved["model"]["bank.queue"].dtype == stored


def test_two_process_gloo_run(tmp_path):
    result = run_two_ranks([
        "pretrain", "--output-dir", tmp_path / "ddp", "--bank-mode", "global", "--epochs", "1",
        "--knn-every", "0",
        *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k not in ("epochs",)],
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    payload = read_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    # 64 images / global batch 16 = 4 steps; global bank: each step enqueues both ranks' keys.
    assert payload["step"] == 4 and payload["model"]["bank.filled"].item() == 32
    assert (tmp_path / "ddp" / "report.md").is_file()


def test_optimizer_groups_exclude_bias_and_norm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = create_optimizer(model, "lars", weight_decay=0.1)
    assert isinstance(optimizer, LARS)
    decayed, plain = optimizer.param_groups
    assert [p.ndim for p in decayed["params"]] == [2] and decayed["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in plain["params"])
    assert plain["weight_decay"] == 0 and plain["lars_exclude"]
    model(torch.randn(8, 4)).sum().backward()
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    before = model[0].weight.detach().clone()
    optimizer.step()
    # LARS scales the update to trust_coefficient * |w| (first step, momentum buffer empty).
    step = (model[0].weight.detach() - before).norm()
    assert torch.isclose(step, 0.1 * 0.001 * before.norm(), rtol=1e-4)


def test_cosine_lr_warms_up_then_decays_to_zero():
    assert cosine_lr(0.0, lr=1.0, warmup_epochs=2, epochs=10) == 0.0
    assert cosine_lr(1.0, lr=1.0, warmup_epochs=2, epochs=10) == 0.5
    assert cosine_lr(2.0, lr=1.0, warmup_epochs=2, epochs=10) == 1.0
    assert cosine_lr(6.0, lr=1.0, warmup_epochs=2, epochs=10) == pytest.approx(0.5)
    assert cosine_lr(10.0, lr=1.0, warmup_epochs=2, epochs=10) == pytest.approx(0.0)


def test_self_neighbours_are_logged_and_warned_about_and_the_option_removes_them(tmp_path, capsys):
    # 64 images, batch 16, one rank: 64 images per epoch, a queue of 64 holds one epoch of keys.
    epochs = {}
    for exclude in (False, True):
        config = tiny(tmp_path / str(exclude), queue_size=64, epochs=3, knn_every=0,
                      exclude_self_neighbors=exclude)
        pretrain(config)
        run = Path(config.output_dir)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        epochs[exclude] = [r for r in rows if r["kind"] == "epoch"]
        report = (run / "report.md").read_text()
        warning = ("warning: queue_size 64 >= 64 images per rank and epoch: about 100% of the "
                   "samples have their own past keys in the queue")
        assert warning in capsys.readouterr().err
        assert warning in report and "--exclude-self-neighbors removes them" in report
        assert ("(on in this run: they are excluded)" in report) == exclude
        assert "self-neighbour fraction" in report and "purity without self" in report
        header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"self_neighbor_fraction", "neighbor_purity_without_self"} <= set(header)
    last = {exclude: rows[-1] for exclude, rows in epochs.items()}
    assert last[False]["self_neighbor_fraction"] > 0  # the own keys are found without the option
    assert last[True]["self_neighbor_fraction"] == 0
    for row in last.values():
        assert 0 <= row["neighbor_purity_without_self"] <= 1


def test_no_warning_when_the_queue_is_smaller_than_an_epoch(finished_run, capsys):
    from snclr.training.train import self_neighbor_warning

    config, last = finished_run  # queue 32 < 64 images per epoch
    assert "warning: queue_size" not in (Path(config.output_dir) / "report.md").read_text()
    assert 0 <= last["self_neighbor_fraction"] <= 1
    assert self_neighbor_warning(32, 64) is None
    assert "about 9% " in self_neighbor_warning(3 * 40000, 40000, world_size=32)
    assert "about 100% " in self_neighbor_warning(3 * 40000, 40000, world_size=32,
                                                  bank_mode="global")
