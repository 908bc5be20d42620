"""kNN evaluation through ``knn_topk``: one search with the largest k, prefixes for the others,
chunked queries, k past the Triton kernels' range, and ``snclr knn`` / ``snclr linear`` on
two ranks equal to one process."""

import json

import pytest
import torch
import torch.nn.functional as F
from torchrun import run_two_ranks

from snclr.training import evaluate
from snclr.training.cli import main
from snclr.training.evaluate import (
    KNN_CHUNK_BYTES,
    KNN_TRITON_MAX_K,
    knn_chunk_rows,
    knn_search_backend,
    weighted_knn_predict,
)


def dense_votes(memory, labels, queries, k, num_classes, temperature, *, stable=True):
    """The definition: all scores, a stable descending sort (ties to the smaller row)."""
    sim = F.normalize(queries, dim=1) @ F.normalize(memory, dim=1).T
    if stable:
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    else:  # ties to the larger row
        flipped = torch.sort(sim.flip(1), dim=1, descending=True, stable=True).indices[:, :k]
        order = sim.shape[1] - 1 - flipped
    votes = torch.zeros(len(queries), num_classes, dtype=sim.dtype)
    return votes.scatter_add_(1, labels[order], (sim.gather(1, order) / temperature).exp())


def tied_features(seed=0, distinct=40, copies=6, num_classes=5, queries=64, dim=8):
    """A memory of ``distinct`` rows, each repeated ``copies`` times under random labels, so
    that every score ties with ``copies - 1`` others; queries are memory rows and noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-3, 4, (distinct, dim), generator=g).double()
    memory = base[torch.randperm(distinct * copies, generator=g) % distinct]
    labels = torch.randint(0, num_classes, (len(memory),), generator=g)
    picks = memory[torch.randint(0, len(memory), (queries // 2,), generator=g)]
    noise = torch.randn(queries - len(picks), dim, generator=g, dtype=torch.float64)
    return memory, labels, torch.cat([picks, noise]), num_classes


def test_predictions_equal_the_dense_definition_on_tied_features():
    memory, labels, queries, classes = tied_features()
    ks = (1, 5, 7, 20, 200)
    votes = weighted_knn_predict(memory, labels, queries, ks=ks, num_classes=classes,
                                 temperature=0.07, backend="torch")
    differs = False
    for k in ks:
        expected = dense_votes(memory, labels, queries, k, classes, 0.07)
        torch.testing.assert_close(votes[k].double(), expected, rtol=1e-5, atol=0)
        assert torch.equal(votes[k].argmax(1), expected.argmax(1)), k
        wrong_ties = dense_votes(memory, labels, queries, k, classes, 0.07, stable=False)
        differs |= not torch.equal(wrong_ties.argmax(1), expected.argmax(1))
    assert differs  # the ties decide some predictions: the test sees the tie rule


def test_one_search_with_the_largest_k_answers_every_k(monkeypatch):
    memory, labels, queries, classes = tied_features(seed=1)
    calls = []
    search = evaluate.knn_topk

    def counting(query, bank, k, **kwargs):
        calls.append(k)
        return search(query, bank, k, **kwargs)

    monkeypatch.setattr(evaluate, "knn_topk", counting)
    votes = weighted_knn_predict(memory, labels, queries, ks=(10, 20, 200), num_classes=classes)
    assert calls == [200] and sorted(votes) == [10, 20, 200]
    # A k larger than the memory is clipped to it.
    clipped = weighted_knn_predict(memory, labels, queries, ks=(10_000,), num_classes=classes)
    whole = weighted_knn_predict(memory, labels, queries, ks=(len(memory),), num_classes=classes)
    assert torch.equal(clipped[10_000], whole[len(memory)])


def test_queries_go_in_chunks_bounded_by_the_stated_bytes(monkeypatch):
    assert knn_chunk_rows(200, 2048) * 200 * 2048 * 4 <= KNN_CHUNK_BYTES
    assert knn_chunk_rows(200, 10**6) == 1
    memory, labels, queries, classes = tied_features(seed=2)
    whole = weighted_knn_predict(memory, labels, queries, ks=(7,), num_classes=classes)
    chunks = []
    search = evaluate.knn_topk

    def recording(query, bank, k, **kwargs):
        chunks.append(len(query))
        return search(query, bank, k, **kwargs)

    monkeypatch.setattr(evaluate, "knn_topk", recording)
    monkeypatch.setattr(evaluate, "KNN_CHUNK_BYTES", 4 * 7 * 8 * 10)  # 10 rows a chunk
    chunked = weighted_knn_predict(memory, labels, queries, ks=(7,), num_classes=classes)
    assert chunks == [10] * 6 + [4]
    torch.testing.assert_close(chunked[7], whole[7])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_k_200_on_both_backends(backend):
    g = torch.Generator().manual_seed(3)
    memory = torch.randn(320, 16, generator=g)
    labels = torch.randint(0, 4, (320,), generator=g)
    queries = torch.randn(12, 16, generator=g)
    assert knn_search_backend(KNN_TRITON_MAX_K, backend) == backend
    assert knn_search_backend(200, backend) == "torch"  # the exact path past the kernels
    for ks in ((10, 20), (10, 20, 200)):  # the kernels answer k <= 64 themselves
        votes = weighted_knn_predict(memory, labels, queries, ks=ks, num_classes=4,
                                     backend=backend)
        for k in ks:
            expected = dense_votes(memory.double(), labels, queries.double(), k, 4, 0.07)
            torch.testing.assert_close(votes[k].double(), expected, rtol=1e-4, atol=0)
            assert torch.equal(votes[k].argmax(1), expected.argmax(1))


# ------------------------------------------------------------------- the command, two ranks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("knn") / "run"
    argv = ["pretrain", "--limit-samples", "64", "--batch-size", "16", "--epochs", "1",
            "--queue-size", "32", "--num-neighbors", "2", "--projector-hidden", "32",
            "--projector-dim", "16", "--predictor-hidden", "32", "--num-workers", "0",
            "--knn-every", "0", "--output-dir", str(run_dir)]
    assert main(argv) == 0
    return run_dir / "checkpoint.pt"


EVAL = ["--limit-samples", "60", "--json", "--device", "cpu"]


def test_knn_takes_k_and_the_temperature(checkpoint, capsys):
    argv = ["knn", "--checkpoint", checkpoint, "--k", "10,20,200", "--temperature", "0.07", *EVAL]
    assert main([str(a) for a in argv]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["top1", "top1_k10", "top1_k20", "top1_k200"]
    assert result["top1"] == result["top1_k10"]
    for flags, message in ((["--k", "0,20"], "--k must be comma-separated integers >= 1, got "
                                             "'0,20'"),
                           (["--k", "ten"], "--k must be comma-separated integers >= 1"),
                           (["--temperature", "0"], "temperature must be a finite number > 0")):
        assert main(["knn", "--checkpoint", str(checkpoint), *flags, *EVAL]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_knn_and_linear_on_two_ranks_equal_one_process(checkpoint, capsys):
    commands = [["knn", "--checkpoint", checkpoint, "--k", "5,20", *EVAL],
                ["linear", "--checkpoint", checkpoint, "--epochs", "3", *EVAL],
                ["linear", "--checkpoint", checkpoint, "--epochs", "1", "--protocol", "augmented",
                 *EVAL],
                ["knn", "--checkpoint", checkpoint, "--k", "0", *EVAL]]
    for argv in commands:
        code = main([str(a) for a in argv])
        one = capsys.readouterr()
        two = run_two_ranks(argv)
        if code == 0:
            assert two.returncode == 0, two.stderr[-2000:]
            assert json.loads(two.stdout) == json.loads(one.out)  # printed once, by rank 0
        else:  # torchrun exits 1 and reports the ranks' status (the first to fail at least)
            assert code == 2 and two.returncode == 1
            assert "exitcode  : 2" in two.stderr, two.stderr[-2000:]
            assert "snclr/training" not in two.stderr  # no traceback of ours (torchrun has one)
            assert "--k must be comma-separated integers >= 1" in two.stderr
