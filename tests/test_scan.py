"""The folder scan: headers only, cached by names, sizes and times, shared from rank 0; files
that fail to decode later are skipped, counted and, past the budget, stop the run."""

import json
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datafiles import write_images
from torchrun import free_port

from snclr.training import datasets
from snclr.training.cli import main
from snclr.training.data import (
    EvalDataset,
    TwoViewDataset,
    UnreadableFiles,
    eval_transform,
    load_splits,
    on_rank_zero,
    two_view_transforms,
)
from snclr.training.datasets import scan_folder
from snclr.training.errors import ConfigError, UnreadableImages
from snclr.training.evaluate import extract_features

MODEL = ["--queue-size", "32", "--num-neighbors", "2", "--projector-hidden", "32",
         "--projector-dim", "16", "--predictor-hidden", "32", "--num-workers", "0",
         "--knn-every", "0", "--log-every", "1", "--batch-size", "16", "--epochs", "1"]


def truncate(path):
    path.write_bytes(path.read_bytes()[:200])  # the header survives, the pixels do not


def folder(root, per_class=20, sizes=32):
    for c in range(2):
        write_images(root / "train" / f"class{c}", [sizes] * per_class, seed=c)
        write_images(root / "val" / f"class{c}", [sizes] * 4, seed=10 + c)
    return root


def probes_counted(monkeypatch):
    calls = []
    probe = datasets._probe

    def counting(path, decode):
        calls.append(path)
        return probe(path, decode)

    monkeypatch.setattr(datasets, "_probe", counting)
    return calls


def test_the_scan_reads_headers_only_and_the_decode_check_reads_pixels(tmp_path):
    root = folder(tmp_path, per_class=4)
    write_images(root / "train" / "class0", [(48, 40)], seed=5)  # overwrites 0.png
    truncate(root / "train" / "class1" / "2.png")
    scan = scan_folder(root / "train")
    assert len(scan.files) == 8 and scan.left_out == ()
    assert scan.sides[0] == 40  # the shorter side, from the header
    with pytest.raises(ConfigError, match=r"1 of 8 image files .* cannot be read, e\.g\. "
                                          r".*class1/2\.png' \(OSError: image file is trunc"):
        scan_folder(root / "train", check="decode")


def test_a_relaunch_reuses_the_cached_scan_and_a_changed_folder_is_rescanned(tmp_path,
                                                                             monkeypatch):
    root = folder(tmp_path, per_class=5)
    calls = probes_counted(monkeypatch)
    first = scan_folder(root / "train")
    assert len(calls) == 10
    again = scan_folder(root / "train")
    assert len(calls) == 10  # nothing probed: the cache answered
    assert list(again.files) == list(first.files) and again.sides.tolist() == first.sides.tolist()
    # Same names, one file bigger: the key changes and the folder is scanned again.
    write_images(root / "train" / "class1", [64], seed=9)
    os.utime(root / "train" / "class1" / "0.png", ns=(1, 1))
    changed = scan_folder(root / "train")
    assert len(calls) == 20 and sorted(changed.sides.tolist()) == [32] * 9 + [64]
    # Another name: scanned again too.
    (root / "train" / "class0" / "4.png").rename(root / "train" / "class0" / "9.png")
    renamed = scan_folder(root / "train")
    assert len(calls) == 30 and renamed.files[-6].endswith("class0/9.png")
    # The decode check has its own entry: the header scan's does not answer for it.
    scan_folder(root / "train", check="decode")
    assert len(calls) == 40


def test_the_cache_file_is_replaced_whole_and_a_broken_one_is_rescanned(tmp_path, monkeypatch):
    root = folder(tmp_path, per_class=3)
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("SNCLR_CACHE_DIR", str(cache_dir))
    calls = probes_counted(monkeypatch)
    scan_folder(root / "train")
    (cached,) = (cache_dir / "scans").iterdir()
    assert json.loads(cached.read_text())["sides"] == [32] * 6
    before = cached.read_text()

    # A write that fails half-way leaves the old file whole and no temporary file behind.
    def failing_dump(payload, out):
        out.write('{"version": ')
        raise OSError(28, "No space left on device")

    write_images(root / "train" / "class0", [40], seed=3)
    monkeypatch.setattr(datasets.json, "dump", failing_dump)
    scan_folder(root / "train")
    monkeypatch.undo()
    monkeypatch.setenv("SNCLR_CACHE_DIR", str(cache_dir))
    assert [p.name for p in (cache_dir / "scans").iterdir()] == [cached.name]
    assert cached.read_text() == before
    # A torn or foreign file is not trusted: the folder is scanned and the file rewritten.
    cached.write_text('{"version": 1, "key": ')
    calls = probes_counted(monkeypatch)
    assert sorted(scan_folder(root / "train").sides.tolist()) == [32] * 5 + [40]
    assert len(calls) == 6 and json.loads(cached.read_text())["sides"][0] == 40


