"""Mean insertion rounds per tile of the split kernel's running top-K, by simulation.

The split kernel (``snclr/kernels/knn_topk.py``) runs one insertion round per tile for
every element that enters the list of the row with the most insertions in that tile (the
first tile fills the list: K rounds). This replays that on i.i.d. random scores for a
query block of BLOCK_B rows streaming one split of the bank, and prints the mean rounds
per tile: the ``--rounds`` argument of ``../shared/tools/sass_model.py``.

    python -m bench.simulate_rounds --rows-per-split 131072 --block-b 64 --block-n 128 --k 16
"""

from __future__ import annotations

import argparse

import numpy as np


def mean_rounds(rows_per_split: int, block_b: int, block_n: int, k: int, seed: int = 0,
                repeats: int = 2) -> float:
    rng = np.random.default_rng(seed)
    total, tiles = 0, 0
    for _ in range(repeats):
        top = np.full((block_b, k), -np.inf)
        for n0 in range(0, rows_per_split, block_n):
            tile = rng.standard_normal((block_b, min(block_n, rows_per_split - n0)))
            both = np.concatenate([top, tile], axis=1)
            kept = np.argpartition(-both, k - 1, axis=1)[:, :k]
            inserted = (kept >= k).sum(axis=1)  # columns >= k came from the tile
            top = np.take_along_axis(both, kept, axis=1)
            total += int(inserted.max()) if k > 1 else int(inserted.max() > 0)
            tiles += 1
    return total / tiles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows-per-split", type=int, required=True)
    p.add_argument("--block-b", type=int, default=64)
    p.add_argument("--block-n", type=int, default=128)
    p.add_argument("--k", type=int, default=16)
    a = p.parse_args()
    r = mean_rounds(a.rows_per_split, a.block_b, a.block_n, a.k)
    print(f"rows_per_split={a.rows_per_split} BLOCK_B={a.block_b} BLOCK_N={a.block_n} "
          f"K={a.k}: {r:.3f} rounds per tile")


if __name__ == "__main__":
    main()
