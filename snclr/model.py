"""The SNCLR model: online encoder + heads, momentum copies, memory queue, symmetric loss.

``forward(x1, x2)`` computes the loss of DESIGN section 2 and returns diagnostics; it never
changes state. The training step calls :meth:`SNCLR.momentum_update` and
:meth:`SNCLR.enqueue` explicitly after the optimiser step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snclr import functional
from snclr.bank import MemoryBank, max_self_rows
from snclr.encoders import create_encoder, projector_depth
from snclr.heads import LearnedAttention, predictor, projector
from snclr.loss import direction_loss
from snclr.ops._checks import check_positive

__all__ = ["METHODS", "SNCLR", "SNCLROutput", "cosine_momentum", "create_model",
           "register_method"]

# Method name -> the model options it fixes. Every method runs on the same pipeline, so a
# comparison changes only these.
METHODS: dict[str, dict] = {}


def register_method(name: str, **options) -> None:
    """Register a method variant as a set of fixed SNCLR options; names are unique."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = options


register_method("snclr", attention="cosine")
register_method("snclr-uniform", attention="uniform")
register_method("snclr-learned", attention="learned")
register_method("nnclr", attention="nearest", num_neighbors=1)
register_method("mocov3", num_neighbors=0)


def cosine_momentum(progress: float, *, base: float = 0.99, final: float = 1.0) -> float:
    """EMA momentum rising from ``base`` to ``final`` on a half cosine; progress in [0, 1]."""
    return final - (final - base) * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2


@dataclass
class SNCLROutput:
    """What one forward pass returns. Statistics are detached scalars; None when K = 0.

    Attributes:
        loss: the symmetric loss (scalar, with gradient).
        keys: ``(B, D)`` normalised momentum keys of view 2, to enqueue after the step.
        neighbor_indices: ``(B, K)`` queue rows chosen for the view-2 keys.
        positiveness: ``(B, K)`` their weights (detached).
        positiveness_entropy: mean entropy of the weights of each sample.
        neighbor_similarity: mean cosine similarity of key and neighbour.
        threshold_removed: fraction of weights zeroed by the threshold.
    """

    loss: Tensor
    keys: Tensor
    neighbor_indices: Tensor | None = None
    positiveness: Tensor | None = None
    positiveness_entropy: Tensor | None = None
    neighbor_similarity: Tensor | None = None
    threshold_removed: Tensor | None = None


