"""What each method fixes or never reads, as the program's option checks state it."""

import pytest
import torch

from snclr.model import METHODS, create_model
from snclr.training.methods import fixed_options


def test_fixed_options_name_what_each_method_sets_or_never_reads():
    assert fixed_options("snclr") == {}
    assert set(fixed_options("mocov3")) == {"num_neighbors", "attention_temperature", "threshold",
                                            "detach_positiveness", "exclude_self_neighbors"}
    assert fixed_options("nnclr")["num_neighbors"] == "nnclr fixes num_neighbors=1"
    assert set(fixed_options("snclr-learned")) == {"attention_temperature"}
    assert set(fixed_options("snclr-uniform")) == {"attention_temperature", "threshold",
                                                   "detach_positiveness"}
    assert set(METHODS) == {"snclr", "snclr-uniform", "snclr-learned", "nnclr", "mocov3"}
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        fixed_options("byol")


VARIED = {"attention_temperature": (1.0, 0.1), "threshold": (False, True),
          "detach_positiveness": (False, True)}


@pytest.mark.parametrize("method", ["snclr", "snclr-uniform", "snclr-learned", "nnclr", "mocov3"])
def test_an_option_a_method_never_reads_changes_nothing_and_one_it_reads_does(method):
    def loss_and_grads(**option):
        torch.manual_seed(0)
        model = create_model("small_cnn", method=method, in_chans=1, img_size=28, queue_size=16,
                             num_neighbors=3, projector_hidden=32, projector_dim=8,
                             predictor_hidden=32, **option)
        model.enqueue(torch.randn(16, 8))
        x1, x2 = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
        loss = model(x1, x2).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    unread = fixed_options(method)
    for name, (a, b) in VARIED.items():
        loss_a, grads_a = loss_and_grads(**{name: a})
        loss_b, grads_b = loss_and_grads(**{name: b})
        same = torch.equal(loss_a, loss_b) and all(map(torch.equal, grads_a, grads_b))
        assert same == (name in unread), (method, name)
