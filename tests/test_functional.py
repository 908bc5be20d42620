"""soft_neighbor_loss against an independent float64 transcription of DESIGN section 2."""

import pytest
import torch
import torch.nn.functional as F

from snclr.functional import neighbor_weights, soft_neighbor_loss, thresholded_weights

T = 0.2
# (b, K, D): one realistic, several odd.
SHAPES = [(32, 5, 64), (1, 1, 16), (7, 3, 24), (9, 16, 8)]


def design_loss(z, y, key, nbr, *, threshold=False, tau_a=1.0, weights=None):
    """DESIGN section 2, one direction, single process, dense and loop-based."""
    b, k, _ = nbr.shape
    if weights is None:
        a = torch.stack([F.normalize(nbr[j], dim=1) @ F.normalize(y[j], dim=0) for j in range(b)])
        weights = torch.softmax(a / tau_a, dim=1)
        if threshold:
            weights = weights * (weights > 1 / k).double()
    columns = []
    for j in range(b):
        columns.append(F.normalize(key[j], dim=0))
        columns.extend(F.normalize(nbr[j, t], dim=0) for t in range(k))
    candidates = torch.stack(columns).detach()  # (M, D), ordered (sample, slot)
    log_p = torch.log_softmax(F.normalize(z, dim=1) @ candidates.t() / T, dim=1)
    total = 0
    for j in range(b):
        row = -log_p[j, j * (k + 1)]
        for t in range(k):
            row = row - weights[j, t] * log_p[j, j * (k + 1) + 1 + t]
        total = total + row
    return 2 * T * total / b


def inputs(b, k, d):
    g = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    return g(b, d).requires_grad_(), g(b, d).requires_grad_(), g(b, d), g(b, k, d)


@pytest.mark.parametrize("threshold", [False, True], ids=["plain", "threshold"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-K{}-D{}".format(*s))
def test_loss_and_gradients_match_design(shape, threshold):
    z, y, key, nbr = inputs(*shape)
    got = soft_neighbor_loss(z, y, key, nbr, temperature=T, threshold=threshold)
    expected = design_loss(z, y, key, nbr, threshold=threshold)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    grads = torch.autograd.grad(got, (z, y))
    expected_grads = torch.autograd.grad(expected, (z, y))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)
    assert grads[1].abs().max() > 0 or shape[1] == 1  # y receives the attention gradient


def test_attention_temperature():
    z, y, key, nbr = inputs(6, 4, 16)
    got = soft_neighbor_loss(z, y, key, nbr, attention_temperature=0.1)
    torch.testing.assert_close(got, design_loss(z, y, key, nbr, tau_a=0.1), atol=1e-10, rtol=1e-10)


def test_k0_is_mocov3():
    z, y, key, _ = inputs(10, 0, 16)
    got = soft_neighbor_loss(z, y, key, key.new_zeros(10, 0, 16))
    logits = F.normalize(z, dim=1) @ F.normalize(key, dim=1).t() / T
    mocov3 = 2 * T * F.cross_entropy(logits, torch.arange(10))
    torch.testing.assert_close(got, mocov3, atol=1e-10, rtol=1e-10)


def test_uniform_attention_equals_fixed_weights():
    z, y, key, nbr = inputs(8, 4, 16)
    got = soft_neighbor_loss(z, y, key, nbr, attention="uniform")
    fixed = torch.full((8, 4), 0.25, dtype=torch.float64)
    torch.testing.assert_close(got, design_loss(z, y, key, nbr, weights=fixed),
                               atol=1e-10, rtol=1e-10)
    (grad_y,) = torch.autograd.grad(got, y, allow_unused=True)
    assert grad_y is None


def test_nearest_attention_replaces_the_key():
    z, y, key, nbr = inputs(5, 3, 8)
    got = soft_neighbor_loss(z, y, key, nbr, attention="nearest")
    columns = torch.cat([F.normalize(key, dim=1).unsqueeze(1), F.normalize(nbr, dim=2)], 1)
    columns = columns.reshape(-1, 8)  # (B*S, D), ordered (sample, slot)
    log_p = torch.log_softmax(F.normalize(z, dim=1) @ columns.t() / T, dim=1)
    expected = -2 * T * log_p[torch.arange(5), torch.arange(5) * 4 + 1].mean()
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_detach_positiveness_leaves_y_without_gradient():
    z, y, key, nbr = inputs(6, 3, 16)
    loss = soft_neighbor_loss(z, y, key, nbr, detach_positiveness=True)
    assert torch.autograd.grad(loss, y, allow_unused=True)[0] is None
    torch.testing.assert_close(loss, soft_neighbor_loss(z, y, key, nbr), atol=1e-12, rtol=0)


def test_given_weights_are_used_as_is():
    z, y, key, nbr = inputs(6, 3, 16)
    weights = torch.rand(6, 3, dtype=torch.float64)
    got = soft_neighbor_loss(z, y, key, nbr, attention="learned", weights=weights)
    torch.testing.assert_close(got, design_loss(z, y, key, nbr, weights=weights),
                               atol=1e-10, rtol=1e-10)


def test_threshold_removes_the_weights_not_above_one_over_k():
    y, nbr = torch.randn(50, 16), torch.randn(50, 4, 16)
    plain = neighbor_weights(y, nbr, attention_temperature=0.2)
    cut = thresholded_weights(plain, attention="cosine", threshold=True)
    assert torch.equal(cut, plain * (plain > 0.25))
    assert torch.equal(thresholded_weights(cut, attention="learned", threshold=True), cut)
    assert thresholded_weights(plain, attention="uniform", threshold=True) is plain
    assert (cut == 0).any() and (cut > 0).all(1).logical_not().any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(neighbors=torch.randn(4, 2, 5)), r"must agree"),
        (dict(attention="softmax"), r"attention must be one of"),
        (dict(attention="learned"), r"needs the weights="),
        (dict(weights=torch.rand(4, 3)), r"weights must have shape \(B=4, K=2\)"),
        (dict(temperature=0), r"temperature must be a finite number > 0"),
        (dict(attention_temperature=0), r"^attention_temperature must be a finite number > 0"),
        (dict(neighbors=torch.randn(4, 0, 8), attention="nearest"),
         r"needs at least one neighbour"),
        (dict(y=torch.randn(3, 8)), r"y must have B=4 rows"),
        (dict(y=torch.randn(4, 6)), r"y must have D=8 columns"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(z=torch.randn(4, 8), y=torch.randn(4, 8), key=torch.randn(4, 8),
                neighbors=torch.randn(4, 2, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        soft_neighbor_loss(**args)


@pytest.mark.parametrize("threshold", [False, True], ids=["plain", "threshold"])
def test_triton_path_equals_reference(threshold, device):
    """The whole loss on the fused kernels (interpreted on a CPU) against the reference."""
    z, y, key, nbr = (t.float().to(device) for t in inputs(33, 5, 24))
    results = []
    for backend in ("torch", "triton"):
        zz, yy = z.detach().requires_grad_(), y.detach().requires_grad_()
        loss = soft_neighbor_loss(zz, yy, key, nbr, threshold=threshold, backend=backend)
        results.append((loss, *torch.autograd.grad(loss, (zz, yy))))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
