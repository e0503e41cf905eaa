"""Child processes' output passed on as the parent's own: the launcher's ranks, whose
stdout and stderr (Python's and their C libraries') reach its terminal and train.log line by
line, and whose faulthandler dumps reach train.log whole, each under the name of its rank."""

from __future__ import annotations

import codecs
import os
import select
import subprocess
import sys
import threading
import time

from rigtrain.terminal import PENDING_MAX, keep_in_the_copy

# Set for a child process whose output its parent passes on and copies (OutputRelay): the
# child makes no copy of its own, which would keep each of its lines twice.
OUTPUT_RELAYED = "RIGTRAIN_OUTPUT_RELAYED"


# Set for a child started by OutputRelay.start: the descriptor its faulthandler writes to
STACKS_FD = "RIGTRAIN_STACKS_FD"
# A faulthandler dump ends when its pipe is quiet this long: long beside the few milliseconds
# a dump takes, so that a rank held off a busy CPU in the middle of one is not cut in two.
STACKS_QUIET_S = 0.5


class OutputRelay:
    """Child processes' stdout and stderr (pipes), passed on as this process's own, so they
    reach its terminal and its copy (copy_output_to) together with its own lines. Through
    the pipes also comes what a child's C libraries write to the descriptors (NCCL's
    warnings, a C++ abort's line, a JIT build's compiler), which a copy made in the child's
    Python never sees. A line is passed on once it ends (or a counter's state, at its carriage
    return), so that several children's lines do not cut into each other; an unended line is
    passed on when its pipe closes, or in pieces of PENDING_MAX. The children's own Python
    output reaches the pipe at once only when they are unbuffered (PYTHONUNBUFFERED=1 in
    `child_env`)."""

    def __init__(self):
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # one whole line at a time on this process's streams

    @staticmethod
    def child_env(env: dict[str, str]) -> dict[str, str]:
        return {**env, OUTPUT_RELAYED: "1", "PYTHONUNBUFFERED": "1"}

    def start(self, command: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        """A child in a session of its own, its stdout and stderr passed on (watch), and a
        third pipe, STACKS_FD, for the Python stacks its faulthandler writes: those go into
        the copy only, each dump whole, under a line with `name` ("rank 1"). Written straight
        into one file, the dumps of two ranks that crash together (an NCCL watchdog aborts
        every rank) cut into each other line by line, and none said whose it was."""
        read, write = os.pipe()
        try:
            process = subprocess.Popen(
                command,
                env={**self.child_env(env), STACKS_FD: str(write)},
                start_new_session=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                pass_fds=(write,),
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        self.watch(process)
        thread = threading.Thread(target=self._keep_stacks, args=(read, name), daemon=True)
        thread.start()
        self._threads.append(thread)
        return process

    def watch(self, process) -> None:
        """process: a Popen started with stdout and stderr PIPE and bufsize=0."""
        for pipe, name in ((process.stdout, "stdout"), (process.stderr, "stderr")):
            thread = threading.Thread(target=self._pass_on, args=(pipe, name), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pass_on(self, pipe, name: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        try:
            while chunk := os.read(pipe.fileno(), 1 << 16):  # b"" once every writer has closed it
                pending += decoder.decode(chunk)
                # a line's end, or a counter's carriage return (its state shows as it changes)
                whole = max(pending.rfind("\n"), pending.rfind("\r")) + 1
                whole = whole or (len(pending) if len(pending) > PENDING_MAX else 0)
                if whole:
                    self._write(name, pending[:whole])
                    pending = pending[whole:]
        except OSError:
            pass  # the pipe broke: what it held is lost, not the run
        finally:
            pipe.close()
        pending += decoder.decode(b"", final=True)
        if pending:
            self._write(name, pending + "\n")

    def _keep_stacks(self, fd: int, name: str) -> None:
        """A dump is a burst of small writes: it is over when STACKS_QUIET_S pass without one
        (or the pipe closes), and is then kept whole, after a line naming whose it is."""
        try:
            while chunk := os.read(fd, 1 << 16):
                burst = [chunk]
                while chunk and select.select([fd], [], [], STACKS_QUIET_S)[0]:
                    chunk = os.read(fd, 1 << 16)
                    burst.append(chunk)
                text = b"".join(burst).decode("utf-8", "replace").rstrip("\n")
                with self._lock:
                    keep_in_the_copy(f"[rigtrain] {name}'s Python stacks (faulthandler):\n{text}")
                if not chunk:
                    break
        except OSError:
            pass  # the pipe broke: what it held is lost, not the run
        finally:
            os.close(fd)

    def _write(self, name: str, text: str) -> None:
        stream = getattr(sys, name)
        with self._lock:
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):
                pass  # this process's stream is gone (closed, or not an OutlivesItsReader)

    def drain(self, timeout_s: float = 5.0) -> None:
        """Wait until the children's pipes are read to their end: after the children have
        exited, so that their last lines come before what this process says next. A pipe
        that a grandchild still holds open is waited for at most timeout_s in all."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
