"""Running snclr on two ranks from a test: a free port, and ``torchrun -m snclr``."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(args: list[str], *, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node=2 -m snclr ARGS`` on a free port, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
               f"--master-port={free_port()}", "-m", "snclr", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
