"""torch.profiler over a few steps of a run, with the data loader on the same timeline.

The trainer marks its phases with `span()` (record_function ranges named rigtrain/...).
Loader threads are outside the profiler's reach (its state is per thread), so their
reads are timed here and written into the trace as their own rows after the profiler
saves it: the trace then shows, side by side, the train loop waiting on a batch and the
threads that were (or were not) reading it."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from rigtrain.config.schema import ProfileConfig


class LoaderTimeline:
    """Each batch a loader thread read or decoded: (thread, start_ns, end_ns, clips), in
    wall-clock nanoseconds (the clock Kineto's trace timestamps are based on). Closed once
    the profile's trace is saved: a long run with a profile at its start keeps no record of
    every batch after it."""

    def __init__(self, kind: str):
        self.kind = kind  # "read" (shards) or "decode" (raw videos)
        self._events: list[tuple[str, int, int, int]] = []
        self._lock = threading.Lock()
        self._closed = False

    def record(self, start_ns: int, end_ns: int, clips: int) -> None:
        with self._lock:
            if not self._closed:
                self._events.append((threading.current_thread().name, start_ns, end_ns, clips))

    def between(self, start_ns: int, end_ns: int) -> list[tuple[str, int, int, int]]:
        with self._lock:
            return [e for e in self._events if e[2] >= start_ns and e[1] <= end_ns]

    def close(self) -> None:
        with self._lock:
            self._closed, self._events = True, []


def timed(function, timeline: LoaderTimeline):
    """function(indices) -> batch, with each call recorded on the timeline."""

    def wrapper(indices):
        start = time.time_ns()
        batch = function(indices)
        timeline.record(start, time.time_ns(), len(indices))
        return batch

    return wrapper


@contextmanager
def _without_kineto_probe_lines():
    """Kineto (torch 2.13) writes "USDT:... profiler_start" and "... profiler_stop" to the
    process's stderr as a trace starts and stops: probe markers, not messages. Its log level
    cannot hide them without hiding its errors too, so stderr is caught while the profiler
    changes state, and everything else written meanwhile is passed on."""
    caught = None
    try:
        caught = tempfile.TemporaryFile()
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no room for a temp file, or no stderr: shown rather than lost
        if caught is not None:
            caught.close()
        yield
        return
    with caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().splitlines(keepends=True)
            kept = b"".join(line for line in lines if not line.startswith(b"USDT:"))
            while kept:  # where they were going
                kept = kept[os.write(2, kept) :]


class StepProfiler:
    """A torch.profiler schedule over optimizer steps: skip profile.start_step, then
    wait / warmup / active once. Traces go to tb/profile/ through tensorboard_trace_handler
    (what the torch-tb-profiler plugin reads), with the loader rows added."""

    def __init__(self, config: ProfileConfig, trace_dir: Path, *, rank: int, cuda: bool, timeline: LoaderTimeline):
        from torch.profiler import ProfilerActivity, profile, schedule  # heavy: only while a profile records

        self.trace_dir, self.rank, self.timeline = Path(trace_dir), rank, timeline
        self.trace_path: Path | None = None
        self.trace_events: list[dict] | None = None  # the saved trace's, kept for its analysis
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.profiler = profile(
            activities=activities,
            schedule=schedule(
                skip_first=config.start_step, wait=config.wait, warmup=config.warmup, active=config.active, repeat=1
            ),
            on_trace_ready=self._save,
            record_shapes=config.record_shapes,
            with_stack=config.with_stack,
            profile_memory=config.profile_memory,
        )
        with _without_kineto_probe_lines():
            self.profiler.start()

    def step(self) -> None:
        with _without_kineto_probe_lines():
            self.profiler.step()

    def stop(self) -> None:
        with _without_kineto_probe_lines():
            self.profiler.stop()

    def _save(self, prof) -> None:
        from torch.profiler import tensorboard_trace_handler  # heavy: only while a profile records

        worker = f"rank{self.rank}"
        before = set(self.trace_dir.glob(f"{worker}.*.pt.trace.json"))
        tensorboard_trace_handler(str(self.trace_dir), worker_name=worker)(prof)
        written = sorted(set(self.trace_dir.glob(f"{worker}.*.pt.trace.json")) - before)
        if written:
            self.trace_path = written[-1]
            self.trace_events = add_loader_rows(self.trace_path, self.timeline)
        self.timeline.close()  # the schedule records once (repeat=1): nothing will read it again


def add_loader_rows(path: Path, timeline: LoaderTimeline) -> list[dict]:
    """The loader threads' batches as rows of the trace (one row per thread), within the
    traced window. Returns the trace's events, so that the analysis need not read back
    what was just written (a few seconds for a large model's trace)."""
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    base = int(trace.get("baseTimeNanoseconds", 0))
    stamps = [e["ts"] for e in events if e.get("ph") == "X" and "ts" in e]
    if not stamps:
        return events
    start_ns, end_ns = base + int(min(stamps) * 1000), base + int(max(stamps) * 1000)
    pid = next((e["pid"] for e in events if e.get("ph") == "X" and isinstance(e.get("pid"), int)), os.getpid())
    threads: dict[str, int] = {}
    for name, start, end, clips in timeline.between(start_ns, end_ns):
        tid = threads.setdefault(name, 900_000 + len(threads))
        events.append(
            {
                "ph": "X",
                "cat": "user_annotation",
                "name": f"rigtrain/loader_{timeline.kind}",
                "pid": pid,
                "tid": tid,
                "ts": (start - base) / 1000,
                "dur": (end - start) / 1000,
                "args": {"clips": clips, "thread": name},
            }
        )
    for name, tid in threads.items():
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": f"loader {name}"}})
    path.write_text(json.dumps(trace))
    return events


@contextmanager
def span(name: str):
    """A phase of the train step, on the profiler's timeline (nearly free when no profiler
    is running)."""
    with torch.profiler.record_function(f"rigtrain/{name}"):
        yield
