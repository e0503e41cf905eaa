"""Where a tune keeps each trial, and how the ranks' outcomes of one trial become its
record: light (no torch), for the driver and the workers alike."""

from __future__ import annotations

from pathlib import Path

LEAKED_EXIT = 3  # a worker kept memory a torn-down trial should have freed: start a fresh group


def trial_dir(tune_dir: Path, index: int) -> Path:
    return tune_dir / "trials" / f"{index:03d}"


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
    return {
        "status": "ok",
        "seconds": slowest["seconds"],
        "steps": slowest["steps"],
        "data_wait_s": max(o["data_wait_s"] for o in outcomes),
        "warmup_s": max(o["warmup_s"] for o in outcomes),
        "peak_gib": max(o["peak_gib"] for o in outcomes),
        "reserved_gib": max(o["reserved_gib"] for o in outcomes),
    }
