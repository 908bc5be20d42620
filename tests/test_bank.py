"""MemoryBank: FIFO wrap-around, fill count, state_dict round trip, search of filled rows."""

import pytest
import torch
import torch.nn.functional as F

from snclr import MemoryBank


def test_enqueue_wraps_around_without_dropping_rows():
    bank = MemoryBank(5, 3)
    first, second = torch.randn(3, 3), torch.randn(4, 3)
    bank.enqueue(first, torch.arange(3))
    assert bank.num_filled == 3 and int(bank.pointer) == 3
    bank.enqueue(second, torch.arange(10, 14))
    # Rows 3, 4 take second[0:2]; the ring wraps and second[2:4] overwrite rows 0, 1.
    expected = F.normalize(torch.cat([second[2:], first[2:3], second[:2]]), dim=1)
    torch.testing.assert_close(bank.queue, expected)
    assert bank.labels.tolist() == [12, 13, 2, 10, 11]
    assert bank.num_filled == 5 and int(bank.filled) == 5 and int(bank.pointer) == 2


def test_oversized_enqueue_keeps_the_newest_rows():
    bank = MemoryBank(4, 2)
    keys = torch.randn(10, 2)
    bank.enqueue(keys)
    torch.testing.assert_close(bank.queue, F.normalize(keys[-4:], dim=1))
    assert bank.num_filled == 4 and int(bank.pointer) == 0


def test_search_sees_only_filled_rows_by_default():
    bank = MemoryBank(100, 8)
    assert bank.rows().shape == (0, 8)
    keys = torch.randn(6, 8)
    bank.enqueue(keys)
    assert bank.rows().shape == (6, 8)
    found = bank.search(keys, keys, 6)
    assert found.indices.max() < 6
    with pytest.raises(ValueError, match=r"k=7 exceeds the 6 searchable rows"):
        bank.search(keys, keys, 7)


def test_search_unfilled_reproduces_the_reference_initialisation():
    bank = MemoryBank(50, 8, search_unfilled=True)
    assert bank.rows().shape == (50, 8)
    torch.testing.assert_close(bank.queue.norm(dim=1), torch.ones(50))
    assert bank.search(torch.randn(3, 8), torch.randn(3, 8), 10).indices.shape == (3, 10)


def test_search_takes_the_attention_temperature_by_its_model_name():
    from snclr import ops

    bank = MemoryBank(20, 8)
    bank.enqueue(torch.randn(20, 8))
    key, online = torch.randn(3, 8), torch.randn(3, 8)
    found = bank.search(key, online, 4, attention_temperature=0.1)
    expected = ops.soft_neighbors(key, online, bank.rows(), 4, attention_temperature=0.1)
    torch.testing.assert_close(found.positiveness, expected.positiveness)
    assert not torch.allclose(found.positiveness, bank.search(key, online, 4).positiveness)


def test_state_dict_round_trip_restores_queue_and_pointers():
    bank = MemoryBank(6, 4)
    bank.enqueue(torch.randn(8, 4), torch.arange(8))
    restored = MemoryBank(6, 4)
    restored.load_state_dict(bank.state_dict())
    assert restored.num_filled == 6 and restored._pointer == 0
    assert torch.equal(restored.queue, bank.queue) and torch.equal(restored.labels, bank.labels)
    more = torch.randn(3, 4)
    bank.enqueue(more)
    restored.enqueue(more)
    assert torch.equal(restored.queue, bank.queue)


def test_bfloat16_storage():
    bank = MemoryBank(8, 4, dtype=torch.bfloat16)
    bank.enqueue(torch.randn(3, 4))
    assert bank.queue.dtype == torch.bfloat16 and bank.rows().shape == (3, 4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: MemoryBank(0, 4), r"size and dim must be >= 1"),
        (lambda: MemoryBank(4, 4, mode="sharded"), r"mode must be one of"),
        (lambda: MemoryBank(4, 4).enqueue(torch.randn(2, 3)),
         r"keys must have shape \(n, 4\), got \(2, 3\)"),
        (lambda: MemoryBank(4, 4).enqueue(torch.randn(2, 4), torch.arange(3)),
         r"labels must have shape \(2,\)"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "args, options, error, match",
    [
        ((2.5, 8), {}, TypeError, "size must be an int, got float 2.5"),
        (("8", 8), {}, TypeError, "size must be an int, got str '8'"),
        ((8, True), {}, TypeError, "dim must be an int, got bool"),
        ((0, 8), {}, ValueError, "size and dim must be >= 1"),
        ((8, 8), {"dtype": torch.int64}, TypeError, "dtype must be a floating-point torch.dtype"),
        ((8, 8), {"dtype": 16}, TypeError, "dtype must be a floating-point torch.dtype, got 16"),
        ((8, 8), {"mode": "sharded"}, ValueError, "mode must be one of"),
    ],
    ids=["float-size", "str-size", "bool-dim", "zero-size", "int-dtype", "number-dtype", "mode"],
)
def test_constructor_rejects_bad_arguments(args, options, error, match):
    with pytest.raises(error, match=match):
        MemoryBank(*args, **options)


def test_enqueue_rejects_float_labels_and_integer_keys():
    bank = MemoryBank(4, 2)
    with pytest.raises(TypeError, match="labels must be an integer tensor, got dtype torch.float"):
        bank.enqueue(torch.randn(2, 2), torch.tensor([2.7, 1.0]))
    with pytest.raises(TypeError, match="keys must be a floating-point tensor"):
        bank.enqueue(torch.ones(2, 2, dtype=torch.long))
    assert bank.num_filled == 0  # nothing was written
    bank.enqueue(torch.randn(2, 2), torch.tensor([3, 1], dtype=torch.int32))
    assert bank.labels[:2].tolist() == [3, 1] and bank.labels.dtype == torch.int64


