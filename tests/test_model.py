"""SNCLR model: training reduces the loss, EMA-only momentum branch, queue fills, variants."""

import copy

import pytest
import torch

from snclr import SNCLR, create_model
from snclr.encoders import create_encoder, list_encoders, register_encoder

SMALL = dict(in_chans=1, img_size=28, projector_hidden=64, projector_dim=32, predictor_hidden=64)


def views(images, generator):
    noise = lambda: 0.3 * torch.randn(images.shape, generator=generator)  # noqa: E731
    return images + noise(), images + noise()


def train(model, steps, batch=16):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 1, 28, 28, generator=generator)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        out = model(*views(images, generator))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.momentum_update(0.9)
        model.enqueue(out.keys)
        losses.append(out.loss.item())
    return losses, out


def test_training_reduces_the_loss_and_fills_the_queue():
    model = create_model("small_cnn", num_neighbors=3, queue_size=64, **SMALL)
    losses, out = train(model, 12)
    assert model.bank.num_filled == 64
    assert sum(losses[-3:]) / 3 < sum(losses[3:6]) / 3  # after the neighbour terms switch on
    assert out.neighbor_indices.shape == (16, 3) and out.positiveness.shape == (16, 3)
    assert 0 < out.positiveness_entropy <= torch.log(torch.tensor(3.0)) + 1e-6


def test_momentum_branch_changes_only_through_ema():
    model = create_model("small_cnn", num_neighbors=2, queue_size=32, **SMALL)
    before = [p.detach().clone() for p in model.momentum_parameters()]
    out = model(torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28))
    out.loss.backward()
    assert all(p.grad is None for p in model.momentum_parameters())
    online = [p.detach().clone() for p in model.online_parameters()]
    model.momentum_update(0.75)
    for m, b, o in zip(model.momentum_parameters(), before, online):
        torch.testing.assert_close(m, 0.75 * b + 0.25 * o)


def test_forward_does_not_change_the_queue():
    model = create_model("small_cnn", num_neighbors=2, queue_size=32, **SMALL)
    model.enqueue(torch.randn(8, 32))
    snapshot = model.bank.queue.clone()
    model(torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28))
    assert torch.equal(snapshot, model.bank.queue) and model.bank.num_filled == 8


@pytest.mark.parametrize("method", ["snclr", "mocov3", "nnclr", "snclr-uniform", "snclr-learned"])
def test_every_method_trains(method):
    model = create_model("small_cnn", method=method, num_neighbors=3, queue_size=32,
                         threshold=True, **SMALL)
    losses, out = train(model, 4, batch=8)
    assert all(torch.isfinite(torch.tensor(losses)))
    expected_k = {"mocov3": 0, "nnclr": 1}.get(method, 3)
    assert model.num_neighbors == expected_k
    if expected_k:
        assert out.neighbor_indices.shape == (8, expected_k)
    if method == "snclr-learned":
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for p in model.attention_head.parameters())


def test_vit_encoder_gets_a_three_layer_projector():
    model = create_model("vit_tiny", in_chans=1, img_size=28, projector_hidden=32,
                         projector_dim=16, predictor_hidden=32, queue_size=16)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.projector) == 3
    assert model(torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)).loss.isfinite()


def test_the_projector_depth_comes_from_the_encoder_family():
    def depth(model):
        return sum(isinstance(m, torch.nn.Linear) for m in model.projector)

    heads = dict(projector_hidden=32, projector_dim=8, predictor_hidden=32, queue_size=16)
    vit = create_encoder("vit_tiny", in_chans=1, img_size=28)
    assert depth(SNCLR(vit, **heads)) == 3  # create_encoder records the family's depth
    assert depth(SNCLR(create_encoder("small_cnn", in_chans=1), **heads)) == 2
    custom = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 40))
    assert depth(SNCLR(custom, num_features=40, **heads)) == 2
    assert depth(SNCLR(vit, projector_layers=1, **heads)) == 1
    assert depth(create_model("small_cnn", projector_layers=None, **SMALL)) == 2


def test_custom_encoder_module():
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 40))
    model = SNCLR(encoder, num_features=40, num_neighbors=2, queue_size=16, projector_hidden=32,
                  projector_dim=8, predictor_hidden=32)
    model.enqueue(torch.randn(4, 8))
    assert model(torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)).loss.isfinite()


def test_encoder_registry_refuses_duplicates_and_unknown_names():
    assert {"small_cnn", "resnet18", "resnet50", "vit_small"} <= set(list_encoders())
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("small_cnn")(lambda **kw: None)
    with pytest.raises(ValueError, match="unknown encoder 'resnet7'"):
        create_encoder("resnet7")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_neighbors=10, queue_size=5), r"queue_size=5 must be >= num_neighbors=10"),
        (dict(attention="dot"), r"attention must be one of"),
        (dict(num_neighbors=-1), r"num_neighbors must be >= 0"),
        (dict(temperature=0), r"^temperature must be a finite number > 0"),
        (dict(attention_temperature=float("nan")), r"^attention_temperature must be a finite"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SNCLR(create_encoder("small_cnn", in_chans=1), **kwargs)
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        create_model("small_cnn", method="byol")


def test_triton_backend_equals_reference(device):
    """One model step on the fused kernels (interpreted on a CPU) against the reference ops."""
    torch.manual_seed(3)
    base = create_model("small_cnn", num_neighbors=4, queue_size=48, **SMALL).to(device)
    base.enqueue(torch.randn(40, 32, device=device))
    x1, x2 = torch.randn(6, 1, 28, 28, device=device), torch.randn(6, 1, 28, 28, device=device)
    results = []
    for backend in ("torch", "triton"):
        model = copy.deepcopy(base)
        model.backend = backend
        out = model(x1, x2)
        out.loss.backward()
        results.append((out, [p.grad for p in model.online_parameters()]))
    (ref, ref_grads), (got, got_grads) = results
    assert torch.equal(got.neighbor_indices, ref.neighbor_indices)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.positiveness, ref.positiveness, atol=1e-5, rtol=1e-4)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_queue_with_fp32_features(backend, device):
    """A bf16 queue is searched in bf16; positiveness and the loss stay fp32 and match the
    same step with the queue's rows in fp32 (the rows are the same bf16 values)."""
    torch.manual_seed(4)
    base = create_model("small_cnn", num_neighbors=4, queue_size=48, bank_dtype=torch.bfloat16,
                        backend=backend, **SMALL).to(device)
    base.enqueue(torch.randn(40, 32, device=device))
    wide = copy.deepcopy(base)
    wide.bank.queue = wide.bank.queue.float()
    x1, x2 = torch.randn(6, 1, 28, 28, device=device), torch.randn(6, 1, 28, 28, device=device)
    out, ref = base(x1, x2), wide(x1, x2)
    assert base.bank.queue.dtype == torch.bfloat16
    assert out.loss.dtype == out.positiveness.dtype == torch.float32
    assert bool(out.loss.isfinite())
    torch.testing.assert_close(out.positiveness, ref.positiveness, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-4)
    out.loss.backward()
    assert all(p.grad is not None for p in base.online_parameters())


