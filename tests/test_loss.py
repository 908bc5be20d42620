"""SoftNeighborLoss: the module loss equals the functional loss and the model's loss."""

import pytest
import torch
import torch.nn.functional as F

from snclr import MemoryBank, SoftNeighborLoss, create_model
from snclr.functional import soft_neighbor_loss
from snclr.heads import LearnedAttention
from snclr.ops import soft_neighbors

B, D, N = 6, 16, 32


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    y1, y2, z1, z2, k1, k2 = torch.randn(6, B, D, generator=generator, dtype=torch.float64) \
        .unbind()
    return (y1.requires_grad_(), y2.requires_grad_()), (z1.requires_grad_(), z2), (k1, k2)


def functional_loss(projections, predictions, keys, bank, k, **options):
    """Both directions written out from the functional loss and the public op."""
    total = 0
    for y, z, key in ((projections[0], predictions[0], keys[1]),
                      (projections[1], predictions[1], keys[0])):
        key = F.normalize(key, dim=1)
        if k:
            neighbors = soft_neighbors(key, y, bank.rows().to(key.dtype), k).neighbors
        else:
            neighbors = key.new_zeros(B, 0, D)
        total = total + soft_neighbor_loss(z, y, key, neighbors, **options)
    return total


@pytest.mark.parametrize("options", [{}, {"threshold": True, "attention_temperature": 0.5},
                                     {"attention": "uniform"}, {"attention": "nearest"}],
                         ids=["cosine", "threshold", "uniform", "nearest"])
def test_module_equals_the_functional_loss_on_both_directions(options):
    bank = MemoryBank(N, D, dtype=torch.float64)
    bank.enqueue(torch.randn(20, D, dtype=torch.float64))
    projections, predictions, keys = inputs()
    loss = SoftNeighborLoss(4, **options)(projections, predictions, keys, bank)
    expected = functional_loss(projections, predictions, keys, bank, 4, **options)
    torch.testing.assert_close(loss, expected)
    wrt = (projections[0], predictions[0])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    expected_grads = torch.autograd.grad(expected, wrt, allow_unused=True, materialize_grads=True)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_empty_or_partly_filled_bank_gives_the_moco_v3_loss_until_ready():
    bank = MemoryBank(N, D, dtype=torch.float64)
    projections, predictions, keys = inputs()
    criterion = SoftNeighborLoss(4)
    moco = functional_loss(projections, predictions, keys, bank, 0)
    torch.testing.assert_close(criterion(projections, predictions, keys, bank), moco)
    bank.enqueue(torch.randn(3, D, dtype=torch.float64))  # 3 rows < K = 4
    torch.testing.assert_close(criterion(projections, predictions, keys, bank), moco)
    bank.enqueue(torch.randn(1, D, dtype=torch.float64))
    assert not torch.allclose(criterion(projections, predictions, keys, bank), moco)
    exclude = torch.full((B, 1), -1)  # one row per sample may be excluded: K + 1 needed
    torch.testing.assert_close(criterion(projections, predictions, keys, bank, exclude=exclude),
                               moco)


def test_module_loss_equals_the_models_loss():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_neighbors=3, queue_size=32, in_chans=1, img_size=28,
                         projector_hidden=32, projector_dim=D, predictor_hidden=32,
                         threshold=True)
    criterion = SoftNeighborLoss(3, threshold=True)
    x1, x2 = torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28)
    for _ in range(2):  # empty queue (MoCo v3), then 8 rows >= K
        out = model(x1, x2)
        y1, y2 = model.projector(model.encoder(x1)), model.projector(model.encoder(x2))
        with torch.no_grad():
            k1, k2 = (model.momentum_projector(model.momentum_encoder(x)) for x in (x1, x2))
        loss = criterion((y1, y2), (model.predictor(y1), model.predictor(y2)), (k1, k2),
                         model.bank)
        torch.testing.assert_close(loss, out.loss)
        model.enqueue(out.keys)


def test_learned_attention_trains_the_head_the_module_holds():
    head = LearnedAttention(D)
    criterion = SoftNeighborLoss(3, attention="learned", attention_head=head)
    assert {id(p) for p in criterion.parameters()} == {id(p) for p in head.parameters()}
    bank = MemoryBank(N, D)
    bank.enqueue(torch.randn(10, D))
    projections, predictions, keys = (tuple(t.float() for t in pair) for pair in inputs())
    criterion(projections, predictions, keys, bank).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize("args, options, match", [
    ((-1,), {}, r"^num_neighbors must be an int >= 0, got -1"),
    ((2.5,), {}, r"^num_neighbors must be an int >= 0, got 2.5"),
    ((3,), {"attention": "dot"}, r"^attention must be one of"),
    ((0,), {"attention": "nearest"}, r"needs num_neighbors >= 1"),
    ((3,), {"attention": "learned"}, r"^attention_head is required with attention='learned'"),
    ((3,), {"attention_head": LearnedAttention(D)}, r"and only then, got attention='cosine'"),
    ((3,), {"temperature": 0.0}, r"^temperature must be a finite number > 0"),
], ids=["negative-k", "float-k", "attention", "nearest-k0", "learned-no-head", "head-cosine",
        "temperature"])
def test_bad_options(args, options, match):
    with pytest.raises(ValueError, match=match):
        SoftNeighborLoss(*args, **options)


def test_mismatched_bank_width_names_the_shapes():
    bank = MemoryBank(N, D + 1)
    bank.enqueue(torch.randn(10, D + 1))
    with pytest.raises(ValueError, match="bank"):
        SoftNeighborLoss(3)(*inputs(), bank)


def test_docstring_example_runs():
    import doctest

    import snclr.loss

    result = doctest.testmod(snclr.loss)
    assert result.attempted > 0 and result.failed == 0
