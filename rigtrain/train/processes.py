"""Starting the training processes and watching them, and the lock that keeps one run per
folder (docs/training.md, "From `rigtrain train` to the first step"):

- one process: in this process (no second start-up);
- several on this machine (GPUs, or train.nproc on a CPU): one process per rank, started
  and watched here (`run_local_ranks`: signals forwarded, a failing rank stops the rest,
  no orphans);
- several machines: DeepSpeed's launcher with the user's `--hostfile`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from rigtrain.errors import UserError
from rigtrain.files import write_json
from rigtrain.output_relay import OutputRelay
from rigtrain.terminal import pausing_together, terminate_with_parent
from rigtrain.train.rendezvous import meeting_folder, port_file_env, remove_what_dead_launchers_left
from rigtrain.train.run_record import RUN_LOG
from rigtrain.train.stopping import (
    LAUNCHER_PID,
    StopRequests,
    keep_native_crash_stacks,
    kill_with_their_stacks,
    paused_line,
    stop_signals,
    stopped_at_once,
)
from rigtrain.train.worker import FAULT_SAID

WORKER_MODULE = "rigtrain.train.worker"
# How long a signal to a multi-node run's workers may take (pdsh: an ssh connection and a
# pkill per machine, done in parallel)
PDSH_TIMEOUT_S = 60.0


def _say(line: str) -> None:
    print(f"[rigtrain] {line}", flush=True)


def new_run_dir(name: str, parent: Path = Path("runs")) -> Path:
    """parent/DATE-TIME-NAME, made now, where no --out was given. Two commands started in the
    same second (a script that starts several, a test suite) each get a folder of their
    own, the later ones -2, -3, ...: making the folder is the claim, and only one process
    can make it. Before, both took the same name and the second was refused as a second
    run in a live folder."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count(1):
            folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
    except OSError as err:
        raise UserError(
            f"cannot make a run folder in {parent.resolve()} ({err.strerror or err}); give one with --out"
        ) from None
    raise AssertionError("unreachable")  # itertools.count never ends


class RunLock:
    """One run per folder: `rigtrain train` (and `rigtrain tune`, in its folder) holds an
    exclusive lock on RUN_DIR/.lock (flock, through filelock) for as long as it runs, with
    who holds it in RUN_DIR/lock.json. A second command on a live folder is refused, naming
    the process; the kernel drops the lock of a process that died, however it died, and
    the next command takes it. busy: what the refusal tells the second command to do."""

    TRAIN_BUSY = (
        "a run is already training there ({who}); wait for it to end, or "
        "stop it (`kill {pid}` saves a checkpoint first) and add --resume"
    )

    def __init__(self, run_dir: Path, busy: str = TRAIN_BUSY, made_here: bool = False):
        self.run_dir, self.busy, self.made_here = run_dir, busy, made_here
        self.info = run_dir / "lock.json"

    def __enter__(self) -> RunLock:

        self.lock = FileLock(str(self.run_dir / ".lock"), timeout=0)
        try:
            self.lock.acquire()
        except Timeout:
            holder = self._holder()
            who = (
                f"process {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
                if holder
                else "another process"
            )
            busy = self.busy.format(who=who, pid=holder.get("pid", "PID"))
            raise UserError(f"--out {self.run_dir}: {busy}") from None
        previous = self._holder()
        if previous and previous.get("pid") != os.getpid():
            _say(f"the lock in {self.run_dir} was left by process {previous.get('pid')}, which is gone; taking it over")

        write_json(
            self.info,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": sys.argv,
            },
        )
        return self

    def _holder(self) -> dict:
        try:
            return json.loads(self.info.read_text())
        except (OSError, ValueError):
            return {}

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.info.unlink(missing_ok=True)
        if exc_type is not None and self.made_here:
            self._remove_if_unused()
        self.lock.release()

    def _remove_if_unused(self) -> None:
        """A folder this command made, and left with nothing written in it because the command
        failed first (too few clips, a rig file that does not fit): removed, still under the
        lock, so that mending a mistake and trying again does not leave runs/ full of empty
        folders. Its lock, empty folders and empty files (the log a tune's first worker
        group opened) are nothing; a single byte anywhere else, and it stays."""
        try:
            for path in self.run_dir.rglob("*"):
                if path.is_symlink() or (not path.is_dir() and path.stat().st_size > 0):
                    return
            shutil.rmtree(self.run_dir)
        except OSError:
            pass  # a file came and went meanwhile, or the folder cannot be changed: it stays


def launch_command(run_dir: Path, plan, hostfile: str | None, in_process: bool = True) -> list[str] | None:
    """The command that starts the workers, or None to run in this process. Only a single
    CPU process runs in-process: this process has already initialised CUDA (to read the
    GPUs), so a GPU run needs fresh processes for CUDA_VISIBLE_DEVICES (rig.gpus) to take
    effect. On one machine the command is one worker's, started once per rank by
    `run_local_ranks`; with a hostfile it is DeepSpeed's launcher, which reaches the others.
    in_process=False: a fresh process even then (a retry after a failed first step: the
    process group and DeepSpeed's state of the failed attempt cannot be built again here)."""
    if hostfile:
        # DeepSpeed's launcher chooses each node's GPUs itself (--include/--exclude).
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            hostfile,
            "--module",
            WORKER_MODULE,
            "--run-dir",
            str(run_dir.resolve()),
        ]
    if plan.world_size == 1 and plan.device == "cpu" and in_process:
        return None
    return [sys.executable, "-m", WORKER_MODULE, "--run-dir", str(run_dir.resolve())]


