"""Projector, predictor and learned-attention heads.

The MLP follows MoCo v3 (Chen, Xie, He, ICCV 2021, "An Empirical Study of Training
Self-Supervised Vision Transformers"): Linear -> BN -> ReLU per hidden layer, and a last
BatchNorm without affine parameters after the output Linear. MoCo v3 uses a 3-layer projector
for ViT and 2 layers for ResNet, a 2-layer predictor, 4096 hidden and 256 output units;
SNCLR keeps these heads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LearnedAttention", "mlp", "predictor", "projector"]


def mlp(in_dim: int, hidden_dim: int, out_dim: int, *, num_layers: int,
        last_bn: bool = True) -> nn.Sequential:
    """``num_layers`` Linear layers with BN + ReLU between them and a non-affine last BN.

    Args:
        in_dim: input width.
        hidden_dim: width of the hidden layers.
        out_dim: output width.
        num_layers: number of Linear layers (>= 1).
        last_bn: end with ``BatchNorm1d(out_dim, affine=False)`` (MoCo v3).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                   nn.ReLU(inplace=True)]
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def projector(in_dim: int, *, hidden_dim: int = 4096, out_dim: int = 256,
              num_layers: int) -> nn.Sequential:
    """MoCo v3 projector g; its depth depends on the encoder family
    (:func:`snclr.encoders.projector_depth`: 3 layers for ViT, 2 for ResNet)."""
    return mlp(in_dim, hidden_dim, out_dim, num_layers=num_layers)


def predictor(dim: int = 256, *, hidden_dim: int = 4096, num_layers: int = 2) -> nn.Sequential:
    """MoCo v3 predictor h (online branch only)."""
    return mlp(dim, hidden_dim, dim, num_layers=num_layers)


class LearnedAttention(nn.Module):
    """The paper's learned positiveness: ``w = softmax_k(<f1(y), f2(nbr_k)> * scale)``.

    ``f1`` and ``f2`` are linear maps of the online projection and of the neighbours; the
    scale starts at ``1/sqrt(attention_dim)`` and is learned in log space.

    Shape:
        ``y`` ``(B, D)``, ``neighbors`` ``(B, K, D)`` -> weights ``(B, K)``.
    """

    def __init__(self, dim: int, attention_dim: int | None = None) -> None:
        super().__init__()
        self.attention_dim = attention_dim or dim
        self.query = nn.Linear(dim, self.attention_dim)
        self.key = nn.Linear(dim, self.attention_dim)
        self.log_scale = nn.Parameter(torch.tensor(-0.5 * math.log(self.attention_dim)))

    def forward(self, y: Tensor, neighbors: Tensor) -> Tensor:
        scores = torch.einsum("ba,bka->bk", self.query(y), self.key(neighbors.to(y.dtype)))
        return torch.softmax(scores * self.log_scale.exp(), dim=-1)

    def extra_repr(self) -> str:
        return f"attention_dim={self.attention_dim}"
