"""Trainer options: step checkpoints and keep-last, accumulation, channels_last, compile."""

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datafiles import write_images, write_stl10
from test_train import tiny

from snclr.model import create_model
from snclr.training.checkpoint import read_checkpoint
from snclr.training.config import ConfigError
from snclr.training.train import State, forward_backward, pretrain


def _epoch_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "epoch"]


def test_step_checkpoints_keep_the_newest_and_resume_mid_epoch_exactly(tmp_path):
    # 2 epochs of 4 steps; saves at steps 3 and 6 (mid-epoch) and 4 and 8 (epoch ends).
    straight = tiny(tmp_path / "a", knn_every=0)
    pretrain(straight)
    stepped = tiny(tmp_path / "b", knn_every=0, save_every_steps=3, keep_last=2)
    pretrain(stepped)
    run = Path(stepped.output_dir)
    assert sorted(p.name for p in run.glob("checkpoint-step*.pt")) == [
        "checkpoint-step00000006.pt", "checkpoint-step00000008.pt"]
    assert os.path.samefile(run / "checkpoint.pt", run / "checkpoint-step00000008.pt")
    mid = read_checkpoint(run / "checkpoint-step00000006.pt")
    assert (mid["epoch"], mid["step"], mid["epoch_progress"]["batches"]) == (1, 6, 2)

    # A run killed after step 6: its folder holds that checkpoint. The resumed run skips
    # the epoch's first 2 batches and ends where the uninterrupted one does, bit for bit,
    # epoch statistics included.
    resumed = tmp_path / "c"
    resumed.mkdir()
    shutil.copy(run / "checkpoint-step00000006.pt", resumed / "checkpoint.pt")
    pretrain(replace(stepped, output_dir=str(resumed), keep_last=0))
    a = read_checkpoint(Path(straight.output_dir) / "checkpoint.pt")
    c = read_checkpoint(resumed / "checkpoint.pt")
    assert (c["epoch"], c["step"], c["epoch_progress"]) == (2, 8, None)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, c["model"][name]), name
    last_a, last_c = _epoch_rows(Path(straight.output_dir))[-1], _epoch_rows(resumed)[-1]
    for key in ("loss", "neighbor_purity", "positiveness_entropy", "neighbor_similarity"):
        assert last_a[key] == pytest.approx(last_c[key], rel=1e-6), key


def _tiny_model():
    torch.manual_seed(0)
    model = create_model("small_cnn", in_chans=1, img_size=28, queue_size=32, num_neighbors=2,
                         projector_hidden=32, projector_dim=16, predictor_hidden=32)
    model.enqueue(F.normalize(torch.randn(32, 16), dim=1))  # full: the neighbour terms are on
    return model


def _grads(model) -> dict:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_accumulated_gradients_are_the_mean_of_the_parts_on_one_queue_snapshot():
    model = _tiny_model()
    state = State(model=model, wrapped=model, optimizer=None,
                  scaler=torch.amp.GradScaler("cpu", enabled=False))
    queue = model.bank.queue.clone()
    x1, x2, indices = torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28), torch.arange(8)
    outs = forward_backward(state, x1, x2, indices, micro_batches=2)
    accumulated = _grads(model)
    assert [out.keys.shape[0] for out in outs] == [4, 4]
    assert torch.equal(model.bank.queue, queue)  # nothing enqueued between the parts
    halves = []
    for part in (slice(0, 4), slice(4, 8)):
        forward_backward(state, x1[part], x2[part], indices[part])
        halves.append(_grads(model))
    assert accumulated.keys() == halves[0].keys()
    for name, grad in accumulated.items():
        torch.testing.assert_close(grad, halves[0][name] / 2 + halves[1][name] / 2)
    # Not one batch of 8: each part contrasts its own 4 images and BatchNorm sees 4.
    forward_backward(state, x1, x2, indices)
    whole = _grads(model)
    assert not all(torch.allclose(grad, whole[name]) for name, grad in accumulated.items())


