"""The symmetric SNCLR loss as an ``nn.Module``, for training loops of your own.

:class:`SoftNeighborLoss` holds the options; given the online projections and predictions,
the momentum keys of both views and the queue, it searches the queue and returns
``L(z1, y1, k2) + L(z2, y2, k1)`` (DESIGN section 2). The math is
:func:`snclr.functional.soft_neighbor_loss`; :func:`direction_loss` is the one direction
both this module and :class:`snclr.SNCLR` compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snclr import functional, ops
from snclr.bank import MemoryBank
from snclr.ops._checks import check_positive

__all__ = ["SoftNeighborLoss", "direction_loss"]


def direction_loss(
    z: Tensor,
    y: Tensor,
    key: Tensor,
    bank: MemoryBank,
    k: int,
    *,
    temperature: float,
    attention: str,
    attention_temperature: float,
    threshold: bool,
    detach_positiveness: bool,
    attention_head: nn.Module | None = None,
    exclude: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, ops.SoftNeighbors | None, Tensor | None]:
    """One direction ``L(z, y, key)`` with ``key``'s ``k`` neighbours from ``bank``.

    ``key`` ``(B, D)`` is the normalised float momentum key (no gradient); ``k = 0`` is the
    MoCo v3 loss whatever the attention (the queue warming up).

    Returns:
        ``(loss, found, weights)``: the scalar loss, the search result and the weights the
        loss used (``(B, K)``, thresholded; None for uniform and nearest); both None at k = 0.
    """
    options = dict(temperature=temperature, detach_positiveness=detach_positiveness,
                   attention=attention, backend=backend)
    if k == 0:
        # MoCo v3 terms only, whatever the attention (NNCLR included) while the queue fills.
        neighbors = key.new_zeros(key.shape[0], 0, key.shape[1])
        options["attention"] = "cosine"
        return functional.soft_neighbor_loss(z, y, key, neighbors, **options), None, None
    # The queue's storage dtype sets the precision of the search only: the winners' values
    # and their positiveness are computed in fp32 from key and y as they are.
    found = bank.search(key, y.float(), k, attention_temperature=attention_temperature,
                        exclude=exclude, backend=backend)
    weights = None
    if attention in ("cosine", "learned"):
        # Given weights are already thresholded; uniform and nearest have none to threshold.
        weights = (found.positiveness if attention == "cosine"
                   else attention_head(y, found.neighbors))
        weights = functional.thresholded_weights(weights, attention=attention,
                                                 threshold=threshold)
    loss = functional.soft_neighbor_loss(z, y, key, found.neighbors, weights=weights, **options)
    return loss, found, weights


class SoftNeighborLoss(nn.Module):
    """The symmetric SNCLR loss against a :class:`snclr.MemoryBank`.

    Args:
        num_neighbors: K (0 is MoCo v3).
        temperature: logit temperature T.
        attention: ``"cosine"``, ``"uniform"``, ``"nearest"`` (NNCLR) or ``"learned"``.
        attention_temperature: tau_a of the positiveness softmax (1 = reference code).
        threshold: zero positiveness weights ``<= 1/K``.
        detach_positiveness: no gradient from the loss into y through the weights.
        attention_head: for ``"learned"`` only, the module scoring the neighbours
            (:class:`snclr.heads.LearnedAttention`); its parameters are this module's, so
            pass ``loss.parameters()`` to the optimiser.
        backend: op backend, ``"auto"``, ``"torch"`` or ``"triton"``.

    Until the bank holds K searchable rows (:meth:`snclr.MemoryBank.ready`; K beyond the
    ``exclude`` width when one is given) the neighbour terms are left out: the loss is
    MoCo v3's. Reading only: enqueue the keys yourself after the step.

    Shape:
        ``projections`` ``(y1, y2)``: ``(B, D)`` each, online projector outputs.
        ``predictions`` ``(z1, z2)``: ``(B, D)`` each, predictor outputs.
        ``keys`` ``(k1, k2)``: ``(B, D)`` each, momentum projections (no gradient flows).
        ``exclude``: optional ``(B, E)`` int64 queue rows each sample's search skips.
        Returns a scalar.

    Raises:
        ValueError: bad options, ``"learned"`` without an ``attention_head`` (or a head with
            another attention); mismatched shapes when called.

    Example:
        >>> import torch
        >>> from snclr import MemoryBank, SoftNeighborLoss
        >>> bank, criterion = MemoryBank(64, 8), SoftNeighborLoss(num_neighbors=3)
        >>> y1, y2, z1, z2, k1, k2 = torch.randn(6, 4, 8).unbind()
        >>> loss = criterion((y1, y2), (z1, z2), (k1, k2), bank)  # empty bank: MoCo v3
        >>> bank.enqueue(k2)
        >>> criterion((y1, y2), (z1, z2), (k1, k2), bank).dim()
        0
    """

    def __init__(
        self,
        num_neighbors: int = 5,
        *,
        temperature: float = functional.TEMPERATURE,
        attention: str = "cosine",
        attention_temperature: float = functional.ATTENTION_TEMPERATURE,
        threshold: bool = False,
        detach_positiveness: bool = False,
        attention_head: nn.Module | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) \
                or num_neighbors < 0:
            raise ValueError(f"num_neighbors must be an int >= 0, got {num_neighbors!r}")
        if attention not in functional.ATTENTIONS:
            raise ValueError(f"attention must be one of {functional.ATTENTIONS}, got {attention!r}")
        if attention == "nearest" and num_neighbors == 0:
            raise ValueError("attention='nearest' (NNCLR) needs num_neighbors >= 1, got 0")
        if (attention == "learned") != (attention_head is not None):
            raise ValueError("attention_head is required with attention='learned' and only "
                             f"then, got attention={attention!r} and attention_head="
                             f"{type(attention_head).__name__ if attention_head else None}")
        check_positive("temperature", temperature)
        check_positive("attention_temperature", attention_temperature)
        self.num_neighbors, self.temperature = num_neighbors, temperature
        self.attention, self.attention_temperature = attention, attention_temperature
        self.threshold, self.detach_positiveness = threshold, detach_positiveness
        self.attention_head, self.backend = attention_head, backend

    def forward(self, projections: tuple[Tensor, Tensor], predictions: tuple[Tensor, Tensor],
                keys: tuple[Tensor, Tensor], bank: MemoryBank, *,
                exclude: Tensor | None = None) -> Tensor:
        (y1, y2), (z1, z2) = projections, predictions
        with torch.no_grad():
            k1, k2 = (F.normalize(key.detach().float(), dim=1) for key in keys)
        excluded = 0 if exclude is None else exclude.shape[1]
        k = self.num_neighbors if bank.ready(self.num_neighbors, excluded=excluded) else 0
        options = dict(temperature=self.temperature, attention=self.attention,
                       attention_temperature=self.attention_temperature,
                       threshold=self.threshold, detach_positiveness=self.detach_positiveness,
                       attention_head=self.attention_head, exclude=exclude, backend=self.backend)
        loss_12 = direction_loss(z1, y1, k2, bank, k, **options)[0]
        loss_21 = direction_loss(z2, y2, k1, bank, k, **options)[0]
        return loss_12 + loss_21

    def extra_repr(self) -> str:
        return (
            f"num_neighbors={self.num_neighbors}, temperature={self.temperature}, "
            f"attention={self.attention!r}, attention_temperature={self.attention_temperature}, "
            f"threshold={self.threshold}, detach_positiveness={self.detach_positiveness}, "
            f"backend={self.backend!r}"
        )
