"""A counter line ("wrote 40/120 videos") that reads well on a terminal and in a log,
output that outlives its terminal, and a child process that does not outlive its parent.

On a terminal the line is rewritten in place with a carriage return. Piped into a file or
a CI log, carriage returns pile every update onto one unreadable line, so there the counter
prints a plain line at each tenth of the way and at the end. At the bottom of the house:
imports nothing from rigtrain."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
from collections.abc import Callable
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


GONE = (errno.EIO, errno.EPIPE, errno.ENXIO)  # a terminal hung up, a pipe's reader gone


class OutlivesItsReader:
    """A text stream (stdout, stderr) whose writes stop failing once no one reads them: a
    closed terminal or a dropped ssh session (EIO), a pipe whose reader has exited (EPIPE,
    `rigtrain train | head`). The first such failure sends the stream to the null device,
    and the program goes on: a run still finishes its step and saves it (the record is in
    the run folder, not in what it printed), where the failing print would have ended it."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            return self._lost(err, len(text))

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


def outlive_the_terminal() -> None:
    """stdout and stderr as OutlivesItsReader, once per process."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, OutlivesItsReader):
            setattr(sys, name, OutlivesItsReader(stream))


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
