"""Stopping a run on request, and never leaving a worker behind.

- The first SIGINT or SIGTERM (or SIGHUP, a closed terminal), each unless the process
  was started with it ignored (`nohup`, a script's `&`), only asks: the step in flight
  finishes, every rank agrees on the step to stop after, a complete checkpoint is written
  and the process exits with 128 + the signal (130 for Ctrl-C, 143 for SIGTERM, 129 for
  SIGHUP). A second signal (half a second or more after the first: the same signal sooner
  is the same request) exits at once: the complete checkpoints on disk are untouched, and
  a save it cuts short never counts (checkpoints.py only ever resumes complete ones).
- A worker dies with its launcher: it asks the kernel for SIGKILL when its parent exits
  (prctl PR_SET_PDEATHSIG), so `kill -9` of `rigtrain train` leaves no rank training on,
  holding GPUs and writing checkpoints.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rigtrain.output_relay import STACKS_FD
from rigtrain.terminal import die_with_parent, keep_in_the_copy, say_from_a_signal_handler
from rigtrain.train.run_record import resume_command

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
HANGUP = getattr(signal, "SIGHUP", None)  # none on Windows
STOP_EXIT_CODES = {128 + s for s in (*STOP_SIGNALS, HANGUP) if s is not None}  # 130, 143, 129


def stop_signals() -> tuple:
    """SIGINT, SIGTERM and SIGHUP, each unless this process was started with it ignored.

    A closed terminal or a dropped ssh session (SIGHUP) then stops a run as SIGTERM does, the
    step in flight finished and saved, where the kernel's default for SIGHUP killed it and
    lost the steps since the last checkpoint. What the run prints to the terminal that is
    gone goes to the null device from the first write that fails
    (terminal.OutlivesItsReader), and the run saves undisturbed.

    An ignored signal is what whoever started the process asked for, and stays ignored:
    `nohup` ignores SIGHUP (the run goes on when the terminal closes), and a shell script
    that starts `rigtrain train &` ignores SIGINT in it (a Ctrl-C meant for the script,
    which reaches its whole process group, leaves the run alone), as Python itself leaves
    an ignored SIGINT ignored."""
    wanted = (*STOP_SIGNALS, HANGUP) if HANGUP is not None else STOP_SIGNALS
    return tuple(s for s in wanted if signal.getsignal(s) != signal.SIG_IGN)


LAUNCHER_PID = "RIGTRAIN_LAUNCHER_PID"  # set by the launcher for the workers it starts

# A stop signal this soon after the first is the same request, not a second one: coreutils'
# `timeout` sends its signal to the command and then to the command's process group, so
# the command can get it twice within microseconds, and a process manager that signals
# every process of a job reaches a worker both directly and through its launcher. A
# second Ctrl-C that means "now" comes later than this.
SAME_REQUEST_S = 0.5


class StopRequests:
    """The stop signals a process has received, a repeat within SAME_REQUEST_S of the first
    counted once. Safe in a signal handler: it only appends and compares."""

    def __init__(self):
        self.signals: list[int] = []
        self._first_at: float | None = None

    def add(self, signum: int) -> bool:
        """Whether this signal counts (the first, or one after SAME_REQUEST_S)."""
        now = time.monotonic()
        if self._first_at is not None and now - self._first_at < SAME_REQUEST_S:
            return False
        self._first_at = self._first_at or now
        self.signals.append(signum)
        return True


class StopRequested(Exception):
    """Raised by the trainer once the run has stopped on a signal and saved; carries the exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def stopped_at_once(signum: int, run_dir: Path | None) -> str:
    """The line for a run a second signal ended without saving: what is kept, how to go on."""
    name = signal.Signals(signum).name
    line = f"rigtrain: second {name}: stopping now; the complete checkpoints are as they were"
    if run_dir is None:
        return line
    from rigtrain.train.checkpoints import last_complete_in_words  # torch: only after such a stop

    saved = last_complete_in_words(run_dir / "checkpoints")
    return f"{line}; {saved}; continue with: {resume_command(run_dir)}"


def paused_line(run_dir: Path | None, machines: int = 0) -> Callable[[int], str]:
    """What a launcher says as Ctrl-Z pauses it with its ranks (terminal.pausing_together);
    machines: a multi-node run's, whose workers pdsh paused (not processes under this one)."""

    def line(paused: int) -> str:
        later = resume_command(run_dir) if run_dir is not None else "the same command with --resume"
        what = f"the run's workers on {machines} machine(s)" if machines else f"the run's {paused} other process(es)"
        return (
            f"rigtrain: paused (Ctrl-Z) with {what}; `fg` or `bg` continues them all. "
            "On GPUs a pause longer than train.collective_timeout_min may end the run when it continues (NCCL's "
            "watchdog counts it; the checkpoints are kept); to stop for longer, Ctrl-C saves the step in flight, and "
            f"later: {later}"
        )

    return line


