"""Worker processes for data preparation: each decodes whole videos (their pictures go to
part files, data/ingest.py), results come back in order."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import select
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from rigtrain.errors import UserError

# Workers that die before any job finishes, even alone, are not a damaged file's doing
NONE_FINISH = (
    "data preparation worker processes die before they finish a single video, even one alone: "
    'calling prepare() from your own script, put the call under `if __name__ == "__main__":`, '
    "since each worker starts by importing that script; else the kernel may be killing them for "
    "memory (fewer --workers need less)"
)
_CRASHED = object()


def in_order(function, jobs: list, workers: int, crashed, isolate: bool = False, scratch=None):
    """function(job) for every job, results in order, at most 2 x workers of them waiting
    (pool.map would decode every video ahead, and fill the disk with their parts). In
    worker processes when workers > 1 or isolate, else here. A job whose process dies (a
    decoder's segfault on a damaged file, the kernel's OOM killer) is run again alone with
    the others in flight then; one that dies alone too has crashed(job) for its result,
    and the jobs after it go on. Results come back through files in a folder made in
    `scratch` (the system's temporary folder if None), removed at the end."""
    if workers <= 1 and not isolate:
        yield from map(function, jobs)
        return
    # Not fork (Linux's default before Python 3.14): this process may hold threads by now
    # (torch's, a loader's, the caller's) and a forked child inherits their locks held;
    # most likely what killed a worker in the suite under Python 3.12 ("terminated abruptly").
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    _start_helpers_deaf_to_a_hangup(context)
    remaining, pending, finished, crashes = deque(jobs), deque(), 0, 0
    results = tempfile.mkdtemp(prefix="rigtrain-results-", dir=scratch)
    try:
        while remaining:
            try:
                with _pool(workers, context) as pool:
                    while remaining or pending:
                        while remaining and len(pending) < 2 * workers:
                            # a broken pool refuses: the job stays
                            future = pool.submit(_result_in_file, function, remaining[0], results)
                            pending.append((remaining.popleft(), future))
                        result = _read_result(pending[0][1].result())
                        pending.popleft()
                        finished += 1
                        yield result
            except BrokenProcessPool:
                while pending:  # which of them killed its process: each alone
                    job = pending.popleft()[0]
                    result = _alone(function, job, context, results)
                    if result is _CRASHED:
                        crashes += 1
                        if crashes >= 2 and not finished:
                            raise UserError(NONE_FINISH) from None
                        result = crashed(job)
                    else:
                        finished += 1
                    yield result
    finally:
        shutil.rmtree(results, ignore_errors=True)


def _alone(function, job, context, results: str):
    """function(job) in a process of its own; _CRASHED when that process dies."""
    try:
        with _pool(1, context) as pool:
            return _read_result(pool.submit(_result_in_file, function, job, results).result())
    except BrokenProcessPool:
        return _CRASHED


def _result_in_file(function, job, folder: str) -> str:
    """In a worker: function(job), its result pickled into a file in `folder`, whose name is
    all that goes back through the pool's pipe. A worker killed while it sent a larger
    result (a Ctrl-C reaches every process of the group) left part of a message in the
    pipe, and the pool's thread reading it waited for the rest for ever, and the stopping
    command with it (seen once in 12 Ctrl-Cs); a name of a few hundred bytes goes through a
    pipe whole or not at all (PIPE_BUF)."""
    handle, path = tempfile.mkstemp(dir=folder, suffix=".pickle")
    with os.fdopen(handle, "wb") as f:
        pickle.dump(function(job), f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def _read_result(path: str):
    with open(path, "rb") as f:
        result = pickle.load(f)
    os.unlink(path)
    return result


def not_in_a_starting_worker() -> None:
    """A worker process that is starting imports the calling script (a fork server's or
    spawn's worker does), and a script without `if __name__ == "__main__":` calls prepare()
    again there. Fail at once in that worker, as multiprocessing itself does when such a
    worker starts a pool of its own: the workers die, and the calling process says what to
    do (NONE_FINISH). Without this the worker's prepare met the caller's lock first, said
    "another prepare is writing", and the script carried on."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError("prepare() was called by a worker process importing the calling script: " + NONE_FINISH)


@contextmanager
def _pool(workers: int, context):
    """A ProcessPoolExecutor whose workers end with this process, and end at once when the
    block is left by anything but a broken pool (see _stop_workers)."""
    with ProcessPoolExecutor(workers, mp_context=context, **_dying_with_this_process()) as pool:
        try:
            yield pool
        except BrokenProcessPool:
            raise
        except BaseException:
            _stop_workers(pool)
            raise


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the pool's workers now: this process is stopping (a SIGTERM, a Ctrl-C, an error
    in what takes the results, or the caller dropping them), and the pool's own exit would
    wait for every video in flight to finish decoding first, minutes for a long one.
    `_processes` is the executor's own table of its workers (no public way to them)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()


def _start_helpers_deaf_to_a_hangup(context) -> None:
    """Start multiprocessing's resource tracker and forkserver with SIGHUP ignored, which
    they inherit (and the workers the forkserver makes). A closed terminal sends SIGHUP to
    the whole process group: the tracker and the forkserver ignore SIGINT and SIGTERM but
    died of SIGHUP, and the prepare, stopping in order, then met a dead tracker: "process
    died unexpectedly, relaunching" and KeyError tracebacks under its one line. Both end on
    their own when this process does (their pipe from it closes), and the workers with it
    (_die_with) or when it stops them (_stop_workers)."""
    from multiprocessing import forkserver, resource_tracker  # the helpers themselves

    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None or threading.current_thread() is not threading.main_thread():
        return  # no SIGHUP here (Windows), or a handler can only be set in the main thread
    previous = signal.signal(hangup, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
        if context.get_start_method() == "forkserver":
            forkserver.ensure_running()
    finally:
        signal.signal(hangup, previous)


def _dying_with_this_process() -> dict:
    """ProcessPoolExecutor arguments that end its workers when this process ends, however it
    ends. Without them a `kill -9` (or the OOM killer, or a SIGTERM, whose default action
    is to end the process at once) of `rigtrain data prepare` left its workers, the
    forkserver and the resource tracker sleeping for ever, children of init: a worker holds
    both ends of the pipe it waits on, so it never reads an end of file, and they kept the
    command's stdout open, so a `| tee` after it never ended either."""
    return {"initializer": _die_with, "initargs": (os.getpid(),)}


def _die_with(parent: int) -> None:
    """In a worker: exit the moment `parent` has exited. A pidfd (Linux 5.3 and later) turns
    readable then, with no polling and no risk of a reused process id; elsewhere the
    process id is looked at once a second. And a Ctrl-C (SIGINT, sent to the whole process
    group) ends the worker at once and quietly, as the kernel ends a process by default:
    Python's KeyboardInterrupt printed a traceback from each worker it caught mid-job
    beside the command's one line, "interrupted"."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        handle = os.pidfd_open(parent)
    except ProcessLookupError:
        os._exit(1)  # gone already
    except (AttributeError, OSError):
        handle = None
    threading.Thread(target=_watch, args=(parent, handle), name="rigtrain-parent-watch", daemon=True).start()


def _watch(parent: int, handle: int | None) -> None:
    if handle is not None:
        select.select([handle], [], [])
    else:
        while _alive(parent):
            time.sleep(1.0)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, another user's (not ours, but alive)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
