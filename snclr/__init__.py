"""snclr: fast soft-neighbour contrastive self-supervised learning (SNCLR)."""

__version__ = "0.1.0"
