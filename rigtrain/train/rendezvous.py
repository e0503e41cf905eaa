"""Where the ranks on one machine meet (torch.distributed's store), with no port race.

The usual way to give ranks a port, binding port 0 and closing the socket at once, leaves the
port free only at that moment: rank 0 binds it seconds later, after importing torch and
DeepSpeed, and on a busy machine another process can take it first (gloo's own connections
take ports from the same ephemeral range). This project's tests saw it as EADDRINUSE at
start-up when several runs started together, and so would a user running two jobs at once.

Here rank 0 binds port 0 itself, so the kernel gives the store a port that is free and stays
its own, and tells the other ranks on this machine which one through a file in a folder the
launcher made for this start (`port_file_env`). A single rank needs no one to meet it.
Ranks started by DeepSpeed's multi-node launcher, or by a user's own torchrun, have no such
file and meet as they were told (env://, MASTER_ADDR and MASTER_PORT).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rigtrain.files import write_json

if TYPE_CHECKING:
    import torch.distributed as dist

PORT_FILE = "RIGTRAIN_STORE_PORT_FILE"  # the file rank 0 writes its store's port to
HOST = "127.0.0.1"  # ranks that meet this way are on one machine
POLL_S = 0.05


# Held (flock) by a launcher while its ranks run, in the folder where they meet: dropped
# however it ends, and unlike a process id the same in every PID namespace sharing /tmp.
LAUNCHER_LOCK = "launcher.lock"


def remove_what_dead_launchers_left() -> None:
    """The temporary folders of launchers that are gone (rigtrain-ranks-PID-*: their lock is
    free), and the fault marks of DeepSpeed's per-machine launchers that are gone
    (worker.deepspeed_node_mark, rigtrain-fault-said-PID-START: no process has that id).
    Each launcher removes its own as it ends, but not one killed with SIGKILL. Another
    user's are left."""
    for path in Path(tempfile.gettempdir()).glob("rigtrain-*-*"):
        parts = path.name.split("-")
        if parts[1] == "ranks" and parts[2].isdigit() and path.is_dir():
            if _launcher_gone(path, int(parts[2])):
                shutil.rmtree(path, ignore_errors=True)
        elif parts[1:3] == ["fault", "said"] and len(parts) > 3 and parts[3].isdigit():
            if _no_process(int(parts[3])):
                path.unlink(missing_ok=True)


def _launcher_gone(folder: Path, pid: int) -> bool:
    try:
        with open(folder / LAUNCHER_LOCK, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: no launcher holds it
        return True
    except BlockingIOError:
        return False
    except FileNotFoundError:  # made a moment ago, its lock not yet taken (or by an older version)
        return _no_process(pid)
    except OSError:  # another user's
        return False


def _no_process(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        pass
    return False


@contextlib.contextmanager
def meeting_folder() -> Iterator[Path]:
    """A launcher's folder for one start of its ranks (rigtrain-ranks-PID-* in /tmp: the
    port file, worker.say_failure's mark), locked while they run and removed afterwards; the
    folders of launchers that died without removing theirs go first."""
    remove_what_dead_launchers_left()
    folder = Path(tempfile.mkdtemp(prefix=f"rigtrain-ranks-{os.getpid()}-"))
    held = open(folder / f"{LAUNCHER_LOCK}.new", "wb")  # noqa: SIM115  (held until the ranks have ended)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        os.rename(folder / f"{LAUNCHER_LOCK}.new", folder / LAUNCHER_LOCK)  # never seen unlocked by another launcher
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # then the lock: no other launcher removes it first
        held.close()


def port_file_env(folder: Path) -> dict[str, str]:
    """What the launcher adds to the environment of the ranks it starts on this machine:
    folder must be new for each start, so no rank reads a port from an earlier one."""
    return {PORT_FILE: str(folder / "store-port")}


def store_for_this_rank(timeout: datetime.timedelta) -> dist.Store | None:
    """The store this rank's process group meets on, or None where the environment says
    how to meet (env://). Rank 0 hosts it; the others wait for its port, for at most
    timeout (the launcher stops them sooner if rank 0 dies)."""
    import torch.distributed as dist  # here, not above: the launchers import this module without torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    port_file = os.environ.get(PORT_FILE)
    if world > 1 and not port_file:
        return None
    if rank == 0:
        store = dist.TCPStore(HOST, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        if world > 1:  # someone to tell
            write_json(Path(port_file), store.port)  # renamed into place whole
    else:
        port = _wait_for_port(Path(port_file), timeout)
        store = dist.TCPStore(HOST, port, world, is_master=False, timeout=timeout)
    # What env:// would have left there, for any code that reads it (DeepSpeed's logs).
    os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(store.port))
    return store


def _wait_for_port(port_file: Path, timeout: datetime.timedelta) -> int:
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        try:
            return int(port_file.read_text())
        except (FileNotFoundError, ValueError):  # not written yet (it is renamed into place whole)
            time.sleep(POLL_S)
    raise TimeoutError(
        f"rank 0 did not open the ranks' meeting point ({port_file}) within {timeout}: "
        "see rank 0's output for why it did not start"
    )