# After one rank fails, the others are usually blocked in a collective that will never
# complete: they get SIGTERM, and SIGKILL if they are still there this many seconds later.
FAILED_RANK_GRACE_S = 10.0

# What usually sends each signal to a training process that no one asked to stop.
SIGNAL_CAUSES = {
    signal.SIGKILL: "on Linux most often the kernel's out-of-memory killer, when the machine runs out of RAM: "
    "`dmesg | grep -i 'killed process'` names it, and fewer data.workers need less; or a kill -9",
    signal.SIGSEGV: "a crash in native code: a driver or a library's kernel",
    signal.SIGBUS: "a file it had mapped shrank, or its disk failed",
    signal.SIGABRT: "a library gave up: NCCL's watchdog after a collective timed out, or a failed CUDA assertion",
}


def how_it_ended(code: int, rank: int | None = None) -> str:
    """A training process's end in words: which rank, the signal by name, what sends it."""
    who = "a training process" if rank is None else f"training process rank {rank}"
    if code >= 0:
        return f"{who} ended with exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    cause = SIGNAL_CAUSES.get(-code)
    return f"{who} was killed by {name}" + (f" ({cause})" if cause else "")


def the_first_to_fail(codes: list[int | None]) -> int | None:
    """The rank whose end brought the run down, among those found ended with a failure at
    one look: one killed by a signal before one that exited (the survivors of a dead rank
    exit with 1 when their collective breaks), then the lowest rank."""
    failed = [(code >= 0, rank) for rank, code in enumerate(codes) if code not in (None, 0)]
    return min(failed)[1] if failed else None


def run_local_ranks(
    command: list[str], world: int, env: dict[str, str], run_dir: Path | None = None
) -> tuple[int, int | None]:
    """One worker process per rank on this machine, watched until all have exited.

    Ours rather than torchrun's, for what happens when something goes wrong: the workers
    run in their own session, so a Ctrl-C in the terminal reaches only this process, which
    passes that one signal to every rank (they finish the step, agree, save and exit) and
    SIGKILL on a second; under torchrun each rank got the terminal's signal and torchrun's. Each worker also
    dies with this process however it ends (stopping.die_with_launcher), and a rank that
    fails takes the others down. Returns (128 + the signal, None) when stopped by one, else
    (the exit code of the rank that failed first, that rank), else (0, None). Ranks killed
    by a second signal say nothing: this process says it, with run_dir's newest complete
    checkpoint."""

    # For this start only: worker.say_failure's one line (not each rank's), and where rank
    # 0 tells the others its store's port (rendezvous.py).
    # Ctrl-Z pauses the ranks too (terminal.pausing_together).
    with meeting_folder() as said, pausing_together(paused_line(run_dir)):
        shared = {
            FAULT_SAID: str(said / "fault-said"),
            **env,
            **port_file_env(said),
            "MASTER_ADDR": "127.0.0.1",
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "GROUP_RANK": "0",
            LAUNCHER_PID: str(os.getpid()),
        }
        relay = OutputRelay()
        # each in a session of its own; its output passes through this process (relay), so that
        # train.log has what its C libraries write too: NCCL's warnings, a C++ abort's line
        ranks = [
            relay.start(command, {**shared, "RANK": str(r), "LOCAL_RANK": str(r)}, f"rank {r}") for r in range(world)
        ]
        requests = StopRequests()
        received, killed = requests.signals, []

        def forward(signum, frame) -> None:
            if not requests.add(signum):
                return  # the first one again (stopping.SAME_REQUEST_S)
            alive = [p for p in ranks if p.poll() is None]
            for process in alive:
                process.send_signal(signum if len(received) == 1 else signal.SIGKILL)
            killed.extend(alive if len(received) > 1 else [])

        previous = {s: signal.signal(s, forward) for s in stop_signals()}
        failed_at, first, stacks_taken = None, None, False
        try:
            while any(p.poll() is None for p in ranks):
                failing = the_first_to_fail([p.returncode for p in ranks])
                if failed_at is None and not received and failing is not None:
                    failed_at, first = time.monotonic(), failing
                    for p in ranks:
                        if p.poll() is None:
                            p.send_signal(signal.SIGTERM)
                if failed_at is not None and time.monotonic() - failed_at > FAILED_RANK_GRACE_S and not stacks_taken:
                    # once: a rank stuck in the driver (state D) outlives its SIGKILL a while
                    stacks_taken = True
                    kill_with_their_stacks(
                        [(r, p) for r, p in enumerate(ranks) if p.poll() is None], FAILED_RANK_GRACE_S
                    )
                time.sleep(0.1)
        finally:
            relay.drain()  # their last lines before anything this process says of them
            for s, handler in previous.items():
                signal.signal(s, handler)
    if received:
        if any(p.returncode == -signal.SIGKILL for p in killed):
            print(stopped_at_once(received[-1], run_dir), file=sys.stderr, flush=True)
        return 128 + received[0], None
    if first is None:  # every rank had ended before a look found one failed
        first = the_first_to_fail([p.returncode for p in ranks])
    return (0, None) if first is None else (ranks[first].returncode, first)


