"""A tune's worker groups as processes: started like the training launcher starts ranks
(one per rank, each in its own session, dying with the driver), stopped with their loader
workers, and what a dead one last said."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from rigtrain.train.processes import free_port
from rigtrain.train.stopping import LAUNCHER_PID

WORKER_MODULE = "rigtrain.tune.worker"


def start_group(tune_dir: Path, queue_file: Path, world: int, plan_env: dict, name: str) -> list[subprocess.Popen]:
    """One worker per rank, each in its own session (so a kill reaches its loader workers
    too) and dying with this process, as the training launcher starts them."""
    (tune_dir / "logs").mkdir(exist_ok=True)
    shared = {
        **os.environ,
        **plan_env,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        LAUNCHER_PID: str(os.getpid()),
    }
    command = [sys.executable, "-m", WORKER_MODULE, "--tune-dir", str(tune_dir.resolve()), "--queue", str(queue_file)]
    processes = []
    for rank in range(world):
        with open(tune_dir / "logs" / f"{name}-rank-{rank}.log", "w") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    env={**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return processes


def kill(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in processes:
        p.wait()


def exit_words(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
