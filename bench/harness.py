"""Shared benchmark harness: time providers of one op, record peak memory, print a table.

Each ``bench_<op>.py`` builds inputs and one callable per provider (``triton``, ``torch``,
...) and calls :func:`run_case`; the rows it returns go to :func:`print_table` (plain
command) or are checked/recorded by pytest-benchmark. Timing is
``triton.testing.do_bench`` on a GPU (median and 20/80 percentiles) and a wall-clock timer
elsewhere (median of repeats after warm-up). Peak memory is
``torch.cuda.max_memory_allocated`` (reset per provider) on a GPU and the process's peak
RSS elsewhere (reset per provider where Linux allows it, so CPU numbers are upper bounds).

Row keys: ``op, provider, mode, shape, dtype, ms, ms_p20, ms_p80, ratio, tflops, peak_mb,
device, commit, date``; ``ratio`` is the reference provider's median time over this one's
(> 1 means faster than the reference).
"""

from __future__ import annotations

import datetime
import functools
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

__all__ = ["device_name", "git_commit", "measure", "print_table", "run_case"]

COLUMNS = (
    "op", "provider", "mode", "shape", "dtype", "ms", "ms_p20", "ms_p80", "ratio", "tflops",
    "peak_mb", "device", "commit", "date",
)


@functools.cache
def git_commit() -> str:
    """Short commit of the checkout the benchmark runs from ("unknown" outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM on Linux; elsewhere the peak is process-wide.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_times_ms(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 5
) -> dict[str, float]:
    """Median / 20th / 80th percentile milliseconds and peak MB of ``fn()`` on ``device``."""
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80, "peak_mb": peak}
    _reset_peak_rss()
    times = _cpu_times_ms(fn, warmup, repeats)
    peak = _peak_rss_mb()
    quantiles = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {
        "ms": statistics.median(times), "ms_p20": quantiles[1], "ms_p80": quantiles[7],
        "peak_mb": peak,
    }


def run_case(
    name: str,
    providers: dict[str, Callable[[], object]],
    flops: float,
    mode: str = "forward",
    *,
    shape: str = "",
    dtype: torch.dtype | str = "",
    device: torch.device | str = "cpu",
    reference: str = "torch",
    warmup: int = 1,
    repeats: int = 5,
) -> list[dict[str, object]]:
    """Time every provider of one case and return one row per provider.

    Args:
        name: op name, e.g. ``"soft_neighbors"``.
        providers: provider name -> zero-argument callable running the op once (for
            ``mode="backward"``/``"full"`` the callable includes the backward).
        flops: useful floating-point operations of one call (the formula beside the setup),
            for TFLOP/s.
        mode: ``"forward"``, ``"backward"`` or ``"full"``; recorded as given.
        shape: a readable shape label, e.g. ``"B=1024 N=65536 D=256 K=16"``.
        dtype: input dtype (recorded).
        device: where the inputs live; chooses the GPU or the CPU timer.
        reference: provider whose time is the denominator of every row's ``ratio``.
        warmup, repeats: CPU timer settings (``do_bench`` picks its own on a GPU).

    Returns:
        Rows with the keys of ``COLUMNS``, in the order of ``providers``.
    """
    device = torch.device(device)
    stamp = {
        "op": name, "mode": mode, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
        "device": device_name(device), "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }
    rows = []
    for provider, fn in providers.items():
        stats = measure(fn, device, warmup=warmup, repeats=repeats)
        tflops = flops / (stats["ms"] * 1e-3) / 1e12 if stats["ms"] > 0 else float("nan")
        rows.append({**stamp, "provider": provider, **stats, "tflops": tflops})
    ref_ms = next((r["ms"] for r in rows if r["provider"] == reference), None)
    for row in rows:
        row["ratio"] = ref_ms / row["ms"] if ref_ms and row["ms"] > 0 else float("nan")
    return [{col: row[col] for col in COLUMNS} for row in rows]


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: list[dict[str, object]]) -> None:
    """Print rows as an aligned plain-text table with the ``COLUMNS`` headers."""
    if not rows:
        return
    cells = [[_format(row.get(col, "")) for col in COLUMNS] for row in rows]
    widths = [max(len(col), *(len(c[i]) for c in cells)) for i, col in enumerate(COLUMNS)]
    print("  ".join(col.ljust(w) for col, w in zip(COLUMNS, widths)))
    for line in cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
