"""What a card really holds beside torch's allocator, measured after a run's first step and
kept for the next plan on the same card (docs/planner.md, "The memory model").

The plan's room outside the allocator (CUDA context and libraries, NCCL, the profiler's
buffers) is a set of published and once-measured figures. After the first step a GPU run
knows the real sum on its card: what NVML counts as used, less what torch's allocator
reserved. That residual is kept in RIGTRAIN_CACHE/memory/, one file per card model,
driver, torch build and kind of run (NCCL or not, profiling or not, lazy module loading or
not), and a later plan for the same card uses it in place of the figures."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import xxhash

from rigtrain.files import write_json


def run_kind(*, card: str, software: dict | None, world: int, profiling: bool, lazy_loading: bool) -> dict:
    """What the residual depends on: the card model, the driver, torch and its CUDA build
    (their kernels fill the context), NCCL's buffers (several processes), the profiler's."""
    software = software or {}
    return {
        "card": card,
        "driver": software.get("driver"),
        "torch": software.get("torch"),
        "nccl": world > 1,
        "profiling": profiling,
        "lazy_loading": lazy_loading,
        # measured without what the card held before the run (since 2026-12-08): a record
        # from before, which counted a desktop's memory too, is not used
        "measured": "own",
    }


def records_dir() -> Path:
    from rigtrain.data.embedded import cache_root  # the cache folder the datasets and step peaks use

    return cache_root() / "memory"


def _path(kind: dict) -> Path:
    key = json.dumps(kind, sort_keys=True)
    return records_dir() / f"{xxhash.xxh3_64_hexdigest(key.encode())}.json"


def remember(kind: dict, outside_gib: float, run_dir: Path) -> None:
    """Keep the first steps' measured residual for this kind of run (best effort: a cache that
    cannot be written costs the next plan its measurement, nothing more)."""
    record = {
        "kind": kind,
        "outside_allocator_gib": round(outside_gib, 3),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": str(run_dir),
    }
    try:
        path = _path(kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
    except OSError:
        pass


def recalled(kind: dict) -> dict | None:
    """The record kept for exactly this kind of run, or None."""
    try:
        record = json.loads(_path(kind).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("kind") != kind:
        return None
    value = record.get("outside_allocator_gib")
    return record if isinstance(value, (int, float)) and 0 < value < 1024 else None
