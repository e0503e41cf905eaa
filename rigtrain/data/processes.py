"""Worker processes for data preparation: each decodes whole videos (their pictures go to
part files, data/ingest.py), results come back in order."""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from rigtrain.errors import UserError

DIED = (
    "a data preparation worker process died before it finished: run it again, and it goes on from "
    "the last shard written (if the kernel killed it for memory, fewer --workers need less); "
    'calling prepare() from your own script, put the call under `if __name__ == "__main__":`, '
    "since each worker starts by importing that script"
)


def in_order(function, jobs: list, workers: int):
    """function(job) for every job, results in order, at most 2 x workers of them waiting
    (pool.map would decode every video ahead, and fill the disk with their parts)."""
    if workers <= 1:
        yield from map(function, jobs)
        return
    # Not fork (Linux's default before Python 3.14): this process may hold threads by now
    # (torch's, a loader's, the caller's) and a forked child inherits their locks held;
    # most likely what killed a worker in the suite under Python 3.12 ("terminated abruptly").
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            pending: deque = deque()
            for job in jobs:
                pending.append(pool.submit(function, job))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    except BrokenProcessPool:
        raise UserError(DIED) from None