@pytest.mark.parametrize("method, options", [
    ("snclr", {}), ("snclr", {"threshold": True, "bank_mode": "global"}),
    ("snclr", {"exclude_self_neighbors": True, "visit_period": 8}),
    ("snclr-learned", {}), ("snclr-uniform", {}), ("nnclr", {}), ("mocov3", {}),
])
def test_forward_compiles_without_graph_breaks(method, options):
    """Host-side queue counts and custom ops keep the whole forward one graph."""
    import torch._dynamo as dynamo

    if method != "mocov3":
        options = {"num_neighbors": 3, **options}
    model = create_model("small_cnn", method=method, queue_size=16, **SMALL, **options)
    model.enqueue(torch.randn(16, 32), sources=torch.arange(16))
    x1, x2 = torch.randn(2, 4, 1, 28, 28).unbind()
    dynamo.reset()
    explained = dynamo.explain(model)(x1, x2, torch.arange(4))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x1, x2, torch.arange(4)).loss,
                               model(x1, x2, torch.arange(4)).loss)


def _self_neighbor_run(method, *, exclude, indices, steps=6, seed=0):
    """Steps on the same images, enqueueing their keys with ``indices`` as sources.

    Duplicates in a batch enqueue an image up to 3 times per 8 keys here: a period of 2
    keys still bounds its rows (at most 1 per 2 keys).
    """
    distinct = len(set(indices.tolist())) == len(indices)
    torch.manual_seed(seed)
    model = create_model("small_cnn", method=method, num_neighbors=3, queue_size=32,
                         backend="torch", exclude_self_neighbors=exclude,
                         visit_period=len(indices) if distinct else 2, **SMALL)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(len(indices), 1, 28, 28, generator=generator)
    outs = []
    for _ in range(steps):
        with torch.no_grad():
            out = model(*views(images, generator), indices)
        model.enqueue(out.keys, sources=indices)
        outs.append((out, model.bank.sources.clone()))
    return outs


@pytest.mark.parametrize("method", ["snclr", "snclr-uniform", "snclr-learned", "nnclr"])
@pytest.mark.parametrize("indices", [torch.arange(8), torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])],
                         ids=["distinct", "duplicates"])
def test_exclude_self_neighbors_never_returns_the_samples_own_key(method, indices):
    def self_found(exclude):
        found = []
        for out, sources in _self_neighbor_run(method, exclude=exclude, indices=indices):
            if out.neighbor_indices is not None:
                found.append((sources[out.neighbor_indices] == indices[:, None]).any().item())
        return found

    with_self = self_found(False)
    assert any(with_self)  # the test can see self-neighbours: its own keys are the nearest
    without = self_found(True)
    assert len(without) >= 4 and not any(without)  # neighbours found, also once the queue wraps


def test_exclude_self_neighbors_waits_for_k_rows_beyond_the_own_ones():
    # 8 images, queue 32: after one step 8 rows (1 own row each, bound E = 2): K + E = 5 <= 8.
    model = create_model("small_cnn", num_neighbors=3, queue_size=32, backend="torch",
                         exclude_self_neighbors=True, visit_period=8, **SMALL)
    indices = torch.arange(4)
    model.enqueue(torch.randn(4, 32), sources=indices)  # 4 rows: 4 < K + E = 5
    out = model(torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), indices)
    assert out.neighbor_indices is None
    model.enqueue(torch.randn(1, 32), sources=torch.tensor([7]))
    out = model(torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), indices)
    assert out.neighbor_indices is not None
    assert not (model.bank.sources[out.neighbor_indices] == indices[:, None]).any()


@pytest.mark.parametrize("method", ["snclr", "nnclr"])
def test_without_the_option_indices_change_nothing(method):
    indices = torch.arange(8)
    plain = _self_neighbor_run(method, exclude=False, indices=indices)
    torch.manual_seed(0)
    model = create_model("small_cnn", method=method, num_neighbors=3, queue_size=32,
                         backend="torch", **SMALL)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 1, 28, 28, generator=generator)
    for out, _ in plain:
        with torch.no_grad():
            old = model(*views(images, generator))
        model.enqueue(old.keys, sources=indices)
        assert torch.equal(old.loss, out.loss)
        assert (old.neighbor_indices is None) == (out.neighbor_indices is None)
        if old.neighbor_indices is not None:
            assert torch.equal(old.neighbor_indices, out.neighbor_indices)
