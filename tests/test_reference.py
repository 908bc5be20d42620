"""The reference ops against direct dense formulas, and gradcheck in float64."""

import pytest
import torch
import torch.nn.functional as F

from snclr import reference

# (B, N, D, K): one realistic, several odd.
KNN_SHAPES = [(64, 1000, 32, 16), (1, 5, 16, 1), (7, 100, 96, 3), (33, 333, 64, 16)]


def assert_topk_matches(values, indices, query, bank, k):
    """Tie-robust top-k check of DESIGN section 5."""
    scores = query.double() @ bank.double().t()
    expected = torch.topk(scores, k).values
    torch.testing.assert_close(values.double(), expected, atol=1e-5, rtol=1e-5)
    recomputed = scores.gather(1, indices)
    torch.testing.assert_close(recomputed, values.double(), atol=1e-5, rtol=1e-5)
    assert (values.double() >= expected[:, -1:] - 1e-5).all()
    assert (indices.sort(1).values.diff(dim=1) > 0).all(), "an index was returned twice"


@pytest.mark.parametrize("shape", KNN_SHAPES, ids=lambda s: "B{}-N{}-D{}-K{}".format(*s))
def test_knn_topk_matches_dense_topk(shape):
    b, n, d, k = shape
    query, bank = torch.randn(b, d), torch.randn(n, d)
    values, indices = reference.knn_topk(query, bank, k)
    assert values.shape == indices.shape == (b, k) and indices.dtype == torch.int64
    assert_topk_matches(values, indices, query, bank, k)


def test_knn_topk_ties_go_to_smaller_index():
    bank = torch.randn(10, 8).repeat(3, 1)  # every row appears at n, n + 10, n + 20
    query = torch.randn(5, 8)
    _, indices = reference.knn_topk(query, bank, 3)
    best = indices[:, 0]
    assert (indices == torch.stack([best, best + 10, best + 20], 1)).all()


def test_knn_topk_nan_rows_never_win_and_exclusion():
    bank = torch.randn(20, 8)
    bank[3] = float("nan")
    query = torch.randn(4, 8)
    values, indices = reference.knn_topk(query, bank, 19)
    assert not (indices == 3).any() and torch.isfinite(values).all()
    exclude = indices[:, :2].clone()
    exclude[0, 1] = -1  # padding keeps row 0's second best eligible
    values2, indices2 = reference.knn_topk(query, bank, 5, exclude=exclude)
    assert not (indices2[1:].unsqueeze(2) == exclude[1:].unsqueeze(1)).any()
    assert indices2[0, 0] == indices[0, 1]
    torch.testing.assert_close(values2[1:], values[1:, 2:7])


def test_knn_topk_reports_minus_inf_when_rows_run_out():
    bank, query = torch.randn(4, 8), torch.randn(2, 8)
    exclude = torch.tensor([[0, 1], [2, -1]])
    values, _ = reference.knn_topk(query, bank, 4, exclude=exclude)
    assert torch.isinf(values[0, 2:]).all() and torch.isfinite(values[0, :2]).all()
    assert torch.isinf(values[1, 3]) and torch.isfinite(values[1, :3]).all()


def test_soft_neighbors_definition():
    key, online = torch.randn(9, 16), torch.randn(9, 16)
    bank = F.normalize(torch.randn(50, 16), dim=1)
    out = reference.soft_neighbors(key, online, bank, 4, attention_temperature=0.5)
    assert_topk_matches(out.similarity, out.indices, F.normalize(key, dim=1), bank, 4)
    torch.testing.assert_close(out.neighbors, bank[out.indices])
    logits = torch.einsum("bd,bkd->bk", F.normalize(online, dim=1), out.neighbors) / 0.5
    torch.testing.assert_close(out.positiveness, logits.softmax(1))
    thresholded = reference.soft_neighbors(key, online, bank, 4, attention_temperature=0.5,
                                           threshold=True)
    kept = out.positiveness > 0.25
    torch.testing.assert_close(thresholded.positiveness, out.positiveness * kept)
    assert (~kept).any() and kept.any()


def test_threshold_keeps_the_weights_above_one_over_k():
    weights = torch.tensor([[0.5, 0.25, 0.15, 0.1], [0.25, 0.25, 0.25, 0.25]])
    expected = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # 1/K = 0.25 is cut
    assert torch.equal(reference.thresholded(weights), expected)
    # K is the last dimension: with two neighbours the cut is 1/2.
    assert reference.threshold_mask(torch.tensor([[0.7, 0.3], [0.5, 0.5]])).tolist() == [
        [True, False], [False, False]]


@pytest.mark.parametrize("offset", [0, 5])
def test_soft_target_loss_matches_log_softmax(offset):
    b, s, m, d = 6, 3, 30, 12
    q, c = torch.randn(b, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    t = torch.rand(b, s, dtype=torch.float64)
    loss = reference.soft_target_contrastive_loss(q, c, t, temperature=0.3, target_offset=offset)
    log_p = torch.log_softmax(F.normalize(q, dim=1) @ F.normalize(c, dim=1).t() / 0.3, dim=1)
    dense_targets = torch.zeros(b, m, dtype=torch.float64)
    for j in range(b):
        dense_targets[j, offset + j * s : offset + (j + 1) * s] = t[j]
    torch.testing.assert_close(loss, -(dense_targets * log_p).sum(1), atol=1e-12, rtol=1e-12)


def test_gradcheck_knn_topk_values():
    query = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, b: reference.knn_topk(q, b, 4)[0], (query, bank))


def test_gradcheck_soft_neighbors_positiveness():
    key = torch.randn(5, 6, dtype=torch.float64)
    online = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    bank = F.normalize(torch.randn(20, 6, dtype=torch.float64), dim=1).requires_grad_()
    for threshold in (False, True):
        def positiveness(o, b, threshold=threshold):
            return reference.soft_neighbors(key, o, b, 4, attention_temperature=0.7,
                                            threshold=threshold).positiveness

        assert torch.autograd.gradcheck(positiveness, (online, bank))


def test_gradcheck_soft_target_contrastive_loss():
    q = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(15, 5, dtype=torch.float64, requires_grad=True)
    t = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    def loss(q, c, t):
        return reference.soft_target_contrastive_loss(q, c, t, temperature=0.2, target_offset=2)

    assert torch.autograd.gradcheck(loss, (q, c, t))


def test_knn_topk_gradient_is_sparse_gather():
    """The query gradient only involves the K selected rows (no dense B x N term)."""
    query = torch.randn(3, 8, requires_grad=True)
    bank = torch.randn(40, 8)
    values, indices = reference.knn_topk(query, bank, 5)
    (grad,) = torch.autograd.grad(values.sum(), query)
    torch.testing.assert_close(grad, bank[indices].sum(1))
