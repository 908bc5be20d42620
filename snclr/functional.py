"""The SNCLR loss, one direction per call, built from the public ops (DESIGN section 2).

Stateless: no parameters and no queue access. The model searches the queue and passes the
neighbours (and, for learned attention, the weights) in.

Alphabet: B local batch, K neighbours, S = K + 1 target slots, D features, W world size,
M = W*B*S gathered candidate columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from snclr import distributed, ops
from snclr.ops._checks import check_features, check_positive
from snclr.reference import thresholded

__all__ = ["ATTENTIONS", "ATTENTION_OPTIONS", "ATTENTION_TEMPERATURE", "TEMPERATURE",
           "neighbor_weights", "soft_neighbor_loss", "thresholded_weights"]

# The defaults of DESIGN section 2, stated here only (the model and the config take them from
# here): the logit temperature T of MoCo v3 and SNCLR, and tau_a of the positiveness softmax
# (1 reproduces the reference code).
TEMPERATURE = 0.2
ATTENTION_TEMPERATURE = 1.0

# Which options each attention reads, stated once (the program's method table derives what a
# comparison may vary from it). cosine: softmax of <n(y), n(nbr)> / tau_a (SNCLR default);
# learned: weights from a module (``snclr.heads.LearnedAttention``), passed in; uniform: 1/K;
# nearest: the nearest neighbour alone replaces the key as the positive (NNCLR). Constant
# weights have no threshold to apply and no gradient to detach.
ATTENTION_OPTIONS: dict[str, tuple[str, ...]] = {
    "cosine": ("attention_temperature", "threshold", "detach_positiveness"),
    "learned": ("threshold", "detach_positiveness"),
    "uniform": (),
    "nearest": (),
}
ATTENTIONS = tuple(ATTENTION_OPTIONS)


def neighbor_weights(
    y: Tensor,
    neighbors: Tensor,
    *,
    attention: str = "cosine",
    attention_temperature: float = ATTENTION_TEMPERATURE,
) -> Tensor:
    """Positiveness weights ``w`` of the K neighbours of each sample, before the threshold.

    Args:
        y: ``(B, D)`` online projections.
        neighbors: ``(B, K, D)`` neighbour rows, raw or normalised.
        attention: ``"cosine"``, ``"uniform"`` or ``"nearest"``.
        attention_temperature: tau_a of the cosine softmax.

    Returns:
        ``(B, K)`` weights; for ``cosine`` differentiable w.r.t. ``y``.
    """
    num_neighbors = neighbors.shape[1]
    if attention == "cosine":
        check_positive("attention_temperature", attention_temperature)
        scores = torch.einsum(
            "bd,bkd->bk", F.normalize(y, dim=-1), F.normalize(neighbors.to(y.dtype), dim=-1)
        )
        return torch.softmax(scores / attention_temperature, dim=-1)
    if attention == "uniform":
        return y.new_full((y.shape[0], num_neighbors), 1.0 / num_neighbors)
    if attention == "nearest":
        return F.one_hot(
            torch.zeros(y.shape[0], dtype=torch.long, device=y.device), num_neighbors
        ).to(y.dtype)
    raise ValueError(
        f"attention must be one of {ATTENTIONS[:3]} here ('learned' weights are "
        f"passed as weights=), got {attention!r}"
    )


def thresholded_weights(weights: Tensor, *, attention: str, threshold: bool) -> Tensor:
    """The weights the loss uses: ``w * [w > 1/K]`` when ``threshold`` is on and the
    attention reads it (the rule itself is :func:`snclr.reference.thresholded`)."""
    if threshold and "threshold" in ATTENTION_OPTIONS[attention]:
        return thresholded(weights)
    return weights


def _check_loss_inputs(
    z: Tensor, y: Tensor, key: Tensor, neighbors: Tensor, weights: Tensor | None, attention: str
) -> None:
    check_features("z", z)
    check_features("y", y)
    check_features("key", key)
    check_features("neighbors", neighbors, ndim=3)
    shapes = f"z {tuple(z.shape)}, y {tuple(y.shape)}, key {tuple(key.shape)}, " + (
        f"neighbors {tuple(neighbors.shape)}"
    )
    batch, dim = key.shape
    if z.shape != key.shape or neighbors.shape[0] != batch or neighbors.shape[2] != dim:
        raise ValueError(f"z, key (B, D) and neighbors (B, K, D) must agree: got {shapes}")
    if y.shape[0] != batch:
        raise ValueError(f"y must have B={batch} rows: got {shapes}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    num_neighbors = neighbors.shape[1]
    if weights is not None:
        check_features("weights", weights)
        if weights.shape != (batch, num_neighbors):
            raise ValueError(
                f"weights must have shape (B={batch}, K={num_neighbors}), "
                f"got {tuple(weights.shape)}"
            )
    elif attention == "learned" and num_neighbors > 0:
        raise ValueError("attention='learned' needs the weights= computed by the module")
    elif attention == "cosine" and num_neighbors > 0 and y.shape[1] != dim:
        raise ValueError(f"cosine attention scores the neighbours with y: y must have D={dim} "
                         f"columns, got {shapes}")
    if attention == "nearest" and num_neighbors == 0:
        raise ValueError("attention='nearest' (NNCLR) needs at least one neighbour, got K=0")


def soft_neighbor_loss(
    z: Tensor,
    y: Tensor,
    key: Tensor,
    neighbors: Tensor,
    *,
    temperature: float = TEMPERATURE,
    threshold: bool = False,
    detach_positiveness: bool = False,
    attention: str = "cosine",
    attention_temperature: float = ATTENTION_TEMPERATURE,
    weights: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """One direction of the SNCLR loss, exactly as DESIGN section 2.

    Candidates ``[n(key_j), n(nbr_j1), ..., n(nbr_jK)]`` of every sample are gathered from
    all ranks (no gradient) into M = W*B*(K+1) columns; row j's soft target is 1 at its own
    key and ``w_jt`` at its own neighbours (not normalised), and::

        L = 2T * mean_j( sum(u_j) * lse_j - sum_t u_jt * s_j,own(t) )

    With K = 0 this is the MoCo v3 loss. Under torch.distributed the mean is over the local
    batch, so averaging gradients across ranks (as DDP does) gives the global-batch gradient.

    Args:
        z: ``(B, D)`` online predictions (queries).
        y: ``(B, D')`` online projections (score the neighbours for ``cosine`` attention).
        key: ``(B, D)`` momentum keys of the other view.
        neighbors: ``(B, K, D)`` the keys' neighbours from the queue, raw or normalised.
        temperature: logit temperature T.
        threshold: zero positiveness weights ``<= 1/K`` (cosine and learned attention;
            applied to given ``weights`` too, so pass them unthresholded).
        detach_positiveness: stop the gradient from the loss into ``y`` through ``w``.
        attention: ``"cosine"``, ``"uniform"``, ``"nearest"`` (NNCLR) or ``"learned"``.
        attention_temperature: tau_a of the cosine positiveness softmax.
        weights: ``(B, K)`` precomputed positiveness (required for learned).
        backend: forwarded to :func:`snclr.ops.soft_target_contrastive_loss`.

    Returns:
        Scalar loss (float32, float64 for float64 inputs).

    Example:
        >>> import torch
        >>> from snclr.functional import soft_neighbor_loss
        >>> z, y, k = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = soft_neighbor_loss(z, y, k, torch.randn(8, 3, 16))
        >>> loss.dim()
        0
    """
    _check_loss_inputs(z, y, key, neighbors, weights, attention)
    check_positive("temperature", temperature)
    check_positive("attention_temperature", attention_temperature)
    batch, num_neighbors, dim = neighbors.shape
    if num_neighbors == 0:
        weights = z.new_zeros(batch, 0)
    elif weights is None:
        weights = neighbor_weights(y, neighbors, attention=attention,
                                   attention_temperature=attention_temperature)
    weights = thresholded_weights(weights, attention=attention, threshold=threshold)
    if detach_positiveness:
        weights = weights.detach()
    # NNCLR: the nearest neighbour replaces the key as the positive.
    key_weight = 0.0 if attention == "nearest" else 1.0
    targets = torch.cat([weights.new_full((batch, 1), key_weight), weights], dim=1)  # (B, S)
    local = torch.cat(
        [F.normalize(key.detach(), dim=-1).unsqueeze(1), F.normalize(neighbors.detach(), dim=-1)],
        dim=1,
    ).reshape(batch * (num_neighbors + 1), dim)  # (B*S, D), ordered (sample, slot)
    candidates = distributed.gather_no_grad(local.to(z.dtype))  # (W*B*S, D), rank-major
    losses = ops.soft_target_contrastive_loss(
        z,
        candidates,
        targets,
        temperature=temperature,
        target_offset=distributed.rank() * local.shape[0],
        backend=backend,
    )  # (B,)
    return 2 * temperature * losses.mean()
