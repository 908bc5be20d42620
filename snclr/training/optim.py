"""Optimisers (AdamW, LARS) and schedules as pure functions of the fractional epoch.

Following MoCo v3, biases and normalisation parameters (every parameter with one dimension)
get no weight decay and no LARS trust-ratio adaptation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LARS", "create_optimizer", "cosine_lr", "parameter_groups"]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases/norm params (neither)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in MoCo v3: SGD momentum on the trust-ratio-scaled update.

    ``update = grad + wd * p``; ``update *= eta * |p| / |update|`` (where both norms > 0,
    unless the group sets ``lars_exclude``); ``mu = momentum * mu + update``; ``p -= lr * mu``.
    """

    def __init__(self, params, lr: float = 0.0, *, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    ratio = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def create_optimizer(model: nn.Module, name: str, *, weight_decay: float) -> torch.optim.Optimizer:
    """``adamw`` or ``lars`` over :func:`parameter_groups`; the lr is set every step."""
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        for group in groups:
            group.pop("lars_exclude")
        return torch.optim.AdamW(groups, lr=0.0)
    if name == "lars":
        return LARS(groups, lr=0.0)
    raise ValueError(f"optimizer must be 'adamw' or 'lars', got {name!r}")


def cosine_lr(epoch: float, *, lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup_epochs``, then half-cosine decay to 0 (MoCo v3)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