class GracefulStop:
    """Signal handlers for one training process: the first stop signal is remembered
    (`signum`), the second ends the process at once, saying so (run_dir: where to go on)."""

    def __init__(self, run_dir: Path | None = None):
        self.run_dir = run_dir
        self.signum = 0
        self._requests = StopRequests()
        self._previous = {s: signal.signal(s, self._handle) for s in stop_signals()}

    def _handle(self, signum, frame) -> None:
        if not self._requests.add(signum):
            return  # the first one again (SAME_REQUEST_S)
        if self.signum:
            try:
                say_from_a_signal_handler(stopped_at_once(signum, self.run_dir))
            finally:  # whatever the line's files hold, the second signal stops the process
                os._exit(128 + self.signum)
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def die_with_launcher() -> None:
    """In a worker the launcher started: be killed when the launcher goes, however it goes.
    If it is already gone (it died before this line ran), exit now."""
    die_with_parent(os.environ.get(LAUNCHER_PID))


# Signals whose handler faulthandler adds (keep_native_crash_stacks): a crash in native code
NATIVE_CRASHES = (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT)
# `kill -USR1 PID` of a training process: its Python stacks now, into the run's log, and it goes on
SHOW_STACKS = signal.SIGUSR1
_crash_log = None  # the file faulthandler writes to: open for the life of the process


def keep_native_crash_stacks(log: Path | None) -> None:
    """Where a training process dies of a crash in native code (NATIVE_CRASHES: a driver,
    NCCL, a library's kernel), every thread's Python stack goes into the run's log first
    (faulthandler), then the process dies of its signal as before: where it crashed, for a
    bug report, kept with the run. Not on the terminal, where the launcher says in one line
    which rank died of what. SHOW_STACKS writes them there too, and the process goes on:
    faulthandler's handler is C, so it answers even in a process stuck inside a C call (a
    collective that never completes), where a Python handler would never run; the launcher
    sends it to a rank that does not end when the run has failed, before killing it. A rank
    our launcher started writes them into a pipe of the launcher's instead (STACKS_FD), which
    keeps each dump whole in the log under a line naming the rank (OutputRelay.start). log
    None: this process's stderr, which is its own log file (a tune worker), written through
    the same descriptor, so that lines after a SHOW_STACKS dump follow it rather than
    overwrite it. Where the log cannot be opened, nothing."""
    global _crash_log
    relayed = os.environ.pop(STACKS_FD, "")  # this process's descriptor: not for its children
    try:  # held open: faulthandler writes to its descriptor when it crashes
        _crash_log = os.fdopen(int(relayed), "w")
    except (ValueError, OSError):
        try:
            _crash_log = sys.stderr if log is None else open(log, "a")  # noqa: SIM115
        except OSError:
            return
    faulthandler.enable(file=_crash_log, all_threads=True)
    faulthandler.register(SHOW_STACKS, file=_crash_log, all_threads=True)


# How long a rank that was sent SHOW_STACKS has to write them before it is killed
STACKS_S = 1.0


def show_their_stacks(processes: list[subprocess.Popen]) -> None:
    """SHOW_STACKS to each of processes still there (each keeps its stacks in its log), and
    STACKS_S for them to write, before they are killed."""
    alive = [p for p in processes if p.poll() is None]
    for process in alive:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(SHOW_STACKS)
    if alive:
        time.sleep(STACKS_S)


def kill_with_their_stacks(stuck: list[tuple[int, subprocess.Popen]], grace_s: float) -> None:
    """The ranks still there grace_s after the run failed: most often stuck in a collective or
    a driver call (a hang the SIGTERM could not reach). First their Python stacks go into
    train.log (SHOW_STACKS: faulthandler answers even inside a C call; the launcher's relay
    puts each under its rank's name), after a line there saying why, then SIGKILL."""
    if not stuck:
        return
    who = f"rank {stuck[0][0]}" if len(stuck) == 1 else "ranks " + ", ".join(str(r) for r, _ in stuck)
    were = "it was (its Python stacks, then it is killed)" if len(stuck) == 1 else "they were (then they are killed)"
    keep_in_the_copy(f"[rigtrain] {who} did not end within {grace_s:.0f} s of the run's failure; where {were}:")
    show_their_stacks([process for _, process in stuck])
    for _, process in stuck:
        if process.poll() is None:
            process.kill()


def exit_without_teardown(code: int) -> None:
    """End a worker process whose run has closed everything it writes (checkpoints, metrics,
    TensorBoard, the process group), without the interpreter's teardown. That teardown
    destroys what gloo's and DeepSpeed's C++ threads still hold, and now and then aborts
    ("terminate called without an active exception", SIGABRT) after a run that finished and
    saved: the launcher would then report a crash and ask for a --resume there is no need for
    (seen twice in this project's tests on a loaded 2-core machine: a ZeRO-3 run of two
    processes and a two-node run, each after its last checkpoint)."""
    import logging  # only at the end

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken pipe: nothing more can be said there
    os._exit(code)