def test_an_empty_cache_setting_writes_nothing(tmp_path, monkeypatch):
    root = folder(tmp_path, per_class=2)
    monkeypatch.setenv("SNCLR_CACHE_DIR", "")
    calls = probes_counted(monkeypatch)
    scan_folder(root / "train")
    scan_folder(root / "train")
    assert len(calls) == 8 and datasets.scan_cache_dir() is None


def test_files_with_an_unreadable_header_are_left_out_within_the_budget(tmp_path, capsys):
    root = folder(tmp_path)
    (root / "train" / "class1" / "3.png").write_text("<html>not a picture</html>")
    splits = load_splits(str(root), max_bad_fraction=0.05)
    assert len(splits["train"]) == 39
    assert splits["train"].left_out[0][0].endswith("class1/3.png")
    assert "left out 1 image files" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="1 of 40 image files"):
        load_splits(str(root), max_bad_fraction=0.0)


def test_a_file_that_fails_to_decode_is_skipped_counted_and_stops_past_the_budget(tmp_path):
    root = folder(tmp_path, per_class=4)
    truncate(root / "train" / "class0" / "1.png")
    images = load_splits(str(root))["train"]
    views = two_view_transforms("byol", img_size=32, crop_scale_min=0.4, in_chans=3)
    dataset = TwoViewDataset(images, *views, seed=0)
    *_, index, bad = dataset[1]
    assert (index, bad) == (2, 1)  # the next image in its place, the file counted
    assert dataset[2][3:] == (2, -1)
    unreadable = UnreadableFiles(images, 0.0, torch.device("cpu"))
    unreadable.add(torch.tensor([-1, 1, -1]))
    with pytest.raises(UnreadableImages, match=r"1 of 8 image files cannot be decoded, more "
                                               r"than the 0 .*first: '.*class0/1\.png'"):
        unreadable.sync()
    lenient = UnreadableFiles(images, 0.2, torch.device("cpu"))
    lenient.add(torch.tensor([1, 1]))
    lenient.sync()
    assert lenient.count == 1 and "1 of 8 image files could not be decoded" in lenient.summary()
    # Evaluation drops the row.
    transform = eval_transform(img_size=32, native_size=None, in_chans=3)
    assert EvalDataset(images, transform)[1][1].item() == -1
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
    feats, labels = extract_features(encoder, images, img_size=32, device=torch.device("cpu"))
    assert feats.shape == (7, 4) and labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_pretrain_skips_unreadable_files_reports_them_and_stops_past_the_budget(tmp_path,
                                                                                capsys):
    root = folder(tmp_path)
    truncate(root / "train" / "class1" / "7.png")
    run_dir = tmp_path / "run"
    code = main(["pretrain", "--data", str(root), *MODEL, "--output-dir", str(run_dir)])
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "stopped" in x]
    assert code == 3 and len(line) == 1 and re.search(
        r"snclr pretrain: stopped: 1 of 40 image files cannot be decoded, more than the 0 that "
        r"max_bad_images=0.001 allows; first: '.*class1/7\.png'; remove or replace them", line[0])
    assert "Traceback" not in err
    lenient = tmp_path / "lenient"
    code = main(["pretrain", "--data", str(root), *MODEL, "--max-bad-images", "0.05",
                 "--output-dir", str(lenient)])
    assert code == 0
    assert "1 of 40 image files could not be decoded" in (lenient / "report.md").read_text()
    rows = [json.loads(x) for x in (lenient / "metrics.jsonl").read_text().splitlines()]
    assert [r["unreadable_images"] for r in rows if r["kind"] == "epoch"] == [1]
    assert main(["pretrain", "--data", str(root), *MODEL, "--check-images", "decode",
                 "--output-dir", str(tmp_path / "strict")]) == 2
    assert "1 of 40 image files" in capsys.readouterr().err


def _rank_zero_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ran = []
        value = on_rank_zero(lambda: ran.append(rank) or {"scan": 7})
        try:
            on_rank_zero(lambda: (_ for _ in ()).throw(ConfigError("bad folder")))
            error = None
        except ConfigError as err:
            error = str(err)
        torch.save({"ran": ran, "value": value, "error": error},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_the_scan_runs_on_rank_zero_and_every_rank_gets_it_or_its_error(tmp_path):
    mp.start_processes(_rank_zero_worker, args=(free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["ran"] for r in ranks] == [[0], []]
    assert [r["value"] for r in ranks] == [{"scan": 7}] * 2
    assert [r["error"] for r in ranks] == ["bad folder"] * 2
