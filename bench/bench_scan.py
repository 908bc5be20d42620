"""Start-up on an image folder: the time from the command to the first training step.

Builds a synthetic folder of small JPEGs itself (``--images``, default 100,000, in 100 class
folders plus a small ``val/``), then launches ``snclr pretrain`` on it twice with a fresh
scan cache: the first launch scans (headers only), the relaunch reads the cache. Each launch
is timed from the command to the first ``step`` row of ``metrics.jsonl`` (``--log-every 1``)
and stopped there. The scan alone is timed in-process too, per file.

    python -m bench.bench_scan                      # 100,000 images (builds ~1 GB once)
    python -m bench.bench_scan --images 20000       # a smaller folder

Targets (2 cores): at most 0.5 ms per file on a first launch, at most 5 s on a relaunch.
The folder is built once and kept (``--folder``); the page cache is warm, as it is on a
machine that just copied the data set.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 100
SIDES = (48, 56, 64, 72)  # shorter sides of the synthetic images (median 60, fitted to 64)


def build_folder(root: Path, images: int) -> None:
    """``images`` JPEGs under root/train/cNN/ and 4 per class under root/val/ (kept)."""
    marker = root / f".built-{images}"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    # A few distinct encoded images, written many times: building stays I/O-bound.
    blobs = []
    for i in range(16):
        side = SIDES[i % len(SIDES)]
        pixels = rng.integers(0, 255, (side, side + 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        blobs.append(buffer.getvalue())
    for split, count in (("train", images), ("val", 4 * CLASSES)):
        for c in range(CLASSES):
            (root / split / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / split / f"c{i % CLASSES:03d}" / f"{i:07d}.jpg"
            path.write_bytes(blobs[i % len(blobs)])
    marker.touch()


def time_scan(root: Path, cache: Path) -> tuple[float, float]:
    """In-process seconds of a cold (no cache) and a warm (cached) scan of root/train."""
    os.environ["SNCLR_CACHE_DIR"] = str(cache)
    from snclr.training.datasets import scan_folder

    tic = time.perf_counter()
    scan_folder(root / "train")
    cold = time.perf_counter() - tic
    tic = time.perf_counter()
    scan_folder(root / "train")
    return cold, time.perf_counter() - tic


def time_to_first_step(root: Path, run_dir: Path, cache: Path,
                       timeout: float = 600) -> tuple[float, float]:
    """Seconds from starting ``snclr pretrain`` to its first line (``image size ...``: imports,
    scan, model and run folder done) and to its first step row; the run is then stopped."""
    command = [sys.executable, "-m", "snclr", "pretrain", "--data", str(root),
               "--output-dir", str(run_dir), "--epochs", "1", "--batch-size", "64",
               "--log-every", "1", "--knn-every", "0", "--num-workers", "2"]
    env = {**os.environ, "SNCLR_CACHE_DIR": str(cache)}
    metrics = run_dir / "metrics.jsonl"
    tic = time.perf_counter()
    # A process group of its own: the loader's worker processes are stopped with it.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    first_line: list[float] = []
    reader = threading.Thread(target=lambda: (process.stdout.readline(),
                                              first_line.append(time.perf_counter() - tic)),
                              daemon=True)
    reader.start()
    try:
        while time.perf_counter() - tic < timeout:
            if metrics.exists() and any(json.loads(line).get("kind") == "step"
                                        for line in metrics.read_text().splitlines() if line):
                step = time.perf_counter() - tic
                reader.join(timeout=5)
                return first_line[0], step
            if process.poll() is not None:
                raise RuntimeError(f"snclr pretrain exited {process.returncode}: "
                                   f"{process.stderr.read()[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"no step within {timeout} s")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--folder", default=None,
                        help="where the synthetic folder is built and kept (default: a "
                             "folder under the system's temporary directory)")
    args = parser.parse_args()
    root = Path(args.folder or Path(tempfile.gettempdir()) / f"snclr-bench-scan-{args.images}")
    tic = time.perf_counter()
    build_folder(root, args.images)
    print(f"folder {root}: {args.images} train JPEGs (built or found in "
          f"{time.perf_counter() - tic:.1f} s)")
    with tempfile.TemporaryDirectory(prefix="snclr-bench-scan-") as work:
        work = Path(work)
        cold, warm = time_scan(root, work / "scan-cache")
        print(f"scan in-process: first {cold:.2f} s ({1e3 * cold / args.images:.3f} ms/file), "
              f"cached {warm:.2f} s")
        for name, run in (("first launch", "run1"), ("relaunch", "run2")):
            ready, step = time_to_first_step(root, work / run, work / "cache")
            print(f"{name}: start-up done (first line) {ready:.1f} s "
                  f"({1e3 * ready / args.images:.3f} ms/file), first step {step:.1f} s")


if __name__ == "__main__":
    main()
