"""The tables and plot of ``snclr compare``: ``compare.md``, ``compare.csv``, ``cells.csv``,
``compare.png``.

Per variant: the mean and sample standard deviation of every metric across its seeds, and
the paired difference to the baseline variant (seed by seed) with its t-interval
(:mod:`snclr.training.stats`). The verdict is on the primary metric, kNN top-1 at k = 20:
"better" or "worse" when the 95 % interval excludes 0, "within noise" otherwise. A table of m
verdicts makes m comparisons; the chance that at least one is wrong when nothing differs is up to
``1 - 0.95^m``, so the Bonferroni verdict (each interval at ``1 - 0.05/m``) is given too.
Diverged cells are listed and left out of the statistics.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from snclr.training.stats import Interval, mean_std, paired_interval, verdict

__all__ = ["LEVEL", "METRICS", "PRIMARY", "CellResult", "Summary", "summarize",
           "write_comparison"]

METRICS = {"knn_k20": "kNN k=20", "knn_k200": "kNN k=200", "linear": "linear probe"}
PRIMARY = "knn_k20"
LEVEL = 0.95


@dataclass(frozen=True)
class CellResult:
    """One (variant, seed) cell: its metrics (empty unless ``status == "done"``) and times."""

    variant: str
    method: str
    seed: int
    folder: str  # the run folder, relative to the comparison's folder
    status: str  # done | diverged
    metrics: dict[str, float]
    linear_protocol: str
    pretrain_s: float
    eval_s: float
    sessions: int = 1
    note: str = ""


@dataclass(frozen=True)
class Summary:
    """One variant's row: statistics over its finished seeds."""

    variant: str
    seeds: list[int]  # the seeds with results
    diverged: list[int]
    mean: dict[str, float | None]
    std: dict[str, float | None]
    diff: dict[str, Interval | None] = field(default_factory=dict)  # None for the baseline
    verdict: str = ""
    verdict_corrected: str = ""
    wall_s: float | None = None  # mean pretrain + evaluation time of a cell


def summarize(cells: list[CellResult], *, variants: list[str], baseline: str,
              level: float = LEVEL) -> list[Summary]:
    """One :class:`Summary` per variant, in the order given.

    Differences pair each seed of a variant with the same seed of ``baseline``; seeds
    missing on either side (diverged) are left out of that pair.
    """
    by_variant = {v: {c.seed: c for c in cells if c.variant == v} for v in variants}
    comparisons = max(len(variants) - 1, 1)
    corrected = 1 - (1 - level) / comparisons
    base = {s: c for s, c in by_variant[baseline].items() if c.status == "done"}
    rows = []
    for v in variants:
        done = {s: c for s, c in sorted(by_variant[v].items()) if c.status == "done"}
        stats = {m: mean_std([c.metrics[m] for c in done.values()]) if done else (None, None)
                 for m in METRICS}
        row = Summary(
            variant=v, seeds=list(done), diverged=sorted(set(by_variant[v]) - set(done)),
            mean={m: s[0] for m, s in stats.items()}, std={m: s[1] for m, s in stats.items()},
            wall_s=(sum(c.pretrain_s + c.eval_s for c in done.values()) / len(done)
                    if done else None))
        if v != baseline:
            paired = [s for s in done if s in base]
            diff = {m: paired_interval([done[s].metrics[m] for s in paired],
                                       [base[s].metrics[m] for s in paired], level=level)
                    if paired else None for m in METRICS}
            primary = diff[PRIMARY]
            strict = (paired_interval([done[s].metrics[PRIMARY] for s in paired],
                                      [base[s].metrics[PRIMARY] for s in paired],
                                      level=corrected) if paired else None)
            row = replace(row, diff=diff,
                          verdict=verdict(primary) if primary else "no pairs",
                          verdict_corrected=verdict(strict) if strict else "no pairs")
        rows.append(row)
    return rows


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean_std(row: Summary, metric: str) -> str:
    if row.mean[metric] is None:
        return "n/a"
    std = row.std[metric]
    return _num(row.mean[metric]) + (f" ± {std:.4f}" if std is not None else " (one seed)")


