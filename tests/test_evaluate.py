"""kNN and linear-probe evaluation on features with known answers, and on a checkpoint."""

from dataclasses import replace

import pytest
import torch

from snclr.training.config import preset
from snclr.training.evaluate import (
    knn_accuracy,
    linear_probe,
    linear_probe_augmented,
    load_backbone,
    parameter_checksum,
    run_knn,
    run_linear,
    weighted_knn_predict,
)
from snclr.training.train import pretrain


def clusters(num_classes=4, per_class=50, dim=16, spread=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator) * 3
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_knn_on_separated_clusters_is_perfect():
    train_x, train_y = clusters(seed=0)
    test_x, test_y = clusters(seed=0, per_class=10)
    result = knn_accuracy(train_x, train_y, test_x + 0.01, test_y, ks=(20, 200))
    assert result == {"top1_k20": 1.0, "top1_k200": 1.0}


def test_knn_votes_are_weighted_by_similarity():
    # One very close neighbour of class 1 outvotes two distant ones of class 0 at T = 0.07.
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.05]])
    scores = weighted_knn_predict(memory, labels, query, ks=(3,), num_classes=2)[3]
    assert scores.argmax(1).item() == 1
    uniform = weighted_knn_predict(memory, labels, query, ks=(3,), num_classes=2,
                                   temperature=1e3)[3]
    assert uniform.argmax(1).item() == 0  # near-uniform weights: majority wins


def test_knn_on_random_labels_is_near_chance():
    train_x, _ = clusters(num_classes=4, per_class=100)
    test_x, _ = clusters(num_classes=4, per_class=25, seed=1)
    g = torch.Generator().manual_seed(0)
    result = knn_accuracy(train_x, torch.randint(0, 4, (400,), generator=g), test_x,
                          torch.randint(0, 4, (100,), generator=g), ks=(20,), num_classes=4)
    assert result["top1_k20"] < 0.5


def test_linear_probe_separates_clusters():
    train_x, train_y = clusters(num_classes=5, spread=0.5)
    test_x, test_y = clusters(num_classes=5, per_class=20, spread=0.5, seed=0)
    assert linear_probe(train_x, train_y, test_x, test_y, num_classes=5, epochs=20)["top1"] == 1.0


def test_linear_probe_uses_the_pretraining_cosine_schedule_without_warmup(monkeypatch):
    from snclr.training.optim import cosine_lr

    seen, step = [], torch.optim.SGD.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    x, y = clusters(per_class=10)  # 40 rows, batch 16: 3 steps an epoch
    linear_probe(x, y, x, y, num_classes=4, epochs=3, lr=0.2, batch_size=16)
    assert seen == [cosine_lr(i, lr=0.2, warmup_epochs=0, epochs=9) for i in range(9)]
    assert seen[0] == 0.2 and seen[-1] < 0.01


def test_parameter_checksum_sees_any_change():
    module = torch.nn.Linear(3, 3)
    before = parameter_checksum(module)
    with torch.no_grad():
        module.weight[0, 0] += 1e-3
    assert parameter_checksum(module) != before


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    config = replace(preset("demo"), output_dir=str(run), limit_samples=64, batch_size=32, epochs=1,
                     queue_size=64, projector_hidden=32, projector_dim=16, predictor_hidden=32,
                     num_workers=0, knn_every=0)
    pretrain(config)
    return str(run / "checkpoint.pt")


def test_checkpoint_backbone_and_random_init_differ(checkpoint):
    trained, info = load_backbone(checkpoint)
    random, _ = load_backbone(checkpoint, random_init=True)
    assert info["in_chans"] == 1 and info["img_size"] == 28
    assert parameter_checksum(trained) != parameter_checksum(random)


def test_knn_and_linear_on_a_checkpoint(checkpoint):
    knn = run_knn(checkpoint, "animal-mnist", limit_samples=500)
    assert set(knn) == {"top1", "top1_k20", "top1_k200"} and 0.1 < knn["top1"] <= 1
    linear = run_linear(checkpoint, "animal-mnist", epochs=2, limit_samples=500)
    assert 0.1 < linear["top1"] <= 1


def test_augmented_linear_probe_is_seeded_and_leaves_the_backbone_alone(checkpoint):
    first = run_linear(checkpoint, "animal-mnist", epochs=2, limit_samples=100,
                       protocol="augmented", seed=3)
    again = run_linear(checkpoint, "animal-mnist", epochs=2, limit_samples=100,
                       protocol="augmented", seed=3)
    assert first == again and 0.1 < first["top1"] <= 1
    # The same head trained on cached features (one pass, no augmentation) sees other inputs.
    cached = run_linear(checkpoint, "animal-mnist", epochs=2, limit_samples=100, seed=3)
    assert 0.1 < cached["top1"] <= 1


def test_augmented_probe_encodes_a_fresh_crop_and_flip_of_every_image_each_epoch():
    from snclr.training.data import ImageSet

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(x.clone())
            return x.flatten(1)

    # Bright right half, a gradient down the rows: a flip or a crop changes the pixels.
    images = torch.zeros(12, 1, 8, 8, dtype=torch.uint8)
    images[..., 4:] = (torch.arange(8, dtype=torch.uint8) * 30)[:, None] + 20
    labels = torch.arange(2).repeat(6)
    train = ImageSet(labels=labels, in_chans=1, img_size=8, num_classes=2, images=images)
    features = images.float().flatten(1) / 127.5 - 1
    encoder = Recorder()
    result = linear_probe_augmented(
        encoder, train, features, labels, img_size=8, num_classes=2, device=torch.device("cpu"),
        standardize=(features.mean(0), features.std(0) + 1e-6), epochs=2, batch_size=5)
    assert 0 <= result["top1"] <= 1
    assert [len(x) for x in encoder.seen] == [5, 5, 2, 5, 5, 2]  # every image, every epoch
    epoch1, epoch2 = torch.cat(encoder.seen[:3]), torch.cat(encoder.seen[3:])
    plain = images.float() / 127.5 - 1
    flipped = (epoch1[..., :4] > epoch1[..., 4:]).all(-1).all(-1).sum()  # bright half on the left
    assert flipped > 0 and not torch.equal(epoch1, epoch2)
    assert sum(any(torch.equal(x, y) for y in plain) for x in epoch1) < len(epoch1)
