"""Statistics for comparing methods across seeds: mean, spread and paired t-intervals.

Plain Python, no SciPy: Student's t distribution for an integer number of degrees of freedom
has a closed-form two-sided mass (Abramowitz & Stegun 26.7.3 / 26.7.4), and its quantile is
found by bisection on the angle ``theta = atan(t / sqrt(df))``, where the mass is monotone.

A paired comparison takes, for each seed present in both, the difference ``d_s = a_s - b_s``
of two variants; its interval is ``mean(d) +- t_{(1+level)/2, n-1} * sd(d) / sqrt(n)``, with
``sd`` the sample standard deviation (n - 1 in the denominator). Pairing by seed removes what
the seed does to both (data order, augmentations, initialisation), so it is never wider
than need be; with n = 3 seeds it is still wide (t = 4.30), and that is the honest answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "mean_std", "paired_interval", "t_quantile", "t_two_sided_mass",
           "verdict"]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values).

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def t_two_sided_mass(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``df`` degrees of freedom (an integer >= 1)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    theta = math.atan(abs(t) / math.sqrt(df))
    return _mass_at_angle(theta, df)


def _mass_at_angle(theta: float, df: int) -> float:
    sin, cos = math.sin(theta), math.cos(theta)
    if df % 2:
        # odd: (2/pi) (theta + sin * sum_j a_j cos^(2j+1)), a_0 = 1, a_j = a_(j-1) 2j/(2j+1)
        total, term = 0.0, cos
        for j in range((df - 1) // 2):
            total += term
            term *= cos * cos * (2 * j + 2) / (2 * j + 3)
        return 2 / math.pi * (theta + sin * total)
    # even: sin * sum_j b_j cos^(2j), b_0 = 1, b_j = b_(j-1) (2j-1)/(2j)
    total, term = 0.0, 1.0
    for j in range(df // 2):
        total += term
        term *= cos * cos * (2 * j + 1) / (2 * j + 2)
    return sin * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (e.g. ``t_quantile(0.975, 2) = 4.3027``).

    Raises:
        ValueError: ``p`` not in (0, 1) or ``df`` not an integer >= 1.

    Example:
        >>> round(t_quantile(0.975, 2), 4), round(t_quantile(0.025, 30), 4)
        (4.3027, -2.0423)
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    t_two_sided_mass(0.0, df)  # validates df
    target = abs(2 * p - 1)
    low, high = 0.0, math.pi / 2
    for _ in range(200):  # the mass rises monotonically with theta; 200 halvings is exact
        middle = (low + high) / 2
        if _mass_at_angle(middle, df) < target:
            low = middle
        else:
            high = middle
    t = math.sqrt(df) * math.tan((low + high) / 2)
    return t if p >= 0.5 else -t


@dataclass(frozen=True)
class Interval:
    """A paired difference across seeds: ``mean`` and its ``level`` t-interval.

    ``low`` and ``high`` are None with fewer than two pairs (no spread to measure).
    """

    mean: float
    std: float | None
    n: int
    level: float
    low: float | None
    high: float | None


def paired_interval(values: Sequence[float], baseline: Sequence[float], *,
                    level: float = 0.95) -> Interval:
    """The t-interval of ``mean(values[s] - baseline[s])`` over the pairs ``s``.

    Args:
        values, baseline: one number per seed, in the same seed order.
        level: coverage of the two-sided interval.

    Raises:
        ValueError: different lengths, no pairs, or ``level`` not in (0, 1).

    Example:
        >>> interval = paired_interval([0.90, 0.85, 0.80], [0.89, 0.84, 0.79])
        >>> round(interval.mean, 4), round(interval.low, 4), verdict(interval)
        (0.01, 0.01, 'better')
    """
    if len(values) != len(baseline):
        raise ValueError(f"paired_interval needs one baseline value per value, got "
                         f"{len(values)} and {len(baseline)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    diffs = [a - b for a, b in zip(values, baseline)]
    mean, std = mean_std(diffs)
    if std is None:
        return Interval(mean, None, 1, level, None, None)
    half = t_quantile((1 + level) / 2, len(diffs) - 1) * std / math.sqrt(len(diffs))
    return Interval(mean, std, len(diffs), level, mean - half, mean + half)


def verdict(interval: Interval) -> str:
    """"better" / "worse" when the interval excludes 0, "within noise" when it holds 0.

    "one seed" when there is no interval (fewer than two pairs).
    """
    if interval.low is None:
        return "one seed"
    if interval.low > 0:
        return "better"
    if interval.high < 0:
        return "worse"
    return "within noise"