class SNCLR(nn.Module):
    """Soft-neighbour contrastive learning around any encoder.

    Args:
        encoder: maps images to ``(B, num_features)`` features.
        num_features: encoder output width (default: ``encoder.num_features``).
        num_neighbors: K (0 is MoCo v3).
        queue_size: rows N of the memory queue.
        temperature: logit temperature T.
        attention: ``"cosine"``, ``"uniform"``, ``"nearest"`` (NNCLR) or ``"learned"``.
        attention_temperature: tau_a of the positiveness softmax (1 = reference code).
        threshold: zero positiveness weights ``<= 1/K``.
        detach_positiveness: no gradient from the loss into y through the weights.
        projector_layers: Linear layers of the projector; None: the encoder family's
            (:func:`snclr.encoders.projector_depth`: 3 for a ViT, 2 otherwise).
        projector_hidden, projector_dim, predictor_hidden: head widths.
        bank_mode: ``"local"`` or ``"global"`` queue under torch.distributed.
        search_unfilled: search the random initial queue rows too (reference code).
        bank_dtype: storage dtype of the queue.
        backend: op backend, ``"auto"``, ``"torch"`` or ``"triton"``.
        exclude_self_neighbors: when ``forward`` gets the batch's dataset ``indices``, each
            sample's search skips the queue rows holding its own past keys (default off: the
            official method searches the raw queue).
        visit_period: P, the keys enqueued into this queue per epoch (images per rank and
            epoch; the data set size in a global queue); it bounds the self rows one image
            can hold (:func:`snclr.bank.max_self_rows`). None: the queue size (no bound
            beyond N). The training loop sets it.

    Until the queue holds K rows the neighbour terms are left out (the MoCo v3 loss; the rule
    is :meth:`MemoryBank.ready`); when excluding self rows, until it holds K + E rows, E the
    self rows the filled queue can hold for one image, so K non-excluded rows always exist.

    Example:
        >>> from snclr.encoders import create_encoder
        >>> model = SNCLR(create_encoder("small_cnn", in_chans=1), num_neighbors=2,
        ...               queue_size=16, projector_hidden=32, projector_dim=8,
        ...               predictor_hidden=32)
        >>> out = model(torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28))
        >>> model.enqueue(out.keys); model.bank.num_filled
        4
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        num_features: int | None = None,
        num_neighbors: int = 5,
        queue_size: int = 4096,
        temperature: float = functional.TEMPERATURE,
        attention: str = "cosine",
        attention_temperature: float = functional.ATTENTION_TEMPERATURE,
        threshold: bool = False,
        detach_positiveness: bool = False,
        projector_layers: int | None = None,
        projector_hidden: int = 4096,
        projector_dim: int = 256,
        predictor_hidden: int = 4096,
        bank_mode: str = "local",
        search_unfilled: bool = False,
        bank_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        exclude_self_neighbors: bool = False,
        visit_period: int | None = None,
    ) -> None:
        super().__init__()
        num_features = num_features or getattr(encoder, "num_features", None)
        if not num_features:
            raise ValueError("num_features is required when the encoder has no num_features")
        if num_neighbors < 0:
            raise ValueError(f"num_neighbors must be >= 0, got {num_neighbors}")
        if attention not in functional.ATTENTIONS:
            raise ValueError(f"attention must be one of {functional.ATTENTIONS}, got {attention!r}")
        if queue_size < num_neighbors:
            raise ValueError(f"queue_size={queue_size} must be >= num_neighbors={num_neighbors}")
        check_positive("temperature", temperature)
        check_positive("attention_temperature", attention_temperature)
        self.num_neighbors, self.temperature = num_neighbors, temperature
        self.attention, self.attention_temperature = attention, attention_temperature
        self.threshold, self.detach_positiveness = threshold, detach_positiveness
        self.backend = backend
        if visit_period is not None and visit_period < 1:
            raise ValueError(f"visit_period must be >= 1 or None, got {visit_period}")
        self.exclude_self_neighbors, self.visit_period = exclude_self_neighbors, visit_period

        self.encoder = encoder
        if projector_layers is None:
            projector_layers = projector_depth(encoder)
        self.projector = projector(num_features, hidden_dim=projector_hidden,
                                   out_dim=projector_dim, num_layers=projector_layers)
        self.predictor = predictor(projector_dim, hidden_dim=predictor_hidden)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for param in self.momentum_parameters():
            param.requires_grad_(False)
        self.attention_head = LearnedAttention(projector_dim) if attention == "learned" else None
        self.bank = MemoryBank(queue_size, projector_dim, mode=bank_mode,
                               search_unfilled=search_unfilled, dtype=bank_dtype)

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def momentum_parameters(self) -> list[nn.Parameter]:
        return [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """EMA of the online encoder and projector: ``p_m <- m p_m + (1 - m) p``."""
        torch._foreach_lerp_(self.momentum_parameters(), self.online_parameters(), 1.0 - momentum)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor | None = None, *,
                sources: Tensor | None = None) -> None:
        """Append momentum keys (normally ``output.keys``) to the queue.

        ``sources`` ``(B,)`` int: the dataset index of each key (-1 or None: unknown).
        """
        self.bank.enqueue(keys, labels, sources=sources)

    def self_rows_bound(self, filled: int | None = None) -> int:
        """E: the most queue rows one image's past keys fill among ``filled`` rows
        (default: all N), from :attr:`visit_period` (None: every row)."""
        filled = self.bank.size if filled is None else filled
        return max_self_rows(max(filled, 1), self.visit_period or self.bank.size)

    def forward(self, x1: Tensor, x2: Tensor, indices: Tensor | None = None) -> SNCLROutput:
        """Symmetric loss ``L(z1, y1, k2) + L(z2, y2, k1)`` on one queue snapshot.

        Shape:
            ``x1``, ``x2``: ``(B, C, H, W)`` two views of the same B images.
            ``indices``: ``(B,)`` int64 dataset indices of the images (used only with
            ``exclude_self_neighbors``).
        """
        y1, y2 = self.projector(self.encoder(x1)), self.projector(self.encoder(x2))
        z1, z2 = self.predictor(y1), self.predictor(y2)
        with torch.no_grad():
            k1 = F.normalize(self.momentum_projector(self.momentum_encoder(x1)).float(), dim=1)
            k2 = F.normalize(self.momentum_projector(self.momentum_encoder(x2)).float(), dim=1)
        # Neighbour terms wait until the queue can supply K rows (host-side count, no sync).
        exclude, excluded = None, 0
        if self.exclude_self_neighbors and indices is not None and self.num_neighbors:
            # (B, E) rows with a static E: no host sync, no B x N mask. The warm-up needs
            # K rows beyond the E an image can hold in the filled queue (host-side count).
            exclude = self.bank.self_rows(indices, max_rows=self.self_rows_bound())
            excluded = self.self_rows_bound(self.bank.num_filled)
        k = self.num_neighbors if self.bank.ready(self.num_neighbors, excluded=excluded) else 0
        loss_12, stats = self._direction(z1, y1, k2, k, exclude)
        loss_21, _ = self._direction(z2, y2, k1, k, exclude)
        return SNCLROutput(loss=loss_12 + loss_21, keys=k2, **stats)

    def _direction(self, z: Tensor, y: Tensor, key: Tensor, k: int,
                   exclude: Tensor | None = None) -> tuple[Tensor, dict]:
        loss, found, weights = direction_loss(
            z, y, key, self.bank, k, temperature=self.temperature, attention=self.attention,
            attention_temperature=self.attention_temperature, threshold=self.threshold,
            detach_positiveness=self.detach_positiveness, attention_head=self.attention_head,
            exclude=exclude, backend=self.backend)
        return loss, ({} if found is None else self._statistics(found, weights))

    @torch.no_grad()
    def _statistics(self, found, weights: Tensor | None) -> dict:
        stats = dict(neighbor_indices=found.indices,
                     neighbor_similarity=found.similarity.float().mean())
        if weights is not None:
            w = weights.detach().float()
            stats.update(
                positiveness=w,
                positiveness_entropy=-torch.special.xlogy(w, w).sum(1).mean(),
                threshold_removed=(w == 0).float().mean(),
            )
        return stats

    def extra_repr(self) -> str:
        return (
            f"num_neighbors={self.num_neighbors}, temperature={self.temperature}, "
            f"attention={self.attention!r}, attention_temperature={self.attention_temperature}, "
            f"threshold={self.threshold}, detach_positiveness={self.detach_positiveness}, "
            f"backend={self.backend!r}, exclude_self_neighbors={self.exclude_self_neighbors}"
        )


def create_model(
    encoder: str | nn.Module,
    *,
    method: str = "snclr",
    in_chans: int = 3,
    img_size: int = 224,
    **options,
) -> SNCLR:
    """Build :class:`SNCLR` for a registered method and encoder.

    The method fixes its options (``mocov3``: K = 0; ``nnclr``: K = 1, nearest target;
    ``snclr-uniform`` / ``snclr-learned``: the attention); the projector depth follows the
    encoder family (:func:`snclr.encoders.projector_depth`) unless given.

    Example:
        >>> model = create_model("small_cnn", method="mocov3", in_chans=1, img_size=28,
        ...                      projector_hidden=32, projector_dim=8, predictor_hidden=32)
        >>> model.num_neighbors
        0
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if isinstance(encoder, str):
        encoder = create_encoder(encoder, in_chans=in_chans, img_size=img_size)
    return SNCLR(encoder, **{**options, **METHODS[method]})
