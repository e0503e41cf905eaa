"""A counter line ("wrote 40/120 videos") that reads well on a terminal and in a log.

On a terminal the line is rewritten in place with a carriage return. Piped into a file or
a CI log, carriage returns pile every update onto one unreadable line, so there the counter
prints a plain line at each tenth of the way and at the end. At the bottom of the house:
imports nothing from rigtrain."""

from __future__ import annotations

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