def _interval(interval: Interval | None) -> str:
    if interval is None:
        return "n/a"
    if interval.low is None:
        return f"{interval.mean:+.4f} (one pair)"
    return f"{interval.mean:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def write_comparison(folder: Path, cells: list[CellResult], *, variants: list[str],
                     baseline: str, setup: dict, level: float = LEVEL) -> list[Path]:
    """Write ``compare.md``, ``compare.csv``, ``cells.csv`` and ``compare.png``; their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = summarize(cells, variants=variants, baseline=baseline, level=level)
    paths = [folder / name for name in ("compare.md", "compare.csv", "cells.csv", "compare.png")]
    # A data path from a non-UTF-8 file system holds surrogate escapes: write them as \udcff.
    paths[0].write_text(_markdown(rows, cells, baseline=baseline, setup=setup, level=level),
                        encoding="utf-8", errors="backslashreplace")
    _write_summary_csv(paths[1], rows, baseline=baseline, setup=setup)
    _write_cells_csv(paths[2], cells)
    _plot(paths[3], rows, cells, variants=variants, baseline=baseline, level=level)
    return paths


def _markdown(rows: list[Summary], cells: list[CellResult], *, baseline: str, setup: dict,
              level: float) -> str:
    pct = f"{level * 100:g} %"
    m = len(rows) - 1
    protocol = {"cached": "cached features (every image encoded once, no augmentation)",
                "augmented": "augmented (MoCo v3: random-resized crop + flip every epoch)"}
    size = f"{setup['img_size']} px" if setup["img_size"] else "the data's native size"
    subset = (f" (a fixed class-balanced subset of {setup['limit_samples']} images per split)"
              if setup["limit_samples"] else "")
    lines = [
        "# snclr compare",
        "",
        f"{len(rows)} variants x {len(setup['seeds'])} seeds "
        f"({', '.join(map(str, setup['seeds']))}) on `{setup['data']}`{subset}; every cell "
        f"trains {_plural(setup['epochs'], 'epoch')} at batch {setup['batch_size']} "
        f"({setup['encoder']}, {size}). Evaluation: kNN top-1 (k = 20, 200; train split as "
        f"memory, test split as queries) and a linear probe, protocol "
        f"{protocol[setup['protocol']]}, {setup['linear_epochs']} epochs, lr {setup['linear_lr']}.",
        "",
        f"Mean ± sample standard deviation over seeds. Δ: the mean over seeds of (variant − "
        f"{baseline}) with the same seed, with its {pct} Student-t interval. Verdict on kNN "
        f"k=20: better / worse when the interval excludes 0, within noise otherwise.",
        "",
        f"| variant | seeds | kNN k=20 | kNN k=200 | linear ({setup['protocol']}) | "
        f"Δ kNN k=20 vs {baseline} ({pct}) | verdict | wall / cell |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        is_base = row.variant == baseline
        lines.append(
            f"| {row.variant} | {len(row.seeds)} | {_mean_std(row, 'knn_k20')} | "
            f"{_mean_std(row, 'knn_k200')} | {_mean_std(row, 'linear')} | "
            f"{'(baseline)' if is_base else _interval(row.diff[PRIMARY])} | "
            f"{'' if is_base else row.verdict} | {_duration(row.wall_s)} |")
    others = [row for row in rows if row.variant != baseline]
    outside = [r.variant + f" ({r.verdict})" for r in others if r.verdict in ("better", "worse")]
    strict = [r.variant + f" ({r.verdict_corrected})" for r in others
              if r.verdict_corrected in ("better", "worse")]
    corrected = 100 * (1 - (1 - level) / max(m, 1))
    lines += [
        "",
        f"**{_plural(m, 'comparison')}** (each variant against {baseline} on kNN k=20). "
        f"Outside the noise at {pct}: {', '.join(outside) or 'none'}"
        f"{'; the others are within it' if outside and len(outside) < m else ''}. "
        f"If no variant truly differed, each verdict would "
        f"still say better or worse with probability {100 - level * 100:g} %, and at least "
        f"one of the {m} up to {100 * (1 - level ** m):.0f} % of the time. With the "
        f"Bonferroni correction (each interval at {corrected:.4g} %): "
        f"{', '.join(strict) or 'none'} outside the noise.",
        "",
    ]
    diverged = [c for c in cells if c.status != "done"]
    if diverged:
        lines += ["Diverged cells, left out of the statistics: " + "; ".join(
            f"{c.variant} seed {c.seed} ({c.note})" for c in diverged) + ".", ""]
    lines += [
        f"## Other metrics: Δ vs {baseline} ({pct} interval; no verdict, not counted above)",
        "",
        "| variant | Δ kNN k=200 | Δ linear |",
        "|---|---|---|",
    ]
    lines += [f"| {r.variant} | {_interval(r.diff['knn_k200'])} | {_interval(r.diff['linear'])} |"
              for r in others]
    lines += [
        "",
        "## Cells",
        "",
        "| variant | seed | kNN k=20 | kNN k=200 | linear | pretrain | evaluation | report |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        values = [_num(c.metrics.get(key)) if c.status == "done" else c.status
                  for key in METRICS]
        sessions = f" ({c.sessions} sessions)" if c.sessions > 1 else ""
        link = quote(c.folder, safe="/+=") + "/report.md"
        lines.append(
            f"| {c.variant} | {c.seed} | {' | '.join(values)} | {_duration(c.pretrain_s)}"
            f"{sessions} | {_duration(c.eval_s)} | [report]({link}) |")
    lines += ["", "Plot: ![comparison](compare.png)", ""]
    return "\n".join(lines)


def _write_summary_csv(path: Path, rows: list[Summary], *, baseline: str, setup: dict) -> None:
    header = ["variant", "seeds", "diverged"]
    for m in METRICS:
        header += [f"{m}_mean", f"{m}_std", f"{m}_diff", f"{m}_diff_low", f"{m}_diff_high"]
    header += ["verdict", "verdict_bonferroni", "baseline", "linear_protocol", "wall_s"]
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            values = [row.variant, len(row.seeds), len(row.diverged)]
            for m in METRICS:
                diff = row.diff.get(m)
                values += [row.mean[m], row.std[m], *(
                    (diff.mean, diff.low, diff.high) if diff else (None, None, None))]
            values += [row.verdict, row.verdict_corrected, baseline, setup["protocol"],
                       row.wall_s]
            writer.writerow(["" if v is None else v for v in values])


def _write_cells_csv(path: Path, cells: list[CellResult]) -> None:
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "method", "seed", "status", *METRICS, "linear_protocol",
                         "pretrain_s", "eval_s", "sessions", "run_dir"])
        for c in cells:
            writer.writerow([c.variant, c.method, c.seed, c.status,
                             *[c.metrics.get(m, "") for m in METRICS], c.linear_protocol,
                             c.pretrain_s, c.eval_s, c.sessions, c.folder])


def _plot(path: Path, rows: list[Summary], cells: list[CellResult], *, variants: list[str],
          baseline: str, level: float) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(4 * (len(METRICS) + 1), 4))
    x = list(range(len(rows)))
    for ax, (metric, title) in zip(axes, METRICS.items()):
        means = [r.mean[metric] if r.mean[metric] is not None else float("nan") for r in rows]
        stds = [r.std[metric] or 0.0 for r in rows]
        # Points, not bars: the axis does not start at 0, and a bar's length would mislead.
        ax.errorbar(x, means, yerr=stds, fmt="o", capsize=5, color="#3182bd", markersize=7)
        for i, v in enumerate(variants):
            seeds = [c.metrics[metric] for c in cells if c.variant == v and c.status == "done"]
            ax.plot([i + 0.15] * len(seeds), seeds, "k.", markersize=5)
        finite = [v for v in means if v == v]
        if finite:
            low = min(min(finite) - 2 * max(stds), min(finite) * 0.98)
            ax.set_ylim(max(0.0, low), min(1.0, max(finite) + 2 * max(stds) + 0.01))
        ax.set_title(f"{title} (mean ± std, dots: seeds)", fontsize=9)
        ax.set_xticks(x, variants, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[-1]
    for i, row in enumerate(rows):
        interval = row.diff.get(PRIMARY)
        if interval is None:
            continue
        if interval.low is None:
            ax.plot([i], [interval.mean], "o", color="#de2d26")
        else:
            ax.errorbar([i], [interval.mean], yerr=[[interval.mean - interval.low],
                        [interval.high - interval.mean]], fmt="o", capsize=4, color="#de2d26")
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Δ kNN k=20 vs {baseline} ({level * 100:g} % CI)", fontsize=9)
    ax.set_xticks(x, variants, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