def last_line(log: Path) -> str:
    """What a process that died last said in its log, for the one line that reports it: the
    line before its Python stacks, where a crash in native code left them (faulthandler)."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    crashed = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error:")]
    where = f"log, with its Python stacks: {log}" if crashed else f"log: {log}"
    lines = lines[: crashed[-1]] if crashed else lines
    return (lines[-1][:300] if lines else "no output") + f" ({where})"


def run_on_machines(command: list[str], run_dir: Path, hosts: list[str], env: dict[str, str]) -> int:
    """DeepSpeed's launcher, watched like our own ranks: a first SIGINT or SIGTERM here goes
    to every worker on every machine (through pdsh, as the launcher reached them), so they
    finish the step, agree, save and exit, and the launcher ends with them; a second one
    goes to DeepSpeed's launcher, whose own handler kills the workers at once. DeepSpeed's
    handler alone would take the workers down before they could save (and this process says
    where the run stands for them). The launcher runs in its own session, so a Ctrl-C in the
    terminal reaches only this process, and it gets SIGTERM (its kill path) if this process
    dies without a word. A Ctrl-Z pauses the workers on every machine with this process."""
    remove_what_dead_launchers_left()  # on this machine
    runner = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=terminate_with_parent)
    requests = StopRequests()  # a repeat of the first within stopping.SAME_REQUEST_S is the same request
    received = requests.signals

    def signal_workers(signum: int) -> None:  # on every machine, as the launcher reached them
        # a machine that stopped answering must not hang a Ctrl-C or a Ctrl-Z here: its
        # workers then meet the collective timeout, which ends the run in one line
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                ["pdsh", "-S", "-w", ",".join(hosts), f"pkill -{int(signum)} -f '{worker_pattern(run_dir)}'"],
                env={**env, "PDSH_RCMD_TYPE": "ssh"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=PDSH_TIMEOUT_S,
            )

    # Ctrl-Z: the workers on every machine stop (SIGSTOP) and go on with this process;
    # DeepSpeed's launcher and its ssh clients wait for them as they are.
    paused = (lambda: signal_workers(signal.SIGSTOP), lambda: signal_workers(signal.SIGCONT))
    previous = {s: signal.signal(s, lambda signum, frame: requests.add(signum)) for s in stop_signals()}
    forwarded = 0
    try:
        with pausing_together(paused_line(run_dir, machines=len(hosts)), children=False, elsewhere=paused):
            while runner.poll() is None:
                if len(received) > forwarded:
                    signum = received[forwarded]
                    forwarded += 1
                    if forwarded == 1:
                        signal_workers(signum)
                    else:
                        runner.send_signal(signum)
                time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if forwarded > 1:  # DeepSpeed's launcher killed the workers: they could say nothing
        print(stopped_at_once(received[1], run_dir), file=sys.stderr, flush=True)
    if received:
        return 128 + received[0]
    return runner.returncode


def worker_pattern(run_dir: Path) -> str:
    """pkill's pattern for this run's workers (`python -u -m rigtrain.train.worker
    --local_rank=N --run-dir RUN`, as DeepSpeed's per-node launcher starts them) and nothing
    else: not DeepSpeed's launchers, which name the module after `--module`, nor the ssh
    clients that carry their command lines, all on the machine a run starts from (in the
    two-node test, both). A SIGTERM to DeepSpeed's runner sets off its own handler, which kills
    the workers while they save. [r] keeps pkill's own shell, whose command line holds the
    pattern, alive."""
    return f" -m [r]igtrain[.]train[.]worker .*--run-dir {run_dir.resolve()}$"


def start_processes(
    run_dir: Path, plan, hostfile: str | None, hosts: list[str] = (), in_process: bool = True
) -> tuple[int, int | None]:
    """Train, and wait: (the exit code, the rank whose failure ended the run where one did
    and this process could tell which)."""
    command = launch_command(run_dir, plan, hostfile, in_process)
    if command is None:
        os.environ.update(plan.env)
        for key, value in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",  # one rank: its store takes a free port (rendezvous.py)
        }.items():
            os.environ[key] = value
        from rigtrain.train.worker import run  # the Trainer (torch, DeepSpeed): only when this process trains

        keep_native_crash_stacks(run_dir / RUN_LOG)  # as a training process started apart does
        return run(run_dir), None
    env = {**os.environ, **plan.env}
    if hostfile:
        env.pop("CUDA_VISIBLE_DEVICES", None)
        return run_on_machines(command, run_dir, list(hosts), env), None
    return run_local_ranks(command, plan.world_size, env, run_dir)
