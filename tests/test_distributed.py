"""Two gloo processes with b/2 samples each equal one process with b samples."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrun import free_port

from snclr import MemoryBank, distributed
from snclr.functional import soft_neighbor_loss
from snclr.training import launch
from snclr.training.errors import ConfigError

BATCH, K, DIM, WORLD = 8, 3, 16, 2


def make_inputs():
    g = torch.Generator().manual_seed(7)
    shapes = ((BATCH, DIM),) * 3 + ((BATCH, K, DIM),)  # z, y, key, neighbours
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        z, y, key, nbr = (t[rows].clone() for t in make_inputs())
        z.requires_grad_(), y.requires_grad_()
        loss = soft_neighbor_loss(z, y, key, nbr, threshold=True)
        grad_z, grad_y = torch.autograd.grad(loss, (z, y))
        bank = MemoryBank(6, DIM, mode="global")
        bank.enqueue(key, torch.arange(BATCH)[rows])
        gathered = distributed.gather_no_grad(torch.full((2,), float(rank)))
        local = MemoryBank(6, DIM, mode="local")
        local.enqueue(key, torch.arange(BATCH)[rows])
        torch.save(
            dict(loss=loss.detach(), grad_z=grad_z, grad_y=grad_y, bank=bank.state_dict(),
                 mean=distributed.all_reduce_mean(loss), gathered=gathered,
                 rank=distributed.rank(), world=distributed.world_size(),
                 local=local.state_dict(), rank_banks=local.gather_rank_queues()),
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("gloo"))
    mp.start_processes(worker, args=(free_port(), out_dir), nprocs=WORLD, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def test_helpers_are_noops_on_one_process():
    t = torch.randn(3, 2)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert torch.equal(distributed.gather_no_grad(t), t)
    assert torch.equal(distributed.all_reduce_mean(t), t)


def test_device_and_launch_rank_come_from_one_place(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.resolve_device("auto") == torch.device("cpu")
    assert launch.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device 'cuda' requested but CUDA is not"):
        launch.resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"device must be one of .*got 'gpu'"):
        launch.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch.resolve_device("auto") == torch.device("cuda", 1)
    assert launch.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("RANK", raising=False)
    assert launch.launch_rank() == 0
    monkeypatch.setenv("RANK", "3")
    assert launch.launch_rank() == 3 and distributed.rank() == 0  # no process group


def test_gather_and_reduce_across_ranks(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world"] == WORLD
    assert ranks[0]["gathered"].tolist() == [0.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(ranks[0]["mean"], (ranks[0]["loss"] + ranks[1]["loss"]) / 2)


def test_two_ranks_equal_one_rank(ranks):
    z, y, key, nbr = make_inputs()
    z.requires_grad_(), y.requires_grad_()
    loss = soft_neighbor_loss(z, y, key, nbr, threshold=True)
    grad_z, grad_y = torch.autograd.grad(loss, (z, y))
    # The global loss is the mean of the ranks' local means; DDP averages gradients the same way.
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, loss, atol=1e-12, rtol=1e-12)
    for name, expected in (("grad_z", grad_z), ("grad_y", grad_y)):
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]) / WORLD, expected,
                                   atol=1e-12, rtol=1e-12)


def test_global_bank_is_identical_on_every_rank(ranks):
    _, _, key, _ = make_inputs()
    single = MemoryBank(6, DIM)
    single.enqueue(key, torch.arange(BATCH))
    for r in ranks:
        torch.testing.assert_close(r["bank"]["queue"], single.queue)
        assert torch.equal(r["bank"]["labels"], single.labels)
        assert int(r["bank"]["pointer"]) == single._pointer


def test_checkpoint_keeps_every_ranks_local_queue(ranks):
    banks = ranks[0]["rank_banks"]  # what rank 0 writes into the checkpoint
    assert banks["queue"].shape == (WORLD, 6, DIM)
    assert not torch.equal(ranks[0]["local"]["queue"], ranks[1]["local"]["queue"])
    for r in ranks:
        restored = MemoryBank(6, DIM, mode="local")
        restored.load_state_dict(ranks[0]["local"])  # the model state holds rank 0's queue
        restored.load_rank_queue(banks, r["rank"])
        assert torch.equal(restored.queue, r["local"]["queue"])
        assert torch.equal(restored.labels, r["local"]["labels"])
    assert MemoryBank(6, DIM).gather_rank_queues() is None  # one process: the model state suffices
