"""Where a tune keeps each trial, and how the ranks' outcomes of one trial become its
record: light (no torch), for the driver and the workers alike."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

LEAKED_EXIT = 3  # a worker kept memory a torn-down trial should have freed: start a fresh group
# Two measurements of the same configuration in one tune differ by a few percent (3 s
# windows on a shared machine): a configuration must beat the plan's own choice by more
# than this to replace it, and a trial is stopped early only when it trails by more.
NOISE_MARGIN = 0.03
# A trial's window is timed in chunks of about this long, each ending on a synchronisation
# the ranks agree on (its slowest rank's time counts), so a trial can stop between chunks.
CHUNK_S = 0.25
# Racing (docs/tune.md, "Stopping early"): a trial whose every chunk so far, at least this
# many, ran slower than the fastest finished trial of its round by more than the noise
# margin stops there. It cannot be chosen, and the rest of its window would only measure
# by how much it loses. Its fastest chunk is what is compared, so noise and the batches the
# loader prefetched during the warm-up both count in its favour.
RACE_MIN_CHUNKS = 3
# ... and one that trails by more than RACE_CLEAR_MARGIN in every chunk stops after
# RACE_CLEAR_CHUNKS: three noise margins are past what two chunks of one configuration
# differ by here (the demo's halved micro-batches trail by 10-50%).
RACE_CLEAR_MARGIN = 0.10
RACE_CLEAR_CHUNKS = 2


@dataclasses.dataclass
class Timing:
    trial_timeout_s: float
    # The first step of a trial allocates, starts the loader (and NCCL, cuDNN's choices):
    # the second runs as every later one (on this CPU the demo's first step takes 1.3-1.7x a
    # later one, its second 1.0x). torch.compile compiles in the first and may recompile in
    # the second (the optimizer's first step changes what its guards see).
    warmup_steps: int = 1
    compiled_warmup_steps: int = 2
    timed_s: float = 3.0  # the timed window per trial, in whole steps
    min_steps: int = 3
    max_steps: int = 200


def trial_dir(tune_dir: Path, index: int) -> Path:
    return tune_dir / "trials" / f"{index:03d}"


def read_result(tune_dir: Path, index: int) -> dict | None:
    """A trial's record (result.json), or None while it has none."""
    try:
        return json.loads((trial_dir(tune_dir, index) / "result.json").read_text())
    except (OSError, ValueError):
        return None


def read_started(tune_dir: Path, index: int) -> float | None:
    """When a trial began (started.json), or None before it did."""
    try:
        return json.loads((trial_dir(tune_dir, index) / "started.json").read_text())["time"]
    except (OSError, ValueError, KeyError):
        return None


def rank_failures(tune_dir: Path, index: int) -> list[dict]:
    """The failures single ranks wrote for a trial (rank-R.json), each with when it was written."""
    out = []
    for path in trial_dir(tune_dir, index).glob("rank-*.json"):
        try:
            out.append({**json.loads(path.read_text()), "at": path.stat().st_mtime})
        except (OSError, ValueError):
            pass  # being written: read it next time
    return out


def combine(outcomes: list[dict]) -> dict:
    """Every rank's outcome as one record: failed if any rank failed (naming which), else
    the slowest rank's time and data wait and the largest peak."""
    failed = [o for o in outcomes if o["status"] != "ok"]
    if failed:
        status = "oom" if any(o["status"] == "oom" for o in failed) else "failed"
        return {
            "status": status,
            "ranks": sorted(o["rank"] for o in failed),
            "error": failed[0]["error"],
        }
    slowest = max(outcomes, key=lambda o: o["seconds"])
    raced = {k: slowest[k] for k in ("raced_out", "against", "bar_clips_per_s") if k in slowest}
    return {
        "status": "ok",
        "seconds": slowest["seconds"],
        "steps": slowest["steps"],
        "clips_per_step": slowest["clips_per_step"],
        **raced,
        "data_wait_s": max(o["data_wait_s"] for o in outcomes),
        "warmup_s": max(o["warmup_s"] for o in outcomes),
        "peak_gib": max(o["peak_gib"] for o in outcomes),
        "reserved_gib": max(o["reserved_gib"] for o in outcomes),
    }


def window_verdict(
    chunks: list[tuple[int, float]],
    clips_per_step: int,
    timed_s: float,
    min_steps: int,
    max_steps: int,
    bar: float | None,
) -> str | None:
    """After a chunk of a trial's window ((steps, seconds) each): "done" when the window is
    full, "raced out" when the trial trails `bar` (clips/s) in every chunk, else None (go on)."""
    steps, seconds = sum(n for n, _ in chunks), sum(s for _, s in chunks)
    if steps >= max_steps or (seconds >= timed_s and steps >= min_steps):
        return "done"
    if bar and len(chunks) >= RACE_CLEAR_CHUNKS:
        fastest = max(n * clips_per_step / max(s, 1e-9) for n, s in chunks)
        needed = RACE_CLEAR_CHUNKS if fastest < bar * (1 - RACE_CLEAR_MARGIN) else RACE_MIN_CHUNKS
        if len(chunks) >= needed and fastest < bar * (1 - NOISE_MARGIN):
            return "raced out"
    return None


def next_chunk_steps(chunks: list[tuple[int, float]], max_steps: int) -> int:
    """The steps of the next chunk: one to start with (it sizes the rest), then about CHUNK_S."""
    steps = sum(n for n, _ in chunks)
    if not chunks:
        return 1
    per_step = sum(s for _, s in chunks) / steps
    return max(1, min(max_steps - steps, round(CHUNK_S / max(per_step, 1e-9))))


def finished_speed(record: dict | None) -> float | None:
    """Clips/s of a trial that ran its whole window, else None (failed, not run, stopped early)."""
    if not record or record.get("status") != "ok" or record.get("raced_out") or "clips_per_step" not in record:
        return None
    return record["clips_per_step"] * record["steps"] / record["seconds"]


def round_leader(records: dict[int, dict]) -> tuple[int, float] | None:
    """(trial, clips/s) of the fastest finished trial among `records` (trial -> result),
    the bar a later trial of the same round races against; a trial stopped early never is."""
    speeds = {index: speed for index, r in records.items() if (speed := finished_speed(r)) is not None}
    if not speeds:
        return None
    best = max(speeds, key=speeds.get)
    return best, speeds[best]


def outcome_words(candidate, result: dict) -> str:
    if result["status"] == "ok":
        clips = clips_per_step(candidate) * result["steps"] / result["seconds"]
        wait = result["data_wait_s"] / result["seconds"]
        words = f"{clips:.1f} clips/s, {wait:.0%} waiting for data, peak {result['peak_gib']:.2f} GiB"
        if result.get("raced_out"):
            words += f"; {raced_out_words(result)}"
        return words
    ranks = result.get("ranks")
    on = f" on rank {', '.join(map(str, ranks))}" if ranks else ""
    return f"{result['status']}{on}: {result.get('error', '')}"


def clips_per_step(candidate) -> int:
    v = candidate.values
    return v["train.micro_batch_size"] * v["train.grad_accum_steps"] * candidate.world


def raced_out_words(result: dict) -> str:
    return (
        f"stopped after {result['steps']} steps, slower in each than trial {result['against']} "
        f"({result['bar_clips_per_s']:.1f})"
    )
