"""A counter line ("wrote 40/120 videos") that reads well on a terminal and in a log,
output that outlives its terminal and is kept in a file beside it, child processes' output
passed on as one's own, and a child process that does not outlive its parent.

On a terminal the line is rewritten in place with a carriage return. Piped into a file or
a CI log, carriage returns pile every update onto one unreadable line, so there the counter
prints a plain line at each tenth of the way and at the end. At the bottom of the house:
imports nothing from rigtrain."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

STEPS_WHEN_LOGGED = 10  # lines a counter prints when its stream is not a terminal


def counter(describe: Callable[[int, int], str], stream: TextIO | None = None) -> Callable[[int, int], None]:
    """A `progress(done, total)` callback that shows `describe(done, total)` on `stream`
    (stdout when None): in place on a terminal, every tenth and the last when logged; the
    last call (done == total) ends the line."""
    out = stream or sys.stdout
    in_place = out.isatty()
    shown_tenth = -1

    def show(done: int, total: int) -> None:
        nonlocal shown_tenth
        finished = done >= total
        if in_place:
            print(f"\r{describe(done, total)}", end="\n" if finished else "", file=out, flush=True)
            return
        tenth = done * STEPS_WHEN_LOGGED // max(total, 1)
        if tenth > shown_tenth or finished:
            shown_tenth = STEPS_WHEN_LOGGED if finished else tenth
            print(describe(done, total), file=out, flush=True)

    return show


PENDING_MAX = 1 << 16  # characters of an unended line held for the copy before they are written anyway
GONE = (errno.EIO, errno.EPIPE, errno.ENXIO)  # a terminal hung up, a pipe's reader gone


class OutlivesItsReader:
    """A text stream (stdout, stderr) whose writes stop failing once no one reads them: a
    closed terminal or a dropped ssh session (EIO), a pipe whose reader has exited (EPIPE,
    `rigtrain train | head`). The first such failure sends the stream to the null device,
    and the program goes on: a run still finishes its step and saves it (the record is in
    the run folder, not in what it printed), where the failing print would have ended it."""

    def __init__(self, stream):
        self._stream = stream
        self._copy: LineCopy | None = None  # copy_output_to: where whole lines also go
        self._pending = ""  # the start of a line not yet ended, for the copy

    def write(self, text: str) -> int:
        copy = self._copy  # once: another thread may end the copy meanwhile
        if copy is not None:
            with copy.lock:  # threads print too (telemetry's warnings)
                if self._copy is copy:  # not ended while this thread waited for the lock
                    self._copy_lines(copy, text)
        try:
            return self._stream.write(text)
        except OSError as err:
            return self._lost(err, len(text))

    def _copy_lines(self, copy: LineCopy, text: str) -> None:
        self._pending += text
        if "\n" in self._pending:
            lines, self._pending = self._pending.rsplit("\n", 1)
            copy.append(lines)
        if "\r" in self._pending:  # a counter rewritten in place: only its last state shows
            self._pending = self._pending[self._pending.rfind("\r") :]
        if len(self._pending) > PENDING_MAX:  # a line that never ends is kept in pieces
            copy.append(self._pending)
            self._pending = ""

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            self._lost(err, 0)

    def _lost(self, err: OSError, written: int) -> int:
        if err.errno not in GONE:
            raise err
        nowhere = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(nowhere, self._stream.fileno())  # for C code and child processes writing there too
        except (OSError, ValueError, AttributeError):
            pass
        finally:
            os.close(nowhere)
        # The old stream still holds the text it could not write; kept open (not collected),
        # since closing it would close the descriptor others write to
        self._gone, self._stream = self._stream, open(os.devnull, "w")
        return written

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def say_from_a_signal_handler(line: str) -> None:
    """line on stderr and in its copy (copy_output_to), from a signal handler: straight to
    the descriptor, since the handler may have interrupted this thread mid-write in the
    buffered stream, which cannot be entered twice (the copy's lock can). Never fails: a
    terminal gone costs the line, not the stop."""
    try:
        os.write(2, f"{line}\n".encode())
    except OSError:
        pass
    keep_in_the_copy(line)


def keep_in_the_copy(line: str) -> None:
    """line in this process's copy of its output (copy_output_to) only, not on the terminal:
    a detail for the log that would only crowd the screen. Nothing where there is no copy."""
    stream = sys.stderr
    copy = stream._copy if isinstance(stream, OutlivesItsReader) else None
    if copy is not None:
        with copy.lock:
            copy.append(line)


def outlive_the_terminal() -> None:
    """stdout and stderr as OutlivesItsReader, once per process."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, OutlivesItsReader):
            setattr(sys, name, OutlivesItsReader(stream))


class LineCopy:
    """Lines appended to a file as a terminal shows them: a counter rewritten in place with
    carriage returns leaves its last state only. Each write is whole lines through one
    O_APPEND write(2), so the lines of several processes copying to one file (a launcher
    and its ranks) do not cut into each other. The copy must never stop what it copies: the
    first failure to write (a full disk, a folder gone) ends the copy, not the program."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.RLock()  # reentrant: a signal handler that prints mid-write
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, lines: str) -> None:
        if self.fd is None:
            return
        shown = [next((part for part in reversed(line.split("\r")) if part), "") for line in lines.split("\n")]
        try:
            os.write(self.fd, ("\n".join(shown) + "\n").encode("utf-8", "replace"))
        except OSError:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def command_header() -> str:
    """The line that starts a command's part of a log it appends to (RUN_DIR/train.log,
    tune.log, sweep.log): when, what and where."""
    command = shlex.join(["rigtrain", *sys.argv[1:]])
    return f"=== {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {command} (process {os.getpid()} on {socket.gethostname()})"


@contextlib.contextmanager
def copy_output_to(path: Path, header: str | None = None) -> Iterator[LineCopy | None]:
    """Within it, every line this process writes to stdout and stderr (its own, Python's
    warnings and tracebacks; not what C libraries write to the descriptors) is also
    appended to path, after header if given: where they are OutlivesItsReader, as the
    program's entry points make them (outlive_the_terminal). Where this process already
    copies to path (a rank run inside the launcher's process), nothing more. Yields the
    copy, or None where path cannot be opened (then nothing is copied, and nothing fails)."""
    path = Path(path).absolute()
    streams = [s for s in (sys.stdout, sys.stderr) if isinstance(s, OutlivesItsReader)]
    if any(s._copy is not None and s._copy.path == path for s in streams):
        yield None
        return
    try:
        copy = LineCopy(path)
    except OSError:
        yield None
        return
    if header:
        copy.append(header)
    before = [(s, s._copy, s._pending) for s in streams]
    for stream in streams:
        stream.flush()
        stream._copy, stream._pending = copy, ""
    try:
        yield copy
    finally:
        with copy.lock:  # no thread is mid-line in the copy while it ends
            for stream, earlier, pending in before:
                if stream._pending:  # a line left unended: kept as it stands
                    copy.append(stream._pending)
                stream._copy, stream._pending = earlier, pending
            copy.close()


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def terminate_with_parent() -> None:
    """preexec_fn of a child that must get SIGTERM (and save, if it trains) when this process dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def die_with_parent(expected_parent: str | None) -> None:
    """In a child that must not outlive the process that started it (its pid in
    `expected_parent`): be killed when that process goes, however it goes, `kill -9`
    included; if it is already gone (it died before this line ran), exit now. Linux only;
    elsewhere, and without an expected parent, nothing."""
    if not expected_parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(expected_parent):
        os._exit(1)


@contextlib.contextmanager
def pausing_together(
    line: Callable[[int], str],
    on_continue: Callable[[float], None] | None = None,
    children: bool = True,
    elsewhere: tuple[Callable[[], None], Callable[[], None]] | None = None,
) -> Iterator[None]:
    """Ctrl-Z (SIGTSTP) pauses this process and every process under it, and `fg` or `bg`
    (SIGCONT) continues them all.

    Training ranks, sweep trials and their loader processes each run in a session of their
    own, so that a fault or a signal meant for one is handled by the process that watches
    them; the terminal's Ctrl-Z therefore reaches only this process, and without this the
    ranks trained on, holding their GPUs, behind a shell that said "Stopped". Here each
    process under this one gets SIGSTOP (uncatchable: a rank in the middle of a step stops
    where it is), then this one stops itself with SIGSTOP too: SIGTSTP's default, the polite
    stop, is discarded by the kernel in a process group with no parent in its session (a
    sweep's trial), so it would not always stop. `line(n)` is said when n processes were
    paused; `on_continue(seconds paused)` runs once they go on. With children=False only this
    process stops (line(n) then names the n processes that go on: a tune's workers, whose
    measurements would count a pause as slowness). `elsewhere`, (pause, go on): what
    pauses and continues processes that are not under this one (a multi-node run's workers,
    reached through pdsh), run before this process stops and after it continues. In the
    main thread only (a signal handler's home), and not where SIGTSTP was started ignored."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTSTP) == signal.SIG_IGN:
        yield
        return

    def pause(signum, frame) -> None:
        import psutil  # only on a Ctrl-Z

        stopped: dict[int, psutil.Process] = {}
        try:  # whatever fails here (a /proc that cannot be read), the pause is not a traceback
            if elsewhere is not None:
                elsewhere[0]()
            for _ in range(2 if children else 0):  # again, for a child started while the first ones stopped
                for child in psutil.Process().children(recursive=True):
                    if child.pid not in stopped:
                        with contextlib.suppress(psutil.Error):
                            child.send_signal(signal.SIGSTOP)  # psutil checks the pid is still that process
                            stopped[child.pid] = child
            below = len(stopped) if children else len(psutil.Process().children(recursive=True))
            say_from_a_signal_handler(line(below))
        except Exception:  # noqa: BLE001  (see above)
            pass
        paused_at = time.monotonic()
        try:
            os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            # Here once continued (`fg`, `bg`, `kill -CONT`), and also where a stop signal that
            # came with the continue raises in its handler (a terminal closed under a stopped
            # job gets SIGHUP, then SIGCONT): the processes below must go on to hear it.
            for child in stopped.values():
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signal.SIGCONT)
            if elsewhere is not None:
                with contextlib.suppress(Exception):
                    elsewhere[1]()
        if on_continue is not None:
            on_continue(time.monotonic() - paused_at)

    previous = signal.signal(signal.SIGTSTP, pause)
    try:
        yield
    finally:
        signal.signal(signal.SIGTSTP, previous)