def test_accumulate_trains_in_optimiser_steps_and_must_divide_the_batch(tmp_path):
    config = tiny(tmp_path / "acc", epochs=1, knn_every=0, accumulate=2, queue_size=64)
    last = pretrain(config)
    saved = read_checkpoint(Path(config.output_dir) / "checkpoint.pt")
    # 4 optimiser steps of 16 images (8 + 8), each enqueueing all 16 keys once.
    assert last["step"] == saved["step"] == 4 and saved["model"]["bank.filled"].item() == 64
    assert torch.isfinite(torch.tensor(last["loss"]))
    with pytest.raises(ConfigError, match="accumulate=3 does not divide the batch of 16"):
        pretrain(tiny(tmp_path / "bad", accumulate=3))


def test_channels_last_trains_with_nhwc_weights(tmp_path):
    config = tiny(tmp_path / "nhwc", epochs=1, knn_every=0, limit_samples=32, channels_last=True)
    last = pretrain(config)
    weight = read_checkpoint(Path(config.output_dir) / "checkpoint.pt")["model"][
        "encoder.features.0.weight"]
    assert weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
    plain = pretrain(replace(config, output_dir=str(tmp_path / "nchw"), channels_last=False))
    assert last["loss"] == pytest.approx(plain["loss"], rel=1e-4)


def test_compile_compiles_the_encoders_and_keeps_the_checkpoint_names(tmp_path, monkeypatch):
    # Inductor's C++ code generation took 93 s for these 2 steps on 2 CPU cores; aot_eager
    # traces the same graphs (dynamo + AOTAutograd, the ops' fake kernels) in seconds.
    compiled = []
    compile_module = torch.nn.Module.compile

    def aot_eager(module, **options):
        compiled.append(type(module).__name__)
        compile_module(module, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager)
    config = tiny(tmp_path / "compiled", epochs=1, knn_every=0, limit_samples=32, compile=True)
    last = pretrain(config)
    assert len(compiled) == 2  # the online and the momentum encoder
    eager = pretrain(replace(config, output_dir=str(tmp_path / "eager"), compile=False))
    assert last["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    saved = read_checkpoint(Path(config.output_dir) / "checkpoint.pt")["model"]
    assert not [name for name in saved if "_orig_mod" in name]


def test_pretraining_on_a_flat_folder_of_images_turns_the_knn_monitor_off(tmp_path, capsys):
    write_images(tmp_path / "flat", [16] * 16)
    config = tiny(tmp_path, data=str(tmp_path / "flat"), batch_size=8, epochs=1)
    last = pretrain(config)
    out = capsys.readouterr().out
    assert "16 images without labels; the kNN monitor and neighbour purity are off" in out
    assert last["knn_top1"] is None and last["neighbor_purity"] is None
    assert last["neighbor_similarity"] is not None and last["step"] == 2
    assert "without labels" in (Path(config.output_dir) / "report.md").read_text()


def test_stl10_pretrains_on_train_and_unlabelled_and_monitors_knn_on_train(tmp_path):
    write_stl10(tmp_path / "stl", {"train": 8, "test": 4}, unlabelled=8)
    config = tiny(tmp_path, data=f"stl10:{tmp_path / 'stl'}", batch_size=8, epochs=1)
    last = pretrain(config)
    assert last["step"] == 2  # 16 images: 8 labelled, 8 unlabelled
    assert 0 <= last["knn_top1"] <= 1
    # Purity over the labelled pairs only (unlabelled keys are stored with label -1).
    assert last["neighbor_purity"] is None or 0 <= last["neighbor_purity"] <= 1


def test_two_processes_accumulate_and_save_mid_epoch(tmp_path):
    from test_train import TINY
    from torchrun import run_two_ranks

    result = run_two_ranks([
        "pretrain", "--output-dir", tmp_path / "ddp", "--epochs", "1", "--knn-every", "0",
        "--accumulate", "2", "--save-every-steps", "3", "--keep-last", "2",
        *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k not in ("epochs",)],
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    mid = read_checkpoint(tmp_path / "ddp" / "checkpoint-step00000003.pt")
    # 4 steps of 8 images per rank, as 2 micro-batches of 4; the sums are over both ranks.
    assert (mid["step"], mid["epoch_progress"]["batches"]) == (3, 3)
    assert mid["rank_banks"]["queue"].shape[0] == 2
    assert read_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["step"] == 4
