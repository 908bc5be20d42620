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


class MemoryBank(nn.Module):
    """FIFO queue of ``size`` L2-normalised rows of width ``dim``.

    Rows, write pointer, fill count and the optional label of each row are persistent
    buffers, so ``state_dict`` carries the queue into checkpoints. Searching reads only;
    :meth:`enqueue` is the one mutation in training, :meth:`restore_rows` the one on resume.

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

    def search(self, key: Tensor, online: Tensor, k: int, *,
               attention_temperature: float = ATTENTION_TEMPERATURE,
               **options) -> ops.SoftNeighbors:
        """:func:`snclr.ops.soft_neighbors` of ``key`` against the searchable rows.

        ``attention_temperature`` is tau_a; it and the other options (``threshold``,
        ``exclude``, ``backend``) pass to the op by name.
        """
        return ops.soft_neighbors(key, online, self.rows(), k,
                                  attention_temperature=attention_temperature, **options)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor | None = None) -> None:
        """Append ``keys`` ``(n, D)`` (normalised here), overwriting the oldest rows.

        In ``global`` mode the keys (and labels) of all ranks are gathered first. If more
        than ``size`` keys arrive at once, the newest ``size`` are kept.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (n, {self.dim}), got {tuple(keys.shape)}")
        if not keys.is_floating_point():
            raise TypeError(f"keys must be a floating-point tensor, got dtype {keys.dtype}")
        if labels is None:
            labels = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        elif labels.shape != keys.shape[:1]:
            raise ValueError(f"labels must have shape ({keys.shape[0]},), "
                             f"got {tuple(labels.shape)}")
        elif labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            # Storing 2.7 as class 2 would silently corrupt neighbour purity.
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if self.mode == "global":
            keys, labels = distributed.gather_no_grad(keys), distributed.gather_no_grad(labels)
        keys = F.normalize(keys.float(), dim=1)[-self.size :]
        labels = labels[-self.size :]
        count = keys.shape[0]
        first = min(count, self.size - self._pointer)  # rows before the wrap
        self.queue[self._pointer : self._pointer + first] = keys[:first].to(self.queue.dtype)
        self.labels[self._pointer : self._pointer + first] = labels[:first].long()
        self.queue[: count - first] = keys[first:].to(self.queue.dtype)
        self.labels[: count - first] = labels[first:].long()
        self._pointer = (self._pointer + count) % self.size
        self._filled = min(self.size, self._filled + count)
        self.pointer.fill_(self._pointer)
        self.filled.fill_(self._filled)

    @torch.no_grad()
    def restore_rows(self, rows: Tensor, labels: Tensor) -> None:
        """Overwrite every row and label with saved ones (a rank's queue from a checkpoint).

        The write pointer and fill count stay: a resumed rank keeps the ones its state dict
        restored, which are the same on every rank.

        Shape:
            ``rows`` ``(N, D)``, ``labels`` ``(N,)``.
        """
        if rows.shape != self.queue.shape or labels.shape != self.labels.shape:
            raise ValueError(f"saved rows and labels must have shapes {tuple(self.queue.shape)} "
                             f"and {tuple(self.labels.shape)}, got {tuple(rows.shape)} and "
                             f"{tuple(labels.shape)}")
        self.queue.copy_(rows)
        self.labels.copy_(labels)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # One host read at load time keeps the mirrors in step with the restored buffers.
        self._pointer = int(self.pointer)
        self._filled = int(self.filled)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, mode={self.mode!r}, "
            f"search_unfilled={self.search_unfilled}, dtype={self.queue.dtype}"
        )
