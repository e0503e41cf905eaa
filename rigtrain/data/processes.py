"""Worker processes for data preparation: each decodes whole videos (their pictures go to
part files, data/ingest.py), results come back in order."""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from rigtrain.errors import UserError

# Workers that die before any job finishes, even alone, are not a damaged file's doing
NONE_FINISH = (
    "data preparation worker processes die before they finish a single video, even one alone: "
    'calling prepare() from your own script, put the call under `if __name__ == "__main__":`, '
    "since each worker starts by importing that script; else the kernel may be killing them for "
    "memory (fewer --workers need less)"
)
_CRASHED = object()


def in_order(function, jobs: list, workers: int, crashed, isolate: bool = False):
    """function(job) for every job, results in order, at most 2 x workers of them waiting
    (pool.map would decode every video ahead, and fill the disk with their parts). In
    worker processes when workers > 1 or isolate, else here. A job whose process dies (a
    decoder's segfault on a damaged file, the kernel's OOM killer) is run again alone with
    the others in flight then; one that dies alone too has crashed(job) for its result,
    and the jobs after it go on."""
    if workers <= 1 and not isolate:
        yield from map(function, jobs)
        return
    # Not fork (Linux's default before Python 3.14): this process may hold threads by now
    # (torch's, a loader's, the caller's) and a forked child inherits their locks held;
    # most likely what killed a worker in the suite under Python 3.12 ("terminated abruptly").
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    remaining, pending, finished, crashes = deque(jobs), deque(), 0, 0
    while remaining:
        try:
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                while remaining or pending:
                    while remaining and len(pending) < 2 * workers:
                        future = pool.submit(function, remaining[0])  # a broken pool refuses: the job stays
                        pending.append((remaining.popleft(), future))
                    result = pending[0][1].result()
                    pending.popleft()
                    finished += 1
                    yield result
        except BrokenProcessPool:
            while pending:  # which of them killed its process: each alone
                job = pending.popleft()[0]
                result = _alone(function, job, context)
                if result is _CRASHED:
                    crashes += 1
                    if crashes >= 2 and not finished:
                        raise UserError(NONE_FINISH) from None
                    result = crashed(job)
                else:
                    finished += 1
                yield result


def _alone(function, job, context):
    """function(job) in a process of its own; _CRASHED when that process dies."""
    try:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(function, job).result()
    except BrokenProcessPool:
        return _CRASHED