def test_restore_rows_overwrites_rows_and_labels_but_not_the_pointers():
    bank = MemoryBank(6, 4)
    bank.enqueue(torch.randn(4, 4), torch.arange(4))
    rows, labels = F.normalize(torch.randn(6, 4), dim=1), torch.arange(10, 16)
    bank.restore_rows(rows, labels)
    assert torch.equal(bank.queue, rows) and torch.equal(bank.labels, labels)
    assert (bank.num_filled, int(bank.pointer)) == (4, 4)
    with pytest.raises(ValueError, match=r"must have shapes \(6, 4\) and \(6,\), got \(5, 4\)"):
        bank.restore_rows(rows[:5], labels)


def test_sources_are_stored_beside_keys_and_default_to_minus_one():
    bank = MemoryBank(5, 3)
    bank.enqueue(torch.randn(3, 3), torch.tensor([0, 1, 2]), sources=torch.tensor([7, 8, 9]))
    bank.enqueue(torch.randn(3, 3))  # wraps: rows 3, 4, 0
    assert bank.sources.tolist() == [-1, 8, 9, -1, -1]
    with pytest.raises(ValueError, match="sources must have shape"):
        bank.enqueue(torch.randn(2, 3), sources=torch.tensor([1]))
    with pytest.raises(TypeError, match="sources must be an integer"):
        bank.enqueue(torch.randn(1, 3), sources=torch.tensor([1.5]))


def test_sources_round_trip_through_state_dict_and_old_state_dicts_load_as_unknown():
    bank = MemoryBank(4, 3)
    bank.enqueue(torch.randn(4, 3), sources=torch.tensor([3, 1, 4, 1]))
    restored = MemoryBank(4, 3)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.sources, bank.sources)
    old = {k: v for k, v in bank.state_dict().items() if k != "sources"}
    restored.load_state_dict(old)  # strict: the missing key is handled, not ignored
    assert restored.sources.tolist() == [-1, -1, -1, -1]
    assert torch.equal(restored.queue, bank.queue)
    restored.restore_rows(bank.queue, bank.labels, bank.sources)
    assert torch.equal(restored.sources, bank.sources)
    restored.restore_rows(bank.queue, bank.labels)
    assert restored.sources.tolist() == [-1, -1, -1, -1]


@pytest.mark.parametrize("size, images, batch", [(16, 5, 3), (7, 7, 2), (20, 3, 4), (5, 9, 3)])
def test_self_rows_equal_a_brute_force_mask_at_the_static_bound(size, images, batch):
    from snclr.bank import max_self_rows
    torch.manual_seed(size * images)
    bank = MemoryBank(size, 4)
    for _ in range(3):  # epochs of reshuffled images, as a sampler would feed them
        order = torch.randperm(images)
        for start in range(0, images, batch):
            chunk = order[start : start + batch]
            bank.enqueue(torch.randn(len(chunk), 4), sources=chunk)
    indices = torch.tensor([0, images - 1, 0, -1])  # a duplicate and an unknown sample
    bound = max_self_rows(size, images)
    rows = bank.self_rows(indices, max_rows=bound)
    assert rows.shape == (4, bound) and rows.dtype == torch.int64
    mask = bank.sources[None, :] == indices[:, None]  # brute force (B, N)
    mask &= indices[:, None] >= 0
    for j in range(4):
        got = sorted(r for r in rows[j].tolist() if r >= 0)
        assert got == mask[j].nonzero().flatten().tolist()
    assert (mask.sum(1) <= bound).all()


def test_max_self_rows_bound():
    from snclr.bank import max_self_rows
    assert max_self_rows(16384, 8000) == 4
    assert max_self_rows(8000, 8000) == 2
    assert max_self_rows(3, 100) == 2  # the end of one epoch and the start of the next
    assert max_self_rows(1, 100) == 1
    assert max_self_rows(4, 1) == 4


def test_calling_the_bank_searches_it_and_changes_nothing():
    bank = MemoryBank(16, 8)
    bank.enqueue(torch.randn(10, 8))
    key, online = torch.randn(3, 8), torch.randn(3, 8)
    before = {name: buffer.clone() for name, buffer in bank.state_dict().items()}
    called, searched = bank(key, online, 4, threshold=True), bank.search(key, online, 4,
                                                                         threshold=True)
    assert torch.equal(called.indices, searched.indices)
    torch.testing.assert_close(called.positiveness, searched.positiveness)
    assert all(torch.equal(before[n], b) for n, b in bank.state_dict().items())


def test_ready_is_the_warm_up_rule_and_an_early_search_says_why_it_cannot():
    bank = MemoryBank(16, 8)
    key = torch.randn(2, 8)
    assert bank.ready(0) and not bank.ready(1)
    with pytest.raises(ValueError, match=r"^k=3 exceeds the 0 searchable rows of the queue "
                                         r"\(0 of 16 filled\): search once bank\.ready\(k\)"):
        bank(key, key, 3)
    bank.enqueue(torch.randn(3, 8))
    assert bank.ready(3) and not bank.ready(4) and not bank.ready(3, excluded=1)
    with pytest.raises(ValueError, match=r"k=4 exceeds the 3 searchable rows of the queue \(3 of"):
        bank.search(key, key, 4)
    assert bank(key, key, 3).indices.shape == (2, 3)
    unfilled = MemoryBank(16, 8, search_unfilled=True)  # the reference: all rows at once
    assert unfilled.ready(16) and unfilled(key, key, 16).indices.shape == (2, 16)
