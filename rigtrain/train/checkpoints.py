"""Checkpoints: DeepSpeed's own format, one tag per step, plus what DeepSpeed does not keep
(each rank's RNG states). A tag counts as complete only once every rank has written its part
and rank 0 has written `complete.json`; resume only ever picks a complete one."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

COMPLETE = "complete.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        if path.is_dir() and path.name.startswith("step") and (path / COMPLETE).is_file():
            found.append((json.loads((path / COMPLETE).read_text())["step"], path.name))
    return sorted(found)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rank_state(tag_dir: Path, rank: int) -> None:
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")


def load_rank_state(tag_dir: Path, rank: int) -> None:
    path = tag_dir / f"rng_rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this checkpoint was written by a run with fewer processes; "
                                "resume with the same number of processes")
    set_rng_state(torch.load(path, weights_only=False))


def mark_complete(tag_dir: Path, step: int) -> None:
    tmp = tag_dir / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"step": step}))
    tmp.replace(tag_dir / COMPLETE)


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than
    the newest complete one (left by a crash mid-save)."""
    complete = complete_tags(ckpt_dir)
    keep_tags = {tag for _, tag in complete[-keep:]}
    newest = complete[-1][0] if complete else -1
    removed = []
    for path in ckpt_dir.iterdir():
        if not (path.is_dir() and path.name.startswith("step")) or path.name in keep_tags:
            continue
        is_complete = (path / COMPLETE).is_file()
        if is_complete or int(path.name[4:]) < newest:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed
