"""The memory queue of past momentum keys (a FIFO ring buffer of L2-normalised rows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snclr import distributed, ops
from snclr.functional import ATTENTION_TEMPERATURE

__all__ = ["BANK_MODES", "MemoryBank"]

# local: each rank enqueues its own keys (the reference code); global: every rank enqueues
# the keys gathered from all ranks, so all queues are identical.
BANK_MODES = ("local", "global")


def _row_ids(name: str, ids: Tensor | None, keys: Tensor) -> Tensor:
    """One integer per key (``-1`` when not given), checked against ``keys``."""
    if ids is None:
        return torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
    if ids.shape != keys.shape[:1]:
        raise ValueError(f"{name} must have shape ({keys.shape[0]},), got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    return ids


class MemoryBank(nn.Module):
    """FIFO queue of ``size`` L2-normalised rows of width ``dim``.

    Rows, write pointer, fill count and the optional label of each row are persistent
    buffers, so ``state_dict`` carries the queue into checkpoints. Searching reads only;
    :meth:`enqueue` is the one mutation in training, :meth:`restore_rows` the one on resume
    (:meth:`gather_rank_queues` and :meth:`load_rank_queue` carry a per-rank queue over ranks).
    Calling the bank searches it (``bank(key, online, k)`` is :meth:`search`); it never
    enqueues by itself.

    An empty or partly filled queue: only filled rows are searched (unless
    ``search_unfilled``), so a search for more neighbours than there are searchable rows is a
    ``ValueError`` saying so. :meth:`ready` is the warm-up rule: until it holds, leave the
    neighbour terms out (:class:`snclr.SNCLR` and :class:`snclr.SoftNeighborLoss` then
    compute the MoCo v3 loss).

    Args:
        size: number of rows N.
        dim: row width D.
        mode: ``"local"`` or ``"global"`` (see ``BANK_MODES``).
        search_unfilled: search all N rows, including the random unit vectors the queue is
            initialised with (the reference code); by default only filled rows are searched.
        dtype: storage dtype (bfloat16 halves the memory of a large queue).

    Raises:
        TypeError: ``size`` or ``dim`` not an int, ``dtype`` not a floating-point dtype;
            in :meth:`enqueue`, non-float keys or non-integer labels.
        ValueError: ``size`` or ``dim`` < 1, unknown ``mode``, wrong key or label shapes.

    Example:
        >>> bank = MemoryBank(4, 2)
        >>> bank.enqueue(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
        >>> bank.num_filled, bank.rows()[0].tolist()
        (2, [0.6000000238418579, 0.800000011920929])
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        mode: str = "local",
        search_unfilled: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if size < 1 or dim < 1:
            raise ValueError(f"size and dim must be >= 1, got size={size}, dim={dim}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if mode not in BANK_MODES:
            raise ValueError(f"mode must be one of {BANK_MODES}, got {mode!r}")
        self.size, self.dim, self.mode, self.search_unfilled = size, dim, mode, search_unfilled
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1).to(dtype))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        # The dataset index each key came from (-1 = unknown): lets a search tell an image's
        # own past keys from other images' keys.
        self.register_buffer("sources", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        # Host mirrors of pointer/filled: slicing by them needs no device sync per step.
        self._pointer = 0
        self._filled = 0

    @property
    def num_filled(self) -> int:
        return self._filled

    @property
    def num_searchable(self) -> int:
        return self.size if self.search_unfilled else self._filled

    def rows(self) -> Tensor:
        """The searchable rows ``(N', D)``: filled rows only unless ``search_unfilled``."""
        # Filled rows are always the prefix [0, filled) until the ring wraps, then all rows.
        return self.queue if self.search_unfilled else self.queue[: self._filled]

    def ready(self, k: int, *, excluded: int = 0) -> bool:
        """Whether a search can give every sample ``k`` neighbours: the searchable rows
        number at least ``k + excluded`` (``excluded``: the rows a search may exclude per
        sample). A host-side count: no device sync.

        Example:
            >>> bank = MemoryBank(8, 2)
            >>> bank.ready(3), bank.ready(0)
            (False, True)
            >>> bank.enqueue(torch.randn(3, 2)); bank.ready(3), bank.ready(3, excluded=1)
            (True, False)
        """
        return self.num_searchable >= k + excluded

    def search(self, key: Tensor, online: Tensor, k: int, *,
               attention_temperature: float = ATTENTION_TEMPERATURE,
               **options) -> ops.SoftNeighbors:
        """:func:`snclr.ops.soft_neighbors` of ``key`` against the searchable rows.

        ``attention_temperature`` is tau_a; it and the other options (``threshold``,
        ``exclude``, ``backend``) pass to the op by name.

        Raises:
            ValueError: fewer than ``k`` searchable rows (see :meth:`ready`).
        """
        if not self.ready(k):
            raise ValueError(f"k={k} exceeds the {self.num_searchable} searchable rows of the "
                             f"queue ({self._filled} of {self.size} filled): search once "
                             "bank.ready(k) holds (the MoCo v3 loss needs no neighbours)")
        return ops.soft_neighbors(key, online, self.rows(), k,
                                  attention_temperature=attention_temperature, **options)

    def forward(self, key: Tensor, online: Tensor, k: int, **options) -> ops.SoftNeighbors:
        """:meth:`search` (read-only): a module call never changes the queue."""
        return self.search(key, online, k, **options)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor | None = None, *,
                sources: Tensor | None = None) -> None:
        """Append ``keys`` ``(n, D)`` (normalised here), overwriting the oldest rows.

        ``labels`` and ``sources`` (the dataset index of each key, global across ranks) are
        ``(n,)`` integer tensors stored beside the keys; missing ones record -1. In
        ``global`` mode the keys, labels and sources of all ranks are gathered first. If more
        than ``size`` keys arrive at once, the newest ``size`` are kept.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (n, {self.dim}), got {tuple(keys.shape)}")
        if not keys.is_floating_point():
            raise TypeError(f"keys must be a floating-point tensor, got dtype {keys.dtype}")
        # Storing 2.7 as class 2 (or source 2) would silently corrupt purity and exclusion.
        labels = _row_ids("labels", labels, keys)
        sources = _row_ids("sources", sources, keys)
        if self.mode == "global":
            keys, labels = distributed.gather_no_grad(keys), distributed.gather_no_grad(labels)
            sources = distributed.gather_no_grad(sources)
        keys = F.normalize(keys.float(), dim=1)[-self.size :]
        labels = labels[-self.size :]
        sources = sources[-self.size :]
        count = keys.shape[0]
        first = min(count, self.size - self._pointer)  # rows before the wrap
        self.queue[self._pointer : self._pointer + first] = keys[:first].to(self.queue.dtype)
        self.labels[self._pointer : self._pointer + first] = labels[:first].long()
        self.sources[self._pointer : self._pointer + first] = sources[:first].long()
        self.queue[: count - first] = keys[first:].to(self.queue.dtype)
        self.labels[: count - first] = labels[first:].long()
        self.sources[: count - first] = sources[first:].long()
        self._pointer = (self._pointer + count) % self.size
        self._filled = min(self.size, self._filled + count)
        self.pointer.fill_(self._pointer)
        self.filled.fill_(self._filled)

    @torch.no_grad()
    def self_rows(self, indices: Tensor, *, max_rows: int) -> Tensor:
        """The queue rows holding each sample's own past keys, as a search's ``exclude``.

        One sort of the sources and a ``searchsorted`` per sample: no host sync and no
        ``B x N`` mask. Rows past ``max_rows`` per sample are dropped, so the result is exact
        whenever ``max_rows`` is at least :func:`max_self_rows` for the run.

        Shape:
            ``indices`` ``(B,)`` int64 dataset indices (negative: unknown, matches nothing).
            Returns ``(B, max_rows)`` int64 rows, padded with -1.
        """
        if indices.dim() != 1 or indices.is_floating_point():
            raise ValueError(f"indices must be a (B,) integer tensor, got shape "
                             f"{tuple(indices.shape)} and dtype {indices.dtype}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        indices = indices.to(self.sources.device, torch.long)
        sorted_sources, order = torch.sort(self.sources, stable=True)
        first = torch.searchsorted(sorted_sources, indices)  # (B,)
        positions = first[:, None] + torch.arange(max_rows, device=indices.device)  # (B, E)
        inside = positions < self.size
        positions = positions.clamp(max=self.size - 1)
        hit = inside & (sorted_sources[positions] == indices[:, None]) & (indices[:, None] >= 0)
        return torch.where(hit, order[positions], torch.full_like(positions, -1))

    @torch.no_grad()
    def restore_rows(self, rows: Tensor, labels: Tensor, sources: Tensor | None = None) -> None:
        """Overwrite every row and label with saved ones (a rank's queue from a checkpoint).

        The write pointer and fill count stay: a resumed rank keeps the ones its state dict
        restored, which are the same on every rank.

        Shape:
            ``rows`` ``(N, D)``, ``labels`` ``(N,)``, ``sources`` ``(N,)`` (None, from a
            checkpoint written before sources were recorded: every source becomes -1).
        """
        if rows.shape != self.queue.shape or labels.shape != self.labels.shape:
            raise ValueError(f"saved rows and labels must have shapes {tuple(self.queue.shape)} "
                             f"and {tuple(self.labels.shape)}, got {tuple(rows.shape)} and "
                             f"{tuple(labels.shape)}")
        if sources is not None and sources.shape != self.sources.shape:
            raise ValueError(f"saved sources must have shape {tuple(self.sources.shape)}, "
                             f"got {tuple(sources.shape)}")
        self.queue.copy_(rows)
        self.labels.copy_(labels)
        if sources is None:
            self.sources.fill_(-1)
        else:
            self.sources.copy_(sources)

    @torch.no_grad()
    def gather_rank_queues(self) -> dict | None:
        """Every rank's rows of a per-rank ("local") queue, for a checkpoint written by rank 0.

        The state dict holds only this rank's queue; with a local queue over several ranks
        the others differ. Returns ``queue`` ``(W, N, D)``, ``labels`` and ``sources``
        ``(W, N)`` on the CPU; None on one process or with a ``global`` queue, which is
        identical everywhere (pointer and fill count are the same on every rank, equal
        batches). Collective under torch.distributed: every rank must call it.
        """
        if distributed.world_size() == 1 or self.mode != "local":
            return None
        return {name: distributed.gather_no_grad(getattr(self, name)[None]).cpu()
                for name in ("queue", "labels", "sources")}

    def load_rank_queue(self, saved: dict | None, rank: int) -> None:
        """Restore this rank's rows from :meth:`gather_rank_queues` output (None: nothing).

        A run resumed on a different number of ranks takes saved queue ``rank % W``.
        """
        if saved is None:
            return
        source = rank % saved["queue"].shape[0]
        # Checkpoints written before sources were recorded have none: restore_rows fills -1.
        sources = saved["sources"][source] if "sources" in saved else None
        self.restore_rows(saved["queue"][source], saved["labels"][source], sources)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "sources" not in state_dict and prefix + "queue" in state_dict:
            # A checkpoint from before sources were recorded: every key's source is unknown.
            state_dict[prefix + "sources"] = torch.full_like(self.sources, -1)
        # A pointer or fill count outside the queue would fail at the first enqueue: refuse
        # it now, before anything is loaded.
        for name, high in (("pointer", self.size - 1), ("filled", self.size)):
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor) and (value.numel() != 1 or value.is_floating_point()
                                              or not 0 <= int(value) <= high):
                got = value.item() if value.numel() == 1 else f"shape {tuple(value.shape)}"
                raise ValueError(f"{prefix}{name} must be one integer from 0 to {high}, got {got}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # One host read at load time keeps the mirrors in step with the restored buffers.
        self._pointer = int(self.pointer)
        self._filled = int(self.filled)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, mode={self.mode!r}, "
            f"search_unfilled={self.search_unfilled}, dtype={self.queue.dtype}"
        )


def max_self_rows(queue_size: int, period: int) -> int:
    """Most queue rows one image can hold: ``min(n, ceil((n - 1) / P) + 1)``.

    An image is visited once every ``period`` = P enqueued keys at most (P images per rank
    per epoch in a local queue, the data set size in a global one), so n consecutive keys
    hold it at most once per visit.
    """
    if queue_size < 1 or period < 1:
        raise ValueError(f"queue_size and period must be >= 1, got {queue_size} and {period}")
    return min(queue_size, -(-(queue_size - 1) // period) + 1)
