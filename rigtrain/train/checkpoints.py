"""Checkpoints: DeepSpeed's own format, one tag per step, plus what DeepSpeed does not keep
(each rank's RNG states).

A tag counts as complete only once every rank has written its part and rank 0 has written
`complete.json`, which lists every file of the tag with its size and xxh3-64 checksum
(xxhash: several GB/s, so it costs a small part of the save). Resuming and `rigtrain eval`
take the newest complete tag whose files still match that list; one that does not (a
truncated file, flipped bytes, a damaged complete.json) is skipped with a one-line warning
naming the file, and the one before it is used. Only complete, matching checkpoints are
ever resumed, and pruning never removes the newest of them.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash

from rigtrain.files import sync_tree, write_json

COMPLETE = "complete.json"
HASH_CHUNK = 8 << 20


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def file_digest(path: Path) -> str:

    digest = xxhash.xxh3_64()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(tag_dir: Path) -> dict[str, dict]:
    """Every file of a tag (but complete.json): {name: {"bytes": size, "xxh3": digest}}."""
    return {
        p.relative_to(tag_dir).as_posix(): {"bytes": p.stat().st_size, "xxh3": file_digest(p)}
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


@dataclass
class Tag:
    step: int
    name: str
    files: dict | None  # None for a checkpoint from before complete.json listed its files


def _read_complete(tag_dir: Path) -> Tag:
    """The tag's record; ValueError when it is out of the shape `mark_complete` writes (an
    edited or damaged file counts as not complete, never as a traceback)."""
    record = json.loads((tag_dir / COMPLETE).read_text())
    step, files = record["step"], record.get("files")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError("its step is not a whole number")
    if files is not None and not (
        isinstance(files, dict)
        and all(
            isinstance(want, dict)
            and isinstance(want.get("bytes"), int)
            and not isinstance(want.get("bytes"), bool)
            and isinstance(want.get("xxh3"), str)
            for want in files.values()
        )
    ):
        raise ValueError("its list of files is out of shape")
    return Tag(step=step, name=tag_dir.name, files=files)


def last_complete_in_words(ckpt_dir: Path) -> str:
    """For a line about a failure: which checkpoint a --resume would start from."""
    tags = complete_tags(ckpt_dir)
    return f"the last complete checkpoint is step {tags[-1][0]}" if tags else "no checkpoint was complete yet"


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of checkpoints marked complete, oldest first (not yet verified: see
    `newest_good`). A complete.json that cannot be read counts as not complete."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        if path.is_dir() and path.name.startswith("step") and (path / COMPLETE).is_file():
            try:
                found.append((_read_complete(path).step, path.name))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return sorted(found)


def verify(tag_dir: Path) -> str | None:
    """None if the tag's files match its complete.json, else what is wrong, in words."""
    try:
        tag = _read_complete(tag_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{tag_dir / COMPLETE} cannot be read ({err if isinstance(err, ValueError) else type(err).__name__})"
    for name, want in (tag.files or {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} has {size:,} bytes where {want['bytes']:,} were written"
        if file_digest(path) != want["xxh3"]:
            return f"{path} does not match its checksum (its bytes changed after the save)"
    return None


def newest_good(ckpt_dir: Path, warn=print) -> tuple[int, str] | None:
    """The newest checkpoint that is complete and whose files match their checksums;
    each damaged one on the way is reported through `warn`, one line each. None if there
    is no checkpoint at all."""
    candidates = (
        [
            path
            for path in ckpt_dir.iterdir()
            if path.is_dir() and path.name.startswith("step") and (path / COMPLETE).exists()
        ]
        if ckpt_dir.is_dir()
        else []
    )
    for path in sorted(candidates, key=lambda p: p.name, reverse=True):
        problem = verify(path)
        if problem is None:
            return _read_complete(path).step, path.name
        warn(f"warning: checkpoint {path.name} is damaged and skipped: {problem}")
    return None


def damaged_only(ckpt_dir: Path) -> bool:
    """True when checkpoints were marked complete but none of them is usable."""
    return ckpt_dir.is_dir() and any((p / COMPLETE).exists() for p in ckpt_dir.iterdir() if p.is_dir())


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


def saved_ranks(tag_dir: Path) -> int:
    """How many processes wrote the checkpoint: each saved its RNG state."""
    return len(list(Path(tag_dir).glob("rng_rank*.pt")))


def load_rank_state(tag_dir: Path, rank: int, seed: int) -> bool:
    """This rank's RNG state as it was saved, or, for a rank the run did not have (a run
    resumed on more processes; complete.json's checksums vouch that no file of the
    checkpoint is missing), a stream of its own from the run's seed, the step and the rank.
    Returns whether the state was saved."""
    path = tag_dir / f"rng_rank{rank}.pt"
    if path.is_file():
        set_rng_state(torch.load(path, weights_only=False))
        return True
    step = json.loads((tag_dir / "trainer.json").read_text())["step"]
    fresh = (seed * 1_000_003 + step * 1_009 + rank) % 2**32
    torch.manual_seed(fresh)  # every device's generator too
    np.random.seed(fresh)
    random.seed(fresh)
    return False


def mark_complete(tag_dir: Path, step: int) -> int:
    """List the tag's files with their sizes and checksums in complete.json, written whole or
    not at all; returns the bytes the checkpoint holds. The files are on the disk before
    complete.json names them, and complete.json is before this returns (so before `prune`
    deletes an older checkpoint): after a power cut the newest checkpoint is whole or not
    marked complete, and the one before it is still there."""
    sync_tree(tag_dir)
    files = describe_files(tag_dir)
    write_json(tag_dir / COMPLETE, {"step": step, "files": files}, durable=True)
    return sum(f["bytes"] for f in files.values())


def checkpoint_bytes(ckpt_dir: Path) -> int:
    """The size of the newest complete checkpoint (0 if there is none): what the next save
    will need, about."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return 0
    tag = _read_complete(ckpt_dir / tags[-1][1])
    if tag.files:
        return sum(f["bytes"] for f in tag.files.values())
    return sum(p.stat().st_size for p in (ckpt_dir / tag.name).rglob("*") if p.is_file())


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than
    the newest complete one (left by a crash mid-save). The newest complete one is never
    deleted, whatever `keep` says."""
    complete = complete_tags(ckpt_dir)
    keep_tags = {tag for _, tag in complete[-max(1, keep) :]}
    newest = complete[-1][0] if complete else -1
    removed = []
    for path in ckpt_dir.iterdir():
        if not (path.is_dir() and path.name.startswith("step")) or path.name in keep_tags:
            continue
        is_complete = (path / COMPLETE).is_file()
        if is_complete or int(path.name[4:]) < newest:
            # complete.json first: a prune cut short leaves an incomplete tag (removed by the
            # next prune), never a "complete" one with files missing, called damaged on resume
            (path / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed
