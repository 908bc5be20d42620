"""The end-of-run report: PNG plots (matplotlib, Agg backend) and ``report.md``.

Reads only the metric rows the training loop logged (``metrics.jsonl``), so a report can be
rebuilt from a run folder at any time.
"""

from __future__ import annotations

from pathlib import Path

from snclr.training.methods import fixed_options, num_neighbors_used
from snclr.training.metrics import read_rows

__all__ = ["read_metrics", "write_report"]


def read_metrics(path: Path) -> list[dict]:
    """The logged rows; an unreadable (torn) line is skipped."""
    return read_rows(path)[0]


def _plot(path: Path, title: str, series: list[tuple[str, list, list]], xlabel: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    if not any(x for _, x, _ in series):
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, x, y in series:
        ax.plot(x, y, marker="o" if len(x) < 30 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_histogram(path: Path, counts: list[float], title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not counts or sum(counts) == 0:
        return False
    edges = [i / len(counts) for i in range(len(counts) + 1)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.stairs(counts, edges, fill=True)
    ax.set_title(title)
    ax.set_xlabel("positiveness weight w")
    ax.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _k(config: dict) -> str:
    """The K the method trained with, and why when the method fixes it."""
    k = num_neighbors_used(config["method"], config["num_neighbors"])
    fixed = fixed_options(config["method"]).get("num_neighbors")
    return f"{k} ({fixed})" if fixed else str(k)


def write_report(run_dir: Path, config: dict, *, histogram: list[float], wall_s: float,
                 warnings: list[str] = ()) -> Path:
    """Write the plots and ``report.md`` into ``run_dir``; return the report path.

    ``warnings``: lines the run printed at start, repeated under the summary.
    """
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    plots = []

    def epoch_series(key):
        picked = [r for r in epochs if r.get(key) is not None]
        return [r["epoch"] for r in picked], [r[key] for r in picked]

    step_numbers = [r["step"] for r in steps]
    curves = [  # (file, plot title, series, x label, section title)
        ("loss.png", "training loss", [("loss", step_numbers, [r["loss"] for r in steps])],
         "step", "Loss per step"),
        ("lr.png", "learning rate", [("lr", step_numbers, [r["lr"] for r in steps])],
         "step", "Learning rate per step"),
        ("knn.png", f"kNN top-1 (k={config['knn_k']})",
         [("kNN top-1", *epoch_series("knn_top1"))], "epoch", "kNN accuracy per epoch"),
        ("purity.png", "neighbour purity",
         [("purity", *epoch_series("neighbor_purity")),
          ("purity without self-neighbours", *epoch_series("neighbor_purity_without_self")),
          ("self-neighbour fraction", *epoch_series("self_neighbor_fraction"))],
         "epoch", "Neighbour purity and self-neighbours per epoch"),
    ]
    for name, title, series, xlabel, section in curves:
        if _plot(run_dir / name, title, series, xlabel):
            plots.append((section, name))
    if _plot_histogram(run_dir / "positiveness.png", histogram,
                       "positiveness of selected neighbours (last epoch)"):
        plots.append(("Positiveness histogram (last epoch)", "positiveness.png"))

    last = epochs[-1] if epochs else {}
    lines = [
        f"# snclr pretraining report: {config['method']} / {config['encoder']} on {config['data']}",
        "",
        f"- epochs: {last.get('epoch', 0)} of {config['epochs']}, "
        f"steps: {steps[-1]['step'] if steps else 0}, batch {config['batch_size']}, "
        f"optimizer {config['optimizer']} (base lr {config['lr']}, wd {config['weight_decay']})",
        f"- K = {_k(config)}, queue {config['queue_size']}, T = {config['temperature']}",
        f"- image size: {config['img_size']} px",
        f"- wall time this session: {wall_s:.1f} s",
        *(f"- **{line}**" for line in warnings),
        "",
        "| epoch | loss | kNN top-1 | neighbour purity | purity without self | "
        "self-neighbour fraction | positiveness entropy |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(value):
        return "" if value is None else f"{value:.4f}"

    for r in epochs:
        lines.append(
            f"| {r['epoch']} | {fmt(r.get('loss'))} | {fmt(r.get('knn_top1'))} | "
            f"{fmt(r.get('neighbor_purity'))} | {fmt(r.get('neighbor_purity_without_self'))} | "
            f"{fmt(r.get('self_neighbor_fraction'))} | {fmt(r.get('positiveness_entropy'))} |"
        )
    lines.append("")
    events = [r for r in rows if r["kind"] in ("resume", "config_change")]
    if events:
        lines += ["## Resumes and configuration changes", ""]
    for r in events:
        if r["kind"] == "resume":
            lines.append(f"- resumed at step {r['step']} (epoch {r['epoch']}): dropped "
                         f"{r['dropped_rows']} logged rows past it, {r['torn_lines']} torn lines")
        else:
            changes = ", ".join(f"{name} {old} -> {new}"
                                for name, (old, new) in r["changes"].items())
            reset = "; optimiser state reset" if r.get("optimizer_state") == "reset" else ""
            lines.append(f"- at step {r['step']} (epoch {r['epoch']}): {changes}{reset}")
    if events:
        lines.append("")
    for title, name in plots:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    lines += ["## Configuration", "", "```yaml"]
    lines += [f"{k}: {v}" for k, v in config.items()]
    lines += ["```", ""]
    path = run_dir / "report.md"
    # A path from a non-UTF-8 file system holds surrogate escapes: write them as \udcff.
    path.write_text("\n".join(lines), encoding="utf-8", errors="backslashreplace")
    return path
